"""The calibration pass: hooks that read routing at the experts boundary and feed the trackers.

`Observer` is a context manager that owns its hooks and removes them on exit. It attaches to any
subset of MoE blocks, so the same code serves a whole model in memory and one decoder layer at a
time. Routing is read where the experts receive `(top_k_index, top_k_weights)`; the router is never
re-run. The probe (MoE inputs with router logits) is taken by a forward hook on the router.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from moeprune.arch import Adapter, get_adapter
from moeprune.arch.base import text_generator
from moeprune.observe.hooks import install_observer
from moeprune.observe.reduce import reduce_layer_stats
from moeprune.observe.stats import ExpertStats, LayerStats, ProbeCollector, Stats

if TYPE_CHECKING:
    from moeprune.distributed import Ranks


def probe_positions(num_tokens: int, probe_size: int, seed: int) -> torch.Tensor:
    """[P] ascending global token indices of the probe, drawn once from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_tokens, generator=g)[: min(probe_size, num_tokens)].sort().values


class Observer(contextlib.AbstractContextManager):
    """Collect per-expert statistics for the given MoE blocks while the model runs.

    Call `begin_batch(positions)` before each forward with the global index of every token of the
    batch in row-major [B, L] order; the probe uses it to pick its rows.
    """

    def __init__(self, adapter: Adapter, blocks: dict[int, nn.Module], wanted_probe: torch.Tensor):
        self.adapter = adapter
        self.blocks = blocks
        self.wanted_probe = wanted_probe
        self.experts: dict[int, ExpertStats] = {}
        self.probes: dict[int, ProbeCollector] = {}
        self._positions: torch.Tensor | None = None
        self._probe_finder = ProbeCollector(wanted_probe)  # finds the probe rows of a batch
        self._undo: list = []

    def begin_batch(self, positions: torch.Tensor) -> None:
        self._positions = positions.reshape(-1)
        # every layer's probe wants the same rows: find them once per batch, not once per layer
        self._probe_rows = self._probe_finder.rows(self._positions)  # [p] on the CPU
        self._probe_hits = self._positions.cpu()[self._probe_rows]  # [p] global token ids
        self._rows_on: dict[torch.device, torch.Tensor] = {}

    def __enter__(self):
        for i, block in self.blocks.items():
            # expert outputs live in the experts' space (D; H unless they run in a latent space)
            self.experts[i] = ExpertStats(self.adapter.num_experts, self.adapter.expert_dim)
            self.probes[i] = ProbeCollector(self.wanted_probe)
            self._undo.append(install_observer(self.adapter, block, self._recorder(i)))
            handle = self.adapter.router(block).register_forward_hook(self._probe_hook(i))
            self._undo.append(handle.remove)
        return self

    def __exit__(self, *exc):
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        return False

    def _recorder(self, layer: int):
        stats = self.experts[layer]
        block, E = self.blocks[layer], self.adapter.num_experts

        def record(top_k_index, top_k_weights, raw, scratch=None):
            ids, gates = top_k_index.reshape(-1), top_k_weights.reshape(-1)  # [S]
            lifted = self.adapter.lift_expert_outputs(block, raw)  # [S, H]
            if lifted is not raw:
                raw, scratch = lifted, None
            routed = ids < E  # pairs sent to never-pruned experts past E (zero-compute) are no expert's
            if not bool(routed.all()):
                ids, gates, raw, scratch = ids[routed], gates[routed], raw[routed], None
            stats.update(ids, gates, raw, scratch)

        return record

    def _probe_hook(self, layer: int):
        collector = self.probes[layer]
        H = self.adapter.config.hidden_size

        def hook(module, args, output):
            if self._positions is None or not self._probe_rows.numel():
                return
            x = args[0].reshape(-1, H)  # [T, H]
            logits = self.adapter.router_logits(output, module).reshape(x.shape[0], -1)  # [T, E]
            rows = self._rows_on.get(x.device)
            if rows is None:
                rows = self._rows_on[x.device] = self._probe_rows.to(x.device)
            collector.add_rows(self._probe_hits, x[rows], logits[rows])

        return hook

    def layer_stats(self) -> dict[int, LayerStats]:
        H, E = self.adapter.config.hidden_size, self.adapter.num_experts
        return {i: LayerStats(i, self.experts[i], self.probes[i].result(H, E)) for i in self.blocks}


