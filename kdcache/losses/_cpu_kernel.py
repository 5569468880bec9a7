"""A compiled CPU kernel for the fused forward-KL + NLL loss of a small batch.

For a classifier's batch ([256, 10]: a few thousand values) the loss costs per operation,
not per value: about 30 torch or numpy calls of 2-5 us each, against a fused
cross-entropy of two. This module compiles one C function that checks and counts the
labels, then computes the loss and its gradient in one pass over the rows, the arithmetic
of :func:`kdcache.losses.divergences._DenseForwardKL` (see there for the formulas and
their NaN and -inf rules), and loads it with :mod:`ctypes`; :func:`kdcache.losses.kd_loss`
calls it (``kdcache.losses.kd._kernel_route``).

It is compiled once per process, on first use, with the C compiler ``$CC`` (else ``cc``
or ``gcc`` on ``PATH``), into a temporary directory that is removed once the library is
loaded: nothing is cached on disk, so nothing on disk has to be trusted, and ranks never
race for a file. It needs no Python headers and no torch headers (about 0.2 s). Without
a compiler, or with ``KDCACHE_CPU_KERNEL=0``, :func:`load` returns None and the loss takes
its torch route: the same value and gradient to float32 rounding (the kernel sums rows
in float64, so on wide rows of close distributions it is the more exact of the two).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

#: Set to "0" to never compile the kernel (the loss then takes its torch route).
ENV_SWITCH = "KDCACHE_CPU_KERNEL"

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Count the labelled rows of labels int64 [n] (those != ignore) and check that each is
 * in [0, v). Returns the count, or -1 - i for the first labelled row i outside. */
int64_t kdcache_count_labels(const int64_t *labels, int64_t n, int64_t v, int64_t ignore) {
    int64_t count = 0;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t y = labels[i];
        if (y == ignore) continue;
        if (y < 0 || y >= v) return -1 - i;
        ++count;
    }
    return count;
}

/* Fused forward KL(p || softmax(s / tau)) + NLL at temperature 1, and its gradient.
 * s, t: float32 [n, v] row-major (logits; teacher log-probabilities at tau).
 * labels: int64 [n] class ids (ignore: no label), or NULL for no NLL term.
 * g: float32 [n, v] out, d loss / d s (rows without a label get no NLL gradient).
 * The NLL weight is w_nll, or w_nll / max(1, labelled rows) when nll_per_count.
 * Row sums, the KL terms and the total are taken in double (a KL between close
 * distributions is a small difference of large sums). Returns w_kl * sum_i KL_i +
 * w_nll * sum_labelled NLL_i. status[0]: -1, or the first row whose label is outside
 * [0, v) (then nothing is written), or -2 when memory for [3 v] floats was refused. */
double kdcache_forward_kl_nll(const float *s, const float *t, const int64_t *labels,
                              int64_t n, int64_t v, double tau, double w_kl, double w_nll,
                              int64_t ignore, int64_t nll_per_count, float *g,
                              int64_t *status) {
    status[0] = -1;
    if (labels) {
        const int64_t count = kdcache_count_labels(labels, n, v, ignore);
        if (count < 0) {
            status[0] = -1 - count;
            return 0.0;
        }
        if (nll_per_count) w_nll /= (double)(count > 0 ? count : 1);
    }
    if (n == 0) return 0.0;
    float *scratch = (float *)malloc((size_t)(3 * (v > 0 ? v : 1)) * sizeof(float));
    if (!scratch) {
        status[0] = -2;
        return 0.0;
    }
    double loss = 0.0;
    float *e1 = scratch, *p = scratch + v, *b = scratch + 2 * v;
    const float tau_f = (float)tau, k = (float)(w_kl / tau), w_nll_f = (float)w_nll;
    for (int64_t i = 0; i < n; ++i) {
        const float *si = s + i * v, *ti = t + i * v;
        float *gi = g + i * v;
        const int64_t y = labels ? labels[i] : ignore;
        const int labelled = labels != NULL && y != ignore;
        /* the row max; NaN if the row holds one (as torch's amax) */
        float m = -INFINITY;
        int nan_in = 0;
        for (int64_t j = 0; j < v; ++j) {
            nan_in |= isnan(si[j]);
            m = si[j] > m ? si[j] : m;
        }
        if (nan_in) m = NAN;
        /* softmax(s / tau) unnormalised (into g), teacher p, softmax(s) unnormalised */
        double z = 0.0, sum1 = 0.0, mass = 0.0;
        for (int64_t j = 0; j < v; ++j) {
            const float a = si[j] - m;
            b[j] = a / tau_f;
            gi[j] = expf(b[j]);
            z += gi[j];
            p[j] = expf(ti[j]);
            mass += p[j];
            if (labelled) {
                e1[j] = expf(a);
                sum1 += e1[j];
            }
        }
        const double log_z = log(z);
        /* KL: NaN terms (0 * -inf where the teacher has no mass) are dropped, and the
         * partition and mass bring back a NaN of the row's inputs */
        double kl = 0.0;
        for (int64_t j = 0; j < v; ++j) {
            const double log_q = (double)b[j] - log_z;
            const double term = (double)p[j] * ((double)ti[j] - log_q);
            if (!isnan(term)) kl += term;
        }
        kl += 0.0 * log_z * mass;
        loss += kl * w_kl;
        const float scale = (float)(mass / z);
        for (int64_t j = 0; j < v; ++j) gi[j] = (gi[j] * scale - p[j]) * k;
        if (labelled) {
            loss += (log(sum1) + (double)m - (double)si[y]) * w_nll;
            const float c = (float)(w_nll / sum1);
            for (int64_t j = 0; j < v; ++j) gi[j] += e1[j] * c;
            gi[y] -= w_nll_f;
        }
    }
    free(scratch);
    return loss;
}

#ifdef __cplusplus
}
#endif
"""


