"""The public Python API; the CLI is a thin layer over these functions.

    import moeprune
    stats = moeprune.observe_checkpoint("path/to/model", "calib.txt")
    plan = moeprune.make_plan_for(stats, "reap", ratio=0.25)
    moeprune.apply_checkpoint("path/to/model", plan, "out/")

or all at once with `moeprune.prune(...)`. Every function checks the cheap things (family, ratio,
top-k, groups, output directory, calibration text) before the expensive calibration pass.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from moeprune.arch import decoder_layers, get_adapter
from moeprune.data import Calibration, calibration_blocks
from moeprune.distributed import Ranks
from moeprune.errors import MoepruneError
from moeprune.store.checkpoint import (
    check_weight_files,
    load_config,
    load_model,
    load_tokenizer,
    parameter_counts,
    save_checkpoint,
)
from moeprune.methods import PlanRequest, get_method, make_plan
from moeprune.methods.access import ModelWeights
from moeprune.observe import LayerStats, Stats, check_same_model, model_description, observe
from moeprune.outputs import atomic_directory, check_output_dir, check_output_file, check_separate
from moeprune.plan import Plan, budget
from moeprune.runtime import check_device
from moeprune.settings import check_ratio, check_seq_len, check_settings
from moeprune.surgery import apply_plan

__all__ = ["apply_checkpoint", "check_output_dir", "check_output_file", "check_separate", "empty_stats", "inspect",
           "make_plan_for", "model_facts", "model_weights", "observe_checkpoint", "prune", "resolve_device",
           "write_plan", "write_stats"]


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True):
    """A rich progress bar on stderr; yields a callback taking the number of items done."""
    if not enabled:
        yield None
        return
    with _progress() as bar, _vanish_on_failure(bar):
        task = bar.add_task(description, total=total)
        yield lambda done: bar.update(task, completed=done)


@contextmanager
def _vanish_on_failure(bar: Progress):
    """A failed or interrupted run's last line is its error: the bar is not redrawn after it stops."""
    try:
        yield
    except BaseException:
        bar.live.transient = True
        raise


def _progress() -> Progress:
    from rich.console import Console

    # progress goes to stderr, so that stdout holds only results (tables, JSON) a script may read
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), transient=False, console=Console(stderr=True))


def inspect(model_path: str | Path) -> dict:
    """Family, MoE layers, experts, top-k, shared experts and parameter split of a checkpoint.

    Only the config is read (the model is built on the meta device), so any size inspects instantly.
    MoNE checkpoints load through `moeprune.from_pretrained`; `novices` then describes them (else None),
    and the parameter counts include the novice vectors.
    """
    from moeprune.store.sharded import skeleton
    from moeprune.store.checkpoint import from_pretrained, weights_bytes
    from moeprune.store.novices import describe, is_novice_checkpoint

    model = from_pretrained(model_path) if is_novice_checkpoint(model_path) else skeleton(load_config(model_path))
    adapter = get_adapter(model.config)
    blocks = adapter.moe_blocks(model)
    if not blocks:
        raise MoepruneError(f"{model_path}: no MoE block found in the {adapter.family} model (every decoder layer "
                            "is dense), so there are no experts to prune")
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


