"""Observe, plan, prune and save a checkpoint one decoder layer at a time, in memory bounded by about one
layer.

For each decoder layer: its weights are read from the shards (`ShardedCheckpoint`), this rank's
calibration batches run through it with the same `Observer` the whole-model path uses, its
statistics are reduced across ranks, its plan is made and applied by the same `surgery` code, it
is written as one output shard, and it is freed. Its outputs are the next layer's inputs. So the
statistics, plans and weights are the ones the whole-model path produces (tests check this per
family), while peak memory is about one layer plus the embeddings' touched rows plus the hidden
states of the calibration batches (`HiddenStates`, spilled to disk beyond a budget).

Methods whose plan for a layer depends only on that layer's statistics and weights (every method
except MoNE with `scope=global`) are planned inside the loop, so the checkpoint is read once. The
others take two passes: observe every layer, plan, then stream the surgery. `sequential=True`
applies each layer's plan before its outputs feed the next layer, so later statistics see the
pruned model (the whole-model path cannot do this).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from moeprune.distributed import Ranks
from moeprune.errors import MoepruneError
from moeprune.methods.compensation import CompensationConfig
from moeprune.observe import LayerStats, Stats, model_description, reduce_layer_stats
from moeprune.observe.observer import Observer, calibration_facts, probe_positions
from moeprune.pipeline.access import LayerAccess
from moeprune.pipeline.activations import HiddenStates, layer_call, run_layer, to_device
from moeprune.plan import LayerPlan, Plan
from moeprune.settings import CalibrationRequest, RuntimeRequest
from moeprune.store.writer import ShardWriter


class _Batches:
    """This rank's calibration batches and their hidden states between layers."""

    def __init__(self, source, input_ids: torch.Tensor, batch_size: int, ranks, budget: int, offload_dir):
        self.source = source
        self.input_ids = input_ids  # [N, L]
        self.batch_size = batch_size
        N = input_ids.shape[0]
        self.starts = ranks.batch_starts(list(range(0, N, batch_size)))
        self.ranks = ranks
        self.hidden = HiddenStates(budget, offload_dir)
        self.state = HiddenStates(budget, offload_dir)  # what a layer hands the next besides (ZAYA)

    @torch.no_grad()
    def run(self, i: int, layer: nn.Module, observer: Observer | None = None, keep: bool = True,
            sink: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], None] | None = None) -> None:
        """Run every local batch through decoder layer i; with `keep`, store the outputs as layer i+1's
        inputs.

        `sink(input_ids [B, L], outputs [B, L, H], state)`, if given, receives each batch's outputs (and
        the state the layer hands on besides, or None) instead.
        """
        L = self.input_ids.shape[1]
        device = self.source.device
        for b, s in enumerate(self.starts):
            batch = self.input_ids[s : s + self.batch_size]  # [B, L]
            h0, args, kwargs = layer_call(self.source.model, self.source.layers, batch, i)
            h = h0 if i == 0 else self.hidden.get(b)  # [B, L, H]
            if observer is not None:
                observer.begin_batch(torch.arange(s * L, (s + batch.shape[0]) * L))
            adapter = self.source.adapter
            if i > 0 and b in self.state:
                args, kwargs = adapter.with_layer_state(args, kwargs, self.state.get(b))
            out, state = run_layer(adapter, layer, h.to(device), to_device(args, device),
                                   to_device(kwargs, device))
            if sink is not None:
                sink(batch, out, state)
            elif keep:
                self.hidden.put(b, out)
                if state is not None:
                    self.state.put(b, state)

    def advance(self) -> None:
        self.hidden.advance()
        self.state.advance()

    def close(self) -> None:
        self.hidden.close()
        self.state.close()


@dataclasses.dataclass
class LayerwiseResult:
    stats: Stats | None
    plan: Plan | None
    seconds: float
    novice_tensors: dict  # novice-file tensors of the written layers (empty without novices)
    parameter_change: (
        dict  # what the plan changed in `store.checkpoint.parameter_counts` terms (after - before)
    )
    mtp: dict = dataclasses.field(default_factory=dict)  # MTP layers written and their plan (`store.mtp`)


