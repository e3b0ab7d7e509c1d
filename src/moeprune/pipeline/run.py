"""What the pipeline does with a weight source: observe, prune, apply, and the plain forward and perplexity.

Every function takes a source (`pipeline.sources`: a checkpoint read layer by layer, or a model in
memory) and makes one walk over it (`pipeline.loop.walk`), so both sources produce the same
statistics, plans and checkpoints through the same code. The `*_layerwise(path, ...)` forms open the
checkpoint at `path` as the source.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from moeprune.arch import get_adapter
from moeprune.errors import MoepruneError
from moeprune.methods import PlanRequest, get_method, make_plan
from moeprune.methods.budget import BudgetChoice, check_budget, global_budget_plan
from moeprune.methods.compensation import CompensationConfig
from moeprune.observe import LayerStats, Stats, model_description
from moeprune.outputs import atomic_directory
from moeprune.pipeline.loop import walk
from moeprune.pipeline.sources import CheckpointSource
from moeprune.plan import Plan
from moeprune.settings import CalibrationRequest, OutputRequest, RuntimeRequest
from moeprune.store.checkpoint import describe_output, parameter_counts


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


def _calibration_info(
    calibration: dict | None, input_ids: torch.Tensor | None, probe_size: int, seed: int
) -> dict:
    """The calibration facts a plan records, known before the pass (the same keys the whole-model pass
    writes)."""
    if input_ids is None:
        return {}
    N, L = input_ids.shape
    return {**(calibration or {}), "tokens": N * L, "sequences": N, "seq_len": L,
            "probe_size": min(probe_size, N * L), "seed": seed}


@torch.no_grad()
def forward(source, input_ids: torch.Tensor, *, runtime: RuntimeRequest | None = None,
            progress=None) -> torch.Tensor:
    """[N, L, H] last decoder layer's outputs on `input_ids` [N, L], computed one layer at a time.

    Nothing is observed or written: the reference the pruning time is compared against
    (`benchmarks/memory.py`).
    """
    outputs = []
    walk(
        source, input_ids=input_ids, runtime=runtime, observe=False,
        on_last=lambda ids, h, _state: outputs.append(h), progress=progress,
    )
    return torch.cat(outputs)


def forward_layerwise(
    model_path: str | Path, input_ids: torch.Tensor, *, batch_size: int = 8, device: str = "cpu",
    progress=None,
) -> torch.Tensor:
    return forward(CheckpointSource(model_path, device=device), input_ids,
                   runtime=RuntimeRequest(batch_size=batch_size), progress=progress)


@torch.no_grad()
def perplexities(
    source, tokenizer, texts, *, seq_len: int = 512, max_tokens: int | None = None,
    runtime: RuntimeRequest | None = None, progress=None, plan: Plan | None = None,
    stats: Stats | None = None,
) -> tuple[list, dict]:
    """([`moeprune.evaluate.perplexity` result per text], parameter change) of the source's model, in one
    walk.

    The windows of every text run through the layers as calibration batches do; the last layer's
    outputs go through the model's own final norm and lm_head (`head_logits`). With `plan` (and the
    `stats` a novice plan needs) every MoE layer is pruned as it is reached, so a sweep scores each
    point without writing or holding a pruned model; the parameter change is the plan's
    (`parameter_counts` after minus before; empty without a plan).
    """
    from moeprune.evaluate.perplexity import _check_model_fits, logits_nll, perplexity_result, text_windows
    from moeprune.pipeline.activations import head_logits, to_device

    windows = [text_windows(tokenizer, t, seq_len, max_tokens) for t in texts]  # ([W_t, L], facts) per text
    blocks = torch.cat([w for w, _ in windows])  # [W, L]
    _check_model_fits(source.model, blocks, seq_len)
    nll = torch.zeros(blocks.shape[0], dtype=torch.float64)  # [W]
    done = 0  # the walk hands the batches over in order (one process)

    def score(ids: torch.Tensor, last_hidden: torch.Tensor, state: torch.Tensor | None) -> None:
        nonlocal done
        logits = head_logits(source.model, source.layers, ids, last_hidden.to(source.device),
                             to_device(state, source.device))  # [B, L, V]
        nll[done : done + ids.shape[0]] = logits_nll(logits, ids).cpu()
        done += ids.shape[0]

    plan_layer = None
    if plan is not None:
        from moeprune.methods.mone import novice_vectors

        vectors = novice_vectors(plan, stats)
        plan_layer = lambda i, _s, _a: (plan.layer(i), vectors.get(i))  # noqa: E731
    result = walk(
        source, input_ids=blocks, runtime=runtime, observe=False, on_last=score, progress=progress,
        plan_layer=plan_layer,
        sequential=plan is not None, flatten_groups=plan is not None and plan.flatten_groups,
    )
    out, start = [], 0
    for w, facts in windows:
        out.append(perplexity_result(float(nll[start : start + w.shape[0]].sum()), w, facts))
        start += w.shape[0]
    return out, result.parameter_change


def perplexity(source, tokenizer, text_or_path, **kwargs) -> dict:
    """`moeprune.evaluate.perplexity` of the source's model, one decoder layer at a time (see
    `perplexities`)."""
    results, _ = perplexities(source, tokenizer, [text_or_path], **kwargs)
    return results[0]


def perplexity_layerwise(
    model_path: str | Path, tokenizer, text_or_path, *, device: str = "cpu", seq_len: int = 512,
    max_tokens: int | None = None, batch_size: int = 8, progress=None,
) -> dict:
    return perplexity(CheckpointSource(model_path, device=device), tokenizer, text_or_path, seq_len=seq_len,
                      max_tokens=max_tokens, runtime=RuntimeRequest(batch_size=batch_size), progress=progress)


def observe(
    source, input_ids: torch.Tensor, *, calib: CalibrationRequest | None = None,
    runtime: RuntimeRequest | None = None, calibration: dict | None = None, ranks=None, progress=None,
) -> Stats:
    """Statistics of the calibration pass over `input_ids` [N, L] (`calibration`: the text's provenance)."""
    result = walk(source, input_ids=input_ids, calib=calib, runtime=runtime, calibration=calibration,
                  ranks=ranks, progress=progress)
    return result.stats


def observe_layerwise(
    model_path: str | Path, input_ids: torch.Tensor, *, device: str = "cpu", batch_size: int = 8,
    probe_size: int = 512, seed: int = 0, hidden_budget: int | None = None, offload_dir=None,
) -> Stats:
    """`observe` on the checkpoint at `model_path`, with the requests' fields as keywords."""
    runtime = RuntimeRequest(batch_size=batch_size, offload_dir=offload_dir,
                             **({} if hidden_budget is None else {"hidden_memory": hidden_budget / 1024**3}))
    return observe(CheckpointSource(model_path, device=device), input_ids, runtime=runtime,
                   calib=CalibrationRequest(probe_size=probe_size, seed=seed))


def empty_stats(model, source: str | None = None) -> Stats:
    """Statistics with no calibration, for methods that read only the weights."""
    desc = model_description(model, get_adapter(model.config), source)
    E, H = desc["num_experts"], desc["hidden_size"]
    layers = {i: LayerStats.empty(i, E, H, desc.get("expert_dim")) for i in desc["moe_layers"]}
    return Stats(model=desc, calibration={}, layers=layers)


def parameters_before(source) -> dict:
    """`parameter_counts` of the source's model, from the checkpoint's config when it is not in memory."""
    from moeprune.store.checkpoint import checkpoint_parameters

    if source.in_memory:
        return parameter_counts(source.model)
    return checkpoint_parameters(source.path)


def _finish(
    source, tmp: Path, plan: Plan, novice_tensors: dict, *, before: dict, command: str | None
) -> None:
    """config.json (and the novice file) of the written layers, then tokenizer files, plan and model card.

    The written config is a copy: the source's model (the caller's, in memory) keeps its own.
    """
    from moeprune.store.checkpoint import checkpoint_parameters
    from moeprune.store.novices import count_path, write_novice_file

    config = copy.deepcopy(source.model.config)
    adapter = get_adapter(config)
    E_in, E_out = plan.num_experts_in, plan.num_experts_out
    config.architectures = [type(source.model).__name__]  # what save_pretrained records
    if novice_tensors:  # the router keeps E rows: the stock part has E_out experts, the novice file the rest
        adapter.write_num_experts(adapter.config, E_out)
        config.save_pretrained(str(tmp))
        write_novice_file(
            tmp, novice_tensors, count_field=count_path(config), num_experts=E_in, kept_count=E_out,
            layers=sorted(lp.layer for lp in plan.layers if lp.novices),
        )
    else:
        adapter.write_num_experts(adapter.config, E_out)
        if plan.flatten_groups:
            adapter.config.n_group = 1
            adapter.config.topk_group = 1
        config.save_pretrained(str(tmp))
    if plan.per_layer_counts:  # moeprune's own format, refused by stock loaders (equal counts stay stock)
        from moeprune.store.budget import write_budget_section

        write_budget_section(tmp, plan, count_field=count_path(config))
    describe_output(tmp, source=str(source.path), plan=plan, before=before, after=checkpoint_parameters(tmp),
                    command=command)


def prune(
    source, method: str, keep: int, output: OutputRequest, *, input_ids: torch.Tensor | None = None,
    calibration: dict | None = None, calib: CalibrationRequest | None = None,
    runtime: RuntimeRequest | None = None, flatten_groups: bool = False, options: dict | None = None,
    ranks=None, progress=None, weights=None, compensate: CompensationConfig | None = None,
    budget: BudgetChoice | None = None,
) -> tuple[Path, Stats | None, Plan]:
    """Observe, plan, apply and save one layer at a time; returns (out, stats, plan).

    Layer-local methods are planned inside the one pass; the others observe every layer first
    (two walks), then plan on all of them (with `weights`, every layer's weight access, for those
    that read weights across layers). Only the main rank writes. An active `compensate` fits each
    compressed layer to the original's output (`moeprune.methods.compensation`), sequentially: each
    layer is fitted on the inputs that come out of the compressed layers before it. A global
    `budget` (`moeprune.methods.budget`) spreads the counts over the layers by measured damage,
    which needs every layer's statistics and `weights` first: two walks (the second a sequential
    calibration walk when compensating, so each fit still sees the compressed layers before it).
    """
    calib = calib or CalibrationRequest()
    runtime = runtime or RuntimeRequest()
    fitting = compensate is not None and compensate.active
    sequential, out = runtime.sequential or fitting, output.path
    spec = get_method(method)
    options = dict(options or {})
    cfg = spec.default_config(**options)
    budget = budget or BudgetChoice()
    local = spec.layer_local(cfg) and not budget.is_global
    if budget.is_global:
        check_budget(budget, spec, cfg, has_calibration=input_ids is not None, probe_size=calib.probe_size,
                     sequential=runtime.sequential,
                     grouped_flattened=flatten_groups and source.adapter.n_group > 1)
        if weights is None:
            raise MoepruneError("--budget global reads every layer's block outputs: give the weights")
    if fitting and (not (local or budget.is_global) or input_ids is None):
        why = "calibration text (--calib)" if input_ids is None else "a method that plans layer by layer"
        raise MoepruneError(f"--compensate {compensate.fit} fits each layer as it goes, which needs {why}; "
                            "use --compensate none")
    if sequential and not local and not budget.is_global:  # a global budget refused --sequential above
        raise MoepruneError(
            f"--sequential plans each layer as it goes, but {method} with these options ranks all "
            "layers together; drop --sequential or use a per-layer setting"
        )
    if spec.needs_weights and not local and weights is None:
        raise MoepruneError(
            f"{method} with these options needs every layer's weights at once, which layer-by-layer "
            "pruning does not hold; use --in-memory"
        )
    desc = model_description(source.model, source.adapter, str(source.path))
    info = _calibration_info(calibration, input_ids, calib.probe_size, calib.seed)
    main = ranks is None or ranks.is_main
    E, H = desc["num_experts"], desc["hidden_size"]
    method_config = {}
    before = parameters_before(source) if main else {}
    if main:
        source.mtp_carrier()  # MTP layers that do not fit the decoder's experts fail before the first pass

    def plan_one_layer(i, layer_stats, access):
        from moeprune.methods.mone import novice_vectors

        one = Stats(model={**desc, "moe_layers": [i]}, calibration=info,
                    layers={i: layer_stats or LayerStats.empty(i, E, H, desc.get("expert_dim"))})
        p = make_plan(method, PlanRequest(one, keep, flatten_groups, _OneLayerWeights(access)), **options)
        method_config.update(p.method_config)
        return p.layers[0], novice_vectors(p, one).get(i)

    walk_args = dict(input_ids=input_ids, calib=calib, runtime=runtime, calibration=calibration, ranks=ranks,
                     progress=progress, flatten_groups=flatten_groups)
    stats = None
    if not local:  # pass 1: observe every layer, then plan on all of them
        if input_ids is not None:
            stats = walk(source, **walk_args).stats
        else:
            stats = empty_stats(source.model, str(source.path))
        request = PlanRequest(stats, keep, flatten_groups, weights)
        whole = (global_budget_plan(method, request, budget, options) if budget.is_global
                 else make_plan(method, request, **options))
        method_config.update(whole.method_config)
        from moeprune.methods.mone import novice_vectors

        vectors = novice_vectors(whole, stats)
        walk_args.update(input_ids=None, plan_layer=lambda i, _s, _a: (whole.layer(i), vectors.get(i)))
        if fitting:  # a global budget's plan, compensated on a second, sequential calibration walk
            walk_args.update(input_ids=input_ids, sequential=True, compensate=compensate)
    else:
        walk_args.update(plan_layer=plan_one_layer, sequential=sequential, compensate=compensate)

    def run(write_to):
        result = walk(source, write_to=write_to, **walk_args)
        plan = Plan(method=method, layers=result.plan.layers, model=desc, method_config=dict(method_config),
                    calibration=info, flatten_groups=flatten_groups, mtp=result.mtp, budget=budget.mode)
        if sequential:
            plan.calibration = {**info, "sequential": True}
        if fitting:
            plan.compensation = dataclasses.asdict(compensate)
        plan.validate()
        return result, plan

    if not main:
        result, plan = run(None)
        return Path(out), stats if stats is not None else result.stats, plan
    with atomic_directory(out, force=output.force) as tmp:
        result, plan = run(tmp)
        _finish(source, tmp, plan, result.novice_tensors, before=before, command=output.command)
    return Path(out), stats if stats is not None else result.stats, plan


def apply(source, plan: Plan, output: OutputRequest, *, stats: Stats | None = None, progress=None) -> Path:
    """Apply a ready plan one layer at a time (no calibration pass) and write the checkpoint to `out`.

    The plan was validated against this model by the driver (`Plan.validate` with `model_facts`).
    """
    from moeprune.methods.mone import novice_vectors

    vectors = novice_vectors(plan, stats)
    before = parameters_before(source)
    with atomic_directory(output.path, force=output.force) as tmp:
        result = walk(source, plan_layer=lambda i, _s, _a: (plan.layer(i), vectors.get(i)), write_to=tmp,
                      flatten_groups=plan.flatten_groups, progress=progress)
        written = dataclasses.replace(plan, mtp=result.mtp)  # the caller's plan is not changed
        _finish(source, tmp, written, result.novice_tensors, before=before, command=output.command)
    return Path(output.path)
