"""TODO docstring."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from kdcache.errors import require


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    special_tokens: Sequence[str] = ("<|pad|>", "<|endoftext|>"),
    min_frequency: int = 2,
) -> Any:
    """Train a byte-level BPE tokenizer (GPT-2 style) with Hugging Face tokenizers.

    Deterministic for the same texts and settings. Special tokens get ids 0, 1, ... in the
    order given (by default pad = 0, end of text = 1).

    Args:
        texts: Training texts.
        vocab_size: Vocabulary size V (including the 256 byte tokens and specials).
        special_tokens: Tokens that are never split.
        min_frequency: Fewest occurrences for a merge.

    Returns:
        A ``tokenizers.Tokenizer``.

    Raises:
        MissingDependencyError: ``tokenizers`` is missing (extra ``hf``).

    Source: Sennrich et al., "Neural Machine Translation of Rare Words with Subword Units",
    ACL 2016; byte-level BPE as in GPT-2 (Radford et al. 2019).
    """
    tk = require("tokenizers", "hf")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        min_frequency=int(min_frequency),
        special_tokens=list(special_tokens),
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def save_tokenizer(tokenizer: Any, directory: str, *, pad_token: str, eos_token: str) -> None:
    """Save a ``tokenizers.Tokenizer`` as a transformers fast tokenizer in ``directory``
    (``tokenizer.json`` and ``tokenizer_config.json``), so that
    :meth:`kdcache.Teacher.from_hf` loads it and hashes its files into the fingerprint.

    Raises:
        MissingDependencyError: transformers is missing (extra ``hf``).
    """
    transformers = require("transformers", "hf")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=pad_token, eos_token=eos_token
    )
    fast.save_pretrained(directory)