def _budget_for(config, ratio, experts, flatten_groups) -> int:
    a = get_adapter(config)
    return budget(a.num_experts, a.top_k, ratio=ratio, experts=experts, n_group=a.n_group,
                  min_per_group=a.min_experts_per_group, flatten_groups=flatten_groups)


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
    return the same merged statistics; only the main process shows the progress bar. `layerwise`
    (default: when the weights exceed half the free memory) runs one decoder layer at a time.
    """
    from moeprune.store.novices import refuse_novice_input

    check_settings(samples=samples, seq_len=seq_len, batch_size=batch_size, seed=seed, probe_size=probe_size,
                   hidden_memory=hidden_memory)
    refuse_novice_input(model_path, model, action="observe")
    device = check_device(device)
    use_layerwise, why = False, "model given"
    config = model.config if model is not None else load_config(model_path)
    if model is None:
        get_adapter(config)
        check_seq_len(seq_len, config)
        check_offload_dir(offload_dir, {"model": model_path, "--calib": calib, "--tokenizer": tokenizer})
        check_weight_files(model_path)
        use_layerwise, why = choose_layerwise(model_path, layerwise)
    cal = calibration or calibration_blocks(load_tokenizer(tokenizer or model_path), calib, samples=samples,
                                            seq_len=seq_len, seed=seed, field=calib_field, template=calib_template,
                                            vocab_size=getattr(config, "vocab_size", None), notify=notify)
    ranks = ranks if ranks is not None else Ranks.from_env(device)
    if ranks.is_main and calibration is None:
        _tell(notify, use_layerwise, why)
    if use_layerwise:
        from moeprune.pipeline import observe_layerwise

        with layer_progress("calibrating", progress and ranks.is_main) as cb:
            return observe_layerwise(model_path, cal.input_ids, batch_size=batch_size, probe_size=probe_size,
                                     seed=seed, calibration=cal.provenance, device=ranks.device(device),
                                     ranks=ranks, progress=cb, offload_dir=offload_dir,
                                     hidden_budget=int(hidden_memory * 1024**3))
    model = model if model is not None else load_model(model_path, device=ranks.device(device))
    N = cal.input_ids.shape[0]
    mine = sum(min(batch_size, N - s) for s in ranks.batch_starts(list(range(0, N, batch_size))))
    what = "calibrating" if ranks.world == 1 else f"calibrating (rank 0 of {ranks.world})"
    with progress_bar(what, mine, progress and ranks.is_main) as cb:
        return observe(model, cal.input_ids, batch_size=batch_size, probe_size=probe_size, seed=seed,
                       calibration=cal.provenance, source=str(model_path), progress=cb, ranks=ranks)


def empty_stats(model, source: str | None = None) -> Stats:
    """Statistics with no calibration, for methods that read only the weights."""
    adapter = get_adapter(model.config)
    desc = model_description(model, adapter, source)
    E, H = desc["num_experts"], desc["hidden_size"]
    layers = {i: LayerStats.empty(i, E, H) for i in desc["moe_layers"]}
    return Stats(model=desc, calibration={}, layers=layers)


def make_plan_for(stats: Stats, method: str, *, ratio: float | None = None, experts: int | None = None,
                  flatten_groups: bool = False, weights=None, options: dict | None = None) -> Plan:
    """Plan `method` on `stats` at the given budget."""
    check_ratio(ratio)
    m = stats.model
    keep = budget(m["num_experts"], m["top_k"], ratio=ratio, experts=experts, n_group=m.get("n_group", 1),
                  min_per_group=m.get("min_experts_per_group", 2), flatten_groups=flatten_groups)
    return make_plan(method, PlanRequest(stats, keep, flatten_groups, weights), **(options or {}))


def model_weights(model_path: str | Path, layerwise: bool | None = None, notify=None, stats: Stats | None = None):
    """Read access to the expert weights of a checkpoint for planning: the whole model, or one layer at a time.

    With `stats`, they must have been observed on a model of this shape (checked before any weight is read).
    """
    if stats is not None:
        check_same_model(stats.model, model_facts(model_path), what="the statistics", model=str(model_path),
                         fix="plan with statistics observed on this model, or pass its own --model")
    check_weight_files(model_path)
    use_layerwise, why = choose_layerwise(model_path, layerwise)
    _tell(notify, use_layerwise, why)
    if use_layerwise:
        from moeprune.pipeline import ShardedCheckpoint, ShardedWeights

        return ShardedWeights(ShardedCheckpoint(model_path))
    return ModelWeights(load_model(model_path))


def resolve_device(device: str) -> str:
    """The torch device for `--device` (cpu, cuda, cuda:N, auto), or one line saying what to give."""
    return check_device(device)


def model_facts(model_path: str | Path) -> dict:
    """The fingerprint facts (`model_description`) of a checkpoint, from its config alone (model on meta)."""
    from moeprune.store.sharded import skeleton

    config = load_config(model_path)
    get_adapter(config)
    model = skeleton(config)
    return model_description(model, get_adapter(model.config), str(model_path))


def check_offload_dir(offload_dir: str | Path | None, inputs: dict) -> None:
    """--offload-dir is a writable directory (or can be made) outside every input."""
    if offload_dir is None:
        return
    import os

    if not str(offload_dir).strip():
        raise MoepruneError("--offload-dir is empty; give a directory for spilled hidden states, or leave it out")
    check_separate(inputs, {"--offload-dir": offload_dir})
    p = Path(offload_dir)
    base = p
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise MoepruneError(f"--offload-dir {offload_dir}: {base} is a file, not a directory; choose a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise MoepruneError(f"--offload-dir {offload_dir}: {base} is not writable; choose a directory you can write to")


def _expected_output_bytes(model_path: str | Path, keep: int, num_experts: int) -> int:
    """A lower bound of the pruned checkpoint's size (every weight scaled by keep/E): refusing below it is safe."""
    from moeprune.store.files import weights_bytes

    return int((weights_bytes(model_path) or 0) * keep / max(num_experts, 1))


