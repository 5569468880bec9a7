"""Token datasets read lazily from text, JSON Lines or Parquet files and tokenised where
each shard is read: :class:`TextDataset`.

Like the file-backed datasets of :mod:`kdcache.data.files`, a :class:`TextDataset` is a
small picklable *plan*: the files, their sizes and versions, the tokenizer's SHA-256 and
which byte ranges (text, JSON Lines) or row groups (Parquet) make each shard. The
constructor reads metadata only (file sizes and versions, Parquet footers, the tokenizer
files). A shard is read and tokenised only where it is used (a Ray actor, the student's
reader), with memory bounded by one shard, and its reader reports an XXH3-128 digest of
the tokens it produced, which the teacher stage records and the student's join checks.

Records. A text file is cut into documents at every ``record_separator`` (overlapping
occurrences, such as ``"\\n\\n\\n"`` with ``"\\n\\n"``, make one separator); a document's
text is exactly the bytes between separators, decoded as UTF-8; a separator at the end
of the file ends the last document and starts none. A JSON Lines file holds one JSON
object per line. A Parquet file holds one record per row.

Sharding (text, JSON Lines: Hadoop ``TextInputFormat`` style). The files' bytes, end to
end in file order, are cut into ``num_shards`` equal byte ranges; a shard owns every
record whose first byte lies in its range, so each record is read exactly once, by one
shard, whatever the cut (the last record of a shard is read past its range's end). A
byte range knows its records only once read, so the per-shard record counts the
fingerprint declares (``shards[i]["num_records"]``, what the student's stream orders by)
come from one scan of the bytes for separators, without tokenising or parsing, the first
time :meth:`TextDataset.fingerprint` (or ``len``) is asked; the constructor never reads
the data. Parquet: shards are runs of whole row groups; counts come from the footers.

Empty documents (no character but whitespace: blank lines of a JSON Lines file, text
between two separators with nothing in it) are skipped, and each shard logs how many it
skipped (a warning naming the file). A JSON Lines or Parquet record whose text (prompt,
completion, messages) is empty is refused: it is data, not layout.

Ids: ``id_field`` names an int64 field (unique within each shard, checked where read), or
None to derive ``file_index * 2**40 + offset``, the offset being the record's first byte
(text, JSON Lines) or its row (Parquet) in its file. Derived ids are stable while the
files are: editing a file shifts its later records' ids, and so changes the cache key.

Shape legend: N sequences in a shard, E tokens in a shard (sum of lengths).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from kdcache.data.base import ShardBatches, read_shard_checked
from kdcache.data.files import (
    DEFAULT_SHARD_BYTES,
    ID_FILE_STRIDE,
    _file_state,
    _find_files,
    _fs_of,
    _ShardDigest,
    _translate,
)
from kdcache.data.tokens import _TOKENIZER_FILES, tokenizer_files_sha256
from kdcache.errors import (
    ConfigError,
    DataError,
    DataFileNotFoundError,
    InputChangedError,
    require,
)

log = logging.getLogger(__name__)

#: The file formats of a :class:`TextDataset` and the suffixes ``format="auto"`` knows.
TEXT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "text": (".txt", ".text"),
    "jsonl": (".jsonl", ".ndjson"),
    "parquet": (".parquet", ".pq"),
}
TRUNCATIONS = ("error", "right")
_FORMATS = ("auto", *TEXT_SUFFIXES)
#: Bytes read from a text file at once while looking for separators.
_READ_BYTES = 4 << 20
#: Records tokenised at once (``Tokenizer.encode_batch``).
_ENCODE_BATCH = 1024
_DIGEST_VERSION = "kdcache-text-digest-1"


# -- the tokenizer -----------------------------------------------------------------------
def _tokenizer_sha256(path: str) -> str:
    """SHA-256 of the tokenizer files, as :func:`kdcache.data.tokens.tokenizer_files_sha256`
    (a directory) or over the one file given (``name \\0 bytes``, the same scheme)."""
    if os.path.isdir(path):
        sha = tokenizer_files_sha256(path)
        assert sha is not None  # checked by the caller
        return sha
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(os.path.basename(path).encode() + b"\0" + fh.read())
    return h.hexdigest()


def _special_token(config: dict[str, Any], key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class _TokenizerFacts:
    json_path: str
    directory: str | None
    sha256: str
    vocab_size: int
    eos_token_id: int | None
    pad_token_id: int | None
    chat_template: str | None


def _tokenizer_facts(tokenizer: str, eos_token: str | None) -> _TokenizerFacts:
    """Find, hash and load the tokenizer once (driver), for its facts.

    Raises:
        ConfigError: no such path, no tokenizer.json, a file that does not load, or an
            ``eos_token`` that is not in the vocabulary.
    """
    if not isinstance(tokenizer, str | os.PathLike) or not os.fspath(tokenizer):
        raise ConfigError(
            f"tokenizer must be the path of a tokenizer.json or of a model directory holding "
            f"one, got {tokenizer!r}"
        )
    path = os.fspath(tokenizer)
    if os.path.isdir(path):
        json_path, directory = os.path.join(path, "tokenizer.json"), path
        if not os.path.isfile(json_path):
            have = [f for f in _TOKENIZER_FILES if os.path.exists(os.path.join(path, f))]
            raise ConfigError(
                f"tokenizer directory {path} holds no tokenizer.json (it has: "
                f"{', '.join(have) or 'no tokenizer file'}); save a fast tokenizer there "
                "(PreTrainedTokenizerFast.save_pretrained) or pass its tokenizer.json"
            )
    elif os.path.isfile(path):
        json_path, directory = path, None
    else:
        raise ConfigError(
            f"tokenizer {path} does not exist; pass a tokenizer.json file or a model "
            "directory holding one"
        )
    tok = _load_tokenizer(json_path)
    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        side = os.path.join(os.path.dirname(json_path), name)
        if os.path.isfile(side):
            try:
                with open(side, encoding="utf-8") as fh:
                    config.update(json.load(fh))
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"tokenizer file {side} does not load ({type(exc).__name__}: {exc}); "
                    "rewrite it with save_pretrained"
                ) from None
    eos = eos_token or _special_token(config, "eos_token")
    eos_id = None if eos is None else tok.token_to_id(eos)
    if eos is not None and eos_id is None:
        raise ConfigError(
            f"the end-of-text token {eos!r} is not in the vocabulary of {json_path}; pass "
            "eos_token= one of its special tokens"
        )
    pad = _special_token(config, "pad_token")
    pad_id = None if pad is None else tok.token_to_id(pad)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    jinja = os.path.join(os.path.dirname(json_path), "chat_template.jinja")
    if template is None and os.path.isfile(jinja):  # where transformers 5 saves it
        with open(jinja, encoding="utf-8") as fh:
            template = fh.read()
    return _TokenizerFacts(
        json_path=json_path,
        directory=directory if directory is not None else os.path.dirname(json_path),
        sha256=_tokenizer_sha256(path),
        vocab_size=int(tok.get_vocab_size(with_added_tokens=True)),
        eos_token_id=None if eos_id is None else int(eos_id),
        pad_token_id=None if pad_id is None else int(pad_id),
        chat_template=template if isinstance(template, str) else None,
    )


def _load_tokenizer(json_path: str) -> Any:
    tk = require("tokenizers", "hf")
    try:
        return tk.Tokenizer.from_file(json_path)
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise ConfigError(
            f"tokenizer file {json_path} does not load ({type(exc).__name__}: {exc}); it "
            "must be a Hugging Face tokenizers JSON file (Tokenizer.save or save_pretrained)"
        ) from None


# -- record boundaries in text ------------------------------------------------------------
def _clusters(f: pa.NativeFile, size: int, start: int, sep: bytes) -> Iterator[tuple[int, int]]:
    """``(first, end)`` byte spans of the separators from ``start`` on, overlapping
    occurrences merged into one span; found in chunks of :data:`_READ_BYTES`."""
    width = len(sep)
    buf, base, pos = b"", start, start  # buf holds bytes [base, base + len(buf))
    span: tuple[int, int] | None = None
    while True:
        i = buf.find(sep, pos - base)
        if i < 0:
            if base + len(buf) >= size:
                break
            keep = max(pos, base + len(buf) - width + 1)
            more = f.read_at(min(_READ_BYTES, size - base - len(buf)), base + len(buf))
            buf, base = buf[keep - base :] + more, keep
            pos = keep
            continue
        q = base + i
        if span is not None and q < span[1]:
            span = (span[0], q + width)
        else:
            if span is not None:
                yield span
            span = (q, q + width)
        pos = q + 1
    if span is not None:
        yield span


def _text_records(
    f: pa.NativeFile, size: int, lo: int, hi: int, sep: bytes
) -> Iterator[tuple[int, bytes]]:
    """``(offset, bytes)`` of each document whose first byte is in ``[lo, hi)``.

    The separators are found from ``lo - len(sep)`` on (so a span ending at ``lo`` is
    seen); a document starts at 0 or where a separator span ends, and runs to the next
    span (or the end of the file)."""
    spans = _clusters(f, size, max(0, lo - len(sep)), sep)
    nxt = next(spans, None)
    if lo == 0:
        start = 0
    else:
        while nxt is not None and nxt[1] < lo:
            nxt = next(spans, None)
        if nxt is None:
            return
        start = nxt[1]
        nxt = next(spans, None)
    while start < hi and start < size:
        while nxt is not None and nxt[0] < start:
            nxt = next(spans, None)
        stop = size if nxt is None else nxt[0]
        yield start, f.read_at(stop - start, start)
        if nxt is None:
            return
        start = nxt[1]
        nxt = next(spans, None)


# -- the plan ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Piece:
    """Bytes (text, JSON Lines) or row groups (Parquet) ``[lo, hi)`` of file ``file``;
    ``row_start``: Parquet, the first row of row group ``lo`` in its file."""

    file: int
    lo: int
    hi: int
    row_start: int = 0


@dataclass
class _Record:
    sample_id: int
    where: str
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: list[dict[str, Any]] | None = None


def _cuts(weights: Sequence[int], num_shards: int) -> list[int]:
    """Indices ``0 = c_0 < ... < c_n = len(weights)`` cutting ``weights`` into
    ``num_shards`` runs of about equal total weight (each run at least one unit)."""
    total = np.concatenate([[0], np.cumsum(weights)])
    cuts = [0]
    for k in range(1, num_shards):
        target = total[-1] * k / num_shards
        c = int(np.searchsorted(total, target, side="left"))
        if c > 0 and target - total[c - 1] <= total[min(c, len(total) - 1)] - target:
            c -= 1  # the nearer boundary
        cuts.append(min(max(c, cuts[-1] + 1), len(weights) - (num_shards - k)))
    return [*cuts, len(weights)]


class TextDataset:
    """Token sequences tokenised from text, JSON Lines or Parquet files, read lazily; a
    :class:`kdcache.data.StreamingDataset` with ``layout = "tokens"``, usable wherever a
    :class:`kdcache.data.TokenDataset` is (:func:`kdcache.build.build_cache`,
    :class:`kdcache.SoftTargetDataset`, :class:`kdcache.stream.ShardedStream`).

    The module docstring says what a record is, how shards are cut and how ids are made.
    Each record becomes one sequence: its tokens (with the tokenizer's own special tokens,
    e.g. a BOS, when ``add_special_tokens``), then the end-of-text token when
    ``add_eos`` and the sequence does not already end with it.

    Args:
        paths: A file, a directory (every file of the format under it, sorted; names
            starting with ``.`` or ``_`` skipped) or a list of files: local paths,
            ``file://`` or the object-store URIs of :class:`kdcache.stores.fs.Location`.
        tokenizer: A ``tokenizer.json`` (Hugging Face ``tokenizers``) or a directory
            written by ``save_pretrained`` holding one; its files' SHA-256 goes into the
            fingerprint as ``preprocessing["tokenizer_files_sha256"]``, as
            :func:`kdcache.data.tokens.tokenizer_files_sha256` computes it (pass the
            model directory to match a teacher's ``tokenizer_sha256``). It must be at the
            same path where shards are read.
        format: ``"text"``, ``"jsonl"``, ``"parquet"`` or ``"auto"`` (by suffix:
            ``.txt``/``.text``, ``.jsonl``/``.ndjson``, ``.parquet``/``.pq``).
        text_field: JSON Lines / Parquet: the string field holding the text.
        prompt_field, completion_field: Instead of ``text_field``: a prompt and its
            completion, tokenised apart and joined; only completion tokens carry targets
            (``prompt_lengths``; see :func:`kdcache.data.tokens.target_positions`).
        messages_field: Instead: a chat, a list of ``{"role", "content"}``, rendered with
            the tokenizer's chat template (``tokenizer_config.json`` ``"chat_template"``
            or ``chat_template.jinja`` beside it, through transformers; its SHA-256 is
            in the fingerprint). The prompt is the conversation before the last message
            rendered with the generation prompt; the last message, which must be the
            assistant's, carries the targets.
        record_separator: Text files: what separates documents (``"\\n"``: one a line;
            ``"\\n%\\n"``: fortune files; ``"\\n\\n"``: paragraphs).
        id_field: JSON Lines / Parquet: an integer field of stable int64 ids; None
            derives them (module docstring).
        max_tokens: Longest sequence, in tokens (>= 2), counting the end-of-text token.
        truncation: ``"error"``: a longer sequence is refused, naming the record;
            ``"right"``: it is cut to ``max_tokens`` (recorded in the fingerprint). A
            prompt of ``max_tokens`` tokens or more is refused either way.
        add_eos: Append the end-of-text token.
        num_shards: Text / JSON Lines: byte ranges (>= 1); Parquet: runs of row groups
            (at most one per row group). None: about :data:`DEFAULT_SHARD_BYTES` each.
        pad_token_id: Id that pads batches (in no fingerprint); None: the tokenizer's
            pad token, else the end-of-text token, else 0.
        eos_token: The end-of-text token; None: the tokenizer's ``eos_token``
            (``tokenizer_config.json`` / ``special_tokens_map.json``).
        add_special_tokens: Let the tokenizer add its special tokens (its post-processor,
            e.g. a BOS) to each text or prompt; completions and chats never get them
            (a chat template writes its own).

    Raises:
        ConfigError: a malformed argument, a tokenizer that does not load, a format that
            cannot be told from the names, no end-of-text token with ``add_eos``, a chat
            field without a chat template, ``num_shards`` above the row groups.
        DataFileNotFoundError: a path does not exist.
        DataError: no file found, an empty file, an unreadable Parquet footer, a missing
            field or one of the wrong type (names the file and the fields there are).

    Example:
        >>> ds = TextDataset("corpus.txt", tokenizer="runs/tok", max_tokens=256,
        ...                  truncation="right", num_shards=8)  # doctest: +SKIP
        >>> ds.read_shard(0)["tokens"]  # int32 [E]                # doctest: +SKIP
    """

    #: Samples are token sequences (see :data:`kdcache.data.base.LAYOUTS`).
    layout = "tokens"

    def __init__(
        self,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        tokenizer: str,
        format: str = "auto",
        text_field: str = "text",
        prompt_field: str | None = None,
        completion_field: str | None = None,
        messages_field: str | None = None,
        record_separator: str = "\n",
        id_field: str | None = None,
        max_tokens: int = 512,
        truncation: str = "error",
        add_eos: bool = True,
        num_shards: int | None = None,
        pad_token_id: int | None = None,
        eos_token: str | None = None,
        add_special_tokens: bool = True,
    ) -> None:
        if format not in _FORMATS:
            raise ConfigError(f"format must be one of {_FORMATS}, got {format!r}")
        if truncation not in TRUNCATIONS:
            raise ConfigError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
            raise ConfigError(
                f"max_tokens must be an int >= 2 (a causal-LM sample needs two tokens), got "
                f"{max_tokens!r}"
            )
        if num_shards is not None and (
            isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1
        ):
            raise ConfigError(f"num_shards must be an int >= 1 or None, got {num_shards!r}")
        if (prompt_field is None) != (completion_field is None):
            raise ConfigError(
                "prompt_field and completion_field go together (a prompt and its "
                f"completion), got prompt_field={prompt_field!r}, "
                f"completion_field={completion_field!r}"
            )
        if prompt_field is not None and messages_field is not None:
            raise ConfigError("give prompt_field/completion_field or messages_field, not both")
        for name, value in (
            ("text_field", text_field),
            ("prompt_field", prompt_field),
            ("completion_field", completion_field),
            ("messages_field", messages_field),
            ("id_field", id_field),
        ):
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{name} must be a field name, got {value!r}")
        if not isinstance(record_separator, str) or not record_separator:
            raise ConfigError(
                f"record_separator must be a non-empty string, got {record_separator!r}"
            )
        self.mode = "chat" if messages_field else "prompt" if prompt_field is not None else "text"
        self.format = _format_of(paths) if format == "auto" else format
        if self.format == "text" and (self.mode != "text" or id_field is not None):
            raise ConfigError(
                "text files hold plain documents: prompt_field, completion_field, "
                "messages_field and id_field need JSON Lines or Parquet files"
            )
        self.text_field = text_field
        self.prompt_field, self.completion_field = prompt_field, completion_field
        self.messages_field = messages_field
        self.record_separator = record_separator
        self.id_field = id_field
        self.max_tokens = int(max_tokens)
        self.truncation = truncation
        self.add_eos = bool(add_eos)
        self.add_special_tokens = bool(add_special_tokens)
        facts = _tokenizer_facts(os.fspath(tokenizer), eos_token)
        if self.add_eos and facts.eos_token_id is None:
            raise ConfigError(
                f"add_eos=True but the tokenizer {tokenizer} names no eos_token; pass "
                "eos_token= (one of its special tokens) or add_eos=False"
            )
        if self.mode == "chat" and facts.chat_template is None:
            raise ConfigError(
                f"messages_field needs a chat template, but the tokenizer {tokenizer} has "
                "none (tokenizer_config.json 'chat_template'); set one with "
                "tokenizer.chat_template = ... and save_pretrained"
            )
        self.tokenizer = os.fspath(tokenizer)
        self._facts = facts
        self.eos_token_id = facts.eos_token_id
        if pad_token_id is None:
            pad_token_id = facts.pad_token_id
        if pad_token_id is None:
            pad_token_id = facts.eos_token_id if facts.eos_token_id is not None else 0
        self.pad_token_id = int(pad_token_id)
        self._root, self._names = _find_files(paths, TEXT_SUFFIXES[self.format])
        self._tok: Any = None
        self._chat: Any = None
        self._counts: list[int] | None = None
        self._plan(num_shards)
        self.preprocessing: dict[str, Any] = {
            "source": "text",
            "format": self.format,
            "mode": self.mode,
            "fields": {
                "text": self.text_field if self.mode == "text" else None,
                "prompt": prompt_field,
                "completion": completion_field,
                "messages": messages_field,
                "id": id_field,
            },
            "record_separator": record_separator if self.format == "text" else None,
            "empty_documents": "skip",
            "max_tokens": self.max_tokens,
            "truncation": truncation,
            "add_eos": self.add_eos,
            "eos_token_id": self.eos_token_id,
            "add_special_tokens": self.add_special_tokens,
            "tokenizer_files_sha256": facts.sha256,
            "vocab_size": facts.vocab_size,
        }
        if self.mode == "chat":  # the template may live outside the hashed files
            assert facts.chat_template is not None
            self.preprocessing["chat_template_sha256"] = hashlib.sha256(
                facts.chat_template.encode()
            ).hexdigest()

    # -- planning (driver: metadata only) -----------------------------------------------
    def _paths(self) -> tuple[pafs.FileSystem, list[str]]:
        fs, root = _fs_of(self._root)
        return fs, [f"{root.rstrip('/')}/{n}" for n in self._names]

    def _plan(self, num_shards: int | None) -> None:
        fs, paths = self._paths()
        remote = not self._root.is_local
        files: list[tuple[int, int | str | None]] = []
        groups: list[list[int]] = []  # Parquet: rows per row group, per file
        weights: list[list[int]] = []
        for i, path in enumerate(paths):
            display = self._root.display(self._names[i])
            kind = "Parquet" if self.format == "parquet" else "input"
            with _translate(display, "reading its metadata", remote=remote, kind=kind):
                with fs.open_input_file(path) as f:
                    size, version = _file_state(fs, path, f)
                    if self.format == "parquet":
                        md = pq.ParquetFile(f).metadata
                        self._check_schema(md.schema.to_arrow_schema(), display)
                        rows = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
                        groups.append(rows)
                        weights.append(
                            [md.row_group(g).total_byte_size for g in range(md.num_row_groups)]
                        )
            if size == 0 or (self.format == "parquet" and sum(groups[-1]) == 0):
                raise DataError(
                    f"{display} is empty; remove it from the dataset (or list the files to read)"
                )
            files.append((size, version))
        self._files = tuple(files)
        if self.format == "parquet":
            self._plan_row_groups(groups, weights, num_shards)
        else:
            self._plan_bytes(num_shards)

    def _plan_bytes(self, num_shards: int | None) -> None:
        sizes = [s for s, _ in self._files]
        total = sum(sizes)
        n = num_shards or max(1, math.ceil(total / DEFAULT_SHARD_BYTES))
        if n > total:
            raise ConfigError(f"num_shards={n} is more than the {total} bytes of the files")
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        bounds = [round(total * k / n) for k in range(n + 1)]
        shards = []
        for k in range(n):
            lo, hi = bounds[k], bounds[k + 1]
            pieces = []
            for i in range(len(sizes)):
                a, b = max(lo, int(starts[i])), min(hi, int(starts[i + 1]))
                if a < b:
                    pieces.append(_Piece(i, a - int(starts[i]), b - int(starts[i])))
            shards.append(tuple(pieces))
        self._shards = tuple(shards)

    def _plan_row_groups(
        self, groups: list[list[int]], weights: list[list[int]], num_shards: int | None
    ) -> None:
        units = [(i, g) for i, rows in enumerate(groups) for g in range(len(rows))]
        rows_of = [groups[i][g] for i, g in units]
        total_bytes = sum(sum(w) for w in weights)
        n = num_shards or max(1, math.ceil(total_bytes / DEFAULT_SHARD_BYTES))
        n = n if num_shards else min(n, len(units))
        if n > len(units):
            raise ConfigError(
                f"num_shards={n} but the Parquet files hold {len(units)} row groups, and a "
                "row group is never split; pass num_shards <= that, or write the files with "
                "smaller row groups (pyarrow.parquet.write_table(row_group_size=...))"
            )
        cuts = _cuts(rows_of, n)
        shards, counts = [], []
        for k in range(n):
            run = units[cuts[k] : cuts[k + 1]]
            pieces = []
            for i in dict.fromkeys(i for i, _ in run):
                gs = [g for j, g in run if j == i]
                pieces.append(_Piece(i, gs[0], gs[-1] + 1, int(sum(groups[i][: gs[0]]))))
            shards.append(tuple(pieces))
            counts.append(int(sum(rows_of[cuts[k] : cuts[k + 1]])))
        self._shards = tuple(shards)
        self._counts = counts

    def _fields(self) -> list[tuple[str, str]]:
        """``(role, field)`` of every field a record needs."""
        out = [("id_field", self.id_field)] if self.id_field else []
        if self.mode == "text":
            out.append(("text_field", self.text_field))
        elif self.mode == "prompt":
            assert self.prompt_field and self.completion_field
            out += [
                ("prompt_field", self.prompt_field),
                ("completion_field", self.completion_field),
            ]
        else:
            assert self.messages_field
            out.append(("messages_field", self.messages_field))
        return out

    def _check_schema(self, schema: pa.Schema, display: str) -> None:
        """Every field exists with a usable type (Parquet, from the footer)."""
        for role, name in self._fields():
            if name not in schema.names:
                raise DataError(
                    f"{display} has no column {name!r} (given as {role}); its columns are: "
                    f"{', '.join(schema.names)}; pass {role} as one of them"
                )
            t = schema.field(name).type
            if role == "id_field":
                ok, want = pa.types.is_integer(t), "integer ids (int64)"
            elif role == "messages_field":
                ok = (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_struct(
                    t.value_type
                )
                want = "a list of structs {role, content}"
            else:
                ok = pa.types.is_string(t) or pa.types.is_large_string(t)
                want = "strings"
            if not ok:
                raise DataError(f"column {name!r} ({role}) of {display} is {t}; expected {want}")

    # -- the ShardedDataset interface ----------------------------------------------------
    @property
    def num_shards(self) -> int:
        return len(self._shards)

    @property
    def files(self) -> list[str]:
        """The files' names relative to the dataset root, in dataset order."""
        return list(self._names)

    def shard_counts(self) -> list[int]:
        """Sequences per shard. Parquet: from the footers; text / JSON Lines: from one
        scan of the bytes for separators (no tokenising; threads, memoised).

        Raises:
            DataError: a shard owns no record (a record longer than its byte range: use
                fewer shards), or a file holds no document.
        """
        if self._counts is None:
            n = len(self._shards)
            with ThreadPoolExecutor(min(8, n), "kdcache-text-count") as pool:
                counts = list(pool.map(self._count_shard, range(n)))
            for k, c in enumerate(counts):
                if c == 0:
                    raise DataError(
                        f"{self._where(k)} holds no document (its byte range lies inside one "
                        "record, or holds only empty ones); pass fewer num_shards"
                    )
            self._counts = counts
        return self._counts

    def __len__(self) -> int:
        return sum(self.shard_counts())

    def __repr__(self) -> str:
        return (
            f"TextDataset({self._root.display()!r}, {len(self._names)} {self.format} files, "
            f"{self.num_shards} shards)"
        )

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the sequences (the cache key's dataset part), memoised.

        Returns:
            ``{"format", "preprocessing": {"token_level", the tokenisation settings,
            "tokenizer_files_sha256", "vocab_size", ...}, "files": [{"name", "size",
            "version"}], "shards": [{"unit", "pieces": [[file, lo, hi], ...]}]}``;
            ``unit`` is ``"bytes"`` or ``"row_groups"`` (``hi`` exclusive). Parquet plans
            add ``num_records`` (total and per shard, from the footers); text and JSON
            Lines plans do not (their counts are known once a shard is read). Sizes and
            versions are trusted; the tokens' digest of each shard is computed where it
            is read (:meth:`open_shard`).

        Raises:
            DataError: as :meth:`shard_counts` (Parquet).
        """
        fp = self.__dict__.get("_fingerprint")
        if fp is None:
            unit = "row_groups" if self.format == "parquet" else "bytes"
            # Parquet counts come from the footers; a byte range's records are known only
            # once read, so text / JSON Lines plans declare none (no scan on the driver):
            # the teacher stage reads each shard where it runs, and the student's stream
            # takes the counts from the cache's commit records.
            counts: list[int | None] = (
                list(self.shard_counts()) if self.format == "parquet" else [None] * self.num_shards
            )
            shards: list[dict[str, Any]] = []
            for c, shard in zip(counts, self._shards, strict=True):
                rec: dict[str, Any] = {
                    "unit": unit,
                    "pieces": [[self._names[p.file], p.lo, p.hi] for p in shard],
                }
                if c is not None:
                    rec["num_records"] = c
                shards.append(rec)
            fp = {
                "format": f"text/{self.format}",
                "preprocessing": {"token_level": "next-token", **self.preprocessing},
                "files": [
                    {"name": n, "size": s, "version": v}
                    for n, (s, v) in zip(self._names, self._files, strict=True)
                ],
                "shards": shards,
            }
            if self.format == "parquet":
                fp["num_records"] = sum(c for c in counts if c is not None)
            self.__dict__["_fingerprint"] = fp
        return fp

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_fingerprint", "_tok", "_chat"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._tok = self._chat = None

    def read_shard(self, index: int) -> dict[str, np.ndarray]:
        """``{"sample_id": int64 [N], "tokens": int32 [E], "token_offsets": int64 [N + 1]
        (from 0), "prompt_lengths": int64 [N]}`` for shard ``index``, as
        :meth:`kdcache.data.TokenDataset.read_shard`.

        Raises:
            IndexError, InputChangedError, DataError: as :meth:`open_shard`.
        """
        return read_shard_checked(self, index)[0]

    def open_shard(self, index: int, batch_size: int) -> ShardBatches:
        """The sequences of shard ``index``, read and tokenised when iterated.

        The shard is tokenised whole (memory: one shard), then handed out in batches of
        at most ``batch_size`` sequences, each a dict as :meth:`read_shard` returns (its
        ``token_offsets`` from 0). After the last batch, ``digest`` is the XXH3-128
        (``"xxh3_128:<hex>"``) of the ids, tokens, lengths and prompt lengths.

        Raises (while iterating):
            ConfigError: ``batch_size`` < 1.
            IndexError: ``index`` out of range.
            InputChangedError: a file's size or version, the tokenizer files, or the
                shard's number of documents differ from the plan.
            DataError: names the file and the record: invalid UTF-8 or JSON, a missing
                field or one of the wrong type, an empty text, a sequence longer than
                ``max_tokens`` (``truncation="error"``), a prompt that leaves no
                completion token, a sequence of fewer than 2 tokens, a repeated id.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not 0 <= index < len(self._shards):
            raise IndexError(f"shard {index} out of range 0..{len(self._shards) - 1}")
        planned = None if self._counts is None else self._counts[index]
        holder: list[ShardBatches] = []
        reader = ShardBatches(
            index, -1 if planned is None else planned, self._iter(index, batch_size, holder)
        )
        holder.append(reader)
        return reader

    # -- reading (workers) ---------------------------------------------------------------
    def _where(self, index: int) -> str:
        parts = ", ".join(
            f"{self._root.display(self._names[p.file])} "
            f"{'row groups' if self.format == 'parquet' else 'bytes'} {p.lo}..{p.hi - 1}"
            for p in self._shards[index]
        )
        return f"shard {index} ({parts})"

    def _open(self, fs: pafs.FileSystem, path: str, file: int) -> pa.NativeFile:
        display = self._root.display(self._names[file])
        with _translate(display, "opening", remote=not self._root.is_local, kind="input"):
            f = fs.open_input_file(path)
            size, version = _file_state(fs, path, f)
        want_size, want_version = self._files[file]
        if size != want_size or (want_version is not None and version != want_version):
            f.close()
            raise InputChangedError(
                f"{display} changed after the dataset was planned: the plan has size "
                f"{want_size} and version {want_version!r}, the file now has size {size} and "
                f"version {version!r}; re-plan the dataset (rerun the build) so that the "
                "cache key covers the new content"
            )
        return f

    def _raw_records(self, index: int) -> Iterator[tuple[int, int, bytes | dict[str, Any]]]:
        """``(file, offset, payload)`` of each record of shard ``index`` in order: text and
        JSON Lines: raw bytes (empty documents included); Parquet: the row as a dict."""
        fs, paths = self._paths()
        for p in self._shards[index]:
            f = self._open(fs, paths[p.file], p.file)
            display = self._root.display(self._names[p.file])
            try:
                with _translate(
                    display,
                    f"reading {self._where(index)}",
                    remote=not self._root.is_local,
                    kind="Parquet" if self.format == "parquet" else "input",
                ):
                    if self.format == "parquet":
                        pf = pq.ParquetFile(f)
                        cols = [name for _, name in self._fields()]
                        row = p.row_start
                        for batch in pf.iter_batches(
                            batch_size=_ENCODE_BATCH,
                            row_groups=list(range(p.lo, p.hi)),
                            columns=cols,
                        ):
                            for rec in batch.to_pylist():
                                yield p.file, row, rec
                                row += 1
                    else:
                        sep = b"\n" if self.format == "jsonl" else self.record_separator.encode()
                        size = self._files[p.file][0]
                        for offset, data in _text_records(f, size, p.lo, p.hi, sep):
                            yield p.file, offset, data
            finally:
                f.close()

    def _count_shard(self, index: int) -> int:
        return sum(
            1
            for _, _, data in self._raw_records(index)
            if not isinstance(data, bytes) or data.strip()
        )

    def _records(self, index: int, skipped: list[int]) -> Iterator[_Record]:
        """The shard's records, parsed and checked; empty documents counted in ``skipped``."""
        for file, offset, data in self._raw_records(index):
            display = self._root.display(self._names[file])
            unit = "row" if self.format == "parquet" else "byte"
            where = f"{display} ({unit} {offset})"
            derived = file * ID_FILE_STRIDE + offset
            if isinstance(data, bytes):
                if not data.strip():
                    skipped.append(offset)
                    continue
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"{where} is not valid UTF-8 ({exc}); re-encode the file as UTF-8"
                    ) from None
                if self.format == "text":
                    yield _Record(derived, where, text=text)
                    continue
                try:
                    rec = json.loads(text)
                except ValueError as exc:
                    raise DataError(
                        f"{where} is not a JSON object ({exc}); each line of a JSON Lines "
                        "file must hold one"
                    ) from None
                if not isinstance(rec, dict):
                    raise DataError(
                        f"{where} holds a JSON {type(rec).__name__}; each line of a JSON "
                        "Lines file must hold one object"
                    )
            else:
                rec = data
            yield self._parse(rec, derived, where)

    def _field(self, rec: dict[str, Any], role: str, name: str, where: str) -> Any:
        if name not in rec:
            raise DataError(
                f"{where} has no field {name!r} (given as {role}); its fields are: "
                f"{', '.join(map(str, rec)) or 'none'}"
            )
        return rec[name]

    def _string(self, rec: dict[str, Any], role: str, name: str, where: str) -> str:
        value = self._field(rec, role, name, where)
        if not isinstance(value, str):
            raise DataError(
                f"field {name!r} ({role}) of {where} is {type(value).__name__}, expected a string"
            )
        if not value.strip():
            raise DataError(
                f"field {name!r} ({role}) of {where} is empty; drop the record, or fill it"
            )
        return value

    def _parse(self, rec: dict[str, Any], derived: int, where: str) -> _Record:
        sid = derived
        if self.id_field is not None:
            value = self._field(rec, "id_field", self.id_field, where)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not (-(1 << 63) <= value < 1 << 63)
            ):
                raise DataError(
                    f"field {self.id_field!r} (id_field) of {where} is {value!r}; expected an "
                    "int64 id, or pass id_field=None to derive ids"
                )
            sid = value
        if self.mode == "text":
            return _Record(sid, where, text=self._string(rec, "text_field", self.text_field, where))
        if self.mode == "prompt":
            assert self.prompt_field and self.completion_field
            return _Record(
                sid,
                where,
                prompt=self._string(rec, "prompt_field", self.prompt_field, where),
                completion=self._string(rec, "completion_field", self.completion_field, where),
            )
        assert self.messages_field
        msgs = self._field(rec, "messages_field", self.messages_field, where)
        if (
            not isinstance(msgs, list)
            or not msgs
            or not all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in msgs
            )
        ):
            raise DataError(
                f"field {self.messages_field!r} (messages_field) of {where} must be a "
                'non-empty list of {"role": str, "content": str}, got '
                f"{str(msgs)[:120]}"
            )
        if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
            raise DataError(
                f"the last message of {where} is {msgs[-1]['role']!r} with "
                f"{len(msgs[-1]['content'])} characters; the last turn, which carries the "
                "targets, must be a non-empty assistant message"
            )
        return _Record(
            sid, where, messages=[{"role": m["role"], "content": m["content"]} for m in msgs]
        )

    def _tokenizer(self) -> Any:
        if self._tok is None:
            sha = _tokenizer_sha256(self.tokenizer) if os.path.exists(self.tokenizer) else None
            if sha != self._facts.sha256:
                raise InputChangedError(
                    f"the tokenizer files at {self.tokenizer} "
                    f"{'are missing' if sha is None else 'changed'} since the dataset was "
                    "planned (their SHA-256 is in the fingerprint); restore them, or re-plan "
                    "the dataset (rerun the build)"
                )
            self._tok = _load_tokenizer(self._facts.json_path)
        return self._tok

    def _render_chat(self, messages: list[dict[str, Any]], where: str) -> tuple[str, str]:
        """(prompt, completion) strings of a chat through the tokenizer's template."""
        if self._chat is None:
            transformers = require("transformers", "hf")
            self._chat = transformers.PreTrainedTokenizerFast(
                tokenizer_file=self._facts.json_path, chat_template=self._facts.chat_template
            )
        try:
            full = self._chat.apply_chat_template(messages, tokenize=False)
            prompt = self._chat.apply_chat_template(
                messages[:-1], tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # jinja2 errors: the template's own raise_exception, ...
            raise DataError(
                f"the chat template failed on {where} ({type(exc).__name__}: {exc})"
            ) from None
        if not full.startswith(prompt):
            raise DataError(
                f"the chat template renders the conversation of {where} without its prompt "
                "as a prefix (the rendering before the last turn, with the generation "
                "prompt); prompt masking needs a template whose rendering only grows"
            )
        return prompt, full[len(prompt) :]

    def _encode(self, records: list[_Record]) -> list[tuple[list[int], int]]:
        """``(tokens, prompt_length)`` of each record, checked against ``max_tokens``."""
        tok = self._tokenizer()
        special = self.add_special_tokens
        if self.mode == "text":
            encs = tok.encode_batch([r.text for r in records], add_special_tokens=special)
            pairs: list[tuple[list[int], list[int]]] = [([], list(e.ids)) for e in encs]
        else:
            if self.mode == "prompt":
                prompts = [r.prompt for r in records]
                comps = [r.completion for r in records]
            else:
                rendered = [self._render_chat(r.messages or [], r.where) for r in records]
                prompts, comps = [p for p, _ in rendered], [c for _, c in rendered]
                special = False
            p_encs = tok.encode_batch(prompts, add_special_tokens=special)
            c_encs = tok.encode_batch(comps, add_special_tokens=False)
            pairs = [(list(p.ids), list(c.ids)) for p, c in zip(p_encs, c_encs, strict=True)]
        out = []
        eos = self.eos_token_id
        for r, (p_ids, c_ids) in zip(records, pairs, strict=True):
            seq = p_ids + c_ids
            if self.add_eos and (not seq or seq[-1] != eos):
                assert eos is not None
                seq.append(eos)
            plen = len(p_ids)
            if self.mode != "text" and plen >= self.max_tokens:
                raise DataError(
                    f"the prompt of {r.where} has {plen} tokens, max_tokens is "
                    f"{self.max_tokens}: no completion token would be left; shorten the "
                    "prompt, drop the record, or raise max_tokens"
                )
            if len(seq) > self.max_tokens:
                if self.truncation == "error":
                    raise DataError(
                        f"{r.where} has {len(seq)} tokens, more than max_tokens="
                        f"{self.max_tokens}; pass truncation='right' to cut it, or raise "
                        "max_tokens"
                    )
                seq = seq[: self.max_tokens]
            if len(seq) < 2:
                raise DataError(
                    f"{r.where} makes {len(seq)} token(s); a causal-LM sample needs at least "
                    "2 (pass add_eos=True, or drop the record)"
                )
            if self.mode != "text" and plen >= len(seq):
                raise DataError(
                    f"the completion of {r.where} makes no token after its {plen}-token "
                    "prompt; give it a non-empty completion"
                )
            out.append((seq, plen))
        return out

    def _iter(
        self, index: int, batch_size: int, holder: list[ShardBatches]
    ) -> Iterator[dict[str, np.ndarray]]:
        skipped: list[int] = []
        ids: list[int] = []
        seqs: list[list[int]] = []
        plens: list[int] = []
        pending: list[_Record] = []
        for rec in [*self._records(index, skipped), None]:
            if rec is not None:
                pending.append(rec)
            if pending and (rec is None or len(pending) >= _ENCODE_BATCH):
                for r, (seq, plen) in zip(pending, self._encode(pending), strict=True):
                    ids.append(r.sample_id)
                    seqs.append(seq)
                    plens.append(plen)
                pending = []
        where = self._where(index)
        if skipped:
            log.warning(
                "%s: skipped %d empty document(s) (whitespace only; first at byte %d)",
                where,
                len(skipped),
                skipped[0],
            )
        planned = None if self._counts is None else self._counts[index]
        if planned is not None and planned != len(ids):
            raise InputChangedError(
                f"{where} holds {len(ids)} documents, the plan {planned}: the files changed "
                "after the dataset was planned; re-plan the dataset (rerun the build)"
            )
        if not ids:
            raise DataError(f"{where} holds no document; pass fewer num_shards")
        sample_ids = np.asarray(ids, dtype=np.int64)
        ordered = np.sort(sample_ids)
        dup = ordered[1:][ordered[1:] == ordered[:-1]]
        if len(dup):
            raise DataError(
                f"sample id {int(dup[0])} appears more than once in {where}; ids "
                f"({self.id_field!r}) must be unique: deduplicate, or pass id_field=None"
            )
        lengths = np.asarray([len(s) for s in seqs], dtype=np.int64)
        offsets = np.zeros(len(seqs) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.concatenate([np.asarray(s, dtype=np.int32) for s in seqs])
        prompt_lengths = np.asarray(plens, dtype=np.int64)
        digest = _ShardDigest({"version": _DIGEST_VERSION, "tokens": "int32"})
        for name, arr in (
            ("sample_id", sample_ids),
            ("tokens", tokens),
            ("lengths", lengths),
            ("prompt_lengths", prompt_lengths),
        ):
            digest.update(name, arr)
        for lo in range(0, len(ids), batch_size):
            hi = min(lo + batch_size, len(ids))
            yield {
                "sample_id": sample_ids[lo:hi],
                "tokens": tokens[offsets[lo] : offsets[hi]],
                "token_offsets": offsets[lo : hi + 1] - offsets[lo],
                "prompt_lengths": prompt_lengths[lo:hi],
            }
        holder[0].digest = digest.hexdigest(len(ids))


def _format_of(paths: Any) -> str:
    """The format ``format="auto"`` picks: by the files' suffixes (a directory: by the
    files under it).

    Raises:
        ConfigError: the names say nothing, or they mix formats.
        DataFileNotFoundError: a path that does not exist.
    """
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not items:
        raise ConfigError("paths is an empty list; pass a file, a directory or a list of files")
    every = tuple(s for v in TEXT_SUFFIXES.values() for s in v)
    names = [os.fspath(p).split("?")[0].lower() for p in items]
    if len(items) == 1 and not names[0].endswith(every):
        try:
            names = [n.lower() for n in _find_files(items[0], every)[1]]
        except DataFileNotFoundError:
            raise
        except (DataError, ConfigError):
            pass
    found = {fmt for n in names for fmt, sfx in TEXT_SUFFIXES.items() if n.endswith(sfx)}
    if len(found) == 1 and all(n.endswith(every) for n in names):
        return found.pop()
    raise ConfigError(
        f"cannot tell the format of {', '.join(map(str, items[:3]))} from the names "
        f"(found {sorted(found) or 'no known suffix'}); pass format='text', 'jsonl' or "
        "'parquet'"
    )
