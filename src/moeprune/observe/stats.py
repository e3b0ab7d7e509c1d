"""Streaming per-expert statistics and the probe reservoir, and their on-disk form.

Everything here is exact and mergeable: float64 accumulators, per-dimension Welford mean and M2
merged with Chan's parallel formula, so statistics gathered in any batch split (or on several
processes) are the same numbers. No per-token storage beyond the fixed-size probe.

Shape letters: E experts, H hidden, S routed (token, expert) pairs, P probe tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moeprune.errors import MoepruneError

STATS_VERSION = 1
F64 = torch.float64


class ExpertStats:
    """count, gate_sum, Welford mean/M2 of the raw output, reap_sum, ean_sum for E experts."""

    def __init__(self, num_experts: int, hidden: int):
        E, H = num_experts, hidden
        self.count = torch.zeros(E, dtype=F64)  # n_i
        self.gate_sum = torch.zeros(E, dtype=F64)  # sum of g_i(x) over T_i
        self.mean = torch.zeros(E, H, dtype=F64)  # running mean of E_i(x)
        self.m2 = torch.zeros(E, H, dtype=F64)  # running sum of squared deviations
        self.reap_sum = torch.zeros(E, dtype=F64)  # sum of g_i(x) * ||E_i(x)||
        self.ean_sum = torch.zeros(E, dtype=F64)  # sum of ||E_i(x)||

    @property
    def num_experts(self) -> int:
        return self.count.shape[0]

    @property
    def var(self) -> torch.Tensor:
        """[E, H] unbiased per-dimension variance; 0 where an expert saw fewer than 2 tokens."""
        denom = (self.count - 1).clamp(min=1)[:, None]
        return torch.where(self.count[:, None] > 1, self.m2 / denom, torch.zeros_like(self.m2))

    @torch.no_grad()
    def update(self, expert_ids: torch.Tensor, gates: torch.Tensor, outputs: torch.Tensor,
               scratch: torch.Tensor | None = None) -> None:
        """Add S routed pairs: expert_ids [S], gates [S], raw outputs [S, H].

        The batch's own moments are taken in float32 on the outputs' device (the hot path), then
        merged into the float64 running state with Chan's formula, so accuracy does not drift with
        the number of batches. `scratch`, if given, is a float32 buffer of S*H elements the caller
        no longer needs; it is overwritten instead of allocating the [S, H] temporary (on CPU a
        fresh multi-megabyte tensor costs page faults that rival the arithmetic).
        """
        E = self.num_experts
        ids = expert_ids.reshape(-1).long()
        out = outputs.float()  # [S, H]
        g = gates.reshape(-1).float()  # [S]
        norms = torch.linalg.vector_norm(out, dim=-1)  # [S]
        n_b = torch.bincount(ids, minlength=E)  # [E]
        sum_b = out.new_zeros(E, out.shape[1]).index_add_(0, ids, out)  # [E, H]
        mean_b = sum_b.div_(n_b.clamp(min=1)[:, None])
        # (mean - x)^2 == (x - mean)^2 bit for bit (IEEE subtraction is antisymmetric), so the
        # deviations are formed in one [S, H] buffer: the batch means gathered per row, minus x.
        usable = (
            scratch is not None
            and scratch.dtype == out.dtype
            and scratch.device == out.device
            and scratch.is_contiguous()
            and scratch.numel() == out.numel()
            and scratch.data_ptr() != out.data_ptr()
        )
        # [S, H]
        dev = torch.index_select(mean_b, 0, ids, out=scratch.view_as(out)) if usable else mean_b[ids]
        m2_b = torch.zeros_like(sum_b).index_add_(0, ids, dev.sub_(out).square_())  # [E, H]
        # [E, 3]
        per_expert = out.new_zeros(E, 3).index_add_(0, ids, torch.stack((g, g * norms, norms), dim=1))
        # two device-to-host transfers per batch, not four: [E, 2H + 3] = mean | m2 | gate, reap, ean
        host = torch.cat((mean_b, m2_b, per_expert), dim=1).to("cpu", F64)
        H = out.shape[1]
        self._merge(n_b.to("cpu", F64), host[:, :H], host[:, H : 2 * H])
        self.gate_sum += host[:, 2 * H]
        self.reap_sum += host[:, 2 * H + 1]
        self.ean_sum += host[:, 2 * H + 2]

    def _merge(self, n_b: torch.Tensor, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        # Chan et al.: combine (n_a, mean_a, M2_a) with (n_b, mean_b, M2_b) per expert.
        n_a = self.count
        n = n_a + n_b
        safe_n = n.clamp(min=1)[:, None]
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b[:, None] / safe_n)
        self.m2 = self.m2 + m2_b + delta**2 * (n_a * n_b)[:, None] / safe_n
        self.count = n

    def merge(self, other: ExpertStats) -> None:
        """Fold in statistics gathered elsewhere (another batch split or process)."""
        self._merge(other.count.clone(), other.mean, other.m2)
        self.gate_sum += other.gate_sum
        self.reap_sum += other.reap_sum
        self.ean_sum += other.ean_sum

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("count", "gate_sum", "mean", "m2", "reap_sum", "ean_sum")}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ExpertStats:
        E, H = tensors["mean"].shape
        s = cls(E, H)
        for k, v in tensors.items():
            setattr(s, k, v.to(F64))
        return s


@dataclass
class Probe:
    """A fixed seeded sample of MoE-block inputs with their router logits, in token order."""

    positions: torch.Tensor  # [P] global calibration-token indices, ascending
    inputs: torch.Tensor  # [P, H] MoE-block input x
    router_logits: torch.Tensor  # [P, E]


class ProbeCollector:
    """Collects the probe rows of one layer as batches stream past.

    The probe positions are drawn once from the seed before the pass, so the probe is the same
    whatever the batch size, and the rows can be gathered on several processes and concatenated.
    """

    def __init__(self, wanted_positions: torch.Tensor):
        self.wanted = wanted_positions.long().cpu()  # [P] ascending
        self._positions, self._inputs, self._logits = [], [], []

    def add(self, positions: torch.Tensor, inputs: torch.Tensor, logits: torch.Tensor) -> None:
        """positions [T] global token ids of this batch's rows; inputs [T, H]; logits [T, E]."""
        rows = self.rows(positions)
        if rows.numel():
            on = rows.to(inputs.device)
            self.add_rows(positions.cpu()[rows], inputs[on], logits[on])

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """[p] CPU indices into `positions` [T] (global token ids) of the rows the probe wants."""
        return torch.isin(positions.cpu(), self.wanted).nonzero().squeeze(1)

    def add_rows(self, positions: torch.Tensor, inputs: torch.Tensor, logits: torch.Tensor) -> None:
        """Add rows already selected with `rows`: positions [p], inputs [p, H], logits [p, E]."""
        self._positions.append(positions.cpu())
        self._inputs.append(inputs.detach().float().cpu())
        self._logits.append(logits.detach().float().cpu())

    def result(self, hidden: int, num_experts: int) -> Probe:
        if not self._positions:
            return Probe(
                torch.zeros(0, dtype=torch.long), torch.zeros(0, hidden), torch.zeros(0, num_experts)
            )
        pos = torch.cat(self._positions)
        order = pos.argsort()
        return Probe(pos[order], torch.cat(self._inputs)[order], torch.cat(self._logits)[order])