def model_description(model: nn.Module, adapter: Adapter, source: str | None = None) -> dict:
    """The facts about a model that stats and plans carry, so that methods check budgets offline and a
    later command can tell whether its model is the one they were made on (`check_same_model`)."""
    import hashlib
    import json

    from moeprune.arch import decoder_layers

    blocks = adapter.moe_blocks(model)
    first = next(iter(blocks.values()), None)
    width = int(adapter.expert_weights(first, 0).down.shape[1]) if first is not None else None
    facts = {
        "model_type": adapter.family,
        "num_experts": adapter.num_experts,
        "top_k": adapter.top_k,
        "n_group": adapter.n_group,
        "min_experts_per_group": adapter.min_experts_per_group,
        "hidden_size": int(adapter.config.hidden_size),
        "moe_layers": sorted(blocks),
        "num_layers": len(decoder_layers(model)[0]),
        "expert_intermediate_size": width,
        "expert_dim": adapter.expert_dim,
        "vocab_size": getattr(adapter.config, "vocab_size", None),
    }
    blob = json.dumps({k: facts[k] for k in FINGERPRINT_FIELDS}, sort_keys=True).encode()
    return {**facts, "source": source, "fingerprint": hashlib.sha256(blob).hexdigest()[:16]}


# The facts that must agree between a model and the stats or plan used on it, in the order they are reported.
FINGERPRINT_FIELDS = (
    "model_type", "hidden_size", "num_experts", "top_k", "n_group", "num_layers", "moe_layers",
    "expert_intermediate_size", "vocab_size",
)


def check_same_model(recorded: dict, actual: dict, *, what: str, model: str, fix: str) -> None:
    """Refuse stats or a plan (`recorded`, their `model` dict) made on another model shape than `actual`.

    Fields missing from `recorded` (files written before they were recorded) are not compared.
    """
    from moeprune.errors import MoepruneError

    for key in FINGERPRINT_FIELDS:
        if key in recorded and key in actual and recorded[key] is not None and actual[key] is not None:
            if recorded[key] != actual[key]:
                raise MoepruneError(
                    f"{what} was made on another model: its {key} is {recorded[key]}, but {model} "
                    f"has {actual[key]}; {fix}"
                )


def calibration_facts(calibration: dict | None, input_ids: torch.Tensor, probe: torch.Tensor, seed: int,
                      seconds: float, ranks: Ranks) -> dict:
    """The calibration record of a pass: provenance plus tokens, probe size, seed and the slowest rank's
    time."""
    N, L = input_ids.shape
    calib = dict(calibration or {})
    calib.update(tokens=N * L, sequences=N, seq_len=L, probe_size=int(probe.numel()), seed=seed,
                 seconds=round(ranks.max_over_ranks(seconds), 3))
    if ranks.world > 1:
        calib["processes"] = ranks.world
    return calib


@torch.no_grad()
def observe(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    batch_size: int = 8,
    probe_size: int = 512,
    seed: int = 0,
    calibration: dict | None = None,
    source: str | None = None,
    progress=None,
    ranks: Ranks | None = None,
) -> Stats:
    """One calibration pass over `input_ids` [N, L] (packed, no padding) -> Stats.

    `progress`, if given, is called with the number of sequences this process has done after every
    batch. With `ranks` (several processes, see `moeprune.distributed`) every rank passes the same
    `input_ids`, runs only its own share of the batches, and all ranks return the same merged Stats.
    """
    from moeprune.distributed import Ranks

    ranks = ranks or Ranks()
    adapter = get_adapter(model.config)
    N, L = input_ids.shape
    device = next(model.parameters()).device
    blocks = adapter.moe_blocks(model)
    wanted = probe_positions(N * L, probe_size, seed)
    started = time.perf_counter()
    done = 0
    generator = text_generator(model)
    with Observer(adapter, blocks, wanted) as obs:
        for start in ranks.batch_starts(list(range(0, N, batch_size))):
            batch = input_ids[start : start + batch_size]  # [B, L]
            positions = torch.arange(start * L, (start + batch.shape[0]) * L)  # [B*L] global token indices
            obs.begin_batch(positions)
            generator(input_ids=batch.to(device), use_cache=False)
            done += batch.shape[0]
            if progress is not None:
                progress(done)
        layers = reduce_layer_stats(ranks, obs.layer_stats())
    calib = calibration_facts(calibration, input_ids, wanted, seed, time.perf_counter() - started, ranks)
    return Stats(model=model_description(model, adapter, source), calibration=calib, layers=layers)
