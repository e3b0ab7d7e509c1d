"""The public Python API; the CLI is a thin layer over these functions.

    import moeprune
    stats = moeprune.observe_checkpoint("path/to/model", "calib.txt")
    plan = moeprune.make_plan_for(stats, "reap", ratio=0.25)
    moeprune.apply_checkpoint("path/to/model", plan, "out/")

or all at once with `moeprune.prune(...)`. Every function checks the cheap things (family, ratio,
top-k, groups, output directory, calibration text) before the expensive calibration pass.
"""

from __future__ import annotations

from pathlib import Path

from moeprune import __version__
from moeprune.analyze import analyze
from moeprune.arch import decoder_layers, get_adapter
from moeprune.data import Calibration, calibration_blocks
from moeprune.distributed import Ranks
from moeprune.errors import MoepruneError
from moeprune.evaluate import parse_task_texts
from moeprune.evaluate import render_table as render_report
from moeprune.evaluation import evaluate_models
from moeprune.methods import METHODS, get_method, make_plan_for
from moeprune.methods.budget import BudgetChoice, check_budget
from moeprune.methods.budget import floor as budget_floor
from moeprune.methods.compensation import CompensationConfig
from moeprune.observe import Stats, check_same_model, model_description
from moeprune.outputs import (
    atomic_directory,
    check_offload_dir,
    check_output_dir,
    check_output_file,
    check_separate,
    write_file_atomically,
)
from moeprune.pipeline import run as pipeline
from moeprune.pipeline.run import empty_stats
from moeprune.pipeline.sources import open_source
from moeprune.plan import Plan, budget
from moeprune.runtime import (
    Terminated,
    check_device,
    layer_progress,
    quiet_transformers,
    return_freed_memory_to_the_system,
    signals_as_exceptions,
)
from moeprune.settings import (
    BudgetRequest,
    CalibrationRequest,
    OutputRequest,
    RuntimeRequest,
    check_seq_len,
    check_settings,
)
from moeprune.store.checkpoint import (
    check_weight_files,
    export_stock,
    load_config,
    load_tokenizer,
    loader_name,
    parameter_counts,
)
from moeprune.store.sharded import model_facts
from moeprune.sweep import knee_sentences, sweep
from moeprune.sweep import render_table as render_sweep

# what the command line (and a script) uses; the CLI imports nothing else of moeprune but the demo driver
__all__ = [
    "METHODS", "BudgetRequest", "CalibrationRequest", "MoepruneError", "OutputRequest", "Plan", "Ranks",
    "RuntimeRequest", "Stats", "Terminated", "__version__", "analyze", "apply_checkpoint", "check_output_dir",
    "check_output_file", "check_separate", "check_settings", "empty_stats", "evaluate_models", "export_stock",
    "get_method", "inspect", "knee_sentences", "loader_name", "make_plan_for", "model_facts", "model_weights",
    "observe_checkpoint", "open_source", "parse_task_texts", "prune", "quiet_transformers", "render_report",
    "render_sweep", "resolve_device", "return_freed_memory_to_the_system", "signals_as_exceptions", "sweep",
    "write_file_atomically", "write_plan", "write_stats",
]


