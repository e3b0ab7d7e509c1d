"""Hostile inputs and faults against the CLI: one test per class of the reliability issue.

Every refusal must be one line on stderr with exit status 2 (130/143 for signals), and no command
may delete or modify a file it did not create, with or without --force.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import copy_checkpoint, tree_digest
from safetensors.torch import load_file, save_file

from moeprune import api
from moeprune.cli import main
from moeprune.outputs import TEMP_MARKER

SMALL_FLAGS = ["--samples", "8", "--seq-len", "32"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


def one_error_line(capsys) -> str:
    """The one error line of a refusal: the last line on stderr, the only one saying error, no traceback.

    Notices printed before the failure (which path was chosen) may precede it.
    """
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one error line last, got:\n{captured.err}"
    return errors[0]


def refused(capsys, argv: list[str], *needles: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2, f"{argv} was not refused"
    line = one_error_line(capsys)
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    return line


@pytest.fixture
def user_dir(tmp_path):
    """A directory of the user's own files, with its digest to prove nothing in it changed."""
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("precious")
    (d / "sub").mkdir()
    (d / "sub" / "data.bin").write_bytes(b"\x00\x01" * 100)
    return d


@pytest.fixture
def made(tmp_path_factory, checkpoint, calib_file):
    """Stats and plans made by moeprune on tiny models (session-cached paths, read-only)."""
    root = tmp_path_factory.mktemp("made")
    mixtral, qwen = checkpoint("mixtral"), checkpoint("qwen2_moe")
    narrow = checkpoint("mixtral", hidden_size=32)
    for name, model in (("st_mixtral", mixtral), ("st_qwen", qwen), ("st_narrow", narrow)):
        assert main(["observe", str(model), "--calib", str(calib_file), "--out", str(root / name),
                     *SMALL_FLAGS]) == 0
    assert main(["plan", str(root / "st_narrow"), "--method", "mone", "--ratio", "0.5", "--out",
                 str(root / "mone_narrow.json")]) == 0
    assert main(["plan", str(root / "st_mixtral"), "--method", "reap", "--ratio", "0.5", "--out",
                 str(root / "reap.json")]) == 0
    return root


# ---- 1. empty or current-directory outputs ----------------------------------------------------------------

@pytest.mark.parametrize("out", ["", " ", "."])
def test_empty_or_cwd_out_is_refused_and_cwd_untouched(out, user_dir, checkpoint, calib_file, capsys,
                                                       monkeypatch):
    monkeypatch.chdir(user_dir)
    before = tree_digest(user_dir)
    refused(capsys, ["prune", str(checkpoint("mixtral")), "--method", "frequency", "--ratio", "0.25",
                     "--calib", str(calib_file), "--out", out, "--force", *SMALL_FLAGS], "--out")
    refused(capsys, ["plan", "st", "--method", "reap", "--ratio", "0.25", "--out", out, "--force"], "--out")
    assert tree_digest(user_dir) == before


def test_force_replaces_only_moeprune_outputs(user_dir, tmp_path, checkpoint, calib_file, capsys):
    argv = ["prune", str(checkpoint("mixtral")), "--method", "frequency", "--ratio", "0.25", "--calib",
            str(calib_file), *SMALL_FLAGS, "--force"]
    before = tree_digest(user_dir)
    line = refused(capsys, [*argv, "--out", str(user_dir)], "notes.txt")
    assert "did not write" in line
    assert tree_digest(user_dir) == before
    # a file in the way is not replaced either
    refused(capsys, [*argv, "--out", str(user_dir / "notes.txt")], "not a directory")
    assert tree_digest(user_dir) == before


# ---- 2. every input outside every output ------------------------------------------------------------------

