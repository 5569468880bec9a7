"""TextDataset: token datasets read lazily from text, JSON Lines and Parquet files and
tokenised where each shard is read. A tiny BPE tokenizer and a tiny GPT-2 are made here;
nothing is downloaded."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kdcache import Teacher
from kdcache.build.stage import build_cache
from kdcache.data.base import read_shard_checked
from kdcache.data.files import ID_FILE_STRIDE
from kdcache.data.text import TextDataset
from kdcache.data.tokens import tokenizer_files_sha256
from kdcache.errors import ConfigError, DataError, InputChangedError
from kdcache.executors import ExecutorConfig
from kdcache.stream import ShardedStream, SoftTargetDataset, read_token_shard
from pipelines.bpe import save_tokenizer, train_bpe_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A penny saved is a penny earned, or so they say.",
    "To be or not to be, that is the question.",
    "All that glitters is not gold; all who wander are not lost.",
    "Never put off till tomorrow what you can do the day after tomorrow.",
    "Time flies like an arrow; fruit flies like a banana.",
    "Ünïcödé works too: naïve café.",
]
EOS = 1
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    tok = train_bpe_tokenizer(TEXTS * 4, 300, special_tokens=("<|pad|>", "<|endoftext|>"))
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    save_tokenizer(tok, str(path), pad_token="<|pad|>", eos_token="<|endoftext|>")
    return str(path)


@pytest.fixture(scope="module")
def chat_tok_dir(tok_dir, tmp_path_factory):
    fast = transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    fast.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("chat") / "tokenizer"
    fast.save_pretrained(str(path))
    return str(path)


def _direct(tok_dir, text, *, special=True):
    from tokenizers import Tokenizer

    return (
        Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
        .encode(text, add_special_tokens=special)
        .ids
    )


def _write_text(path, docs, sep="\n"):
    path.write_bytes(sep.join(docs).encode() + sep.encode())
    return str(path)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _all(ds):
    """Every shard's records, as {sample_id: (tokens list, prompt length)}."""
    out = {}
    for i in range(ds.num_shards):
        sh = ds.read_shard(i)
        off = sh["token_offsets"]
        for j, sid in enumerate(sh["sample_id"].tolist()):
            assert sid not in out, f"sample_id {sid} read twice"
            out[sid] = (sh["tokens"][off[j] : off[j + 1]].tolist(), int(sh["prompt_lengths"][j]))
    return out


# -- tokens -------------------------------------------------------------------------------


def test_text_file_tokens_equal_a_direct_tokenisation(tmp_path, tok_dir):
    path = _write_text(tmp_path / "a.txt", TEXTS)
    ds = TextDataset(path, tokenizer=tok_dir, num_shards=3)
    got = _all(ds)
    assert len(got) == len(TEXTS) == len(ds)
    by_offset = sorted(got)
    for sid, text in zip(by_offset, TEXTS, strict=True):
        assert got[sid] == ([*_direct(tok_dir, text), EOS], 0)
    sh = ds.read_shard(0)
    assert sh["tokens"].dtype == np.int32 and sh["sample_id"].dtype == np.int64
    assert sh["token_offsets"][0] == 0 and sh["prompt_lengths"].dtype == np.int64
    assert ds.preprocessing["tokenizer_files_sha256"] == tokenizer_files_sha256(tok_dir)
    assert ds.pad_token_id == 0 and ds.eos_token_id == EOS


def test_fortune_separator_and_overlapping_separators(tmp_path, tok_dir):
    # "\n%\n%\n" is an empty fortune (overlapping separators: one), skipped, logged
    raw = "first one\n%\nsecond\nline\n%\n%\nthird\n%\n"
    path = tmp_path / "fortunes"
    path.write_text(raw)
    ds = TextDataset(str(path), tokenizer=tok_dir, format="text", record_separator="\n%\n")
    got = _all(ds)
    texts = sorted((sid, toks) for sid, (toks, _) in got.items())
    assert [t for _, t in texts] == [
        [*_direct(tok_dir, t), EOS] for t in ("first one", "second\nline", "third")
    ]
    # ids are byte offsets of each document in the file
    assert [sid for sid, _ in texts] == [
        raw.index("first"),
        raw.index("second"),
        raw.index("third"),
    ]


