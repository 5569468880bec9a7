"""Sequence-level distillation data: teachers write continuations of prompts (greedy or
sampled) as a new token dataset.

Hugging Face causal LMs (a :class:`kdcache.Teacher` from ``Teacher.from_hf(...,
task="causal-lm")``, or the transformers module itself) are decoded with their key/value
cache: the prompts run once (prefill), then one token per step. Any other callable
``input_ids [B, T] -> logits [B, T, V]`` is rerun on the whole prefix at every step.

Shape legend: K teachers, B sequences, T tokens, V vocabulary.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch

from kdcache.data.tokens import TokenDataset, pad_batch
from kdcache.errors import ConfigError, DataError, TeacherOutputError
from kdcache.teachers.loaders import HFLogits
from kdcache.teachers.teacher import Teacher

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
GenerationTeacher = Teacher | torch.nn.Module | LogitsFn


# --------------------------------------------------------------------------------------
# One decoder per teacher: the prefix in, the next-token logits [B, V] out
# --------------------------------------------------------------------------------------


class _Recompute:
    """The no-cache fallback: ``fn`` reruns on the whole right-padded prefix each step."""

    def __init__(self, fn: LogitsFn, pad_token_id: int, name: str) -> None:
        self.fn = fn
        self.pad_token_id = pad_token_id
        self.name = name

    def _last(self, seqs: list[list[int]]) -> torch.Tensor:
        ids_BT = pad_batch([np.asarray(s) for s in seqs], self.pad_token_id)
        z = self.fn(ids_BT)
        if not isinstance(z, torch.Tensor) or z.dim() != 3 or z.shape[:2] != ids_BT.shape:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise TeacherOutputError(
                f"teacher {self.name}: a generating teacher returns next-token logits "
                f"[B, T, V] for input ids {tuple(ids_BT.shape)}, got {shape}; give a causal "
                "LM (e.g. Teacher.from_hf(..., task='causal-lm'))"
            )
        last_B = torch.tensor([len(s) - 1 for s in seqs])
        return z.float()[torch.arange(len(seqs)), last_B].cpu()

    def start(self, seqs: list[list[int]]) -> torch.Tensor:
        return self._last(seqs)

    def step(self, seqs: list[list[int]], new_B: torch.Tensor) -> torch.Tensor:
        return self._last(seqs)


class _KVCache:
    """Incremental decoding of a Hugging Face causal LM with its key/value cache.

    The prompts are left-padded, so every row's last token sits in the last column; the
    attention mask hides the padding and ``position_ids`` count from each row's first real
    token, so a row sees exactly the positions and context it has without padding. Each
    step feeds one token per row at the next position, with the cache of the earlier ones.

    Args:
        model: The transformers causal LM.
        pad_token_id: Tokens equal to it are masked, as :class:`HFLogits` masks them in
            the no-cache path (the padding itself is always masked); None masks padding only.
        vocab_size: Keep the first ``vocab_size`` logits, as :class:`HFLogits` does.
        autocast_dtype: Run under ``torch.autocast`` with this dtype, as ``Teacher.logits``.
        name: For messages.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        pad_token_id: int | None,
        vocab_size: int | None,
        autocast_dtype: torch.dtype | None,
        name: str,
    ) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.vocab_size = vocab_size
        self.autocast_dtype = autocast_dtype
        self.name = name
        params = inspect.signature(model.forward).parameters
        # transformers >= 5 names the cache argument ``cache``, earlier ``past_key_values``.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        # Only the last position's logits are needed after the prefill.
        self._keep: dict[str, int] = next(
            ({k: 1} for k in ("logits_to_keep", "num_logits_to_keep") if k in params), {}
        )
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._cache: Any = None
        self._mask_BT = torch.zeros(0, 0, dtype=torch.int64)
        self._pos_B = torch.zeros(0, dtype=torch.int64)

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _visible(self, ids: torch.Tensor) -> torch.Tensor:
        if self.pad_token_id is None:
            return torch.ones_like(ids)
        return (ids != int(self.pad_token_id)).long()

    def _run(self, ids_BT: torch.Tensor, pos_BT: torch.Tensor, **extra: Any) -> torch.Tensor:
        with self._autocast():
            out = self.model(
                input_ids=ids_BT.to(self.device),
                attention_mask=self._mask_BT.to(self.device),
                position_ids=pos_BT.to(self.device),
                use_cache=True,
                **{self._cache_arg: self._cache},
                **extra,
            )
        cache = getattr(out, "cache", None)
        self._cache = cache if cache is not None else getattr(out, "past_key_values", None)
        if self._cache is None:
            raise TeacherOutputError(
                f"teacher {self.name}: the model returned no key/value cache with "
                "use_cache=True; pass its logits function instead (the no-cache path)"
            )
        z_BV = out.logits[:, -1].float()
        if self.vocab_size is not None:
            if self.vocab_size > z_BV.shape[-1]:
                raise ConfigError(
                    f"teacher {self.name}: vocab_size {self.vocab_size} exceeds the model's "
                    f"logit dimension {z_BV.shape[-1]}; the tokenizer does not belong to it"
                )
            z_BV = z_BV[:, : self.vocab_size]
        return z_BV.cpu()

    def start(self, seqs: list[list[int]]) -> torch.Tensor:
        lens_B = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
        width = int(lens_B.max())
        ids_BT = torch.zeros(len(seqs), width, dtype=torch.int64)
        real_BT = torch.zeros(len(seqs), width, dtype=torch.int64)
        for b, s in enumerate(seqs):
            ids_BT[b, width - len(s) :] = torch.as_tensor(s, dtype=torch.int64)
            real_BT[b, width - len(s) :] = 1
        self._cache = None
        self._mask_BT = real_BT * self._visible(ids_BT)
        pos_BT = (torch.arange(width)[None, :] - (width - lens_B)[:, None]).clamp(min=0)
        self._pos_B = lens_B
        return self._run(ids_BT, pos_BT, **self._keep)

    def step(self, seqs: list[list[int]], new_B: torch.Tensor) -> torch.Tensor:
        # Rows already stopped are fed their drawn token too: the batch keeps one shape,
        # and a row never attends to another, so their outputs (ignored) change nothing.
        ids_B1 = new_B.to(torch.int64)[:, None]
        self._mask_BT = torch.cat([self._mask_BT, self._visible(ids_B1)], dim=1)
        out = self._run(ids_B1, self._pos_B[:, None])
        self._pos_B = self._pos_B + 1
        return out