def apply_checkpoint(model_path: str | Path, plan: Plan, out: str | Path, *, force: bool = False,
                     device: str = "cpu", command: str | None = None, model=None, stats: Stats | None = None,
                     layerwise: bool | None = None, progress: bool = True, notify=None,
                     input_paths: dict | None = None) -> Path:
    """Apply `plan` to the checkpoint at `model_path` and write the result to `out`.

    A plan with novices (MoNE) needs `stats`, the statistics it was made from, for the novice vectors.
    `layerwise` (default: when the checkpoint is large next to free memory) streams it layer by layer.
    `notify(message)` hears which way was chosen, once the inputs passed their checks. `input_paths`
    names the files the plan and stats came from (`{"plan": ..., "--stats": ...}`), which `out` must not touch.
    Every check (paths, plan against the model's shape, stats against both) runs before any weight is read.
    """
    from moeprune.methods.mone import novice_vectors
    from moeprune.plan import check_novice_plan
    from moeprune.store.novices import refuse_novice_input

    refuse_novice_input(model_path, model)
    device = check_device(device)
    inputs = {"model": model_path, **(input_paths or {})}
    check_output_dir(out, force, inputs, expected_bytes=_expected_output_bytes(
        model_path, plan.num_experts_out, plan.num_experts_in) if model is None else None, notify=notify)
    facts = model_description(model, get_adapter(model.config), str(model_path)) if model is not None \
        else model_facts(model_path)
    check_same_model(plan.model, facts, what="the plan", model=str(model_path),
                     fix="make the plan from statistics of this model")
    if stats is not None:
        check_same_model(stats.model, facts, what="the statistics", model=str(model_path),
                         fix="give --stats observed on this model")
    check_novice_plan(plan)
    novice_vectors(plan, stats)  # fails before loading the model when the stats are missing or do not match
    plan.validate(facts)
    if model is None:
        check_weight_files(model_path)
    use_layerwise, why = choose_layerwise(model_path, layerwise) if model is None else (False, "model given")
    _tell(notify, use_layerwise, why)
    if use_layerwise:
        from moeprune.pipeline import apply_layerwise

        with layer_progress("applying", progress) as cb:
            return apply_layerwise(model_path, plan, out, stats=stats, force=force, command=command,
                                   device=device, progress=cb)
    model = copy.deepcopy(model) if model is not None else load_model(model_path, device=device)
    before = parameter_counts(model)
    apply_plan(model, plan, stats=stats)
    return save_checkpoint(model, out, source=str(model_path), plan=plan, before=before, force=force,
                           command=command)