def test_every_record_is_read_exactly_once_whatever_the_cut(tmp_path, tok_dir):
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(TEXTS[0].split(), rng.integers(1, 12))) for _ in range(60)]
    paths = [
        _write_text(tmp_path / f"{k}.txt", docs[k * 20 : (k + 1) * 20], "\n\n") for k in range(3)
    ]
    want = {(f, d) for f in range(3) for d in docs[f * 20 : (f + 1) * 20]}
    raw = [(tmp_path / f"{k}.txt").read_bytes() for k in range(3)]
    for n in (1, 2, 5, 13, 40):
        ds = TextDataset(paths, tokenizer=tok_dir, record_separator="\n\n", num_shards=n)
        assert ds.num_shards == n
        got = _all(ds)
        assert sum(ds.shard_counts()) == 60  # the one scan, outside the fingerprint
        assert len(got) == 60
        seen = set()
        for sid, (toks, _) in got.items():
            f, off = divmod(sid, ID_FILE_STRIDE)
            text = raw[f][off:].split(b"\n\n")[0].decode()
            assert toks == [*_direct(tok_dir, text), EOS]
            seen.add((f, text))
        assert seen == want


def test_jsonl_and_parquet_give_the_same_tokens_and_ids(tmp_path, tok_dir):
    rows = [{"id": 100 + k, "text": t} for k, t in enumerate(TEXTS)]
    jl = _write_jsonl(tmp_path / "a.jsonl", rows)
    pqf = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pqf, row_group_size=2)
    a = TextDataset(jl, tokenizer=tok_dir, id_field="id", num_shards=2)
    b = TextDataset(str(pqf), tokenizer=tok_dir, id_field="id", num_shards=3)
    assert a.format == "jsonl" and b.format == "parquet"
    assert (
        _all(a)
        == _all(b)
        == {100 + k: ([*_direct(tok_dir, t), EOS], 0) for k, t in enumerate(TEXTS)}
    )
    # derived ids: file index * 2**40 + row
    c = TextDataset(str(pqf), tokenizer=tok_dir, num_shards=2)
    assert sorted(_all(c)) == list(range(len(TEXTS)))


def test_prompt_completion_masks_the_prompt(tmp_path, tok_dir):
    rows = [{"q": "To be or not", "a": " to be."}, {"q": "A penny", "a": " saved."}]
    ds = TextDataset(
        _write_jsonl(tmp_path / "pc.jsonl", rows),
        tokenizer=tok_dir,
        prompt_field="q",
        completion_field="a",
    )
    for (toks, plen), r in zip([v for _, v in sorted(_all(ds).items())], rows, strict=True):
        p, c = _direct(tok_dir, r["q"]), _direct(tok_dir, r["a"], special=False)
        assert plen == len(p) > 0
        assert toks == [*p, *c, EOS]


def test_chat_template_masks_all_but_the_last_assistant_turn(tmp_path, chat_tok_dir):
    msgs = [
        {"role": "user", "content": "Who jumps?"},
        {"role": "assistant", "content": "The fox."},
        {"role": "user", "content": "Over what?"},
        {"role": "assistant", "content": "The lazy dog."},
    ]
    ds = TextDataset(
        _write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}]),
        tokenizer=chat_tok_dir,
        messages_field="messages",
    )
    [(toks, plen)] = _all(ds).values()
    prompt = (
        "<|user|>Who jumps?<|endoftext|><|assistant|>The fox.<|endoftext|>"
        "<|user|>Over what?<|endoftext|><|assistant|>"
    )
    p = _direct(chat_tok_dir, prompt, special=False)
    c = _direct(chat_tok_dir, "The lazy dog.<|endoftext|>", special=False)
    assert plen == len(p)
    assert toks == [*p, *c]  # ends with eos already: no second one
    assert toks[-1] == EOS and toks.count(EOS) == 4


# -- the plan ------------------------------------------------------------------------------


class _NoDataFile:
    """An open file whose size and metadata can be asked, but not its bytes."""

    def __init__(self, f):
        self._f = f

    def size(self):
        return self._f.size()

    def metadata(self):
        return self._f.metadata()

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getattr__(self, name):
        raise AssertionError(f"the plan read file data ({name})")


class _NoDataFS:
    def __init__(self, fs):
        self._fs = fs

    def open_input_file(self, path):
        return _NoDataFile(self._fs.open_input_file(path))

    def get_file_info(self, path):
        return self._fs.get_file_info(path)