def inspect(model_path: str | Path) -> dict:
    """Family, MoE layers, experts, top-k, shared experts and parameter split of a checkpoint.

    Only the config is read (the model is built on the meta device), so any size inspects instantly.
    MoNE checkpoints load through `moeprune.from_pretrained`; `novices` then describes them (else None),
    and the parameter counts include the novice vectors.
    """
    from moeprune.store.budget import budget_skeleton, is_budget_checkpoint
    from moeprune.store.checkpoint import from_pretrained, weights_bytes
    from moeprune.store.novices import describe, is_novice_checkpoint
    from moeprune.store.sharded import skeleton

    per_layer = None
    if is_novice_checkpoint(model_path):
        model = from_pretrained(model_path)
    elif is_budget_checkpoint(model_path):  # each MoE layer with its own count, still on the meta device
        model = budget_skeleton(model_path)
        per_layer = {i: int(next(iter(get_adapter(model.config).expert_parameters(b).values())).shape[0])
                     for i, b in get_adapter(model.config).moe_blocks(model).items()}
    else:
        config = load_config(model_path)
        get_adapter(config)  # an unsupported model is told what it lacks before a skeleton is built
        model = skeleton(config)
    adapter = get_adapter(model.config)
    blocks = adapter.moe_blocks(model)
    if not blocks:
        raise MoepruneError(
            f"{model_path}: no MoE block found in the {adapter.family} model (every decoder layer "
            "is dense), so there are no experts to prune"
        )
    first = next(iter(blocks.values()))
    counts = parameter_counts(model, adapter)
    layers, _ = decoder_layers(model)
    exact, why = adapter.survivors_exact()
    return {
        "path": str(model_path),
        "model_type": adapter.family,
        "architecture": type(model).__name__,
        "num_layers": len(layers),
        "moe_layers": sorted(blocks),
        "dense_layers": [i for i in range(len(layers)) if i not in blocks],
        "num_experts": adapter.num_experts,
        **({"experts_per_layer": per_layer} if per_layer else {}),  # --budget global: the largest above
        "top_k": adapter.top_k,
        "n_group": adapter.n_group,
        "shared_experts": adapter.shared_expert_modules(first),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "parameters": counts,
        "novices": describe(model),
        "bytes_on_disk": weights_bytes(model_path),
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "pruning_keeps_surviving_routes_exact": exact,
        "routing_note": why,
    }


def _runtime(device, batch_size, layerwise, sequential=False, offload_dir=None, hidden_memory=2.0,
             progress=True) -> RuntimeRequest:
    """The runtime request of the keyword API (`layerwise=False` asks for the whole model in memory)."""
    return RuntimeRequest(
        device=device, batch_size=batch_size, in_memory=None if layerwise is None else not layerwise,
        sequential=sequential, offload_dir=offload_dir, hidden_memory=hidden_memory, progress=progress,
    )


def _tell(notify, source, why: str) -> None:
    if notify is not None:
        notify(f"{'whole model in memory' if source.in_memory else 'layer by layer'} ({why})")


def _check_calibration(calib: CalibrationRequest, config) -> None:
    if calib.text is not None:
        check_seq_len(calib.seq_len, config)


def _tokenise(calib: CalibrationRequest, model_path, config, notify) -> Calibration:
    """Tokenising is cheap next to the pass: done before any weight is read, so bad text fails fast."""
    return calibration_blocks(
        load_tokenizer(calib.tokenizer or model_path), calib.text, samples=calib.samples,
        seq_len=calib.seq_len, seed=calib.seed, field=calib.field, template=calib.template,
        vocab_size=getattr(config, "vocab_size", None), notify=notify,
    )


def observe_checkpoint(
    model_path: str | Path, calib: str, *, samples: int = 128, seq_len: int = 512, batch_size: int = 8,
    seed: int = 0, probe_size: int = 512, device: str = "cpu", tokenizer: str | None = None,
    calib_field: str | None = None, calib_template: str | None = None, progress: bool = True, model=None,
    calibration: Calibration | None = None, ranks: Ranks | None = None, layerwise: bool | None = None,
    offload_dir: str | Path | None = None, hidden_memory: float = 2.0, notify=None,
) -> Stats:
    """Run the calibration pass over `calib` and return the statistics.

    `model` and `calibration` may be passed in when the caller already loaded them. Under torchrun
    (`ranks`, default `Ranks.from_env(device)`) every process runs its share of the batches and all
    return the same merged statistics; only the main process shows the progress bar. The checkpoint
    is read one decoder layer at a time unless `layerwise=False` (the whole model in memory).
    """
    request = CalibrationRequest(calib, samples=samples, seq_len=seq_len, seed=seed, probe_size=probe_size,
                                 field=calib_field, template=calib_template, tokenizer=tokenizer)
    runtime = _runtime(device, batch_size, layerwise, offload_dir=offload_dir, hidden_memory=hidden_memory,
                       progress=progress)
    return observe_request(model_path, request, runtime, model=model, calibration=calibration, ranks=ranks,
                           notify=notify)


