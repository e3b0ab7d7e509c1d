"""The Plan: what to do with every expert of every MoE layer, as small editable JSON.

Per layer, `groups` lists the output experts in order; each is a set of input experts with merge
coefficients (pruning is singleton groups with coefficient 1). `novices` lists input experts
replaced by a constant vector (MoNE). `validate()` is the single place that checks a plan against a
model's facts: disjoint in-range ids, enough experts for top-k, one expert count for all layers, and
group-limited routing constraints.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moeprune.errors import MoepruneError

PLAN_VERSION = 1
ROUTER_MERGES = ("average", "sum")


@dataclass
class Group:
    members: list[int]  # input expert ids merged into this output expert
    coeffs: list[float]  # merge coefficients, one per member (sum to 1 for a weighted average)
    # Optional permutation alignment (UNCURL, M-SMoE): per member, a permutation of its I hidden units
    # applied before the weighted sum (new unit j = old unit perm[j]; see moeprune.align). None: no alignment.
    perms: list[list[int]] | None = None


@dataclass
class LayerPlan:
    layer: int
    num_experts_in: int
    groups: list[Group]
    router_merge: str = "average"  # how a group's router rows combine: coefficient-weighted or summed
    novices: list[int] = field(default_factory=list)  # input ids replaced by a constant vector
    notes: dict = field(default_factory=dict)  # method-specific facts worth keeping (e.g. search used)

    @property
    def num_experts_out(self) -> int:
        return len(self.groups)

    @property
    def kept(self) -> list[int]:
        return sorted(m for g in self.groups for m in g.members)

    @property
    def dropped(self) -> list[int]:
        used = set(self.kept) | set(self.novices)
        return [e for e in range(self.num_experts_in) if e not in used]

    @property
    def is_pruning(self) -> bool:
        return all(len(g.members) == 1 and g.coeffs == [1.0] and g.perms is None for g in self.groups)


@dataclass
class Plan:
    method: str
    layers: list[LayerPlan]
    model: dict  # model_type, num_experts, top_k, n_group, min_experts_per_group, hidden_size, moe_layers
    method_config: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    flatten_groups: bool = False  # set n_group = topk_group = 1 on the output model
    version: int = PLAN_VERSION

    @property
    def num_experts_in(self) -> int:
        return int(self.model["num_experts"])

    @property
    def num_experts_out(self) -> int:
        return self.layers[0].num_experts_out if self.layers else self.num_experts_in

    def layer(self, i: int) -> LayerPlan:
        for lp in self.layers:
            if lp.layer == i:
                return lp
        raise KeyError(i)

    # ---- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        for lp in d["layers"]:  # groups without alignment keep the JSON of plans made before `perms` existed
            for g in lp["groups"]:
                if g.get("perms") is None:
                    g.pop("perms", None)
        d["num_experts_out"] = self.num_experts_out
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        if d.get("version") != PLAN_VERSION:
            raise MoepruneError(f"plan version {d.get('version')!r} is not supported (expected {PLAN_VERSION})")
        layers = [
            LayerPlan(layer=lp["layer"], num_experts_in=lp["num_experts_in"],
                      groups=[Group(list(g["members"]), [float(c) for c in g["coeffs"]],
                                    None if g.get("perms") is None else [[int(u) for u in q] for q in g["perms"]])
                              for g in lp["groups"]],
                      router_merge=lp.get("router_merge", "average"), novices=list(lp.get("novices", [])),
                      notes=lp.get("notes", {}))
            for lp in d["layers"]
        ]
        return cls(method=d["method"], layers=layers, model=d["model"], method_config=d.get("method_config", {}),
                   calibration=d.get("calibration", {}), flatten_groups=d.get("flatten_groups", False))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        p = Path(path)
        if not p.is_file():
            raise MoepruneError(f"plan file {p} does not exist")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MoepruneError(f"{p} is not a valid moeprune plan ({type(e).__name__}: {e})")

    # ---- checks -------------------------------------------------------------------------------
    def validate(self, model: dict | None = None) -> None:
        """Raise MoepruneError with the first problem found; `model` defaults to the plan's own facts."""
        m = model or self.model
        E, K = int(m["num_experts"]), int(m["top_k"])
        n_group = 1 if self.flatten_groups else int(m.get("n_group", 1))
        min_per_group = int(m.get("min_experts_per_group", 2))
        moe_layers = set(m.get("moe_layers", [lp.layer for lp in self.layers]))
        if not self.layers:
            raise MoepruneError("plan has no layers")
        counts = {lp.num_experts_out for lp in self.layers}
        if len(counts) != 1:
            raise MoepruneError(f"plan keeps different expert counts per layer {sorted(counts)}; a stock config "
                                "holds one count, so every MoE layer must keep the same number")
        for lp in self.layers:
            where = f"layer {lp.layer}"
            if lp.layer not in moe_layers:
                raise MoepruneError(f"{where} is not an MoE layer of this model (MoE layers: {sorted(moe_layers)})")
            if lp.num_experts_in != E:
                raise MoepruneError(f"{where}: plan expects {lp.num_experts_in} experts, the model has {E}")
            if lp.router_merge not in ROUTER_MERGES:
                raise MoepruneError(f"{where}: router_merge {lp.router_merge!r} is not one of {ROUTER_MERGES}")
            seen: set[int] = set()
            widths: set[int] = set()  # hidden widths of the permutations met in this layer (one I per layer)
            for g in lp.groups:
                if not g.members or len(g.members) != len(g.coeffs):
                    raise MoepruneError(f"{where}: a group needs members and one coefficient per member")
                if not all(math.isfinite(c) for c in g.coeffs):
                    raise MoepruneError(f"{where}: non-finite merge coefficient in group {g.members}")
                if g.perms is not None:
                    self._check_perms(where, g, widths)
            for e in [m_ for g in lp.groups for m_ in g.members] + list(lp.novices):
                if not 0 <= e < E:
                    raise MoepruneError(f"{where}: expert id {e} out of range [0, {E})")
                if e in seen:
                    raise MoepruneError(f"{where}: expert {e} appears in more than one group or novice slot")
                seen.add(e)
            routable = lp.num_experts_out + len(lp.novices)
            if routable < K:
                raise MoepruneError(f"{where}: {routable} experts left but top-k is {K}; keep at least {K} "
                                    "(lower --ratio or raise --experts)")
            if n_group > 1:
                self._check_groups(lp, E, n_group, min_per_group)

    @staticmethod
    def _check_perms(where: str, g: Group, widths: set[int]) -> None:
        if len(g.perms) != len(g.members):
            raise MoepruneError(f"{where}: group {g.members} has {len(g.perms)} permutations, one per member needed")
        for e, q in zip(g.members, g.perms):
            widths.add(len(q))
            if sorted(q) != list(range(len(q))):
                raise MoepruneError(f"{where}: the permutation of expert {e} (group {g.members}) is not a "
                                    f"permutation of its {len(q)} hidden units 0..{len(q) - 1}")
        if len(widths) > 1:
            raise MoepruneError(f"{where}: permutations of different lengths {sorted(widths)}; every expert of a "
                                "layer has the same hidden width I")

    def _check_groups(self, lp: LayerPlan, E: int, n_group: int, min_per_group: int) -> None:
        where, r = f"layer {lp.layer}", lp.num_experts_out
        hint = "or pass --flatten-groups to route without groups"
        if lp.novices:
            raise MoepruneError(f"{where}: novices with group-limited routing are not supported; {hint}")
        if r % n_group:
            raise MoepruneError(f"{where}: {r} experts is not divisible by n_group={n_group}; "
                                f"keep a multiple of {n_group} experts {hint}")
        per_in, per_out = E // n_group, r // n_group
        if per_out < min_per_group:
            raise MoepruneError(f"{where}: each of the {n_group} routing groups would keep {per_out} experts, "
                                f"fewer than {min_per_group}; keep at least {min_per_group * n_group} {hint}")
        for j, g in enumerate(lp.groups):
            routing_groups = {m // per_in for m in g.members}
            if routing_groups != {j // per_out}:
                raise MoepruneError(f"{where}: output expert {j} (members {g.members}) must come from routing "
                                    f"group {j // per_out} only; order groups by routing group {hint}")


def budget(num_experts: int, top_k: int, ratio: float | None = None, experts: int | None = None,
           n_group: int = 1, min_per_group: int = 2, flatten_groups: bool = False) -> int:
    """The number of experts to keep per layer, checked before any expensive work."""
    E = num_experts
    if (ratio is None) == (experts is None):
        raise MoepruneError("give exactly one of --ratio R (fraction of experts to remove) or --experts N (to keep)")
    if ratio is not None:
        if not 0 <= ratio < 1:
            raise MoepruneError(f"--ratio {ratio} is outside [0, 1): it is the fraction of experts to remove")
        r = E - round(ratio * E)
    else:
        r = int(experts)
        if not 1 <= r <= E:
            raise MoepruneError(f"--experts {r} is outside [1, {E}]: the model has {E} experts per layer")
    if r < top_k:
        raise MoepruneError(f"keeping {r} of {E} experts is fewer than top-k={top_k}; keep at least {top_k} "
                            f"(--experts {top_k} or --ratio <= {(E - top_k) / E:.3f})")
    if n_group > 1 and not flatten_groups:
        ok = [n for n in range(n_group * min_per_group, E + 1, n_group)]
        if r % n_group or r // n_group < min_per_group:
            raise MoepruneError(f"keeping {r} experts breaks group-limited routing (n_group={n_group}, at least "
                                f"{min_per_group} per group): use --experts in {ok} or --flatten-groups")
    return r