def test_outputs_never_overlap_inputs(tmp_path, checkpoint, calib_file, made, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(calib_file, corpus / "a.txt")
    model = str(checkpoint("mixtral"))
    before = tree_digest(corpus)
    refused(capsys, ["prune", model, "--method", "frequency", "--ratio", "0.25", "--calib", str(corpus),
                     "--out", str(corpus), "--force", *SMALL_FLAGS], "--calib")
    refused(capsys, ["prune", model, "--method", "frequency", "--ratio", "0.25", "--calib", str(corpus),
                     "--out", str(corpus / "inside"), *SMALL_FLAGS], "--calib")
    refused(capsys, ["observe", model, "--calib", str(calib_file), "--out", str(tmp_path / "st"),
                     "--offload-dir", str(tmp_path / "st" / "spill"), *SMALL_FLAGS], "overlap")
    refused(capsys, ["prune", model, "--method", "frequency", "--ratio", "0.25", "--calib", str(calib_file),
                     "--out", str(tmp_path / "o"), "--save-stats", str(tmp_path / "o"), *SMALL_FLAGS],
            "--save-stats")
    assert tree_digest(corpus) == before
    stats = tmp_path / "st2"
    shutil.copytree(made / "st_mixtral", stats)
    shutil.copy(made / "reap.json", stats / "plan.json")
    before = tree_digest(stats)
    refused(capsys, ["apply", model, str(stats / "plan.json"), "--stats", str(stats), "--out", str(stats),
                     "--force"], "overlaps the input")
    refused(capsys, ["apply", model, str(made / "reap.json"), "--out", model, "--force"], "model")
    assert tree_digest(stats) == before


# ---- 3. single-file outputs never land in an input ---------------------------------------------------------

def test_file_outputs_never_replace_input_files(tmp_path, checkpoint, made, capsys):
    model = copy_checkpoint(checkpoint("mixtral"), tmp_path / "m")
    before = tree_digest(model)
    refused(capsys, ["plan", str(made / "st_mixtral"), "--method", "reap", "--ratio", "0.25", "--model",
                     str(model), "--out", str(model / "config.json"), "--force"], "--model")
    refused(capsys, ["eval", str(model), "--text", str(model / "tokenizer.json"), "--json",
                     str(model / "model.safetensors"), "--force"], "model 1")
    assert tree_digest(model) == before
    # --force replaces a plan moeprune wrote, but never a user's file
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "data"}')
    refused(capsys, ["plan", str(made / "st_mixtral"), "--method", "reap", "--ratio", "0.25", "--out",
                     str(mine), "--force"], "not a file moeprune wrote")
    assert mine.read_text() == '{"my": "data"}'
    ours = tmp_path / "ours.json"
    shutil.copy(made / "reap.json", ours)
    assert main(["plan", str(made / "st_mixtral"), "--method", "frequency", "--ratio", "0.25", "--out",
                 str(ours), "--force"]) == 0
    assert json.loads(ours.read_text())["method"] == "frequency"


# ---- 4. stats and plans carry the model's fingerprint ------------------------------------------------------

def test_stats_and_plans_of_another_model_are_refused(tmp_path, checkpoint, made, capsys):
    mixtral, qwen = str(checkpoint("mixtral")), str(checkpoint("qwen2_moe"))
    refused(capsys, ["apply", mixtral, str(made / "mone_narrow.json"), "--stats", str(made / "st_narrow"),
                     "--out", str(tmp_path / "o1")], "hidden_size")
    refused(capsys, ["plan", str(made / "st_qwen"), "--method", "dek", "--ratio", "0.25", "-o",
                     "representation=weight", "--model", mixtral, "--out", str(tmp_path / "p.json")],
            "model_type")
    refused(capsys, ["apply", qwen, str(made / "reap.json"), "--out", str(tmp_path / "o2")], "model_type")
    stats = json.loads((made / "st_mixtral" / "stats.json").read_text())["model"]
    assert {"fingerprint", "num_layers", "hidden_size", "expert_intermediate_size"} <= set(stats)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# ---- 5. numeric options checked up front -------------------------------------------------------------------