def observe_request(model_path, calib: CalibrationRequest, runtime: RuntimeRequest, *, model=None,
                    calibration: Calibration | None = None, ranks: Ranks | None = None, notify=None) -> Stats:
    """`observe_checkpoint` with its settings as requests (what the CLI and sweep call)."""
    from moeprune.store.novices import refuse_novice_input

    refuse_novice_input(model_path, model, action="observe")
    device = check_device(runtime.device)
    config = model.config if model is not None else load_config(model_path)
    if model is None:
        get_adapter(config)
        _check_calibration(calib, config)
        check_offload_dir(runtime.offload_dir, {"model": model_path, "--calib": calib.text,
                                                "--tokenizer": calib.tokenizer})
        check_weight_files(model_path)
    cal = calibration or _tokenise(calib, model_path, config, notify)
    ranks = ranks if ranks is not None else Ranks.from_env(device)
    source, why = open_source(model_path, runtime, model=model, device=ranks.device(device))
    if ranks.is_main and calibration is None:
        _tell(notify, source, why)
    with layer_progress("calibrating", runtime.progress and ranks.is_main) as cb:
        return pipeline.observe(source, cal.input_ids, calib=calib, runtime=runtime,
                                calibration=cal.provenance, ranks=ranks, progress=cb)


def model_weights(
    model_path: str | Path, layerwise: bool | None = None, notify=None, stats: Stats | None = None
):
    """Read access to the expert weights of a checkpoint for planning: one layer at a time, or the whole
    model.

    With `stats`, they must have been observed on a model of this shape (checked before any weight is read).
    """
    from moeprune.pipeline.access import ModelWeights, ShardedWeights

    if stats is not None:
        check_same_model(stats.model, model_facts(model_path), what="the statistics", model=str(model_path),
                         fix="plan with statistics observed on this model, or pass its own --model")
    check_weight_files(model_path)
    source, why = open_source(model_path, _runtime("cpu", 8, layerwise))
    _tell(notify, source, why)
    if source.in_memory:
        return ModelWeights(source.model)
    return ShardedWeights(source)


def resolve_device(device: str) -> str:
    """The torch device for `--device` (cpu, cuda, cuda:N, auto), or one line saying what to give."""
    return check_device(device)


def _expected_output_bytes(model_path: str | Path, keep: int, num_experts: int) -> int:
    """A lower bound of the pruned checkpoint's size (every weight scaled by keep/E): refusing below it is
    safe."""
    from moeprune.runtime import weights_on_disk

    return int(weights_on_disk(model_path) * keep / max(num_experts, 1))


def apply_checkpoint(model_path: str | Path, plan: Plan, out: str | Path, *, force: bool = False,
                     device: str = "cpu", command: str | None = None, model=None, stats: Stats | None = None,
                     layerwise: bool | None = None, progress: bool = True, notify=None,
                     input_paths: dict | None = None) -> Path:
    """Apply `plan` to the checkpoint at `model_path` and write the result to `out`.

    A plan with novices (MoNE) needs `stats`, the statistics it was made from, for the novice vectors.
    The checkpoint is read and written one decoder layer at a time unless `layerwise=False`; a
    `model` in memory is the source when given (it is not modified). `notify(message)` hears which
    way was chosen, once the inputs passed their checks. `input_paths` names the files the plan and
    stats came from (`{"plan": ..., "--stats": ...}`), which `out` must not touch. Every check (paths,
    plan against the model's shape, stats against both) runs before any weight is read.
    """
    from moeprune.methods.mone import novice_vectors
    from moeprune.store.novices import refuse_novice_input

    refuse_novice_input(model_path, model)
    device = check_device(device)
    inputs = {"model": model_path, **(input_paths or {})}
    least = min(lp.num_experts_out for lp in plan.layers)  # a lower bound, also with per-layer counts
    check_output_dir(out, force, inputs, expected_bytes=_expected_output_bytes(
        model_path, least, plan.num_experts_in) if model is None else None, notify=notify)
    facts = model_description(model, get_adapter(model.config), str(model_path)) if model is not None \
        else model_facts(model_path)
    check_same_model(plan.model, facts, what="the plan", model=str(model_path),
                     fix="make the plan from statistics of this model")
    if stats is not None:
        check_same_model(stats.model, facts, what="the statistics", model=str(model_path),
                         fix="give --stats observed on this model")
    novice_vectors(plan, stats)  # fails before loading the model when the stats are missing or do not match
    plan.validate(facts)
    if plan.compensation and notify is not None:  # the fit needs calibration tokens, which apply has not
        notify(f"note: this plan was compensated (--compensate {plan.compensation.get('fit')}) during "
               "`moeprune prune`; apply writes the plan without that fit (re-run prune to fit it again)")
    if model is None:
        check_weight_files(model_path)
    source, why = open_source(model_path, _runtime(device, 8, layerwise), model=model)
    _tell(notify, source, why)
    with layer_progress("applying", progress) as cb:
        return pipeline.apply(source, plan, OutputRequest(out, force=force, command=command), stats=stats,
                              progress=cb)