def test_the_plan_reads_no_data_on_the_driver(tmp_path, tok_dir, monkeypatch):
    import kdcache.data.text as text_mod

    paths = [_write_text(tmp_path / f"{k}.txt", TEXTS) for k in range(2)]
    pqf = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": TEXTS}), pqf, row_group_size=3)
    real = text_mod._fs_of
    with monkeypatch.context() as m:
        m.setattr(text_mod, "_fs_of", lambda root: (_NoDataFS(real(root)[0]), real(root)[1]))
        ds = TextDataset(paths, tokenizer=tok_dir, num_shards=3)
        assert ds.num_shards == 3 and ds.files == ["0.txt", "1.txt"]
        # the fingerprint (the key) reads no data either: a byte range's records are
        # counted where it is read
        fp = ds.fingerprint()
        assert len(fp["shards"]) == 3 and all("num_records" not in x for x in fp["shards"])
        with pytest.raises(AssertionError, match="read file data"):
            ds.read_shard(0)
    with monkeypatch.context() as m:  # Parquet: footers only, counts included
        m.setattr(pq.ParquetFile, "iter_batches", _refuse)
        m.setattr(pq.ParquetFile, "read_row_groups", _refuse)
        m.setattr(pq.ParquetFile, "read", _refuse)
        pds = TextDataset(str(pqf), tokenizer=tok_dir, num_shards=2)
        fp = pds.fingerprint()
        assert [s["num_records"] for s in fp["shards"]] == [3, 4]
    # the plan is small and travels; a copy reads the same
    assert len(pickle.dumps(ds)) < 20_000
    back = pickle.loads(pickle.dumps(ds))
    assert _all(back) == _all(ds)
    assert len(ds) == 2 * len(TEXTS)


def _refuse(*args, **kwargs):
    raise AssertionError("the plan read file data")


def test_fingerprint_changes_with_tokenizer_settings_and_file(tmp_path, tok_dir, chat_tok_dir):
    path = tmp_path / "a.txt"
    _write_text(path, TEXTS)

    def fp(**kw):
        return TextDataset(str(path), tokenizer=kw.pop("tokenizer", tok_dir), **kw).fingerprint()

    base = fp()
    assert fp() == base
    for kw in (
        {"tokenizer": chat_tok_dir},
        {"max_tokens": 100},
        {"truncation": "right"},
        {"add_eos": False},
        {"num_shards": 2},
        {"record_separator": "."},
    ):
        assert fp(**kw) != base, kw
    assert fp(pad_token_id=5) == base  # padding changes no valid position
    _write_text(path, [*TEXTS, "one more"])
    assert fp() != base


# -- bad input -----------------------------------------------------------------------------


