"""The layer-by-layer counterparts of observe / prune / apply, and the plain layer-by-layer forward.

They take the same arguments as the whole-model functions in `moeprune.api` (which choose between
the two paths) and produce the same statistics, plans and checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moeprune.errors import MoepruneError
from moeprune.store.checkpoint import atomic_directory, describe_output
from moeprune.store.sharded import ShardedCheckpoint
from moeprune.pipeline.loop import DEFAULT_HIDDEN_BUDGET, walk
from moeprune.methods import PlanRequest, get_method, make_plan
from moeprune.observe import LayerStats, Stats, model_description
from moeprune.plan import Plan


class ShardedWeights:
    """Weight access for every MoE layer, shaped like `methods.access.ModelWeights`, one layer in memory.

    `layer(i)` reads layer i from the shards and frees the one read before, so a method that walks
    the layers in order (they all do) plans a model of any size in the memory of one layer.
    """

    def __init__(self, ck: ShardedCheckpoint):
        self.ck = ck
        self.adapter = ck.adapter
        self._blocks = ck.adapter.moe_blocks(ck.model)
        self._loaded: int | None = None

    def layers(self) -> list[int]:
        return sorted(self._blocks)

    def layer(self, i: int):
        from moeprune.store.sharded import free
        from moeprune.methods.access import LayerAccess

        if self._loaded != i:
            if self._loaded is not None:
                free(self.ck.layers[self._loaded])
            self.ck.load_layer(i)
            self._loaded = i
        return LayerAccess(self.adapter, self._blocks[i], i)


class _OneLayerWeights:
    """Weight access to the one layer in memory, shaped like `methods.access.ModelWeights`."""

    def __init__(self, access):
        self.adapter = access.adapter
        self._access = access

    def layers(self) -> list[int]:
        return [self._access.layer]

    def layer(self, i: int):
        if i != self._access.layer:
            raise RuntimeError(f"layer {i} is not in memory (layer {self._access.layer} is)")
        return self._access


def _calibration_info(calibration: dict | None, input_ids: torch.Tensor | None, probe_size: int, seed: int) -> dict:
    """The calibration facts a plan records, known before the pass (the same keys the whole-model pass writes)."""
    if input_ids is None:
        return {}
    N, L = input_ids.shape
    return {**(calibration or {}), "tokens": N * L, "sequences": N, "seq_len": L,
            "probe_size": min(probe_size, N * L), "seed": seed}


@torch.no_grad()
def forward_layerwise(model_path: str | Path, input_ids: torch.Tensor, *, batch_size: int = 8, device: str = "cpu",
                      progress=None) -> torch.Tensor:
    """[N, L, H] last decoder layer's outputs on `input_ids` [N, L], computed one layer at a time.

    Nothing is observed or written: the reference the layer-by-layer pruning time is compared
    against (`benchmarks/memory.py`).
    """
    ck = ShardedCheckpoint(model_path, device=device)
    outputs = []
    walk(ck, input_ids=input_ids, batch_size=batch_size, observe=False, on_last=lambda ids, h: outputs.append(h),
         progress=progress)
    return torch.cat(outputs)


@torch.no_grad()
def perplexity_layerwise(model_path: str | Path, tokenizer, text_or_path, *, seq_len: int = 512,
                         max_tokens: int | None = None, batch_size: int = 8, device: str = "cpu", progress=None,
                         hidden_budget: int = DEFAULT_HIDDEN_BUDGET, offload_dir: str | Path | None = None) -> dict:
    """`moeprune.evaluate.perplexity` of a stock checkpoint, computed one decoder layer at a time.

    The windows run through the layers as calibration batches do; the last layer's outputs go through
    the model's own final norm and lm_head (`head_logits`). Same result dict, same numbers.
    """
    from moeprune.evaluate.perplexity import _check_model_fits, logits_nll, perplexity_result, text_windows
    from moeprune.pipeline.activations import head_logits

    if batch_size < 1:
        raise MoepruneError(f"--batch-size must be at least 1 (got {batch_size})")
    ck = ShardedCheckpoint(model_path, device=device)
    blocks, facts = text_windows(tokenizer, text_or_path, seq_len, max_tokens)  # [W, L]
    _check_model_fits(ck.model, blocks, seq_len)
    total = torch.zeros((), dtype=torch.float64)

    def score(ids: torch.Tensor, last_hidden: torch.Tensor) -> None:
        nonlocal total
        logits = head_logits(ck.model, ck.layers, ids, last_hidden.cpu())  # [B, L, V]
        total += logits_nll(logits, ids).sum()

    walk(ck, input_ids=blocks, batch_size=batch_size, observe=False, on_last=score, progress=progress,
         hidden_budget=hidden_budget, offload_dir=offload_dir)
    return perplexity_result(float(total), blocks, facts)


def observe_layerwise(model_path: str | Path, input_ids: torch.Tensor, *, batch_size: int = 8, probe_size: int = 512,
                      seed: int = 0, calibration: dict | None = None, device: str = "cpu", ranks=None, progress=None,
                      hidden_budget: int = DEFAULT_HIDDEN_BUDGET, offload_dir: str | Path | None = None) -> Stats:
    """Statistics of the calibration pass, equal to `moeprune.observe` on the whole model."""
    ck = ShardedCheckpoint(model_path, device=device)
    result = walk(ck, input_ids=input_ids, batch_size=batch_size, probe_size=probe_size, seed=seed,
                  calibration=calibration, ranks=ranks, progress=progress, hidden_budget=hidden_budget,
                  offload_dir=offload_dir)
    return result.stats


def _finish(ck: ShardedCheckpoint, tmp: Path, plan: Plan, novice_tensors: dict, *, command: str | None) -> None:
    """config.json (and the novice file) of the written layers, then tokenizer files, plan and model card."""
    from moeprune.store.checkpoint import checkpoint_parameters
    from moeprune.store.novices import write_novice_file

    config = ck.model.config
    adapter = ck.adapter
    E_in, E_out = plan.num_experts_in, plan.num_experts_out
    config.architectures = [type(ck.model).__name__]  # what save_pretrained records
    if novice_tensors:  # the router keeps E rows: the stock part has E_out experts, the novice file the rest
        setattr(config, adapter.count_field, E_out)
        config.save_pretrained(str(tmp))
        setattr(config, adapter.count_field, E_in)
        write_novice_file(tmp, novice_tensors, count_field=adapter.count_field, num_experts=E_in, kept_count=E_out,
                          layers=sorted(lp.layer for lp in plan.layers if lp.novices))
    else:
        adapter.set_config_num_experts(ck.model, E_in, E_out)
        if plan.flatten_groups:
            config.n_group = 1
            config.topk_group = 1
        config.save_pretrained(str(tmp))
    describe_output(tmp, source=str(ck.path), plan=plan, before=checkpoint_parameters(ck.path),
                    after=checkpoint_parameters(tmp), command=command)


def prune_layerwise(
    model_path: str | Path, method: str, out: str | Path, *, keep: int, input_ids: torch.Tensor | None = None,
    calibration: dict | None = None, batch_size: int = 8, probe_size: int = 512, seed: int = 0,
    flatten_groups: bool = False, options: dict | None = None, sequential: bool = False, force: bool = False,
    command: str | None = None, device: str = "cpu", ranks=None, progress=None,
    hidden_budget: int = DEFAULT_HIDDEN_BUDGET, offload_dir: str | Path | None = None,
) -> tuple[Path, Stats | None, Plan]:
    """Observe, plan, apply and save one layer at a time; returns (out, stats, plan).

    Layer-local methods are planned inside the one pass; the others observe every layer first
    (two reads of the checkpoint). Only the main rank writes.
    """
    spec = get_method(method)
    options = dict(options or {})
    cfg = spec.default_config(**options)
    local = spec.layer_local(cfg)
    if sequential and not local:
        raise MoepruneError(f"--sequential plans each layer as it goes, but {method} with these options ranks all "
                            "layers together; drop --sequential or use a per-layer setting")
    if spec.needs_weights and not local:
        raise MoepruneError(f"{method} with these options needs every layer's weights at once, which layer-by-layer "
                            "pruning does not hold; use --in-memory")
    ck = ShardedCheckpoint(model_path, device=device)
    desc = model_description(ck.model, ck.adapter, str(model_path))
    info = _calibration_info(calibration, input_ids, probe_size, seed)
    main = ranks is None or ranks.is_main
    E, H = desc["num_experts"], desc["hidden_size"]
    method_config = {}

    def plan_one_layer(i, layer_stats, access):
        from moeprune.methods.mone import novice_vectors

        one = Stats(model={**desc, "moe_layers": [i]}, calibration=info,
                    layers={i: layer_stats or LayerStats.empty(i, E, H)})
        p = make_plan(method, PlanRequest(one, keep, flatten_groups, _OneLayerWeights(access)), **options)
        method_config.update(p.method_config)
        return p.layers[0], novice_vectors(p, one).get(i)

    walk_args = dict(input_ids=input_ids, batch_size=batch_size, probe_size=probe_size, seed=seed,
                     calibration=calibration, ranks=ranks, progress=progress, hidden_budget=hidden_budget,
                     offload_dir=offload_dir, flatten_groups=flatten_groups)
    stats = None
    if not local:  # pass 1: observe every layer, then plan on all of them
        stats = walk(ck, **walk_args).stats
        whole = make_plan(method, PlanRequest(stats, keep, flatten_groups, None), **options)
        method_config.update(whole.method_config)
        from moeprune.methods.mone import novice_vectors

        vectors = novice_vectors(whole, stats)
        walk_args.update(input_ids=None, plan_layer=lambda i, _s, _a: (whole.layer(i), vectors.get(i)))
    else:
        walk_args.update(plan_layer=plan_one_layer, sequential=sequential)

    def run(write_to):
        result = walk(ck, write_to=write_to, **walk_args)
        plan = Plan(method=method, layers=result.plan.layers, model=desc, method_config=dict(method_config),
                    calibration=info, flatten_groups=flatten_groups)
        if sequential:
            plan.calibration = {**info, "sequential": True}
        plan.validate()
        return result, plan

    if not main:
        result, plan = run(None)
        return Path(out), stats if stats is not None else result.stats, plan
    with atomic_directory(out, force=force) as tmp:
        result, plan = run(tmp)
        _finish(ck, tmp, plan, result.novice_tensors, command=command)
    return Path(out), stats if stats is not None else result.stats, plan


def apply_layerwise(model_path: str | Path, plan: Plan, out: str | Path, *, stats: Stats | None = None,
                    force: bool = False, command: str | None = None, device: str = "cpu", progress=None) -> Path:
    """Apply a ready plan one layer at a time (no calibration pass) and stream the checkpoint to `out`."""
    from moeprune.methods.mone import novice_vectors
    from moeprune.plan import check_novice_plan

    check_novice_plan(plan)
    vectors = novice_vectors(plan, stats)
    ck = ShardedCheckpoint(model_path, device=device)
    moe_layers = sorted(ck.adapter.moe_blocks(ck.model))
    missing = sorted(set(moe_layers) - {lp.layer for lp in plan.layers})
    if missing:
        raise MoepruneError(f"plan has no entry for MoE layers {missing}; every MoE layer needs one")
    with atomic_directory(out, force=force) as tmp:
        result = walk(ck, plan_layer=lambda i, _s, _a: (plan.layer(i), vectors.get(i)), write_to=tmp,
                      flatten_groups=plan.flatten_groups, progress=progress)
        _finish(ck, tmp, plan, result.novice_tensors, command=command)
    return Path(out)