def write_stats(stats: Stats, out: str | Path, *, force: bool = False) -> Path:
    """Save statistics to the directory `out`, atomically (checked with `check_output_dir` beforehand)."""
    with atomic_directory(out, force=force) as tmp:
        stats.save(tmp)
    return Path(out)


def write_plan(plan: Plan, out: str | Path) -> Path:
    """Save a plan to the file `out`, atomically (checked with `check_output_file` beforehand)."""
    write_file_atomically(out, plan.save)
    return Path(out)


def prune(
    model_path: str | Path,
    method: str,
    out: str | Path,
    *,
    ratio: float | None = None,
    experts: int | None = None,
    calib: str | None = None,
    samples: int = 128,
    seq_len: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    probe_size: int = 512,
    device: str = "cpu",
    flatten_groups: bool = False,
    force: bool = False,
    tokenizer: str | None = None,
    calib_field: str | None = None,
    calib_template: str | None = None,
    progress: bool = True,
    command: str | None = None,
    stats_out: str | Path | None = None,
    options: dict | None = None,
    layerwise: bool | None = None,
    sequential: bool = False,
    offload_dir: str | Path | None = None,
    hidden_memory: float = 2.0,
    notify=None,
    compensate: str = "auto",
    compensate_rank: int = 8,
    budget: str = "uniform",
    budget_floor: int | None = None,
) -> Path:
    """The whole flow: check inputs, observe, plan, apply, save (the keyword form of `prune_request`).

    The checkpoint is read, observed, pruned and written one decoder layer at a time, in memory
    bounded by about one layer, unless `layerwise=False` (the whole model in memory: same walk, same
    result). `sequential` applies each layer's plan before its outputs feed the next layer. Hidden
    states of the calibration batches beyond `hidden_memory` GiB go to files under `offload_dir`.
    `notify(message)` hears which way was chosen, once the inputs passed their checks. `compensate`
    (none, down, novices, down+novices, lowrank, down+lowrank, router, router+down) fits each compressed
    layer to the original's output (`moeprune.methods.compensation`), sequentially; the default, auto,
    is `down` wherever it can run (calibration text, a layer-by-layer method, experts it can refit, memory
    for its normal equations) and none elsewhere; `compensate_rank` is the rank
    of the low-rank novices (lowrank, down+lowrank only). `budget="global"` keeps the same total but
    spreads the counts over the layers by measured damage, each keeping at least `budget_floor`
    (`moeprune.methods.budget`; written in moeprune's own format, `moeprune.store.budget`).
    """
    return prune_request(
        model_path, method,
        CalibrationRequest(calib, samples=samples, seq_len=seq_len, seed=seed, probe_size=probe_size,
                           field=calib_field, template=calib_template, tokenizer=tokenizer),
        BudgetRequest(ratio, experts, flatten_groups),
        OutputRequest(out, force=force, command=command, stats_path=stats_out),
        _runtime(device, batch_size, layerwise, sequential, offload_dir, hidden_memory, progress),
        options=options, notify=notify, compensation=compensation_config(
            compensate, **({"rank": compensate_rank} if compensate_rank != CompensationConfig.rank else {})),
        spread=BudgetChoice(budget, budget_floor))