@pytest.mark.parametrize("flag,value,needle", [
    ("--batch-size", "-1", "--batch-size"), ("--batch-size", "0", "--batch-size"),
    ("--probe-size", "-1", "--probe-size"), ("--seq-len", "4096", "max_position_embeddings"),
    ("--hidden-memory", "nan", "--hidden-memory"), ("--samples", "0", "--samples"),
    ("--ratio", "nan", "--ratio"),
])
def test_numeric_options_refused_before_work(flag, value, needle, tmp_path, checkpoint, calib_file, capsys,
                                             monkeypatch):
    monkeypatch.setattr(api, "open_source",
                        lambda *a, **k: pytest.fail("the model was loaded before the check"))
    argv = ["prune", str(checkpoint("mixtral")), "--method", "frequency", "--calib", str(calib_file), "--out",
            str(tmp_path / "o"), "--samples", "8", "--seq-len", "32", "--in-memory"]
    argv += [] if flag == "--ratio" else ["--ratio", "0.25"]
    refused(capsys, [*argv, flag, value], needle)
    assert not (tmp_path / "o").exists()


# ---- 6. and 7. interrupts and signals ----------------------------------------------------------------------

def test_ctrl_c_exits_non_zero_with_a_message(tmp_path, checkpoint, calib_file, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "calibration_blocks", interrupted)
    capsys.readouterr()
    assert main(["prune", str(checkpoint("mixtral")), "--method", "frequency", "--ratio", "0.25", "--calib",
                 str(calib_file), "--out", str(tmp_path / "o"), *SMALL_FLAGS]) == 130
    assert "interrupted" in one_error_line(capsys)


