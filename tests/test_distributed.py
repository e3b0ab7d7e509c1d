"""Calibration on several processes: the batch split, the exact reduction, and
`torchrun -m moeprune observe`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import SEED, calibration_text, token_ids

from moeprune.arch.tiny import save_tiny_checkpoint, tiny_model
from moeprune.distributed import Ranks
from moeprune.observe import LayerStats, Stats, merge_layer_stats, observe, reduce_layer_stats
from moeprune.plan import Plan

N, L, BATCH = 10, 32, 2  # 5 batches: no world size above 1 splits them evenly
PROBE = 40


class _Share(Ranks):
    """One rank's share of the pass without a process group: the reduction is left to the test."""

    def all_gather(self, obj):
        return [obj]


def _assert_same_stats(got: dict[int, LayerStats], want: dict[int, LayerStats]) -> float:
    """Counts and probe identical, float64 statistics within 1e-12 of each tensor's scale; the largest
    relative gap."""
    assert sorted(got) == sorted(want)
    worst = 0.0
    for i, w in want.items():
        g = got[i]
        assert torch.equal(g.experts.count, w.experts.count), f"layer {i} count"
        assert float(w.experts.count.sum()) > 0
        for key, want_t in w.experts.tensors().items():
            got_t = getattr(g.experts, key)
            assert got_t.dtype == torch.float64 and got_t.shape == want_t.shape, f"layer {i} {key}"
            gap = float((got_t - want_t).abs().max() / want_t.abs().max().clamp(min=1e-300))
            assert gap <= 1e-12, f"layer {i} {key}: relative difference {gap:.3g}"
            worst = max(worst, gap)
        for key in ("positions", "inputs", "router_logits"):
            assert torch.equal(getattr(g.probe, key), getattr(w.probe, key)), f"layer {i} probe {key}"
        assert g.probe.positions.numel() == PROBE
    return worst


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_batch_starts_are_contiguous_near_equal_chunks(world):
    starts = list(range(0, N, BATCH))
    chunks = [Ranks(r, world).batch_starts(starts) for r in range(world)]
    assert sum(chunks, []) == starts
    sizes = [len(c) for c in chunks]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert (0 in sizes) == (world > len(starts))


def test_single_process_ranks_change_nothing():
    r = Ranks.from_env("cpu") if int(os.environ.get("WORLD_SIZE", "1")) <= 1 else Ranks()
    assert r == Ranks(0, 1) and r.is_main and r.device("cuda") == "cuda" and r.device("cpu") == "cpu"
    layers = {0: object()}
    assert reduce_layer_stats(r, layers) is layers and r.all_gather(layers) == [layers]
    r.barrier()


@pytest.mark.parametrize("world", [2, 3, 7])
def test_shares_merged_equal_one_pass(world):
    """Each rank's share observed separately, merged as `reduce_layer_stats` merges them, equals one pass."""
    model = tiny_model("mixtral")
    ids = token_ids(N, L, seed=7)  # [N, L]
    whole = observe(model, ids, batch_size=BATCH, probe_size=PROBE, seed=3)
    shares = [observe(model, ids, batch_size=BATCH, probe_size=PROBE, seed=3, ranks=_Share(r, world))
              for r in range(world)]
    for share in shares:  # every rank reports the global calibration
        assert share.num_tokens == N * L and share.calibration["sequences"] == N
    assert (sum(int(s.layers[1].experts.count.sum()) for s in shares)
            == int(whole.layers[1].experts.count.sum()))
    parts = [s.layers for s in shares]
    before = [{i: ls.experts.tensors() | {"probe": ls.probe.positions} for i, ls in p.items()} for p in parts]
    before = [{i: {k: v.clone() for k, v in t.items()} for i, t in b.items()} for b in before]
    _assert_same_stats(merge_layer_stats(parts), whole.layers)
    for p, b in zip(parts, before):  # the inputs are left as they were
        for i, ls in p.items():
            assert all(torch.equal(v, b[i][k]) for k, v in ls.experts.tensors().items())
            assert torch.equal(ls.probe.positions, b[i]["probe"])
    # any subset of layers (the layer-by-layer loop reduces one layer at a time)
    one = merge_layer_stats([{2: p[2]} for p in parts])
    assert list(one) == [2]
    _assert_same_stats(one, {2: whole.layers[2]})


