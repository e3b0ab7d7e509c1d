"""`auto`: for each MoE layer, the candidate plan whose block output is closest to the original's.

Not a published method: moeprune's answer to "which method for this layer?". Every candidate method
plans the layer at the same budget; each layer plan is applied to a copy of the block
(`LayerWeights.block_output`, the family's own routing) and scored by the relative error of the
block's output on held-out probe tokens,

    err(m) = ||Z - Ẑ_m||² / ||Z||²,   Z = block(x_held_out),   Ẑ_m = block after m's layer plan,

and the layer takes the candidate with the lowest error (ties: the first in `candidates`). The
chosen method and every candidate's error go into the layer's notes, and from there into the model
card. Compensation (`--compensate`) runs after the choice, on the chosen plan, and keeps its fit
only where it lowers the held-out error of that layer.

Readings and defaults:
- held out: the probe tokens are split in two by position (even / odd). The candidates are planned
  on statistics whose probe holds the even half only, and scored on the odd half, so the methods
  that fit on the probe (NAEE, REAM, merges with learned coefficients) are scored on tokens they did
  not see. The per-expert counts and sums the score methods rank by are over all calibration tokens
  (the odd half is a few hundred of them);
- `format=stock` (default): candidates are pruning and merging methods; the output is a stock
  checkpoint. `format=novices`: every candidate's kept set becomes a MoNE layer (the router keeps
  all rows, each dropped expert is a novice with its mean output, `novice_vectors`), and `mone`'s own
  kept set is a candidate; the output is moeprune's novice format. A plan with novices must have them
  in every layer (`Plan.validate`), so the format is chosen for the whole model;
- one budget: every layer keeps the same number of experts (a stock config holds one count).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from moeprune.errors import MoepruneError
from moeprune.methods import options
from moeprune.methods.registry import METHODS, PlanRequest, make_plan, register
from moeprune.observe.stats import LayerStats, Probe, Stats
from moeprune.plan import Group, LayerPlan, Plan

FORMATS = ("stock", "novices")
DEFAULT_CANDIDATES = "frequency,ean,reap,naee,ream,msmoe"
NOVICE_CANDIDATES = "frequency,ean,reap,naee"  # format=novices: pruning methods only (and mone, always)


@dataclass(frozen=True)
class AutoConfig:
    # comma-separated methods tried in every layer; empty: DEFAULT_CANDIDATES, or NOVICE_CANDIDATES with
    # format=novices (a novice layer is a pruned layer, so merges cannot be its candidates)
    candidates: str = ""
    format: str = "stock"  # stock: prune/merge candidates; novices: kept sets as MoNE layers, plus mone

    def __post_init__(self):
        options.one_of("auto", "format", self.format, FORMATS)
        if not isinstance(self.candidates, str):
            raise MoepruneError(f"auto option candidates={self.candidates!r} is not text; give methods "
                                f"separated by commas, e.g. {DEFAULT_CANDIDATES}")
        names = self.names
        tried = sorted(set(METHODS) - {"auto"})
        if not names:
            raise MoepruneError(f"auto option candidates={self.candidates!r} names no method; give methods "
                                f"separated by commas, e.g. {DEFAULT_CANDIDATES}")
        unknown = [m for m in names if m not in tried]
        if unknown:
            raise MoepruneError(f"auto option candidates={self.candidates!r} is not a list of known methods "
                                f"({unknown[0]!r} is not one); give methods from {', '.join(tried)}")
        if self.format == "novices":
            merging = [m for m in names if METHODS[m].kind == "merge"]
            if merging:
                raise MoepruneError(f"auto option candidates={self.candidates!r} is not usable with "
                                    f"format=novices ({merging[0]} merges, and a novice layer is a pruned "
                                    "layer); give pruning methods, or format=stock")

    @property
    def names(self) -> list[str]:
        given = self.candidates if self.candidates.strip() else (
            NOVICE_CANDIDATES if self.format == "novices" else DEFAULT_CANDIDATES)
        return [m.strip() for m in given.split(",") if m.strip()]

    @property
    def layer_local(self) -> bool:
        return True


def _probe_half(ls: LayerStats, half: int) -> torch.Tensor:
    """Rows of the probe in one half (0: even positions in the probe, 1: odd)."""
    return torch.arange(half, ls.probe.positions.numel(), 2)


def _planning_stats(stats: Stats, i: int) -> Stats:
    """Layer i's statistics with the probe cut to its even half (the odd half scores the candidates)."""
    ls = stats.layers[i]
    rows = _probe_half(ls, 0)
    probe = Probe(ls.probe.positions[rows], ls.probe.inputs[rows], ls.probe.router_logits[rows])
    return dataclasses.replace(stats, model={**stats.model, "moe_layers": [i]},
                               layers={i: dataclasses.replace(ls, probe=probe)})