def _hf_causal_lm(obj: Any) -> torch.nn.Module | None:
    """``obj`` if it is a transformers causal LM that can be stepped with a cache."""
    can_generate = getattr(obj, "can_generate", None)
    if not isinstance(obj, torch.nn.Module) or not callable(can_generate):
        return None
    config = getattr(obj, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or not can_generate():
        return None
    return obj


def _hf_config(teacher: Any) -> Any:
    """The transformers config behind a teacher, a bound ``Teacher.logits`` or a module."""
    owner = getattr(teacher, "__self__", teacher)  # a bound method: its object
    module = owner.module if isinstance(owner, Teacher) else owner
    if isinstance(module, HFLogits):
        module = module.model
    return getattr(module, "config", None) if isinstance(module, torch.nn.Module) else None


def _decoder(teacher: GenerationTeacher, pad_token_id: int, k: int) -> _Recompute | _KVCache:
    if isinstance(teacher, Teacher):
        name = repr(teacher.name)
        if isinstance(teacher.module, HFLogits) and _hf_causal_lm(teacher.module.model):
            return _KVCache(
                teacher.module.model,
                pad_token_id=teacher.module.pad_token_id,
                vocab_size=teacher.module.vocab_size,
                autocast_dtype=teacher.autocast_dtype,
                name=name,
            )
        if _hf_causal_lm(teacher.module):  # Teacher.from_module(hf_model): mask padding only
            return _KVCache(
                teacher.module,
                pad_token_id=None,
                vocab_size=None,
                autocast_dtype=teacher.autocast_dtype,
                name=name,
            )
        return _Recompute(teacher.logits, pad_token_id, name)
    model = _hf_causal_lm(teacher)
    if model is not None:
        name = f"{k} ({type(model).__name__})"
        return _KVCache(model, pad_token_id=None, vocab_size=None, autocast_dtype=None, name=name)
    if not callable(teacher):
        raise ConfigError(
            f"teacher {k} is a {type(teacher).__name__}; expected a kdcache.Teacher, a "
            "Hugging Face causal-LM module, or a function input_ids [B, T] -> logits [B, T, V]"
        )
    return _Recompute(teacher, pad_token_id, str(k))


def _check_context(teachers: Sequence[GenerationTeacher], prompts: TokenDataset, new: int) -> None:
    """Refuse, before any work, prompts + continuations longer than a teacher's context."""
    if len(prompts) == 0:
        return
    lengths = np.asarray(prompts.lengths)
    longest = int(lengths.max())
    for k, teacher in enumerate(teachers):
        config = _hf_config(teacher)
        found = [
            (a, getattr(config, a))
            for a in ("n_positions", "max_position_embeddings")
            if isinstance(getattr(config, a, None), int)
        ]
        if not found or longest + new <= found[0][1]:
            continue
        attr, context = found[0]
        owner = getattr(teacher, "__self__", teacher)
        name = repr(owner.name) if isinstance(owner, Teacher) else str(k)
        at = int(np.argmax(lengths))
        fixes = []
        if context > longest:
            fixes.append(f"lower max_new_tokens to at most {context - longest}")
        if context > new:
            fixes.append(f"shorten the prompts to at most {context - new} tokens")
        fix = " or ".join(fixes) or f"make prompt + max_new_tokens at most {context} tokens"
        raise ConfigError(
            f"teacher {name} has a context of {context} tokens (config {attr}), but the "
            f"longest prompt (sample_id {int(prompts.sample_ids[at])}) has {longest} tokens "
            f"and max_new_tokens={new} would make {longest + new}; {fix}"
        )


# --------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------


@torch.inference_mode()
def generate_continuations(
    teachers: Sequence[GenerationTeacher],
    prompts: TokenDataset,
    *,
    max_new_tokens: int,
    greedy: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
    eos_token_id: int | None = None,
    batch_size: int = 32,
    vocab_size: int | None = None,
    description: dict[str, Any] | None = None,
    num_shards: int | None = None,
) -> TokenDataset:
    """Teachers write continuations of prompts: the data of sequence-level distillation.

    At each step the next token is drawn from the ensemble's mean probability (mean of
    ``softmax(logits / temperature)`` over the teachers) at each sequence's last position:
    its arg-max with ``greedy``, else a sample from a ``torch.Generator`` seeded with
    ``seed``. A sequence stops at ``eos_token_id`` (kept) or after ``max_new_tokens``.
    The prompts keep their ``sample_id``; ``prompt_lengths`` of the result are the prompts'
    lengths, so the teacher stage caches targets for the generated tokens only.

    How each teacher runs:

    * a :class:`kdcache.Teacher` from ``Teacher.from_hf(..., task="causal-lm")``, or a
      Hugging Face causal-LM module itself: with its key/value cache. The batch's prompts
      run once, left-padded, with an attention mask over the padding and ``position_ids``
      counted from each prompt's first token; then one token per step. O(T) positions per
      sequence. The tokens are those of the no-cache path (same arg-max; same samples for
      the same seed), to floating-point rounding of the logits. A Teacher masks tokens
      equal to its ``pad_token_id``, as its ``logits`` does; a bare module masks only the
      padding, like ``lambda ids: model(ids).logits``. Each teacher keeps its own cache.
    * any other callable ``input_ids [B, T] int64 -> logits [B, T, V']`` (e.g. a
      ``Teacher.logits``, or any other Teacher): the slow no-cache fallback. It reruns
      on the whole right-padded prefix at every step, O(T^2) positions per sequence.

    Args:
        teachers: K >= 1 teachers, each as above; mixed kinds are fine.
        prompts: Prompt sequences (each >= 1 token; their own prompt lengths are ignored).
        max_new_tokens: Most tokens appended, >= 1.
        greedy: Arg-max decoding (else ancestral sampling).
        temperature: Sampling temperature > 0 (ignored when greedy).
        seed: Seed of the sampling generator.
        eos_token_id: Stop token, or None.
        batch_size: Prompts decoded together.
        vocab_size: Real V; logit columns beyond it are never chosen.
        description: JSON-able facts about the teachers (e.g. their weight hashes) that go
            into the result's preprocessing, so a new teacher gives a new dataset key.
            How the teachers were run (with or without the cache) is not recorded: it
            does not change the tokens.
        num_shards: Shards of the result (default: the prompts').

    Returns:
        A :class:`TokenDataset` of prompt + continuation, sharded like the prompts.

    Raises:
        ConfigError: no teacher, a teacher of an unknown kind, max_new_tokens < 1,
            temperature <= 0, or the longest prompt plus ``max_new_tokens`` exceeds the
            context of a Hugging Face teacher (config ``n_positions`` or
            ``max_position_embeddings``), raised before any decoding.
        TeacherOutputError: a teacher returns no [B, T, V] logits, or teachers disagree
            on V.

    Source: Kim and Rush, "Sequence-Level Knowledge Distillation", EMNLP 2016, sec. 3
    (train the student on the teacher's beam/greedy output).
    """
    if not teachers:
        raise ConfigError("generate_continuations needs at least one teacher")
    if int(max_new_tokens) < 1 or not temperature > 0:
        raise ConfigError("max_new_tokens must be >= 1 and temperature > 0")
    _check_context(teachers, prompts, int(max_new_tokens))
    decoders = [_decoder(t, prompts.pad_token_id, k) for k, t in enumerate(teachers)]
    gen = torch.Generator().manual_seed(int(seed))
    out_seqs: list[np.ndarray] = []
    plens: list[int] = []
    for lo in range(0, len(prompts), batch_size):
        seqs = [list(prompts.sequence(i)) for i in range(lo, min(lo + batch_size, len(prompts)))]
        plens.extend(len(s) for s in seqs)
        done = [False] * len(seqs)
        nxt = torch.zeros(0, dtype=torch.int64)
        for step in range(int(max_new_tokens)):
            if all(done):
                break
            probs = None
            for d in decoders:
                z = d.start(seqs) if step == 0 else d.step(seqs, nxt)
                if vocab_size is not None:
                    z = z[:, :vocab_size]
                p = torch.softmax(z / (1.0 if greedy else float(temperature)), dim=-1)
                if probs is not None and p.shape != probs.shape:
                    raise TeacherOutputError(
                        f"teacher {d.name} gives {p.shape[-1]} logits, teacher "
                        f"{decoders[0].name} {probs.shape[-1]}; give vocab_size (the real V)"
                    )
                probs = p if probs is None else probs + p
            assert probs is not None
            nxt = (
                probs.argmax(dim=-1)
                if greedy
                else torch.multinomial(probs / len(decoders), 1, generator=gen)[:, 0]
            )
            for b, tok in enumerate(nxt.tolist()):
                if not done[b]:
                    seqs[b].append(int(tok))
                    done[b] = eos_token_id is not None and int(tok) == int(eos_token_id)
        out_seqs.extend(np.asarray(s, np.int32) for s in seqs)
    if any(len(s) < 2 for s in out_seqs):
        raise DataError("a prompt plus its continuation is shorter than 2 tokens")
    return TokenDataset.from_sequences(
        prompts.sample_ids,
        out_seqs,
        prompt_lengths=np.asarray(plens, np.int64),
        num_shards=num_shards or prompts.num_shards,
        preprocessing={
            "source": prompts.preprocessing,
            "generation": {
                "max_new_tokens": int(max_new_tokens),
                "greedy": bool(greedy),
                "temperature": float(temperature),
                "seed": int(seed),
                "eos_token_id": eos_token_id,
                "teachers": description or {},
            },
        },
        pad_token_id=prompts.pad_token_id,
    )