def _single_process_env() -> dict:
    """This environment without any torchrun variables a surrounding launcher may have set; one thread."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_torchrun_observe_equals_one_process(tmp_path):
    model_dir, calib = tmp_path / "model", tmp_path / "calib.txt"
    save_tiny_checkpoint("mixtral", model_dir, seed=SEED)
    calib.write_text(calibration_text(), encoding="utf-8")
    env = _single_process_env()
    args = ["observe", str(model_dir), "--calib", str(calib), "--samples", str(N), "--seq-len", str(L),
            "--batch-size", str(BATCH), "--probe-size", str(PROBE), "--seed", "3"]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    single = subprocess.run([sys.executable, "-m", "moeprune", *args, "--out",
                             str(tmp_path / "one" / "stats")],
                            env=env, capture_output=True, text=True, timeout=180)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                            "2", "-m", "moeprune", *args, "--out", str(tmp_path / "two" / "stats")],
                           env=env, capture_output=True, text=True, timeout=180)
    assert multi.returncode == 0, multi.stderr
    assert multi.stdout.count("written to") == 1, multi.stdout  # only rank 0 reports
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["stats"]  # one stats directory, no leftovers
    assert (sorted(p.name for p in (tmp_path / "two" / "stats").iterdir())
            == ["stats.json", "stats.safetensors"])

    one, two = Stats.load(tmp_path / "one" / "stats"), Stats.load(tmp_path / "two" / "stats")
    assert two.model == one.model
    assert two.calibration["processes"] == 2 and "processes" not in one.calibration
    for key in ("tokens", "sequences", "seq_len", "probe_size", "seed", "sha256", "samples"):
        assert two.calibration[key] == one.calibration[key], key
    assert one.calibration["tokens"] == N * L and one.calibration["sequences"] == N
    ignore = {"seconds", "processes"}
    assert ({k: v for k, v in two.calibration.items() if k not in ignore}
            == {k: v for k, v in one.calibration.items() if k not in ignore})
    _assert_same_stats(two.layers, one.layers)


@pytest.mark.slow
def test_torchrun_layerwise_prune_equals_one_process(tmp_path):
    """2 processes, layer by layer: each layer's statistics are reduced before it is planned; rank 0
    writes."""
    model_dir, calib = tmp_path / "model", tmp_path / "calib.txt"
    save_tiny_checkpoint("qwen3_moe", model_dir, seed=SEED)
    calib.write_text(calibration_text(), encoding="utf-8")
    env = _single_process_env()
    args = ["prune", str(model_dir), "--method", "reap", "--ratio", "0.25", "--calib", str(calib),
            "--samples", str(N), "--seq-len", str(L), "--batch-size", str(BATCH), "--probe-size", str(PROBE),
            "--compensate", "none"]  # bit for bit without a fit (with one: the next test)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    single = subprocess.run([sys.executable, "-m", "moeprune", *args, "--in-memory", "--out",
                             str(tmp_path / "one" / "m"), "--save-stats", str(tmp_path / "one" / "stats")],
                            env=env, capture_output=True, text=True, timeout=180)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                            "2", "-m", "moeprune", *args, "--layerwise", "--out", str(tmp_path / "two" / "m"),
                            "--save-stats", str(tmp_path / "two" / "stats")],
                           env=env, capture_output=True, text=True, timeout=180)
    assert multi.returncode == 0, multi.stderr
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["m", "stats"]
    one, two = Stats.load(tmp_path / "one" / "stats"), Stats.load(tmp_path / "two" / "stats")
    assert two.calibration["processes"] == 2 and two.calibration["layerwise"] is True
    _assert_same_stats(two.layers, one.layers)
    from safetensors.torch import load_file

    def weights(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    a, b = weights(tmp_path / "one" / "m"), weights(tmp_path / "two" / "m")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_compensated_prune_matches_one_process(tmp_path):
    """2 processes with --compensate down: the normal equations are added over the processes, so both
    write what one process fits on all the batches (up to the order of float64 sums)."""
    model_dir, calib = tmp_path / "model", tmp_path / "calib.txt"
    save_tiny_checkpoint("qwen3_moe", model_dir, seed=SEED)
    calib.write_text(calibration_text(), encoding="utf-8")
    env = _single_process_env()
    args = ["prune", str(model_dir), "--method", "reap", "--ratio", "0.5", "--calib", str(calib),
            "--samples", str(4 * N), "--seq-len", str(L), "--batch-size", str(BATCH),
            "--probe-size", str(PROBE), "--compensate", "down"]
    single = subprocess.run([sys.executable, "-m", "moeprune", *args, "--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                            "2", "-m", "moeprune", *args, "--out", str(tmp_path / "two")],
                           env=env, capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr
    one = Plan.load(tmp_path / "one" / "moeprune_plan.json")
    two = Plan.load(tmp_path / "two" / "moeprune_plan.json")
    assert [lp.kept for lp in one.layers] == [lp.kept for lp in two.layers]
    fits = [(lp.notes["compensation"], lq.notes["compensation"]) for lp, lq in zip(one.layers, two.layers)]
    assert any(a["applied"] for a, _ in fits)
    for a, b in fits:
        assert (a["applied"], a["alpha"], a["fit_tokens"], a["held_out_tokens"]) == \
            (b["applied"], b["alpha"], b["fit_tokens"], b["held_out_tokens"])
    from safetensors.torch import load_file

    def weights(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
