"""Bad inputs through the API and the CLI, output-directory safety, and the CLI happy path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from helpers import copy_checkpoint, saved_tensors, tree_digest

from moeprune import api
from moeprune.arch.tiny import COMMON, tiny_tokenizer
from moeprune.cli import main
from moeprune.errors import MoepruneError
from moeprune.observe import Stats
from moeprune.plan import Plan
from moeprune.store.checkpoint import parameter_counts

SMALL = {"samples": 8, "seq_len": 32}
SMALL_FLAGS = ["--samples", "8", "--seq-len", "32"]


@pytest.fixture(scope="session")
def llama_checkpoint(tmp_path_factory) -> Path:
    """A dense (unsupported) tiny Llama saved as a stock checkpoint."""
    path = tmp_path_factory.mktemp("llama") / "llama"
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**COMMON, intermediate_size=128))
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("error:"), lines[0]
    return lines[0]


# ---- bad inputs ---------------------------------------------------------------------------------

def _bad_case(name: str, tmp: Path, checkpoint, calib_file: Path, llama: Path):
    """-> (model dir, method, calib, ratio, experts, expected message fragment)."""
    good = checkpoint("mixtral")
    if name == "missing model":
        return tmp / "no-such-model", "frequency", calib_file, 0.5, None, "does not exist"
    if name == "garbage config":
        bad = copy_checkpoint(good, tmp / "garbage")
        (bad / "config.json").write_text("{this is not json")
        return bad, "frequency", calib_file, 0.5, None, "config.json"
    if name == "no config":
        bad = copy_checkpoint(good, tmp / "noconfig")
        (bad / "config.json").unlink()
        return bad, "frequency", calib_file, 0.5, None, "no config.json"
    if name == "truncated weights":
        bad = copy_checkpoint(good, tmp / "truncated")
        weights = bad / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        return bad, "frequency", calib_file, 0.5, None, "weights"
    if name == "unsupported family":
        return llama, "frequency", calib_file, 0.5, None, "unsupported model_type 'llama'"
    if name == "ratio 1.0":
        return good, "frequency", calib_file, 1.0, None, r"outside \[0, 1\)"
    if name == "ratio -0.1":
        return good, "frequency", calib_file, -0.1, None, r"outside \[0, 1\)"
    if name == "too few experts":
        return good, "frequency", calib_file, None, 1, "top-k"
    if name == "empty calib":
        empty = tmp / "empty.txt"
        empty.write_text("  \n\n ")
        return good, "frequency", empty, 0.5, None, "no text"
    if name == "short calib":
        short = tmp / "short.txt"
        short.write_text("def f(x):\n    return x\n")
        return good, "frequency", short, 0.5, None, "fewer than one block"
    if name == "missing calib":
        return good, "frequency", tmp / "nope.txt", 0.5, None, "does not exist"
    if name == "unknown method":
        return good, "no-such-method", calib_file, 0.5, None, "unknown method"
    if name == "groups":
        return checkpoint("deepseek_v3"), "frequency", calib_file, None, 3, "flatten-groups"
    raise AssertionError(name)


BAD_CASES = ["missing model", "garbage config", "no config", "truncated weights", "unsupported family",
             "ratio 1.0", "ratio -0.1", "too few experts", "empty calib", "short calib", "missing calib",
             "unknown method", "groups"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_fails_cleanly_via_api(case, tmp_path, checkpoint, calib_file, llama_checkpoint):
    model, method, calib, ratio, experts, message = _bad_case(case, tmp_path, checkpoint, calib_file,
                                                              llama_checkpoint)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(MoepruneError, match=message):
        api.prune(model, method, work / "out", ratio=ratio, experts=experts, calib=str(calib), progress=False,
                  **SMALL)
    assert list(work.iterdir()) == [], "nothing may be left behind, not even a temporary directory"


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_fails_cleanly_via_cli(case, tmp_path, checkpoint, calib_file, llama_checkpoint, capsys):
    model, method, calib, ratio, experts, message = _bad_case(case, tmp_path, checkpoint, calib_file,
                                                              llama_checkpoint)
    work = tmp_path / "work"
    work.mkdir()
    argv = ["prune", str(model), "--method", method, "--out", str(work / "out"), "--calib", str(calib),
            *SMALL_FLAGS]
    argv += ["--ratio", str(ratio)] if ratio is not None else ["--experts", str(experts)]
    capsys.readouterr()
    assert main(argv) != 0
    line = _one_error_line(capsys)
    assert message.replace("\\", "") in line
    assert list(work.iterdir()) == []


def test_other_commands_fail_cleanly(tmp_path, checkpoint, calib_file, capsys):
    missing = str(tmp_path / "missing")
    for argv in (["inspect", missing],
                 ["observe", missing, "--calib", str(calib_file), "--out", str(tmp_path / "s")],
                 ["plan", missing, "--method", "reap", "--experts", "4", "--out", str(tmp_path / "p.json")],
                 ["apply", str(checkpoint("mixtral")), missing, "--out", str(tmp_path / "o")]):
        capsys.readouterr()
        assert main(argv) != 0, argv
        _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cheap_checks_happen_before_any_expensive_work(tmp_path, checkpoint, calib_file, monkeypatch, capsys):
    def expensive(*args, **kwargs):
        raise AssertionError("an expensive step ran before the cheap checks")

    for name in ("calibration_blocks", "open_source", "load_tokenizer"):
        monkeypatch.setattr(f"moeprune.api.{name}", expensive)
    monkeypatch.setattr("moeprune.pipeline.run.walk", expensive)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    mixtral, deepseek = str(checkpoint("mixtral")), str(checkpoint("deepseek_v3"))
    calls = [
        (mixtral, "frequency", {"ratio": 1.0}),
        (mixtral, "frequency", {"ratio": -0.1}),
        (mixtral, "frequency", {"experts": 1}),
        (mixtral, "frequency", {"ratio": 0.5, "experts": 4}),
        (deepseek, "frequency", {"experts": 3}),
        (deepseek, "frequency", {"experts": 2}),
        (mixtral, "no-such-method", {"ratio": 0.5}),
        (mixtral, "random", {"ratio": 0.5, "options": {"no_such_option": 1}}),
        (mixtral, "frequency", {"ratio": 0.5, "out": existing}),
        (mixtral, "frequency", {"ratio": 0.5, "out": mixtral}),
        (mixtral, "frequency", {"ratio": 0.5, "calib": None}),
    ]
    for model, method, kwargs in calls:
        out = kwargs.pop("out", tmp_path / "out")
        calib = kwargs.pop("calib", str(calib_file))
        with pytest.raises(MoepruneError):  # an AssertionError here means the check came too late
            api.prune(model, method, out, calib=calib, progress=False, **SMALL, **kwargs)
    capsys.readouterr()
    assert main(["prune", deepseek, "--method", "reap", "--out", str(tmp_path / "out"), "--calib",
                 str(calib_file), "--experts", "3"]) == 2
    assert "flatten-groups" in _one_error_line(capsys)
    assert main(["observe", mixtral, "--calib", str(calib_file), "--out", str(existing)]) == 2
    _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    assert (existing / "keep.txt").read_text() == "precious"


def test_existing_output_needs_force_and_force_replaces_only_moeprune_outputs(tmp_path, checkpoint,
                                                                             calib_file, capsys):
    src = checkpoint("olmoe")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    argv = ["prune", str(src), "--method", "frequency", "--out", str(out), "--calib", str(calib_file),
            "--ratio", "0.5", *SMALL_FLAGS]
    capsys.readouterr()
    assert main(argv) == 2
    assert "--force" in _one_error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    with pytest.raises(MoepruneError, match="force"):
        api.prune(src, "frequency", out, ratio=0.5, calib=str(calib_file), progress=False, **SMALL)
    # a directory moeprune did not write is refused even with --force, naming what is in the way
    assert main(argv + ["--force"]) == 2
    assert "old.txt" in _one_error_line(capsys)
    assert (out / "old.txt").read_text() == "old"

    (out / "old.txt").unlink()  # an empty directory is fine without --force
    assert main(argv) == 0
    # a moeprune output is replaced with --force
    assert main(argv[:-len(SMALL_FLAGS) - 2] + ["--ratio", "0.25", *SMALL_FLAGS, "--force"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert {"config.json", "model.safetensors.index.json", "moeprune_plan.json"} <= set(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temporary or backup directory left"
    assert json.loads((out / "config.json").read_text())["num_experts"] == 6


def test_input_model_directory_is_unchanged(tmp_path, checkpoint, calib_file):
    src = copy_checkpoint(checkpoint("qwen2_moe"), tmp_path / "model")
    before = tree_digest(src)
    api.prune(src, "reap", tmp_path / "out", ratio=0.5, calib=str(calib_file), progress=False,
              stats_out=tmp_path / "stats", **SMALL)
    plan = Plan.load(tmp_path / "out" / "moeprune_plan.json")
    api.apply_checkpoint(src, plan, tmp_path / "out2")
    api.inspect(src)
    assert tree_digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out", "out2", "stats"]


# ---- happy path ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("family,budget", [("mixtral", ["--ratio", "0.5"]),
                                           ("deepseek_v3", ["--experts", "4"])])
def test_cli_stepwise_equals_one_shot_prune(family, budget, tmp_path, checkpoint, calib_file, capsys):
    src = str(checkpoint(family))
    calib = ["--calib", str(calib_file), *SMALL_FLAGS, "--batch-size", "3", "--seed", "1",
             "--probe-size", "64"]
    stats, plan_file = tmp_path / "stats", tmp_path / "plan.json"
    stepwise, oneshot = tmp_path / "stepwise", tmp_path / "oneshot"

    assert main(["observe", src, "--out", str(stats), *calib]) == 0
    assert main(["plan", str(stats), "--method", "reap", "--out", str(plan_file), *budget]) == 0
    assert main(["apply", src, str(plan_file), "--out", str(stepwise)]) == 0
    # compensation off: `apply` re-applies the plan and does not refit
    assert main(["prune", src, "--method", "reap", "--out", str(oneshot), *budget, *calib,
                 "--save-stats", str(tmp_path / "stats2"), "--compensate", "none"]) == 0
    capsys.readouterr()

    a, b = saved_tensors(stepwise), saved_tensors(oneshot)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (json.loads((stepwise / "config.json").read_text())
            == json.loads((oneshot / "config.json").read_text()))

    s1, s2 = Stats.load(stats), Stats.load(tmp_path / "stats2")
    for i in s1.layers:
        for key, tensor in s1.layers[i].experts.tensors().items():
            assert torch.equal(tensor, s2.layers[i].experts.tensors()[key]), key

    plan = Plan.load(plan_file)
    saved = Plan.load(oneshot / "moeprune_plan.json")
    assert [lp.groups for lp in saved.layers] == [lp.groups for lp in plan.layers]
    assert saved.method == "reap" and plan.num_experts_out == 4
    assert plan.calibration["samples"] == 8 and plan.calibration["seq_len"] == 32

    for out in (stepwise, oneshot):
        names = {p.name for p in out.iterdir()}
        assert {"README.md", "moeprune_plan.json", "config.json", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json"} <= names
        assert not any(n.endswith(".tmp") or n.startswith(".") for n in names)
        tok = tf.AutoTokenizer.from_pretrained(out)
        assert tok("def f(x): return x")["input_ids"]

    card = (oneshot / "README.md").read_text()
    original = tf.AutoModelForCausalLM.from_pretrained(src)
    pruned = tf.AutoModelForCausalLM.from_pretrained(oneshot)
    before, after = parameter_counts(original), parameter_counts(pruned)
    assert after["routed_experts"] * 2 == before["routed_experts"]
    assert "`reap`" in card and "2510.13999" in card
    assert "8→4" in card or "8 → 4" in card
    for count in (before["total"], after["total"], before["routed_experts"], after["routed_experts"]):
        assert f"{count:,}" in card
    assert "8 sequences" in card and "32 tokens" in card

    assert main(["inspect", str(oneshot)]) == 0
    shown = capsys.readouterr().out
    assert family in shown and "4 per MoE layer" in shown
    assert main(["inspect", src, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == family and info["num_experts"] == 8 and info["top_k"] == 2


def test_prune_without_calibration_for_random(tmp_path, checkpoint, capsys):
    src = str(checkpoint("gpt_oss"))
    assert main(["prune", src, "--method", "random", "--out", str(tmp_path / "out"), "--experts", "6"]) == 0
    capsys.readouterr()
    plan = Plan.load(tmp_path / "out" / "moeprune_plan.json")
    assert plan.method_config == {"seed": 0} and plan.num_experts_out == 6 and not plan.calibration
    assert "**Calibration:** none" in (tmp_path / "out" / "README.md").read_text()
    assert main(["prune", src, "--method", "random", "--out", str(tmp_path / "o2"), "--experts", "6",
                 "-o", "seed=four"]) == 2
    assert "seed" in _one_error_line(capsys)
    assert main(["prune", src, "--method", "random", "--out", str(tmp_path / "o3"), "--experts", "6",
                 "-o", "colour=red"]) == 2
    assert "colour" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_method_seed_option_reaches_the_method(tmp_path, checkpoint, capsys):
    """`-o seed=N` is the random method's own option; prune's --seed is the calibration seed."""
    src = str(checkpoint("gpt_oss"))
    code = main(["prune", src, "--method", "random", "--out", str(tmp_path / "out"), "--experts", "6",
                 "-o", "seed=4"])
    capsys.readouterr()
    assert code == 0
    assert Plan.load(tmp_path / "out" / "moeprune_plan.json").method_config == {"seed": 4}