def write_stats(stats: Stats, out: str | Path, *, force: bool = False) -> Path:
    """Save statistics to the directory `out`, atomically (checked with `check_output_dir` beforehand)."""
    with atomic_directory(out, force=force) as tmp:
        stats.save(tmp)
    return Path(out)


def write_plan(plan: Plan, out: str | Path) -> Path:
    """Save a plan to the file `out`, atomically (checked with `check_output_file` beforehand)."""
    from moeprune.outputs import write_file_atomically

    write_file_atomically(out, plan.save)
    return Path(out)


def _tell(notify, layerwise: bool, why: str) -> None:
    if notify is not None:
        notify(f"{'layer by layer' if layerwise else 'whole model in memory'} ({why})")


def choose_layerwise(model_path: str | Path, requested: bool | None) -> tuple[bool, str]:
    """Whether to work layer by layer, and why: as requested, else when the weights exceed half the free memory."""
    from moeprune.pipeline import available_memory
    from moeprune.store.files import weights_bytes

    size = weights_bytes(model_path) or 0
    safetensors = any(Path(model_path).glob("*.safetensors"))
    if requested is not None:
        if requested and not safetensors:
            raise MoepruneError(f"{model_path} has no safetensors weights, which layer-by-layer work reads; "
                                "convert the checkpoint or use --in-memory")
        return requested, "as asked"
    free = available_memory()
    gb = 1024**3
    if safetensors and free is not None and size > free / 2:
        return True, f"weights {size / gb:.1f} GiB > half of the {free / gb:.1f} GiB available"
    return False, f"weights {size / gb:.2f} GiB fit in the {(free or 0) / gb:.1f} GiB available"


@contextmanager
def layer_progress(description: str, enabled: bool = True):
    """A progress callback for the layer-by-layer loop (`walk`): a bar over the decoder layers."""
    state: dict = {}
    if not enabled:
        yield None
        return
    with _progress() as bar, _vanish_on_failure(bar):
        def update(what: str, done: int, total: int) -> None:
            if "task" not in state:
                state["task"] = bar.add_task(description, total=total)
            bar.update(state["task"], completed=done, description=f"{description} {what}")

        yield update