@dataclass
class LayerStats:
    layer: int
    experts: ExpertStats
    probe: Probe

    @classmethod
    def empty(cls, layer: int, num_experts: int, hidden: int, expert_dim: int | None = None) -> LayerStats:
        """No calibration: zero counts and an empty probe, for methods that read only the weights.

        `expert_dim`: the experts' width D when it is not `hidden` (experts in a latent space)."""
        E, H = num_experts, hidden
        return cls(
            layer,
            ExpertStats(E, expert_dim or H),
            Probe(torch.zeros(0, dtype=torch.long), torch.zeros(0, H), torch.zeros(0, E)),
        )


@dataclass
class Stats:
    """Everything one calibration pass learned about a model's experts."""

    model: dict  # family, model_type, num_experts, top_k, n_group, hidden, num_layers, source path
    calibration: dict  # source, sha256, samples, seq_len, tokens, seed, probe size
    layers: dict[int, LayerStats] = field(default_factory=dict)
    version: int = STATS_VERSION

    @property
    def num_tokens(self) -> int:
        return int(self.calibration.get("tokens", 0))

    def save(self, directory: str | Path) -> None:
        """Write `stats.safetensors` and `stats.json` into `directory` (created if needed)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, ls in self.layers.items():
            for k, v in ls.experts.tensors().items():
                tensors[f"layer.{i}.{k}"] = v.contiguous()
            tensors[f"layer.{i}.probe.positions"] = ls.probe.positions.contiguous()
            tensors[f"layer.{i}.probe.inputs"] = ls.probe.inputs.contiguous()
            tensors[f"layer.{i}.probe.router_logits"] = ls.probe.router_logits.contiguous()
        save_file(tensors, str(d / "stats.safetensors"), metadata={"format": "pt"})
        meta = {"version": self.version, "model": self.model, "calibration": self.calibration,
                "layers": sorted(self.layers)}
        (d / "stats.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> Stats:
        """Read a stats directory, checking it whole first: one clear error names what is damaged."""
        d = Path(directory)
        if not (d / "stats.json").is_file() or not (d / "stats.safetensors").is_file():
            raise MoepruneError(f"{d} is not a stats directory (expected stats.json and stats.safetensors "
                                "written by `moeprune observe`)")
        meta = _read_meta(d)
        try:
            tensors = load_file(str(d / "stats.safetensors"))
        except (SafetensorError, OSError, ValueError) as e:
            raise _damaged(d, f"stats.safetensors cannot be read ({e})") from None
        layers = {}
        for i in meta["layers"]:
            layers[i] = _layer_from(d, i, tensors, meta["model"])
        return cls(
            model=meta["model"], calibration=meta["calibration"], layers=layers, version=meta["version"]
        )


# ---- checks of a stats directory -----------------------------------------------------------------
# A directory may be cut short by a full disk or a killed run, or edited; what it holds is checked
# before any method reads it, so a damaged one fails here and not as a shape error deep in a method.

EXPERT_TENSORS = ("count", "gate_sum", "mean", "m2", "reap_sum", "ean_sum")
PROBE_TENSORS = ("positions", "inputs", "router_logits")


def _damaged(d: Path, what: str) -> MoepruneError:
    return MoepruneError(f"{d} is damaged: {what}; re-run `moeprune observe` to write it again")


def _read_meta(d: Path) -> dict:
    try:
        meta = json.loads((d / "stats.json").read_text())
    except UnicodeDecodeError:
        raise _damaged(d, "stats.json is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        raise _damaged(d, f"stats.json is not valid JSON ({e.msg} at {where})") from None
    if not isinstance(meta, dict):
        raise _damaged(d, f"stats.json holds a JSON {type(meta).__name__}, not an object")
    missing = [k for k in ("version", "model", "calibration", "layers") if k not in meta]
    if missing:
        raise _damaged(d, f"stats.json lacks {', '.join(missing)}")
    if meta["version"] != STATS_VERSION or isinstance(meta["version"], bool):
        raise MoepruneError(f"{d}: stats version {meta['version']!r} is not {STATS_VERSION}; "
                            "re-run `moeprune observe`")
    for k in ("model", "calibration"):
        if not isinstance(meta[k], dict):
            raise _damaged(d, f"stats.json field {k} is not an object")
    layers = meta["layers"]
    if not isinstance(layers, list) or not all(type(i) is int for i in layers):  # bool is not a layer index
        raise _damaged(d, "stats.json field layers is not a list of layer indices")
    if len(set(layers)) != len(layers):
        raise _damaged(d, f"stats.json lists a layer more than once ({layers})")
    E = meta["model"].get("num_experts")
    if E is not None and (not isinstance(E, int) or isinstance(E, bool) or E < 1):
        raise _damaged(d, f"stats.json model.num_experts is {E!r}, not a positive integer")
    return meta


def _layer_from(d: Path, i: int, tensors: dict[str, torch.Tensor], model: dict) -> LayerStats:
    """Layer i's statistics, after checking that its tensors exist, agree in shape and are finite."""
    names = [f"layer.{i}.{k}" for k in EXPERT_TENSORS] + [f"layer.{i}.probe.{k}" for k in PROBE_TENSORS]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise _damaged(d, f"stats.json lists layer {i} but stats.safetensors lacks {', '.join(missing)}")
    t = {k: tensors[f"layer.{i}.{k}"] for k in EXPERT_TENSORS}
    p = {k: tensors[f"layer.{i}.probe.{k}"] for k in PROBE_TENSORS}
    if t["mean"].dim() != 2:
        raise _damaged(d, f"layer {i} mean has shape {list(t['mean'].shape)}, not [experts, hidden]")
    E, H = t["mean"].shape
    for k in ("count", "gate_sum", "reap_sum", "ean_sum", "m2"):
        want = [E, H] if k == "m2" else [E]
        if list(t[k].shape) != want:
            raise _damaged(d, f"layer {i} {k} has shape {list(t[k].shape)}, but mean is [{E}, {H}] "
                              f"(experts, hidden), so {want} was expected")
    if p["positions"].dim() != 1:
        shape = list(p["positions"].shape)
        raise _damaged(d, f"layer {i} probe.positions has shape {shape}, not [probe size]")
    P = p["positions"].shape[0]
    H_in = int(model.get("hidden_size") or H)  # probe inputs are the block's; expert means may be latent
    for k, want in (("inputs", [P, H_in]), ("router_logits", [P, E])):
        if list(p[k].shape) != want:
            raise _damaged(d, f"layer {i} probe.{k} has shape {list(p[k].shape)}, but {want} was expected "
                              f"({P} probe positions, {E} experts, hidden size {H_in})")
    E_model = model.get("num_experts")
    if E_model is not None and E != E_model:
        raise _damaged(d, f"layer {i} holds statistics of {E} experts, but stats.json says the model has "
                          f"{E_model}")
    if p["positions"].is_floating_point() or p["positions"].dtype == torch.bool:
        raise _damaged(d, f"layer {i} probe.positions are {p['positions'].dtype}, not token indices")
    for k, v in [*t.items(), *(("probe." + k, v) for k, v in p.items() if k != "positions")]:
        if not v.is_floating_point():
            raise _damaged(d, f"layer {i} {k} is {v.dtype}, not floating point")
        bad = int((~torch.isfinite(v)).sum())
        if bad:
            raise _damaged(d, f"layer {i} {k} holds {bad} non-finite value(s) (NaN or Inf)")
    if bool((t["count"] < 0).any()) or bool((t["m2"] < 0).any()):
        raise _damaged(d, f"layer {i} has negative token counts or squared deviations")
    ex = ExpertStats.from_tensors(t)
    return LayerStats(i, ex, Probe(p["positions"], p["inputs"], p["router_logits"]))