def walk(
    source,
    *,
    input_ids: torch.Tensor | None = None,
    calib: CalibrationRequest | None = None,
    runtime: RuntimeRequest | None = None,
    calibration: dict | None = None,
    ranks: Ranks | None = None,
    plan_layer: Callable[[int, LayerStats | None, LayerAccess], tuple[LayerPlan, torch.Tensor | None]]
    | None = None,
    sequential: bool = False,
    flatten_groups: bool = False,
    write_to: Path | None = None,
    observe: bool = True,
    on_last: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], None] | None = None,
    progress=None,
    compensate: CompensationConfig | None = None,
) -> LayerwiseResult:
    """One pass over the decoder layers of `source` (a `pipeline.sources` CheckpointSource or ModelSource).

    With `input_ids` [N, L] the layers run on the calibration batches (`runtime.batch_size` per forward,
    hidden states beyond `runtime.hidden_budget` spilled to `runtime.offload_dir`), observed when
    `observe` (`calib.probe_size` probe tokens per layer, drawn with `calib.seed`; `calibration` is the
    text's provenance for the statistics).
    `plan_layer(i, stats_i, access)` returns layer i's plan and its novice vectors (or None); it is
    applied before the layer is written (to `write_to`) or, with `sequential`, before its outputs
    move on. `on_last(input_ids [B, L], outputs [B, L, H], state)` receives the last decoder layer's
    outputs (before the final norm) and the state it hands on (`head_logits` takes it) batch by batch.
    `progress(description, done, total)` is called as work advances. With an active `compensate`, each
    changed layer is fitted to the original layer's output on its calibration inputs right after
    surgery (`pipeline.compensate`; with `sequential`, those inputs come out of the compressed layers).
    """
    if on_last is not None and input_ids is None:
        raise ValueError("on_last needs input_ids")
    ranks = ranks or Ranks()
    calib = calib or CalibrationRequest()
    runtime = runtime or RuntimeRequest()
    adapter = source.adapter
    blocks = source.blocks
    desc = model_description(source.model, adapter, None if source.path is None else str(source.path))
    started = time.perf_counter()
    batches = None
    wanted = None
    if input_ids is not None:
        N, L = input_ids.shape
        wanted = probe_positions(N * L, calib.probe_size, calib.seed)
        batches = _Batches(source, input_ids, runtime.batch_size, ranks, runtime.hidden_budget,
                           runtime.offload_dir)
    if plan_layer is None and sequential:
        raise MoepruneError("sequential pruning needs a plan for each layer as it goes")
    writer = mtp = None
    if write_to is not None:
        mtp = source.mtp_carrier()  # MTP layers the model does not hold, written after the rest
        extra = mtp.layout.num_shards if mtp is not None else 0
        writer = ShardWriter(write_to, num_shards=len(source.layers) + 1 + extra)
    source.prepare()
    stats_layers: dict[int, LayerStats] = {}
    plans: list[LayerPlan] = []
    novice_tensors: dict[str, torch.Tensor] = {}  # for the novice file, gathered as layers are written
    parameter_change: dict[str, int] = {}
    mtp_record: dict = {}
    n_layers = len(source.layers)
    try:
        for i in range(n_layers):
            if progress is not None:
                progress(f"layer {i + 1}/{n_layers}", i, n_layers)
            will_change = plan_layer is not None and i in blocks
            layer, block = source.layer(i, changes=will_change)
            last = i == n_layers - 1
            layer_stats = None
            # with `sequential`, the outputs that move on are the pruned layer's, so the unpruned layer runs
            # only when it is observed
            pruned_outputs_move_on = sequential and will_change
            observed = observe and block is not None
            if batches is not None and (observed or not pruned_outputs_move_on):
                keep = not last and not pruned_outputs_move_on
                sink = on_last if last and not pruned_outputs_move_on else None
                if observed:
                    with Observer(adapter, {i: block}, wanted) as obs:
                        batches.run(i, layer, obs, keep=keep, sink=sink)
                    layer_stats = reduce_layer_stats(ranks, obs.layer_stats())[i]
                    stats_layers[i] = layer_stats
                else:
                    batches.run(i, layer, keep=keep, sink=sink)
            if will_change:
                from moeprune.surgery import apply_layer_plan

                lp, vectors = plan_layer(i, layer_stats, LayerAccess(adapter, block, i))
                counted = _layer_counts(adapter, layer, block)
                fitting = compensate is not None and compensate.active and batches is not None
                original = copy.deepcopy(block) if fitting else None  # what compensation fits against
                apply_layer_plan(adapter, block, lp, vectors)
                if flatten_groups:
                    adapter.flatten_block_groups(block)
                if fitting:
                    lp.notes["compensation"] = _compensate(compensate, batches, i, layer, block, original, lp)
                    del original
                for key, after in _layer_counts(adapter, layer, block).items():  # low-rank novices included
                    parameter_change[key] = parameter_change.get(key, 0) + after - counted[key]
                plans.append(lp)
                if pruned_outputs_move_on and batches is not None and (on_last is not None or not last):
                    batches.run(i, layer, keep=not last, sink=on_last if last else None)
            if writer is not None:
                writer.write(_layer_tensors(source, i, layer, block, novice_tensors))
            source.release(i, layer)
            if batches is not None:
                batches.advance()
        if writer is not None:
            writer.write(source.rest_tensors())  # embeddings, norm, lm_head
            if mtp is not None:  # with the plan of the last MoE decoder layer (`store.mtp`)
                last_plan = max(plans, key=lambda lp: lp.layer) if plans else None
                for tensors in mtp.shards(last_plan):
                    writer.write(tensors)
                mtp_record = mtp.record(last_plan)
            writer.finish()
    finally:
        if batches is not None:
            batches.close()
    if progress is not None:
        progress("done", n_layers, n_layers)
    seconds = time.perf_counter() - started
    stats = None
    if batches is not None and observe:
        facts = calibration_facts(calibration, input_ids, wanted, calib.seed, seconds, ranks)
        stats = Stats(model=desc, calibration={**facts, "layerwise": True}, layers=stats_layers)
    plan = None
    if plans:
        plan = Plan(method="", layers=plans, model=desc, flatten_groups=flatten_groups)
    return LayerwiseResult(stats, plan, seconds, novice_tensors, parameter_change, mtp_record)