def compensation_config(fit: str = "auto", **options) -> CompensationConfig:
    """The compensation settings for `--compensate FIT` (checked: one line when the choice is unknown).

    `auto` is `down` where it can run and nothing elsewhere (`check_compensation` decides, before any
    work)."""
    from moeprune.methods.compensation import FITS

    if fit not in (*FITS, "auto"):
        raise MoepruneError(f"--compensate {fit!r} is not a known fit; give one of auto, {', '.join(FITS)}")
    cfg = CompensationConfig(fit="down", required=False, **options) if fit == "auto" else \
        CompensationConfig(fit=fit, **options)
    if "rank" in options and not cfg.low_rank:
        raise MoepruneError(f"--compensate-rank {options['rank']!r} sets the rank of low-rank novices, which "
                            f"--compensate {fit} does not fit; use --compensate lowrank or down+lowrank")
    return cfg


def check_compensation(compensation: CompensationConfig | None, method: str, spec, cfg,
                       calib: CalibrationRequest, config=None,
                       keep: int | None = None) -> tuple[CompensationConfig | None, str | None]:
    """Refuse, before any work, a compensation this prune cannot run (or hold in memory); returns the
    compensation to run and, for the default (`auto`, not `required`), the line that says what it chose:
    where it cannot run, the default becomes none instead of refusing."""
    if compensation is None or not compensation.active:
        return compensation, None
    try:
        _refuse_compensation(compensation, method, spec, cfg, calib, config, keep)
    except MoepruneError as e:
        if compensation.required:
            raise
        # without calibration text there is nothing to fit and nothing worth saying
        note = None if calib.text is None else f"compensation: off ({str(e).split('; use')[0]})"
        return CompensationConfig(), note
    if compensation.required:
        return compensation, None
    return compensation, ("compensation: down (the default: each layer's kept down projections refitted to "
                          "the original layer's output on the calibration tokens; --compensate none turns it "
                          "off)")


def _refuse_compensation(compensation: CompensationConfig, method: str, spec, cfg, calib: CalibrationRequest,
                         config, keep: int | None) -> None:
    import os

    fit = f"--compensate {compensation.fit}"
    if calib.text is None:
        raise MoepruneError(f"{fit} fits each layer on calibration tokens: pass --calib PATH")
    if compensation.fits_router and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # its input directions come from the first batch, which each process has its own of
        raise MoepruneError(f"{fit} refits the router in one process only; run it without torchrun, or use "
                            "--compensate down")
    adapter = get_adapter(config) if config is not None else None
    if compensation.fits_router and adapter is not None:
        _check_router_refit(adapter, fit, spec.makes_novices(cfg))
    if config is not None and keep is not None:
        _check_compensation_memory(compensation, config, keep, spec.makes_novices(cfg))
    if not spec.layer_local(cfg):
        raise MoepruneError(f"{fit} fits each layer as it goes, but {method} with these options ranks all "
                            "layers together; use a per-layer setting or --compensate none")
    if compensation.fits_novices and not spec.makes_novices(cfg):
        raise MoepruneError(f"{fit} fits novice vectors, which {method} does not make; use --compensate down "
                            "or a novice method (mone)")
    if adapter is not None and adapter.dense_experts:
        raise MoepruneError(f"{fit}: {adapter.family}'s experts run densely on gate-scaled inputs, which "
                            "compensation does not refit; use --compensate none")


def _check_router_refit(adapter, fit: str, novices: bool) -> None:
    """The router refit reads softmax gates (renormalised over the selected experts or not) in stock
    outputs: refuse other routing rules (and novice outputs) in one line, before calibration."""
    from moeprune.arch.facts import BY_MODEL_TYPE

    family = BY_MODEL_TYPE.get(adapter.family)
    softmax = family is not None and family.routing in ("softmax_topk", "softmax_norm_topk_prob",
                                                         "softmax_no_renorm")
    if not softmax or adapter.group_limited:
        raise MoepruneError(f"{fit} refits routers whose gates are softmax probabilities without group "
                            f"limits (Mixtral, Qwen2/3-MoE, MiniMax, Jamba); {adapter.family}'s are not; use "
                            "--compensate down")
    if novices:
        raise MoepruneError(f"{fit} refits the router of a stock output, and this method makes novices; use "
                            "--compensate down+novices or a stock method")