def prune(
    model_path: str | Path, method: str, out: str | Path, *, ratio: float | None = None, experts: int | None = None,
    calib: str | None = None, samples: int = 128, seq_len: int = 512, batch_size: int = 8, seed: int = 0,
    probe_size: int = 512, device: str = "cpu", flatten_groups: bool = False, force: bool = False,
    tokenizer: str | None = None, calib_field: str | None = None, calib_template: str | None = None,
    progress: bool = True, command: str | None = None, stats_out: str | Path | None = None,
    options: dict | None = None, layerwise: bool | None = None, sequential: bool = False,
    offload_dir: str | Path | None = None, hidden_memory: float = 2.0, notify=None,
) -> Path:
    """The whole flow: check inputs, observe, plan, apply, save.

    `layerwise` reads, observes, prunes and writes one decoder layer at a time, in memory bounded by
    about one layer (default: when the weights exceed half the free memory). `sequential` (implies
    layerwise) applies each layer's plan before its outputs feed the next layer. Hidden states of the
    calibration batches beyond `hidden_memory` GiB go to files under `offload_dir`. `notify(message)` hears which
    way was chosen, once the inputs passed their checks.
    """
    from moeprune.store.novices import refuse_novice_input

    check_settings(samples=samples, seq_len=seq_len, batch_size=batch_size, seed=seed, probe_size=probe_size,
                   hidden_memory=hidden_memory)
    check_ratio(ratio)
    refuse_novice_input(model_path)
    config = load_config(model_path)
    adapter = get_adapter(config)
    spec = get_method(method)
    options = dict(options or {})
    cfg = spec.default_config(**options)
    keep = _budget_for(config, ratio, experts, flatten_groups)
    if spec.kind == "novice" and adapter.n_group > 1 and not flatten_groups:
        raise MoepruneError(f"method {method} keeps every router row and routes to novices, which moeprune does not "
                            f"support with group-limited routing (n_group={adapter.n_group}); pass "
                            "--flatten-groups to route without groups")
    if sequential and layerwise is False:
        raise MoepruneError("--sequential works layer by layer; drop --in-memory")
    device = check_device(device)
    # a method whose need depends on its options says why through `calibration_reason()` (e.g. dek)
    reason = cfg.calibration_reason() if hasattr(cfg, "calibration_reason") else None
    if (spec.needs_calibration or reason) and calib is None:
        why = f" ({reason})" if reason else ""
        raise MoepruneError(f"method {method} needs calibration text{why}: pass --calib PATH")
    if calib is not None:
        check_seq_len(seq_len, config)
    inputs = {"model": model_path, "--calib": calib, "--tokenizer": tokenizer}
    check_separate(inputs, {"--out": out, "--save-stats": stats_out, "--offload-dir": offload_dir})
    check_offload_dir(offload_dir, inputs)
    check_output_dir(out, force, inputs, expected_bytes=_expected_output_bytes(model_path, keep, adapter.num_experts),
                     notify=notify)
    if stats_out is not None:
        check_output_dir(stats_out, force, inputs, what="--save-stats", notify=notify)
    check_weight_files(model_path)
    use_layerwise, why = choose_layerwise(model_path, True if sequential else layerwise)
    why = "--sequential works layer by layer" if sequential else why
    cal = None
    if calib is not None:
        # tokenising is cheap next to the pass: do it before loading the model so bad text fails fast
        cal = calibration_blocks(load_tokenizer(tokenizer or model_path), calib, samples=samples, seq_len=seq_len,
                                 seed=seed, field=calib_field, template=calib_template,
                                 vocab_size=getattr(config, "vocab_size", None), notify=notify)
    ranks = Ranks.from_env(device)  # under torchrun the calibration batches are shared; rank 0 writes
    if ranks.is_main:
        _tell(notify, use_layerwise, why)
    if use_layerwise:
        from moeprune.pipeline import prune_layerwise

        with layer_progress("pruning", progress and ranks.is_main) as cb:
            path, stats, _ = prune_layerwise(
                model_path, method, out, keep=keep,
                input_ids=None if cal is None else cal.input_ids, calibration=None if cal is None else cal.provenance,
                batch_size=batch_size, probe_size=probe_size, seed=seed, flatten_groups=flatten_groups,
                options=options, sequential=sequential, force=force, command=command, device=ranks.device(device),
                progress=cb, offload_dir=offload_dir, hidden_budget=int(hidden_memory * 1024**3), ranks=ranks)
        if stats_out is not None and stats is not None and ranks.is_main:
            write_stats(stats, stats_out, force=force)
        return path
    model = load_model(model_path, device=ranks.device(device))
    if cal is not None:
        stats = observe_checkpoint(model_path, calib, batch_size=batch_size, seed=seed, probe_size=probe_size,
                                   progress=progress, model=model, calibration=cal, ranks=ranks)
    else:
        stats = empty_stats(model, str(model_path))
    if not ranks.is_main:
        return Path(out)
    plan = make_plan_for(stats, method, ratio=ratio, experts=experts, flatten_groups=flatten_groups,
                         weights=ModelWeights(model), options=options)
    before = parameter_counts(model)
    apply_plan(model, plan, stats=stats)
    path = save_checkpoint(model, out, source=str(model_path), plan=plan, before=before, force=force,
                           command=command)
    if stats_out is not None and calib is not None:
        write_stats(stats, stats_out, force=force)
    return path