def _as_novices(lp: LayerPlan, ls: LayerStats) -> tuple[LayerPlan, torch.Tensor]:
    """A pruning layer plan as a MoNE layer: every dropped expert a novice with its mean output."""
    if not lp.is_pruning:
        raise MoepruneError(f"layer {lp.layer}: a merging plan cannot be made into novices")
    novices = lp.dropped
    st = ls.experts
    ids = torch.tensor(novices, dtype=torch.long)
    routed = (st.count[ids] > 0)[:, None]  # [N, 1] never-routed experts get a zero novice
    vectors = torch.where(routed, st.mean[ids], torch.zeros_like(st.mean[ids]))  # [N, D]
    notes = {**lp.notes, "novice_vectors": "out_mean"}
    return dataclasses.replace(lp, novices=novices, notes=notes), vectors


@register("auto", config=AutoConfig, kind="prune", needs_weights=True,
          paper="moeprune: per layer, the candidate method with the lowest held-out block-output error",
          summary="try every candidate method on each layer; keep the plan whose block output is closest to "
                  "the original on held-out probe tokens")
def auto_plan(request: PlanRequest, cfg: AutoConfig) -> Plan:
    if request.weights is None:
        raise MoepruneError("auto scores candidate plans on the layer's weights: plan it with the model")
    if request.stats.num_tokens <= 0:
        raise MoepruneError("auto needs statistics from a calibration pass: pass --calib")
    layers = []
    for i, ls in sorted(request.stats.layers.items()):
        access = request.weights.layer(i)
        x = ls.probe.inputs[_probe_half(ls, 1)]  # [n, H] held-out probe tokens
        if x.shape[0] == 0:
            raise MoepruneError(f"layer {i}: auto needs probe tokens to score candidates; raise --probe-size")
        Z = access.block_output(x).double()  # [n, H]
        scale = float((Z**2).sum()) or 1.0
        stats_i = _planning_stats(request.stats, i)
        one = dataclasses.replace(request, stats=stats_i)
        errors, plans = {}, {}
        names = cfg.names + (["mone"] if cfg.format == "novices" and "mone" not in cfg.names else [])
        for name in names:
            lp = make_plan(name, one).layers[0]
            vectors = None
            lp = dataclasses.replace(lp, novices=[], notes={k: v for k, v in lp.notes.items()
                                                             if k != "novice_vectors"})  # its kept set
            if cfg.format == "novices":
                lp, vectors = _as_novices(lp, stats_i.layers[i])
            got = access.block_output(x, lp, vectors).double()
            errors[name] = float(((Z - got) ** 2).sum()) / scale
            plans[name] = lp
        best = min(names, key=lambda n: (errors[n], names.index(n)))
        chosen = plans[best]
        notes = {"chosen": best, "errors": {n: float(f"{e:.6g}") for n, e in errors.items()},
                 "held_out_tokens": int(x.shape[0]), "format": cfg.format,
                 "chosen_notes": {k: v for k, v in chosen.notes.items() if k != "novice_vectors"}}
        if cfg.format == "novices":
            notes["novice_vectors"] = "out_mean"
        layers.append(LayerPlan(layer=i, num_experts_in=chosen.num_experts_in,
                                groups=[Group(list(g.members), list(g.coeffs), g.perms)
                                        for g in chosen.groups],
                                router_merge=chosen.router_merge, novices=list(chosen.novices), notes=notes))
    return request.plan("auto", layers)