def _check_compensation_memory(compensation: CompensationConfig, config, keep: int, novices: bool) -> None:
    """One layer's normal equations must fit in free memory (they are float64, `R·I·(I + D)` per layer
    when solved per expert): refused in one line, before calibration, when they do not."""
    from moeprune.runtime import available_memory
    from moeprune.store.sharded import skeleton

    free = available_memory()
    if free is None:
        return
    model = skeleton(config)
    adapter = get_adapter(model.config)
    block = next(iter(adapter.moe_blocks(model).values()), None)
    if block is None:
        return
    down = getattr(adapter.experts(block), "down_proj", None)  # [E, D, I], or [E, I, D] when transposed
    if down is None or not hasattr(down, "shape") or len(down.shape) != 3:
        raise MoepruneError(f"--compensate {compensation.fit}: {adapter.family}'s experts hold no down_proj "
                            "tensor [E, D, I] to refit; use --compensate none")
    width = down.shape[1] if adapter.transposed else down.shape[2]
    E = adapter.num_experts
    equations = compensation.accumulator_bytes(keep, width, adapter.expert_dim, E - keep if novices else 0,
                                               router_width=model.config.get_text_config().hidden_size)
    # the fit also holds a copy of the block as it was before surgery, in the checkpoint's dtype
    copy = sum(p.numel() for p in block.parameters()) * _dtype_bytes(model.config.get_text_config())
    need = equations + copy
    if need > 0.8 * free:
        D = adapter.expert_dim
        raise MoepruneError(f"--compensate {compensation.fit} holds about {need / 1024**3:.1f} GiB per layer "
                            f"({equations / 1024**3:.1f} GiB of float64 normal equations for {keep} experts "
                            f"× width {width} × (width + {D}), and a {copy / 1024**3:.1f} GiB copy of the "
                            f"original block), more than the {free / 1024**3:.1f} GiB free; use --compensate "
                            "none or a machine with more memory")