class Kernel(NamedTuple):
    """The compiled functions (see the C source above), with their argument types set."""

    forward_kl_nll: Any
    count_labels: Any


_lock = threading.Lock()
_loaded: bool = False
_function: Kernel | None = None


def _compile() -> Kernel | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        log.info("no C compiler on PATH: kd_loss takes its torch route on the CPU")
        return None
    compiler = shlex.split(cc)  # CC may carry a launcher or flags ("ccache gcc")
    try:
        workdir = tempfile.mkdtemp(prefix="kdcache-kernel-")
        try:
            src = os.path.join(workdir, "kernel.c")
            lib = os.path.join(workdir, "kernel.so")
            with open(src, "w") as f:
                f.write(_SOURCE)
            # -O2, no -ffast-math: IEEE NaN and inf semantics are part of the loss's
            # contract; no contraction into FMA, so every platform rounds alike
            cmd = [*compiler, "-O2", "-fno-math-errno", "-ffp-contract=off", "-shared"]
            cmd += ["-fPIC", src, "-o", lib, "-lm"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
            if done.returncode != 0:
                log.info(
                    "compiling kd_loss's CPU kernel with %s failed; kd_loss takes its torch "
                    "route: %s",
                    cc,
                    done.stderr.strip()[-500:],
                )
                return None
            so = ctypes.CDLL(lib)
            fn, count = so.kdcache_forward_kl_nll, so.kdcache_count_labels
            log.debug("compiled kd_loss's CPU kernel with %s", cc)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)  # the loaded library stays mapped
    except Exception as err:  # any failure to build means: the torch route
        log.info("kd_loss's CPU kernel is unavailable (%r); kd_loss takes its torch route", err)
        return None
    vp, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    fn.restype = f64
    fn.argtypes = [vp, vp, vp, i64, i64, f64, f64, f64, i64, i64, vp, vp]
    count.restype = i64
    count.argtypes = [vp, i64, i64, i64]
    return Kernel(fn, count)


def load() -> Kernel | None:
    """The compiled kernel (see the C source above), or None when it
    is switched off (``KDCACHE_CPU_KERNEL=0``) or cannot be built here. Compiled on the
    first call in a process (thread-safe), then returned from memory."""
    global _loaded, _function
    if _loaded:
        return _function
    with _lock:
        if not _loaded:
            try:
                if os.environ.get(ENV_SWITCH, "1") != "0":
                    _function = _compile()
            finally:
                _loaded = True  # tried once per process, whatever happened
    return _function
