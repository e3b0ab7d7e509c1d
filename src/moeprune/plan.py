"""The Plan: what to do with every expert of every MoE layer, as small editable JSON.

Per layer, `groups` lists the output experts in order; each is a set of input experts with merge
coefficients (pruning is singleton groups with coefficient 1). `novices` lists input experts
replaced by a constant vector (MoNE). Loading checks the JSON against the plan's schema (types and
fields, naming the offending field path), so a hand-edited plan fails with one line, not a
traceback. `validate()` is the single place that checks a plan against a model's facts: disjoint
in-range ids, coefficients that form a weighted average, enough experts for top-k, one expert count
for all layers (unless the plan's `budget` is "global"), every MoE layer covered once, permutation
widths, and group-limited routing.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moeprune.errors import MoepruneError

PLAN_VERSION = 1
ROUTER_MERGES = ("average", "sum")
BUDGETS = ("uniform", "global")  # one expert count for every layer, or a count per layer
SUM_TOLERANCE = 1e-4  # a normalised group sums to 1 within this (JSON round trips, float32 fits)
MAX_COEFF = 1e3  # beyond this even a deliberately unnormalised merge is an editing slip, not a weighting


@dataclass
class Group:
    members: list[int]  # input expert ids merged into this output expert
    coeffs: list[float]  # merge coefficients, one per member (sum to 1 for a weighted average)
    # Optional permutation alignment (UNCURL, M-SMoE; DEK, HC-SMoE with align=true): per member, a
    # permutation of its I hidden units applied before the weighted sum (new unit j = old unit perm[j]; see
    # moeprune.methods.alignment). None: no alignment.
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
    # Each group's coefficients are a weighted average (>= 0, sum 1). A plan that means other sums
    # (e.g. hand-made extrapolation) says so with false; plans saved before this field default to True.
    normalise: bool = True
    # MTP layers carried to the output and the plan they took (`moeprune.store.mtp`); written by the
    # pipeline, descriptive only (empty: none in the checkpoint)
    mtp: dict = field(default_factory=dict)
    # the compensation fitted after each layer's surgery (`moeprune.methods.compensation` options; each
    # layer's notes["compensation"] says what was fitted and accepted); empty: none
    compensation: dict = field(default_factory=dict)
    # "uniform": every MoE layer keeps the same count (a stock config holds one); "global": counts differ per
    # layer (`moeprune.methods.budget`), written in moeprune's own format (`moeprune.store.budget`)
    budget: str = "uniform"
    version: int = PLAN_VERSION

    @property
    def num_experts_in(self) -> int:
        return int(self.model["num_experts"])

    @property
    def num_experts_out(self) -> int:
        """The count every layer keeps; with a global budget the largest (the count a config records)."""
        if not self.layers:
            return self.num_experts_in
        return max(lp.num_experts_out for lp in self.layers)

    @property
    def per_layer_counts(self) -> bool:
        """Whether the layers keep different counts (a global budget's checkpoint is then moeprune's own)."""
        return len({lp.num_experts_out for lp in self.layers}) > 1

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
        for key in ("mtp", "compensation"):  # plans without them keep their JSON
            if not d[key]:
                d.pop(key)
        if d["budget"] == "uniform":  # plans made before `budget` existed keep their JSON
            d.pop("budget")
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, d: dict, source: str = "plan") -> Plan:
        """A Plan from its JSON form, after checking every field's type (`source` names it in errors)."""
        check_plan_schema(d, source)
        if d["version"] != PLAN_VERSION:
            raise MoepruneError(f"{source}: plan version {d['version']} is not supported (expected "
                                f"{PLAN_VERSION}); re-plan with this moeprune")
        layers = [
            LayerPlan(layer=lp["layer"], num_experts_in=lp["num_experts_in"],
                      groups=[Group(list(g["members"]), [float(c) for c in g["coeffs"]],
                                    None if g.get("perms") is None else [list(q) for q in g["perms"]])
                              for g in lp["groups"]],
                      router_merge=lp.get("router_merge", "average"), novices=list(lp.get("novices", [])),
                      notes=lp.get("notes", {}))
            for lp in d["layers"]
        ]
        return cls(
            method=d["method"], layers=layers, model=d["model"], method_config=d.get("method_config", {}),
            calibration=d.get("calibration", {}), flatten_groups=d.get("flatten_groups", False),
            normalise=d.get("normalise", True), mtp=d.get("mtp", {}), compensation=d.get("compensation", {}),
            budget=d.get("budget", "uniform"),
        )

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        p = Path(path)
        if not p.is_file():
            raise MoepruneError(f"plan file {p} does not exist")
        try:
            d = json.loads(p.read_text())
        except UnicodeDecodeError:
            raise MoepruneError(f"{p} is not a moeprune plan: it is not UTF-8 text (give the JSON file "
                                "`moeprune plan` wrote)") from None
        except json.JSONDecodeError as e:
            raise MoepruneError(f"{p} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                                "fix the file or write a new plan with `moeprune plan`") from None
        return cls.from_dict(d, source=str(p))

    # ---- checks -------------------------------------------------------------------------------
    def validate(self, model: dict | None = None) -> None:
        """Raise MoepruneError with the first problem found.

        `model` holds the facts of the model the plan is for: num_experts, top_k, n_group,
        min_experts_per_group, and optionally moe_layers (the model's MoE layers: every one must
        have exactly one entry) and expert_intermediate_size (the width I every permutation must
        have). Without it the plan is checked against its own `model` facts, and layer coverage
        and permutation width only for consistency within the plan.
        """
        given = model is not None
        m = model if given else self.model
        E, K = int(m["num_experts"]), int(m["top_k"])
        n_group = 1 if self.flatten_groups else int(m.get("n_group", 1))
        min_per_group = int(m.get("min_experts_per_group", 2))
        moe_layers = set(m.get("moe_layers", [lp.layer for lp in self.layers]))
        width = m.get("expert_intermediate_size") if given else None
        if not self.layers:
            raise MoepruneError("plan has no layers")
        listed = [lp.layer for lp in self.layers]
        twice = sorted({i for i in listed if listed.count(i) > 1})
        if twice:
            raise MoepruneError(f"plan lists MoE layer(s) {twice} more than once; keep one entry per layer")
        if given and "moe_layers" in m:
            missing = sorted(moe_layers - set(listed))
            if missing:
                raise MoepruneError(f"plan has no entry for MoE layer(s) {missing}: it was made for another "
                                    "model shape; re-plan on this model's statistics")
        if self.budget not in BUDGETS:
            raise MoepruneError(f"plan budget {self.budget!r} is not one of {', '.join(BUDGETS)}")
        counts = {lp.num_experts_out for lp in self.layers}
        if len(counts) != 1 and self.budget != "global":
            raise MoepruneError(
                f"plan keeps different expert counts per layer {sorted(counts)}; a stock config "
                "holds one count, so every MoE layer must keep the same number (a plan made with "
                "--budget global says \"budget\": \"global\")"
            )
        for lp in self.layers:
            where = f"layer {lp.layer}"
            if lp.layer not in moe_layers:
                raise MoepruneError(
                    f"{where} is not an MoE layer of this model (MoE layers: {sorted(moe_layers)})"
                )
            if lp.num_experts_in != E:
                if given:
                    raise MoepruneError(f"{where}: the plan was made for {lp.num_experts_in} experts per "
                                        f"layer, but the model has {E}; re-plan on this model's statistics")
                raise MoepruneError(f"{where}: the plan says num_experts_in={lp.num_experts_in}, but its "
                                    f"model facts say num_experts={E}; the plan is inconsistent, re-plan")
            if lp.router_merge not in ROUTER_MERGES:
                raise MoepruneError(
                    f"{where}: router_merge {lp.router_merge!r} is not one of {ROUTER_MERGES}"
                )
            seen: set[int] = set()
            widths: set[int] = set() if width is None else {int(width)}  # one hidden width I per layer
            for j, g in enumerate(lp.groups):
                if not g.members or len(g.members) != len(g.coeffs):
                    raise MoepruneError(f"{where}: a group needs members and one coefficient per member")
                self._check_coeffs(f"{where}, group {j}", g)
                if g.perms is not None:
                    self._check_perms(where, g, widths, width)
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
        check_novice_plan(self)

    def _check_coeffs(self, where: str, g: Group) -> None:
        if not all(math.isfinite(c) for c in g.coeffs):
            raise MoepruneError(f"{where}: non-finite merge coefficient in group {g.members} ({g.coeffs})")
        if not self.normalise:
            big = [c for c in g.coeffs if abs(c) > MAX_COEFF]
            if big:
                raise MoepruneError(f"{where}: merge coefficient {big[0]:g} of group {g.members} is beyond "
                                    f"±{MAX_COEFF:g}, even for a plan with \"normalise\": false; "
                                    "check the plan")
            return
        hint = "or set \"normalise\": false in the plan if another weighting is meant"
        for e, c in zip(g.members, g.coeffs):
            if c < 0:
                raise MoepruneError(f"{where}: coefficient {c:g} of expert {e} (group {g.members}) is "
                                    f"negative; a merge is a weighted average with weights >= 0, {hint}")
        total = math.fsum(g.coeffs)
        if abs(total - 1.0) > SUM_TOLERANCE:
            raise MoepruneError(f"{where}: the coefficients of group {g.members} sum to {total:.6g}, not 1; "
                                f"a merge is a weighted average: scale them to sum to 1, {hint}")

    @staticmethod
    def _check_perms(where: str, g: Group, widths: set[int], width: int | None = None) -> None:
        if len(g.perms) != len(g.members):
            raise MoepruneError(
                f"{where}: group {g.members} has {len(g.perms)} permutations, one per member needed"
            )
        for e, q in zip(g.members, g.perms):
            if width is not None and len(q) != width:
                raise MoepruneError(f"{where}: the permutation of expert {e} (group {g.members}) has "
                                    f"{len(q)} hidden units, but the model's experts have {width}; the plan "
                                    "was made for another model shape, re-plan on this model")
            widths.add(len(q))
            if sorted(q) != list(range(len(q))):
                raise MoepruneError(f"{where}: the permutation of expert {e} (group {g.members}) is not a "
                                    f"permutation of its {len(q)} hidden units 0..{len(q) - 1}")
        if len(widths) > 1:
            raise MoepruneError(
                f"{where}: permutations of different lengths {sorted(widths)}; every expert of a "
                "layer has the same hidden width I"
            )

    def _check_groups(self, lp: LayerPlan, E: int, n_group: int, min_per_group: int) -> None:
        where, r = f"layer {lp.layer}", lp.num_experts_out
        hint = "or pass --flatten-groups to route without groups"
        if lp.novices:
            # the router keeps all E rows (check_novice_plan), so its groups and every token's choice are
            # the original's whatever experts are kept
            return
        if r % n_group:
            raise MoepruneError(f"{where}: {r} experts is not divisible by n_group={n_group}; "
                                f"keep a multiple of {n_group} experts {hint}")
        per_in, per_out = E // n_group, r // n_group
        if per_out < min_per_group:
            raise MoepruneError(
                f"{where}: each of the {n_group} routing groups would keep {per_out} experts, "
                f"fewer than {min_per_group}; keep at least {min_per_group * n_group} {hint}"
            )
        for j, g in enumerate(lp.groups):
            routing_groups = {m // per_in for m in g.members}
            if routing_groups != {j // per_out}:
                raise MoepruneError(
                    f"{where}: output expert {j} (members {g.members}) must come from routing "
                    f"group {j // per_out} only; order groups by routing group {hint}"
                )


# ---- the JSON schema of a plan -------------------------------------------------------------------
# Checked by hand, field by field, so every message names the field path (layers[2].groups[0].coeffs[1])
# and the JSON type expected. JSON true/false are Python bools, and bool is a subclass of int:
# integers and numbers exclude them explicitly, and booleans must be real JSON booleans.

PLAN_FIELDS = {"version": True, "method": True, "layers": True, "model": True, "method_config": False,
               "calibration": False, "flatten_groups": False, "normalise": False, "num_experts_out": False,
               "mtp": False, "compensation": False, "budget": False}
LAYER_FIELDS = {"layer": True, "num_experts_in": True, "groups": True, "router_merge": False,
                "novices": False, "notes": False}
GROUP_FIELDS = {"members": True, "coeffs": True, "perms": False}
MODEL_INTS = {"num_experts": True, "top_k": True, "n_group": False, "min_experts_per_group": False,
              "hidden_size": False}  # facts validate() reads; other model fields are free-form description


def check_novice_plan(plan: Plan) -> None:
    """A plan with novices must be a pruning plan whose kept experts and novices cover every expert.

    That is MoNE's shape: the router keeps all its rows, so every router id needs a kept expert or
    a novice behind it. `Plan.validate` runs this last.
    """
    if not any(lp.novices for lp in plan.layers):
        return
    for lp in plan.layers:
        where = f"layer {lp.layer}"
        if not lp.is_pruning:
            raise MoepruneError(
                f"{where}: novices combine only with pruning (singleton groups with coefficient 1); "
                "this plan also merges experts"
            )
        covered = set(lp.kept) | set(lp.novices)
        missing = sorted(set(range(lp.num_experts_in)) - covered)
        if missing:
            raise MoepruneError(
                f"{where}: experts {missing} are neither kept nor novices; with novices the router "
                "keeps all its rows, so every expert must be one or the other"
            )


def check_same_calibration(plan: Plan, stats) -> None:
    """Refuse statistics whose calibration facts differ from the ones the plan records."""
    for key in ("sha256", "tokens", "seq_len", "seed", "source"):
        a, b = plan.calibration.get(key), stats.calibration.get(key)
        if a is not None and b is not None and a != b:
            raise MoepruneError(
                f"the statistics do not match the plan: calibration {key} is {b!r} in the stats but "
                f"{a!r} in the plan; pass the stats directory the plan was made from"
            )


def _json_kind(v) -> str:
    """How a JSON value reads in a message: its JSON type, with short scalars shown."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"
    if isinstance(v, str):
        return f"the string {json.dumps(v[:40])}"
    return "a list" if isinstance(v, list) else "an object" if isinstance(v, dict) else type(v).__name__


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_KINDS = {
    "an integer": _is_int,
    "a number": _is_number,
    "a string": lambda v: isinstance(v, str),
    "true or false": lambda v: isinstance(v, bool),
    "a list": lambda v: isinstance(v, list),
    "an object": lambda v: isinstance(v, dict),
}


def _need(source: str, path: str, value, kind: str) -> None:
    if not _KINDS[kind](value):
        raise MoepruneError(f"{source}: {path} must be {kind}, not {_json_kind(value)}; fix the plan file "
                            "or write a new one with `moeprune plan`")


def _need_list_of(source: str, path: str, value, kind: str) -> None:
    _need(source, path, value, "a list")
    for j, v in enumerate(value):
        _need(source, f"{path}[{j}]", v, kind)


def _fields(source: str, path: str, d, fields: dict[str, bool]) -> None:
    """d is an object holding every required field of `fields` (name -> required) and no other."""
    _need(source, path, d, "an object")
    missing = [k for k, required in fields.items() if required and k not in d]
    if missing:
        raise MoepruneError(f"{source}: {path} lacks the field(s) {', '.join(missing)}; a plan written by "
                            "`moeprune plan` has them")
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise MoepruneError(f"{source}: {path} has unknown field(s) {', '.join(map(repr, unknown))}; the "
                            f"fields are {', '.join(fields)} (a misspelt field would be ignored silently)")


def check_plan_schema(d, source: str = "plan") -> None:
    """Raise MoepruneError naming the first field of the plan JSON `d` whose type or presence is wrong."""
    _fields(source, "the plan", d, PLAN_FIELDS)
    _need(source, "version", d["version"], "an integer")
    _need(source, "method", d["method"], "a string")
    for key in ("method_config", "calibration", "mtp", "compensation"):
        if key in d:
            _need(source, key, d[key], "an object")
    for key in ("flatten_groups", "normalise"):
        if key in d:
            _need(source, key, d[key], "true or false")
    if "budget" in d:
        _need(source, "budget", d["budget"], "a string")
    if "num_experts_out" in d:
        _need(source, "num_experts_out", d["num_experts_out"], "an integer")
    model = d["model"]
    _need(source, "model", model, "an object")
    for key, required in MODEL_INTS.items():
        if key in model or required:
            if key not in model:
                raise MoepruneError(f"{source}: model lacks the field {key}; a plan written by "
                                    "`moeprune plan` has it")
            _need(source, f"model.{key}", model[key], "an integer")
    if "model_type" in model and model["model_type"] is not None:
        _need(source, "model.model_type", model["model_type"], "a string")
    if "moe_layers" in model:
        _need_list_of(source, "model.moe_layers", model["moe_layers"], "an integer")
    _need(source, "layers", d["layers"], "a list")
    for i, lp in enumerate(d["layers"]):
        at = f"layers[{i}]"
        _fields(source, at, lp, LAYER_FIELDS)
        _need(source, f"{at}.layer", lp["layer"], "an integer")
        _need(source, f"{at}.num_experts_in", lp["num_experts_in"], "an integer")
        if "router_merge" in lp:
            _need(source, f"{at}.router_merge", lp["router_merge"], "a string")
        if "novices" in lp:
            _need_list_of(source, f"{at}.novices", lp["novices"], "an integer")
        if "notes" in lp:
            _need(source, f"{at}.notes", lp["notes"], "an object")
        _need(source, f"{at}.groups", lp["groups"], "a list")
        for j, g in enumerate(lp["groups"]):
            gat = f"{at}.groups[{j}]"
            _fields(source, gat, g, GROUP_FIELDS)
            _need_list_of(source, f"{gat}.members", g["members"], "an integer")
            _need_list_of(source, f"{gat}.coeffs", g["coeffs"], "a number")
            if g.get("perms") is not None:
                _need(source, f"{gat}.perms", g["perms"], "a list")
                for k, q in enumerate(g["perms"]):
                    _need_list_of(source, f"{gat}.perms[{k}]", q, "an integer")


def budget(num_experts: int, top_k: int, ratio: float | None = None, experts: int | None = None,
           n_group: int = 1, min_per_group: int = 2, flatten_groups: bool = False,
           groups_unchanged: bool = False) -> int:
    """The number of experts to keep per layer, checked before any expensive work.

    `groups_unchanged`: the method keeps every router row (novices), so group-limited routing is
    the original's and sets no condition on the count.
    """
    E = num_experts
    if (ratio is None) == (experts is None):
        raise MoepruneError(
            "give exactly one of --ratio R (fraction of experts to remove) or --experts N (to keep)"
        )
    if ratio is not None:
        if not 0 <= ratio < 1:
            raise MoepruneError(f"--ratio {ratio} is outside [0, 1): it is the fraction of experts to remove")
        r = E - round(ratio * E)
    else:
        r = int(experts)
        if not 1 <= r <= E:
            raise MoepruneError(f"--experts {r} is outside [1, {E}]: the model has {E} experts per layer")
    if top_k > E:
        raise MoepruneError(
            f"the model routes each token to top-k={top_k} experts but has only {E}; its config is "
            "inconsistent (check num_experts_per_tok and the expert count in config.json)"
        )
    if r < top_k:
        raise MoepruneError(f"keeping {r} of {E} experts is fewer than top-k={top_k}; keep at least {top_k} "
                            f"(--experts {top_k} or --ratio <= {(E - top_k) / E:.3f})")
    if n_group > 1 and not flatten_groups and not groups_unchanged:
        ok = [n for n in range(n_group * min_per_group, E + 1, n_group)]
        if r % n_group or r // n_group < min_per_group:
            raise MoepruneError(
                f"keeping {r} experts breaks group-limited routing (n_group={n_group}, at least "
                f"{min_per_group} per group): use --experts in {ok} or --flatten-groups"
            )
    return r