def _compensate(cfg: CompensationConfig, batches: _Batches, i: int, layer: nn.Module, block: nn.Module,
                original: nn.Module, lp: LayerPlan) -> dict:
    """Fit compressed layer i to `original` on this rank's calibration batches; returns the plan notes.

    A router refit runs first, in its own pass; the experts' fit then sees the routing it gives."""
    from moeprune.pipeline.compensate import LayerCompensation, LayerRouterRefit, held_out_rule

    adapter, rule = batches.source.adapter, held_out_rule(cfg.holdout)
    def fitted(kind, c: CompensationConfig) -> dict:
        extra = {"combine": batches.ranks.sum_over_ranks} if kind is LayerCompensation else {}
        try:
            return _fit_pass(kind(c, adapter, block, original, lp, rule, **extra), batches, i, layer, block)
        except MoepruneError as e:
            if c.required:
                raise
            # the default fit (`--compensate auto`) found these experts not refittable: the layer stays as
            # surgery left it (the fit writes nothing before `finish`), and its notes say why
            return {"fit": c.fit, "applied": False, "why_not": str(e).split("; use")[0]}

    if cfg.fits_router:
        router = fitted(LayerRouterRefit, cfg)
        rest = cfg.without_router
        if not rest.active:
            return router
        notes = fitted(LayerCompensation, rest)
        notes = {**notes, "fit": cfg.fit, "router": router,
                 "applied": bool(notes.get("applied") or router.get("applied"))}
        if "held_out_relative_before" in router:  # before any fit, as for one fit
            notes["held_out_relative_before"] = router["held_out_relative_before"]
        return notes
    return fitted(LayerCompensation, cfg)


def _fit_pass(fit, batches: _Batches, i: int, layer: nn.Module, block: nn.Module) -> dict:
    """Run layer i over the calibration batches, handing each batch's block input to `fit.add_batch`, then
    `fit.finish()`."""
    from moeprune.pipeline.compensate import experts_calls

    N = batches.input_ids.shape[0]
    starts = iter(batches.starts)
    # the layer's own run of the compressed block is the one the fit reads, so it is not run again; a block
    # that is the decoder layer itself (Gemma 4) gets its MoE part run on the block input, as for the original
    own_run = block is not layer
    with experts_calls(batches.source.adapter, block) if own_run else contextlib.nullcontext() as mine:
        busy = False

        def gather(_module, args, kwargs, _output):
            nonlocal busy
            if busy:  # the fit's own call of the block
                return
            x = args[0] if args else kwargs["hidden_states"]  # [B, L, H] block input
            s = next(starts)
            calls = None
            if own_run:
                calls = list(mine)
                mine.clear()
            busy = True
            try:
                fit.add_batch(x, torch.arange(s, min(s + batches.batch_size, N)), calls)
            finally:
                busy = False

        # after the block ran (a pre-hook would also see the call that only captures a layer's arguments,
        # which stops before the layer runs)
        handle = block.register_forward_hook(gather, with_kwargs=True)
        try:
            batches.run(i, layer, keep=False, sink=lambda *_: None)
        finally:
            handle.remove()
    return fit.finish()


def _layer_counts(adapter, layer: nn.Module, block: nn.Module) -> dict[str, int]:
    """`store.checkpoint.parameter_counts` of one decoder layer (novices are buffers, counted too)."""
    from moeprune.arch.base import novice_parameter_count

    total = sum(p.numel() for p in layer.parameters())
    routed = sum(p.numel() for p in adapter.expert_parameters(block).values())
    novices = novice_parameter_count(adapter.experts(block))
    return {"total": total + novices, "routed_experts": routed, "novices": novices, "other": total - routed}


def _layer_tensors(source, i: int, layer: nn.Module, block: nn.Module | None,
                   novice_tensors: dict) -> dict[str, torch.Tensor]:
    """Layer i's on-disk tensors; a layer with novices gives its novice tensors to `novice_tensors`."""
    from moeprune.surgery.novices import detach_novices, is_novice_experts

    if block is not None and is_novice_experts(source.adapter.experts(block)):
        # the router keeps the kept rows only, as on disk
        tensors, _ = detach_novices(source.adapter, block, i)
        novice_tensors.update(tensors)
    return source.layer_tensors(i, layer)
