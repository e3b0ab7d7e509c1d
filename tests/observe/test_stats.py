"""Stats directories are validated when loaded: damage is one MoepruneError line naming it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moeprune.cli import main
from moeprune.errors import MoepruneError
from moeprune.observe.stats import ExpertStats, LayerStats, Probe, Stats

E, H, I = 8, 16, 4


# ---- 4. damaged stats directories ---------------------------------------------------------------------

def _stats(tmp_path, P: int = 5):
    g = torch.Generator().manual_seed(0)
    layers = {}
    for i in (1, 2):
        ex = ExpertStats(E, H)
        ex.update(torch.randint(0, E, (40,), generator=g), torch.rand(40, generator=g),
                  torch.randn(40, H, generator=g))
        probe = Probe(torch.arange(P), torch.randn(P, H, generator=g), torch.randn(P, E, generator=g))
        layers[i] = LayerStats(i, ex, probe)
    stats = Stats(model={"model_type": "mixtral", "num_experts": E, "top_k": 2, "moe_layers": [1, 2]},
                  calibration={"tokens": 40}, layers=layers)
    d = tmp_path / "stats"
    stats.save(d)
    return d


def _edit_tensors(d, fn):
    from safetensors.torch import load_file, save_file

    t = load_file(str(d / "stats.safetensors"))
    fn(t)
    save_file(t, str(d / "stats.safetensors"))


def test_good_stats_load(tmp_path):
    st = Stats.load(_stats(tmp_path))
    assert sorted(st.layers) == [1, 2] and st.layers[1].experts.mean.shape == (E, H)


@pytest.mark.parametrize("damage,fragment", [
    (lambda d: (d / "stats.json").write_text("{broken"), "stats.json is not valid JSON"),
    (lambda d: (d / "stats.json").write_text("[1, 2]"), "holds a JSON list, not an object"),
    (lambda d: (d / "stats.json").write_text('{"version": 1, "model": {}}'), "lacks calibration, layers"),
    (lambda d: (d / "stats.json").write_text('{"version": 1, "model": [], "calibration": {}, "layers": [1]}'),
     "model is not an object"),
    (lambda d: (d / "stats.json").write_text('{"version": 1, "model": {}, "calibration": {}, "layers": "1"}'),
     "layers is not a list"),
    (lambda d: (d / "stats.safetensors").write_bytes((d / "stats.safetensors").read_bytes()[:200]),
     "stats.safetensors cannot be read"),
    (lambda d: (d / "stats.safetensors").write_bytes(b"garbage"), "stats.safetensors cannot be read"),
    (lambda d: _set_json(d, "layers", [1, 2, 3]), "lists layer 3 but stats.safetensors lacks layer.3.count"),
    (lambda d: _edit_tensors(d, lambda t: t.pop("layer.2.m2")), "lacks layer.2.m2"),
    (lambda d: _edit_tensors(d, lambda t: t.update({"layer.1.count": torch.ones(E - 1).double()})),
     r"layer 1 count has shape \[7\], but mean is \[8, 16\]"),
    (lambda d: _edit_tensors(d, lambda t: t.update({"layer.2.m2": torch.ones(E, H + 1).double()})),
     r"layer 2 m2 has shape \[8, 17\]"),
    (lambda d: _edit_tensors(d, lambda t: t.update({"layer.1.probe.inputs": torch.ones(5, H - 1)})),
     r"layer 1 probe.inputs has shape \[5, 15\], but \[5, 16\] was expected"),
    (lambda d: _edit_tensors(d, lambda t: t.update({"layer.1.probe.router_logits": torch.ones(4, E)})),
     r"probe.router_logits has shape \[4, 8\]"),
    (lambda d: _edit_tensors(d, lambda t: t.update({"layer.1.mean": torch.ones(E)})),
     r"not \[experts, hidden\]"),
    (lambda d: _set_json(d, "model", {"num_experts": 6}), "8 experts, but stats.json says the model has 6"),
])
def test_damaged_stats_are_one_line_naming_the_damage(tmp_path, damage, fragment):
    d = _stats(tmp_path)
    damage(d)
    with pytest.raises(MoepruneError, match=fragment) as info:
        Stats.load(d)
    message = str(info.value)
    assert str(d) in message and "moeprune observe" in message and "\n" not in message


@pytest.mark.parametrize("name", ["count", "gate_sum", "mean", "m2", "reap_sum", "ean_sum", "probe.inputs",
                                  "probe.router_logits"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_accumulators_are_damage(tmp_path, name, bad):
    d = _stats(tmp_path)

    def poison(t):
        t[f"layer.2.{name}"].view(-1)[3] = bad

    _edit_tensors(d, poison)
    with pytest.raises(MoepruneError, match=f"layer 2 {name} holds 1 non-finite value"):
        Stats.load(d)


def test_negative_counts_are_damage(tmp_path):
    d = _stats(tmp_path)
    _edit_tensors(d, lambda t: t["layer.1.count"].__setitem__(0, -1.0))
    with pytest.raises(MoepruneError, match="negative token counts"):
        Stats.load(d)


def _set_json(d, key, value):
    meta = json.loads((d / "stats.json").read_text())
    meta[key] = value
    (d / "stats.json").write_text(json.dumps(meta))


def test_damaged_stats_via_cli_is_one_line(tmp_path, capsys):
    d = _stats(tmp_path)
    _edit_tensors(d, lambda t: t["layer.1.gate_sum"].__setitem__(0, math.nan))
    argv = ["plan", str(d), "--method", "frequency", "--experts", "4", "--out", str(tmp_path / "p.json")]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "gate_sum" in lines[0] and "moeprune observe" in lines[0], lines
    assert not (tmp_path / "p.json").exists()