# A driver that stops inside the save (the weights file is being written) and says so on stdout.
SLOW_SAVE = textwrap.dedent("""
    import sys, time
    import moeprune.pipeline.run as run
    real = run._finish
    def slow(*args, **kwargs):
        real(*args, **kwargs)
        print("SAVING", flush=True)
        time.sleep(120)
    run._finish = slow
    from moeprune.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _start_slow_prune(tmp_path: Path, model: Path, calib: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, "prune", str(model), "--method", "frequency",
                             "--ratio", "0.25", "--calib", str(calib), "--out", str(out), "--in-memory",
                             *SMALL_FLAGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "SAVING" in line:
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    pytest.fail(f"the driver never reached the save: {proc.stderr.read()}")


def _temporaries(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.tmp-*")) + sorted(parent.glob(f".{name}.old-*"))


@pytest.mark.slow
def test_sigterm_during_save_cleans_up_and_exits_non_zero(tmp_path, checkpoint, calib_file):
    work = tmp_path / "work"
    work.mkdir()
    proc = _start_slow_prune(tmp_path, checkpoint("mixtral"), calib_file, work / "out")
    assert _temporaries(work, "out"), "the save should be under way in a temporary directory"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert "terminated" in err and "Traceback" not in err
    assert list(work.iterdir()) == [], "the temporary directory must be removed"


@pytest.mark.slow
def test_sigkill_during_save_is_cleaned_by_the_next_run(tmp_path, checkpoint, calib_file, capsys):
    work = tmp_path / "work"
    work.mkdir()
    proc = _start_slow_prune(tmp_path, checkpoint("mixtral"), calib_file, work / "out")
    proc.kill()
    proc.communicate(timeout=60)
    left = _temporaries(work, "out")
    assert left and (left[0] / TEMP_MARKER).is_file(), "SIGKILL cannot be handled: the sibling stays, marked"
    # a directory that merely looks like ours (no marker) is never touched
    lookalike = work / ".out.tmp-user"
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["prune", str(checkpoint("mixtral")), "--method", "frequency", "--ratio", "0.25", "--calib",
                 str(calib_file), "--out", str(work / "out"), *SMALL_FLAGS]) == 0
    assert "removed" in capsys.readouterr().err
    assert sorted(p.name for p in work.iterdir()) == [".out.tmp-user", "out"]
    assert (lookalike / "keep.txt").read_text() == "mine"


# ---- 8. garbage accepted silently --------------------------------------------------------------------------

def test_nan_weights_are_refused(tmp_path, checkpoint, calib_file, capsys):
    model = copy_checkpoint(checkpoint("mixtral"), tmp_path / "m")
    tensors = load_file(str(model / "model.safetensors"))
    key = next(k for k in sorted(tensors) if "experts.3" in k and "layers.1" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    for mode in ("--in-memory", "--layerwise"):
        refused(capsys, ["prune", str(model), "--method", "frequency", "--ratio", "0.25", "--calib",
                         str(calib_file), "--out", str(tmp_path / "o"), mode, *SMALL_FLAGS],
                "NaN or Inf", "layers.1")
    assert not (tmp_path / "o").exists()


def test_boolean_options_accept_only_clear_words(tmp_path, checkpoint, calib_file, capsys):
    refused(capsys, ["prune", str(checkpoint("mixtral")), "--method", "mone", "--ratio", "0.25", "--calib",
                     str(calib_file), "--out", str(tmp_path / "o"), "-o", "novice=maybe"], "true or false")
    refused(capsys, ["prune", str(checkpoint("mixtral")), "--method", "mone", "--ratio", "0.25", "--calib",
                     str(calib_file), "--out", str(tmp_path / "o"), "-o", "novice"], "give a value")


def test_binary_and_endless_calibration_is_refused(tmp_path, checkpoint, capsys):
    model = str(checkpoint("mixtral"))
    binary = tmp_path / "weights.bin.txt"
    binary.write_bytes(bytes(range(256)) * 400)
    argv = ["prune", model, "--method", "frequency", "--ratio", "0.25", "--out", str(tmp_path / "o"),
            *SMALL_FLAGS]
    refused(capsys, [*argv, "--calib", str(binary)], "binary")
    if Path("/dev/zero").exists():
        started = time.monotonic()
        refused(capsys, [*argv, "--calib", "/dev/zero"], "binary")
        assert time.monotonic() - started < 120, "reading /dev/zero must stop at the cap"


def test_non_utf8_calibration_text_is_reported(tmp_path, checkpoint, calib_file, capsys):
    model = str(checkpoint("mixtral"))
    damaged = tmp_path / "damaged.txt"
    damaged.write_bytes(calib_file.read_bytes() + b"\n\xff\xfe broken \xc3\n")
    capsys.readouterr()
    assert main(["observe", model, "--calib", str(damaged), "--out", str(tmp_path / "st"), *SMALL_FLAGS]) == 0
    assert "replaced by U+FFFD" in capsys.readouterr().err
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n{"text": "\xff bad"}\n')
    refused(capsys, ["observe", model, "--calib", str(jsonl), "--out", str(tmp_path / "st2"), *SMALL_FLAGS],
            "rows.jsonl:2", "UTF-8")


# ---- 9. usage errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,needle", [
    (["prune", "m", "--method", "reap", "--out", "o", "--bogus"], "--bogus"),
    (["prune", "m", "--out", "o"], "--method"),
    (["prune", "m", "--method", "reap", "--out", "o", "--ratio", "abc"], "--ratio"),
    (["prnue"], "prune"),
])
def test_usage_errors_are_one_line(argv, needle, capsys):
    refused(capsys, argv, needle, "--help")


def test_version_and_help_answer():
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "moeprune", "--version"], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0 and done.stdout.startswith("moeprune ")
    # --help must not import torch or transformers (that is what made it take seconds)
    probe = ("import sys; from moeprune.cli import main; code = main(['--help']); "
             "assert 'transformers' not in sys.modules and 'torch' not in sys.modules, 'heavy import'; "
             "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "prune" in done.stdout


# ---- 10. output locations checked before any work ----------------------------------------------------------

def test_unwritable_output_locations_refused_before_work(tmp_path, checkpoint, calib_file, made, capsys,
                                                         monkeypatch):
    monkeypatch.setattr(api, "open_source",
                        lambda *a, **k: pytest.fail("the model was loaded before the check"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    argv = ["prune", str(checkpoint("mixtral")), "--method", "frequency", "--ratio", "0.25", "--calib",
            str(calib_file), "--in-memory", *SMALL_FLAGS, "--out"]
    refused(capsys, [*argv, str(a_file / "out")], "is a file")
    refused(capsys, [*argv, str(tmp_path / ("n" * 250))], "cannot create")
    plan = ["plan", str(made / "st_mixtral"), "--method", "reap", "--ratio", "0.25", "--out"]
    refused(capsys, [*plan, str(tmp_path / "missing" / "p.json")], "does not exist")
    refused(capsys, [*plan, str(tmp_path)], "is a directory")
    assert a_file.read_text() == "x"


def _tmpfs(path: Path, size: int, readonly: bool = False) -> None:
    path.mkdir()
    opts = f"size={size}" + (",ro" if readonly else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a small tmpfs needs root (mount said: {done.stderr.strip()})")


@pytest.mark.slow
def test_full_and_read_only_disks(tmp_path, checkpoint, calib_file, capsys):
    from moeprune.store.files import weights_bytes

    model = checkpoint("mixtral")
    argv = ["prune", str(model), "--method", "frequency", "--ratio", "0.5", "--calib", str(calib_file),
            "--in-memory", *SMALL_FLAGS, "--out"]
    mounts = []
    try:
        tiny = tmp_path / "tiny"
        _tmpfs(tiny, 64 * 1024)
        mounts.append(tiny)
        refused(capsys, [*argv, str(tiny / "o")], "free")  # the estimate alone rules it out: before any work
        # room for the estimate (every weight scaled by kept/E) but not for the real output: the write fails
        # midway, and that too is one line with nothing left behind
        lower_bound = weights_bytes(model) // 2
        snug = tmp_path / "snug"
        _tmpfs(snug, lower_bound + 64 * 1024)
        mounts.append(snug)
        refused(capsys, [*argv, str(snug / "o")])
        assert list(snug.iterdir()) == []
        ro = tmp_path / "ro"
        _tmpfs(ro, 1024 * 1024, readonly=True)
        mounts.append(ro)
        refused(capsys, [*argv, str(ro / "o")], "not writable")
    finally:
        for m in mounts:
            subprocess.run(["umount", str(m)], capture_output=True)


# ---- 13. other tracebacks ----------------------------------------------------------------------------------

def test_other_bad_inputs_are_one_line(tmp_path, checkpoint, calib_file, capsys):
    model = str(checkpoint("mixtral"))
    out = ["--out", str(tmp_path / "o")]
    base = ["prune", model, "--method", "frequency", "--ratio", "0.25", *SMALL_FLAGS, *out]
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "hello there"}\n')
    refused(capsys, [*base, "--calib", str(rows), "--calib-template", "{text[x]}"], "--calib-template")
    refused(capsys, [*base, "--calib", str(calib_file), "--device", "tpu"], "--device")
    refused(capsys, [*base, "--calib", str(calib_file), "--device", "meta"], "--device")
    refused(capsys, [*base, "--calib", str(calib_file), "--tokenizer", str(tmp_path / "no_tok")],
            "does not exist")
    small_vocab = str(checkpoint("mixtral", vocab_size=300))
    refused(capsys, ["prune", small_vocab, "--method", "frequency", "--ratio", "0.25", "--calib",
                     str(calib_file), *SMALL_FLAGS, *out], "vocabulary")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    refused(capsys, [*base, "--calib", str(calib_file), "--offload-dir", str(a_file)], "--offload-dir")
    assert a_file.read_text() == "x"
    refused(capsys, ["prune", model, "--method", "dek", "--ratio", "0.25", "-o", "representation=weight",
                     "-o", "learn_lr=nan", *out], "learn_lr")
    assert not (tmp_path / "o").exists()


def test_tensor_missing_from_its_shard_is_one_line(tmp_path, checkpoint, calib_file, capsys):
    model = copy_checkpoint(checkpoint("mixtral"), tmp_path / "m")
    tensors = load_file(str(model / "model.safetensors"))
    keys = sorted(tensors)
    half = len(keys) // 2
    save_file({k: tensors[k] for k in keys[:half]}, str(model / "a.safetensors"), metadata={"format": "pt"})
    save_file({k: tensors[k] for k in keys[half:-1]}, str(model / "b.safetensors"), metadata={"format": "pt"})
    (model / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: "a.safetensors" if n < half else "b.safetensors"
                                            for n, k in enumerate(keys)}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(capsys, ["prune", str(model), "--method", "frequency", "--ratio", "0.25", "--calib",
                     str(calib_file), "--layerwise", "--out", str(tmp_path / "o"), *SMALL_FLAGS],
            "lacks", keys[-1])


# ---- 15. messages that said the wrong thing ----------------------------------------------------------------

def test_messages_name_the_real_problem(tmp_path, checkpoint, calib_file, made, capsys):
    model = checkpoint("mixtral")
    line = refused(capsys, ["inspect", str(model / "config.json")], "is a file")
    assert "no config.json" not in line
    refused(capsys, ["prune", str(model), "--method", "mone", "--ratio", "0.25", "-o", "novice", "--out",
                     "o"], "give a value")
    refused(capsys, ["prune", str(model), "--method", "frequency", "--ratio", "0.25", "--calib",
                     str(calib_file), "--out", str(tmp_path / "o"), "--save-stats", str(tmp_path / "o")],
            "--save-stats", "--out")


# ---- 16. and 17. permissions and where output goes ---------------------------------------------------------

def test_outputs_have_usual_permissions_and_progress_goes_to_stderr(tmp_path, checkpoint, calib_file, capsys):
    capsys.readouterr()
    old = os.umask(0o022)
    try:
        assert main(["prune", str(checkpoint("mixtral")), "--method", "frequency", "--ratio", "0.25",
                     "--calib", str(calib_file), "--out", str(tmp_path / "o"), *SMALL_FLAGS]) == 0
    finally:
        os.umask(old)
    captured = capsys.readouterr()
    assert "pruning" in captured.err and "pruning" not in captured.out
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o755
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in (tmp_path / "o").iterdir())


# ---- 14. plan/model mismatches found before the model is loaded --------------------------------------------

def test_plan_of_another_shape_is_refused_before_loading(tmp_path, checkpoint, made, capsys, monkeypatch):
    monkeypatch.setattr(api, "open_source",
                        lambda *a, **k: pytest.fail("the model was loaded before the check"))
    plan = json.loads((made / "reap.json").read_text())
    model = str(checkpoint("mixtral"))
    missing = {**plan, "layers": plan["layers"][:2]}
    (tmp_path / "missing.json").write_text(json.dumps(missing))
    refused(capsys, ["apply", model, str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")], "layer")
    twice = {**plan, "layers": plan["layers"] + plan["layers"][:1]}
    (tmp_path / "twice.json").write_text(json.dumps(twice))
    refused(capsys, ["apply", model, str(tmp_path / "twice.json"), "--out", str(tmp_path / "o")],
            "more than once")
    wide = json.loads(json.dumps(plan))
    wide["layers"][0]["groups"][0]["perms"] = [list(range(7))]
    (tmp_path / "wide.json").write_text(json.dumps(wide))
    refused(capsys, ["apply", model, str(tmp_path / "wide.json"), "--out", str(tmp_path / "o")],
            "permutation")
    assert not (tmp_path / "o").exists()


def test_task_dir_files_of_the_user_are_not_overwritten(tmp_path, checkpoint, calib_file, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "manifest.json").write_text('{"mine": true}')
    refused(capsys, ["eval", str(checkpoint("mixtral")), "--task-text", f"prose={calib_file}", "--task-dir",
                     str(tasks), "--task-items", "20"], "manifest.json")
    assert (tasks / "manifest.json").read_text() == '{"mine": true}'