def _dtype_bytes(config) -> int:
    """Bytes per weight of the config's dtype (4 when it names none)."""
    import torch

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return torch.empty(0, dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 4


def check_prune(model_path, method: str, calib: CalibrationRequest, budget_request: BudgetRequest,
                output: OutputRequest, runtime: RuntimeRequest, options: dict | None = None, notify=None,
                compensation: CompensationConfig | None = None, spread: BudgetChoice | None = None):
    """Every cheap check of a prune, before anything expensive; returns (config, method spec, method config,
    experts kept, the compensation to run, the line saying what the default compensation chose or None)."""
    from moeprune.store.novices import refuse_novice_input

    refuse_novice_input(model_path)
    config = load_config(model_path)
    adapter = get_adapter(config)
    if not model_facts(model_path)["moe_layers"]:  # a meta-device skeleton: no weights read
        raise MoepruneError(f"{model_path}: no MoE block found in the {adapter.family} model (every decoder "
                            "layer is dense), so there are no experts to prune")
    spec = get_method(method)
    cfg = spec.default_config(**dict(options or {}))
    if spec.kind == "novice" and adapter.novice_refusal:
        raise MoepruneError(f"method {method} on {adapter.family}: {adapter.novice_refusal}")
    keep = budget(
        adapter.num_experts, adapter.top_k, ratio=budget_request.ratio, experts=budget_request.experts,
        n_group=adapter.n_group, min_per_group=adapter.min_experts_per_group,
        flatten_groups=budget_request.flatten_groups, groups_unchanged=spec.groups_unchanged(cfg),
    )
    check_device(runtime.device)
    spec.check_use(cfg, n_group=adapter.n_group, flatten_groups=budget_request.flatten_groups,
                   has_calibration=calib.text is not None)
    adapter.check_method(method, cfg)
    compensation, compensation_note = check_compensation(compensation, method, spec, cfg, calib, config, keep)
    if spread is not None and spread.is_global:
        check_budget(spread, spec, cfg, has_calibration=calib.text is not None, probe_size=calib.probe_size,
                     sequential=runtime.sequential,
                     grouped_flattened=budget_request.flatten_groups and adapter.n_group > 1)
        budget_floor(spread, keep=keep, num_experts=adapter.num_experts, top_k=adapter.top_k,
                     n_group=1 if budget_request.flatten_groups else adapter.n_group,
                     min_per_group=adapter.min_experts_per_group)
    _check_calibration(calib, config)
    inputs = {"model": model_path, "--calib": calib.text, "--tokenizer": calib.tokenizer}
    check_separate(inputs, {"--out": output.path, "--save-stats": output.stats_path,
                            "--offload-dir": runtime.offload_dir})
    check_offload_dir(runtime.offload_dir, inputs)
    check_output_dir(
        output.path, output.force, inputs,
        expected_bytes=_expected_output_bytes(model_path, keep, adapter.num_experts), notify=notify,
    )
    if output.stats_path is not None:
        check_output_dir(output.stats_path, output.force, inputs, what="--save-stats", notify=notify)
    check_weight_files(model_path)
    return config, spec, cfg, keep, compensation, compensation_note


def prune_request(model_path, method: str, calib: CalibrationRequest, budget_request: BudgetRequest,
                  output: OutputRequest, runtime: RuntimeRequest, *, options: dict | None = None,
                  notify=None, compensation: CompensationConfig | None = None,
                  spread: BudgetChoice | None = None) -> Path:
    """Check everything, tokenise, then one walk (two for methods that rank all layers) that writes
    `output`."""
    options = dict(options or {})
    config, spec, cfg, keep, compensation, compensation_note = check_prune(
        model_path, method, calib, budget_request, output, runtime, options, notify, compensation, spread)
    cal = _tokenise(calib, model_path, config, notify) if calib.text is not None else None
    device = check_device(runtime.device)
    ranks = Ranks.from_env(device)  # under torchrun the calibration batches are shared; rank 0 writes
    # a method that reads every layer's weights at once to plan needs them all in memory
    all_weights = spec.needs_weights and not spec.layer_local(cfg)
    if all_weights and runtime.in_memory is False:
        raise MoepruneError(
            f"{method} with these options needs every layer's weights at once, which layer-by-layer "
            "pruning does not hold; use --in-memory"
        )
    source, why = open_source(
        model_path, runtime, device=ranks.device(device),
        needs_whole_model=f"{method}'s cross-layer weight reads" if all_weights else None,
    )
    fitting = compensation is not None and compensation.active
    why = "--sequential works layer by layer" if runtime.sequential else why
    if fitting and compensation.required:
        why = f"--compensate {compensation.fit} runs sequentially"
    if ranks.is_main:
        _tell(notify, source, why)
        if compensation_note is not None and notify is not None:
            notify(compensation_note)
    weights = None
    if all_weights:
        from moeprune.pipeline.access import ModelWeights

        weights = ModelWeights(source.model)
    elif spread is not None and spread.is_global:  # block outputs of one layer at a time suffice
        from moeprune.pipeline.access import ModelWeights, ShardedWeights

        weights = ModelWeights(source.model) if source.in_memory else ShardedWeights(source)
    with layer_progress("pruning", runtime.progress and ranks.is_main) as cb:
        path, stats, _ = pipeline.prune(
            source, method, keep, output, input_ids=None if cal is None else cal.input_ids,
            calibration=None if cal is None else cal.provenance, calib=calib, runtime=runtime,
            flatten_groups=budget_request.flatten_groups, options=options, ranks=ranks, progress=cb,
            weights=weights, compensate=compensation, budget=spread)
    if output.stats_path is not None and stats is not None and ranks.is_main:
        write_stats(stats, output.stats_path, force=output.force)
    return path
