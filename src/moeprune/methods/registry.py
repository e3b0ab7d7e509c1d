"""The method registry and the request every method receives.

The registry is filled once at import by decorators and never mutated afterwards; it carries no
run-time state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from moeprune.errors import MoepruneError
from moeprune.methods.access import WeightAccess
from moeprune.observe.stats import Stats
from moeprune.plan import Plan, budget
from moeprune.settings import check_ratio


@dataclass(frozen=True)
class PlanRequest:
    """What a method is asked for: the statistics, the budget, and optional weight access."""

    stats: Stats
    keep: int  # experts to keep per MoE layer
    flatten_groups: bool = False
    weights: WeightAccess | None = None  # for methods that read expert weights

    @property
    def model(self) -> dict:
        return self.stats.model

    @property
    def n_group(self) -> int:
        return 1 if self.flatten_groups else int(self.model.get("n_group", 1))

    def plan(self, method: str, layers: list) -> Plan:
        """The Plan of `method` with these layer plans, recording the model and calibration it came from."""
        return Plan(
            method=method, layers=layers, model=dict(self.model), calibration=dict(self.stats.calibration)
        )


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[[PlanRequest, object], Plan]
    config: type
    paper: str  # citation shown by `moeprune methods`
    summary: str
    needs_calibration: bool = True
    kind: str = "prune"  # prune | merge | novice
    needs_weights: bool = False  # reads expert weights (PlanRequest.weights), so planning needs the model

    def layer_local(self, cfg) -> bool:
        """Whether the plan of a layer depends only on that layer's statistics and weights (configs say
        otherwise)."""
        return bool(getattr(cfg, "layer_local", True))

    def groups_unchanged(self, cfg) -> bool:
        """Whether the plan keeps every router row whatever the count (novices), so that group-limited
        routing needs nothing of the kept experts (`plan.budget`). A config may still ask for choices
        that respect the routing groups (MoNE's `within_groups`), and then the count must fit them."""
        return self.kind == "novice" and not getattr(cfg, "within_groups", False)

    def makes_novices(self, cfg) -> bool:
        """Whether this method with these options writes novices (MoNE's format)."""
        return self.kind == "novice" or getattr(cfg, "format", None) == "novices"

    def check_use(self, cfg, *, n_group: int, flatten_groups: bool, has_calibration: bool) -> None:
        """Refuse, before any work, a use of this method that cannot run: one line saying what to change."""
        # a method whose need depends on its options says why through `calibration_reason()` (e.g. dek)
        reason = cfg.calibration_reason() if hasattr(cfg, "calibration_reason") else None
        if (self.needs_calibration or reason) and not has_calibration:
            why = f" ({reason})" if reason else ""
            raise MoepruneError(f"method {self.name} needs calibration text{why}: pass --calib PATH")

    def default_config(self, **overrides):
        names = {f.name for f in dataclasses.fields(self.config)}
        unknown = set(overrides) - names
        if unknown:
            raise MoepruneError(
                f"method {self.name} has no option(s) {sorted(unknown)}; options: {sorted(names)}"
            )
        return self.config(**overrides)


METHODS: dict[str, MethodSpec] = {}


def register(name: str, *, config: type, paper: str, summary: str, needs_calibration: bool = True,
             kind: str = "prune", needs_weights: bool = False):
    def wrap(fn):
        METHODS[name] = MethodSpec(name, fn, config, paper, summary, needs_calibration, kind, needs_weights)
        return fn

    return wrap


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise MoepruneError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def make_plan(name: str, request: PlanRequest, **options) -> Plan:
    """Run method `name` with its config built from `options`, validate and return the Plan."""
    spec = get_method(name)
    cfg = spec.default_config(**options)
    if spec.needs_weights and request.weights is None:
        raise MoepruneError(f"method {name} reads the expert weights: plan it with the model "
                            "(`moeprune prune`, or `moeprune plan ... --model PATH`)")
    if request.weights is not None:
        check_weights_match(request)
    plan = spec.fn(request, cfg)
    plan.method_config = dataclasses.asdict(cfg)
    plan.flatten_groups = request.flatten_groups
    plan.validate()
    return plan


@dataclass(frozen=True)
class NoOptions:
    """This method has no options."""



def check_weights_match(request: PlanRequest) -> None:
    """Statistics and weights come from one model: same expert count, every stats layer an MoE layer there.

    Checked before any method runs, so statistics of another model fail with both counts named (the
    statistics say X, the model has Y) rather than as a shape error inside a method.
    """
    adapter = getattr(request.weights, "adapter", None)
    E_model = getattr(adapter, "num_experts", None)
    for i, ls in sorted(request.stats.layers.items()):
        E_stats = ls.experts.num_experts
        if E_model is not None and E_stats != E_model:
            raise MoepruneError(f"the statistics have {E_stats} experts in layer {i}, but the model has "
                                f"{E_model}: they come from another model; observe this model "
                                "(`moeprune observe`)")
    layers = set(request.weights.layers())
    missing = sorted(set(request.stats.layers) - layers)
    if missing:
        raise MoepruneError(f"the statistics have MoE layer(s) {missing} that the model does not (its MoE "
                            f"layers: {sorted(layers)}); observe this model (`moeprune observe`)")


def make_plan_for(stats: Stats, method: str, *, ratio: float | None = None, experts: int | None = None,
                  flatten_groups: bool = False, weights=None, options: dict | None = None) -> Plan:
    """Plan `method` on `stats` at the given budget."""
    check_ratio(ratio)
    m = stats.model
    spec = get_method(method)
    keep = budget(m["num_experts"], m["top_k"], ratio=ratio, experts=experts, n_group=m.get("n_group", 1),
                  min_per_group=m.get("min_experts_per_group", 2), flatten_groups=flatten_groups,
                  groups_unchanged=spec.groups_unchanged(spec.default_config(**(options or {}))))
    return make_plan(method, PlanRequest(stats, keep, flatten_groups, weights), **(options or {}))
