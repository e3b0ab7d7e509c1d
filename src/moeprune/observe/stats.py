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
from safetensors.torch import load_file, save_file

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
        usable = (scratch is not None and scratch.dtype == out.dtype and scratch.device == out.device
                  and scratch.is_contiguous() and scratch.numel() == out.numel() and scratch.data_ptr() != out.data_ptr())
        dev = torch.index_select(mean_b, 0, ids, out=scratch.view_as(out)) if usable else mean_b[ids]  # [S, H]
        m2_b = torch.zeros_like(sum_b).index_add_(0, ids, dev.sub_(out).square_())  # [E, H]
        per_expert = out.new_zeros(E, 3).index_add_(0, ids, torch.stack((g, g * norms, norms), dim=1))  # [E, 3]
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
            return Probe(torch.zeros(0, dtype=torch.long), torch.zeros(0, hidden), torch.zeros(0, num_experts))
        pos = torch.cat(self._positions)
        order = pos.argsort()
        return Probe(pos[order], torch.cat(self._inputs)[order], torch.cat(self._logits)[order])


@dataclass
class LayerStats:
    layer: int
    experts: ExpertStats
    probe: Probe

    @classmethod
    def empty(cls, layer: int, num_experts: int, hidden: int) -> LayerStats:
        """No calibration: zero counts and an empty probe, for methods that read only the weights."""
        E, H = num_experts, hidden
        return cls(layer, ExpertStats(E, H), Probe(torch.zeros(0, dtype=torch.long), torch.zeros(0, H), torch.zeros(0, E)))


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
        from moeprune.errors import MoepruneError

        d = Path(directory)
        if not (d / "stats.json").is_file() or not (d / "stats.safetensors").is_file():
            raise MoepruneError(f"{d} is not a stats directory (expected stats.json and stats.safetensors "
                                "written by `moeprune observe`)")
        meta = json.loads((d / "stats.json").read_text())
        if meta.get("version") != STATS_VERSION:
            raise MoepruneError(f"{d}: stats version {meta.get('version')} is not {STATS_VERSION}; re-run observe")
        tensors = load_file(str(d / "stats.safetensors"))
        layers = {}
        for i in meta["layers"]:
            ex = ExpertStats.from_tensors({k: tensors[f"layer.{i}.{k}"] for k in
                                           ("count", "gate_sum", "mean", "m2", "reap_sum", "ean_sum")})
            probe = Probe(tensors[f"layer.{i}.probe.positions"], tensors[f"layer.{i}.probe.inputs"],
                          tensors[f"layer.{i}.probe.router_logits"])
            layers[int(i)] = LayerStats(int(i), ex, probe)
        return cls(model=meta["model"], calibration=meta["calibration"], layers=layers, version=meta["version"])
