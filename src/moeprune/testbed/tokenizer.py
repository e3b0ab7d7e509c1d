"""A byte-level BPE tokenizer for the testbed, trained on the corpus and saved as a transformers tokenizer.

Byte-level so that any text (code, odd punctuation, non-ASCII) encodes without unknown tokens.
The tokenizer adds no special tokens when encoding: perplexity and calibration code tokenize
plain text files, and a silent BOS would change the token counts they report. `<|bos|>`,
`<|eos|>` and `<|pad|>` exist (ids 0, 1, 2) for code that asks for them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .cache import building_dir, cache_root, stable_hash
from .corpus import Corpus

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
DEFAULT_VOCAB_SIZE = 4096
FORMAT = 1  # bump when training or saving changes, so cached tokenizers are rebuilt


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with `vocab_size` entries (specials and the 256 bytes included)."""
    if not 300 <= vocab_size <= 65536:
        raise ValueError(f"vocab_size={vocab_size} is out of range; the testbed uses 4096-8192")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # No length limit: whole text files are tokenized as one stream and then windowed.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=int(1e30)
    )


def tokenizer_dir(
    corpus: Corpus, vocab_size: int = DEFAULT_VOCAB_SIZE, cache_dir: str | Path | None = None
) -> Path:
    """Where the tokenizer for `corpus` and `vocab_size` is (or will be) cached."""
    key = stable_hash({"format": FORMAT, "corpus": corpus.version, "vocab_size": vocab_size})
    return cache_root(cache_dir) / "tokenizer" / f"bpe{vocab_size}-{key}"


def get_tokenizer(
    corpus: Corpus, vocab_size: int = DEFAULT_VOCAB_SIZE, cache_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """The tokenizer trained on `corpus`'s mixed training split, built on first use and cached."""
    final = tokenizer_dir(corpus, vocab_size, cache_dir)
    if not (final / "tokenizer.json").exists():
        # Documents, not the whole file, so the trainer can count words in parallel.
        docs = (text for _, text in corpus.documents("mixed", "train"))
        tok = train_tokenizer(docs, vocab_size)
        with building_dir(final) as tmp:
            tok.save_pretrained(tmp)
    return PreTrainedTokenizerFast.from_pretrained(final)


def tokenizer_fingerprint(path: str | os.PathLike) -> str:
    """A digest of a saved tokenizer's vocabulary and merges, to key models trained with it."""
    return hashlib.sha256((Path(path) / "tokenizer.json").read_bytes()).hexdigest()[:12]