def test_bad_input_is_refused_with_clear_errors(tmp_path, tok_dir, caplog):
    jl = tmp_path / "x.jsonl"
    # an empty line is skipped and logged; an empty text is refused
    _write_jsonl(jl, [{"text": "fine"}])
    jl.write_text(jl.read_text() + "\n   \n" + json.dumps({"text": "also"}) + "\n")
    ds = TextDataset(str(jl), tokenizer=tok_dir)
    with caplog.at_level("WARNING"):
        assert len(_all(ds)) == 2
    assert "skipped 2 empty document" in caplog.text  # "" and "   "

    cases = [
        ([{"text": ""}], {}, "is empty"),
        ([{"body": "x"}], {}, "no field 'text'"),
        ([{"text": 3}], {}, "is int, expected a string"),
        ([{"text": "x", "id": "7"}], {"id_field": "id"}, "expected an int64 id"),
        ([{"text": "a"}, {"text": "b", "id": 1}], {"id_field": "id"}, "no field 'id'"),
        ([{"text": "x", "id": 1}, {"text": "y", "id": 1}], {"id_field": "id"}, "more than once"),
        ([{"text": TEXTS[4]}], {"max_tokens": 5}, "truncation='right'"),
        (
            [{"q": TEXTS[4], "a": "x"}],
            {"prompt_field": "q", "completion_field": "a", "max_tokens": 5, "truncation": "right"},
            "no completion token",
        ),
        ([{"q": "x", "a": "  "}], {"prompt_field": "q", "completion_field": "a"}, "is empty"),
        ([{"text": "x"}], {"add_eos": False}, "needs at least 2"),
    ]
    for k, (rows, kw, msg) in enumerate(cases):
        ds = TextDataset(_write_jsonl(tmp_path / f"c{k}.jsonl", rows), tokenizer=tok_dir, **kw)
        with pytest.raises(DataError, match=msg) as info:
            ds.read_shard(0)
        assert f"c{k}.jsonl" in str(info.value)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl \(byte 15\) is not a JSON object"):
        TextDataset(str(bad), tokenizer=tok_dir).read_shard(0)
    chat = _write_jsonl(tmp_path / "chat.jsonl", [{"m": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ConfigError, match="chat template"):
        TextDataset(chat, tokenizer=tok_dir, messages_field="m")


def test_truncation_right_cuts_and_is_in_the_fingerprint(tmp_path, tok_dir):
    path = _write_text(tmp_path / "a.txt", [TEXTS[4]])
    ds = TextDataset(path, tokenizer=tok_dir, max_tokens=5, truncation="right")
    [(toks, _)] = _all(ds).values()
    assert toks == _direct(tok_dir, TEXTS[4])[:5]
    assert ds.fingerprint()["preprocessing"]["truncation"] == "right"


def test_bad_tokenizer_and_arguments_are_refused(tmp_path, tok_dir):
    path = _write_text(tmp_path / "a.txt", TEXTS)
    broken = tmp_path / "broken.json"
    broken.write_text("{not a tokenizer")
    with pytest.raises(ConfigError, match="does not load"):
        TextDataset(path, tokenizer=str(broken))
    with pytest.raises(ConfigError, match="does not exist"):
        TextDataset(path, tokenizer=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"no tokenizer\.json"):
        TextDataset(path, tokenizer=str(tmp_path))
    with pytest.raises(ConfigError, match="truncation"):
        TextDataset(path, tokenizer=tok_dir, truncation="left")
    with pytest.raises(ConfigError, match="cannot tell the format"):
        TextDataset(_write_text(tmp_path / "nosuffix", TEXTS), tokenizer=tok_dir)
    with pytest.raises(ConfigError, match="go together"):
        TextDataset(path, tokenizer=tok_dir, prompt_field="q")
    pqf = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": TEXTS, "n": list(range(len(TEXTS)))}), pqf)
    with pytest.raises(DataError, match=r"no column 'body'.*columns are: text, n"):
        TextDataset(str(pqf), tokenizer=tok_dir, text_field="body")
    with pytest.raises(DataError, match="expected strings"):
        TextDataset(str(pqf), tokenizer=tok_dir, text_field="n")
    with pytest.raises(ConfigError, match="row groups"):
        TextDataset(str(pqf), tokenizer=tok_dir, num_shards=2)


def test_a_file_or_tokenizer_changed_after_the_plan_is_refused(tmp_path, tok_dir):
    path = tmp_path / "a.txt"
    _write_text(path, TEXTS)
    ds = TextDataset(str(path), tokenizer=tok_dir, num_shards=2)
    ds.fingerprint()
    _write_text(path, [*TEXTS, "more"])
    with pytest.raises(InputChangedError, match="changed after the dataset was planned"):
        ds.read_shard(0)
    tok2 = tmp_path / "tok2"
    shutil.copytree(tok_dir, tok2)
    _write_text(path, TEXTS)
    ds = TextDataset(str(path), tokenizer=str(tok2))
    (tok2 / "tokenizer_config.json").write_text("{}")
    with pytest.raises(InputChangedError, match="tokenizer files"):
        ds.read_shard(0)


def test_digest_depends_on_the_tokens_not_the_batching(tmp_path, tok_dir):
    path = tmp_path / "a.txt"
    _write_text(path, TEXTS)
    ds = TextDataset(str(path), tokenizer=tok_dir)
    _, digest = read_shard_checked(ds, 0)
    reader = ds.open_shard(0, 2)
    parts = list(reader)
    assert len(parts) == 4 and all(p["token_offsets"][0] == 0 for p in parts)
    assert reader.digest == digest and digest.startswith("xxh3_128:")
    st = os.stat(path)
    path.write_bytes(path.read_bytes().replace(b"fox", b"cat"))  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert read_shard_checked(ds, 0)[1] != digest


# -- end to end ------------------------------------------------------------------------------


def _gpt2(path, tok_dir, n_positions=64):
    cfg = transformers.GPT2Config(
        vocab_size=320,
        n_positions=n_positions,
        n_embd=16,
        n_layer=1,
        n_head=2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(path))
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    tok.save_pretrained(str(path))
    return str(path)


def test_build_cache_and_stream_over_a_text_dataset(tmp_path, tok_dir, monkeypatch):
    # neither stage counts records on the driver: the teacher stage reads each byte range
    # where it runs, and the student's stream takes the counts from the commit records
    def no_scan(self):
        raise AssertionError("shard_counts scanned the text on the driver")

    monkeypatch.setattr(TextDataset, "shard_counts", no_scan)
    teacher_dir = _gpt2(tmp_path / "teacher", tok_dir)
    teacher = Teacher.from_hf(teacher_dir, task="causal-lm", name="t0")
    path = tmp_path / "a.txt"
    _write_text(path, TEXTS * 2)
    # the teacher directory holds the same tokenizer files: its hash matches
    ds = TextDataset(str(path), tokenizer=teacher_dir, num_shards=3)
    cache = build_cache(
        ds,
        teacher,
        temperature=2.0,
        root=str(tmp_path / "cache"),
        executor=ExecutorConfig(kind="local", batch_size=4),
        kind="topk",
        params={"k": 8},
        progress=False,
    )
    stream = SoftTargetDataset(cache, ds, batch_size=2, shuffle=False, drop_last=False)
    seen = []
    for batch in stream:
        seen += batch["sample_id"].tolist()
        num_b, width = batch["inputs"].shape
        assert batch["targets"].ids_BS.shape[0] == num_b * width  # rows b * T + t
        # the kept ids at each target position are the teacher's top 8 for that sequence
        b, t = torch.nonzero(batch["mask"], as_tuple=True)
        for bi in b.unique().tolist():
            n = int(batch["lengths"][bi])
            z = teacher.logits(batch["inputs"][bi : bi + 1, :n])[0, :, :300]
            ts = t[b == bi]
            want = torch.topk(z[ts], 8).indices.sort(-1).values
            got = batch["targets"].ids_BS[bi * width + ts].sort(-1).values
            assert torch.equal(got, want)
    assert sorted(seen) == sorted(_all(ds)) and len(seen) == 2 * len(TEXTS)
    recs = [m.input_digest for m in (cache.manifest_record(i) for i in range(3))]
    assert all(r and r.startswith("xxh3_128:") for r in recs)
    monkeypatch.undo()  # a stream without a cache counts the records: one scan
    assert len(list(ShardedStream(ds, batch_size=3, drop_last=False))) == 5

    # a file changed under the same size and mtime is refused at the join
    st = os.stat(path)
    path.write_bytes(path.read_bytes().replace(b"fox", b"cat"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(InputChangedError, match="content digest"):
        read_token_shard(cache, 0, ds)


def test_teacher_with_another_tokenizer_or_shorter_context_is_refused(tmp_path, tok_dir):
    path = _write_text(tmp_path / "a.txt", TEXTS)
    # same size, other ids: only the tokenizer files' SHA-256 tells them apart
    other = train_bpe_tokenizer(TEXTS * 4, 300, special_tokens=("<|endoftext|>", "<|pad|>"))
    other_dir = tmp_path / "other"
    save_tokenizer(other, str(other_dir), pad_token="<|pad|>", eos_token="<|endoftext|>")
    t_other = Teacher.from_hf(_gpt2(tmp_path / "t_other", str(other_dir)), task="causal-lm")
    short_dir = _gpt2(tmp_path / "short", tok_dir, n_positions=8)
    short = Teacher.from_hf(short_dir, task="causal-lm")
    ds = TextDataset(path, tokenizer=short_dir)  # the teacher's own tokenizer files
    kw = {"temperature": 1.0, "executor": ExecutorConfig(kind="local"), "progress": False}
    with pytest.raises(ConfigError, match="different tokens"):
        build_cache(ds, t_other, root=str(tmp_path / "c1"), **kw)
    with pytest.raises(ConfigError, match=r"n_positions.*max_tokens=8, truncation='right'"):
        build_cache(ds, short, root=str(tmp_path / "c2"), **kw)
    ok = TextDataset(path, tokenizer=short_dir, max_tokens=8, truncation="right")
    cache = build_cache(ok, short, root=str(tmp_path / "c3"), **kw)
    assert cache.manifest_record(0).input_digest is not None


def test_runs_of_overlapping_separators_split_the_same_whatever_the_cut(tmp_path, tok_dir):
    import re

    rng = np.random.default_rng(1)
    words = TEXTS[3].split()
    docs = [
        "\n".join(" ".join(rng.choice(words, 3)) for _ in range(rng.integers(1, 3)))
        for _ in range(40)
    ]
    raw = "".join(d + "\n" * int(rng.integers(2, 6)) for d in docs)
    path = tmp_path / "runs.txt"
    path.write_text(raw)
    want = [d for d in re.split(r"\n{2,}", raw) if d.strip()]  # a run of >= 2 is one
    assert want == docs
    for n in (1, 3, 7, 16):
        ds = TextDataset(str(path), tokenizer=tok_dir, record_separator="\n\n", num_shards=n)
        got = [toks for _, (toks, _) in sorted(_all(ds).items())]
        assert got == [[*_direct(tok_dir, d), EOS] for d in docs], n
