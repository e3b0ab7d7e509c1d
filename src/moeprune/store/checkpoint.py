"""Loading inputs and writing outputs: checked model loading, atomic checkpoint writing, model card.

Outputs are written into a temporary sibling directory and renamed into place at the end, so a
failure never leaves a half-written checkpoint. The input model directory is only ever read.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
import transformers as tf
from torch import nn

from moeprune import compat
from moeprune.arch import Adapter, get_adapter
from moeprune.arch.base import novice_parameter_count
from moeprune.errors import MoepruneError
from moeprune.outputs import atomic_directory, check_output_dir
from moeprune.store.files import read_config_dict, weights_bytes

__all__ = [
    "atomic_directory", "check_output_dir", "checkpoint_parameters", "export_stock", "from_pretrained",
    "load_config", "load_model", "load_tokenizer", "read_config_dict", "save_checkpoint", "weights_bytes",
]

# Files of a model directory that loaders read besides weights and config: carried over to the output.
SIDE_FILES = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json", "*.model",
              "*.tiktoken", "chat_template*", "generation_config.json", "preprocessor_config.json",
              "processor_config.json", "video_preprocessor_config.json", "audio_preprocessor_config.json",
              "feature_extractor_config.json", "image_processor_config.json", "speech_*.json")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def load_config(path: str | Path):
    """The transformers config of a model directory, with a clear error when it is not one."""
    p = Path(path)
    if not str(path).strip():
        raise MoepruneError("the model directory is empty; give the directory that holds config.json")
    if not p.exists():
        raise MoepruneError(f"model directory {p} does not exist")
    if not p.is_dir():
        raise MoepruneError(
            f"{p} is a file, not a model directory; give the directory that holds config.json"
        )
    if not (p / "config.json").is_file():
        raise MoepruneError(f"{p} is not a model directory: it has no config.json")
    from moeprune.store.novices import is_novice_checkpoint, novice_config

    if is_novice_checkpoint(p):  # its config.json refuses stock loading on purpose
        return novice_config(p)
    from moeprune.store.budget import budget_config, is_budget_checkpoint

    if is_budget_checkpoint(p):  # likewise; the config's count is the largest layer's
        return budget_config(p)[0]
    try:
        return tf.AutoConfig.from_pretrained(str(p))
    except Exception as e:
        raise MoepruneError(f"could not read {p}/config.json ({_one_line(e)})")


def load_model(path: str | Path, *, device: str = "cpu", dtype: str | torch.dtype = "auto") -> nn.Module:
    """Load a causal LM and refuse checkpoints with missing or mismatched weights.

    MoNE checkpoints (with novices) load through `moeprune.store.novices.load_novice_model`.
    """
    from moeprune.store.novices import is_novice_checkpoint, load_novice_model

    if is_novice_checkpoint(path):
        return load_novice_model(path, device=device, dtype=dtype)
    from moeprune.store.budget import is_budget_checkpoint, load_budget_model

    if is_budget_checkpoint(path):
        model = load_budget_model(path, device=device, dtype=dtype)
        refuse_nonfinite(model.named_parameters(), path)
        return model
    config = load_config(path)
    get_adapter(config)  # unsupported families fail before any weight is read
    try:
        # mismatched shapes come back in `info` (reported below by name) instead of as an error that points
        # to a loading report transformers does not show at moeprune's log level
        model, info = compat.model_class(config)[1].from_pretrained(
            str(path), config=config, dtype=dtype, output_loading_info=True, device_map=None,
            ignore_mismatched_sizes=True,
        )
    except Exception as e:
        detail = _one_line(e)
        if "above report" in detail:  # a conversion error, whose report transformers logs at warning level
            detail = "a tensor does not fit the layout its config gives"
        raise MoepruneError(
            f"could not load the weights of {path} ({detail}); is the checkpoint complete and "
            "does it match its config.json?"
        )
    bad = list(info.get("missing_keys", [])) + [
        k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])
    ]
    if bad:
        raise MoepruneError(
            f"{path} is missing or has mis-shaped weights ({len(bad)}, e.g. {sorted(bad)[0]}); "
            "the checkpoint is incomplete or does not match its config"
        )
    refuse_nonfinite(model.named_parameters(), path)
    return model.to(device).eval()


def refuse_nonfinite(named_parameters: Iterable[tuple[str, torch.Tensor]], path: str | Path) -> None:
    """Refuse weights holding NaN or Inf: every score computed from them is NaN, so any kept set is
    arbitrary."""
    for name, p in named_parameters:
        if p.is_meta or not p.is_floating_point():
            continue
        finite = torch.isfinite(p)
        if bool(finite.all()):
            continue
        where = ""
        if p.dim() >= 3 and "expert" in name:  # fused experts tensor [E, ...]: say which experts
            bad = (~finite).flatten(1).any(dim=1).nonzero().flatten().tolist()
            where = f" (experts {', '.join(map(str, bad[:8]))}{' ...' if len(bad) > 8 else ''})"
        raise MoepruneError(f"{path} has NaN or Inf weights in {name}{where}; the checkpoint is damaged: "
                            "re-download or re-convert it")


def check_weight_files(path: str | Path) -> None:
    """Read the header of every safetensors file of a model directory (cheap), so a truncated or corrupt
    download fails before any expensive work; with an index, every tensor it names must be in its shard."""
    from safetensors import safe_open

    p = Path(path)
    index = p / "model.safetensors.index.json"
    named: dict[str, set[str]] = {}
    if index.is_file():
        try:
            for k, f in json.loads(index.read_text())["weight_map"].items():
                named.setdefault(f, set()).add(k)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise MoepruneError(
                f"{index} is not a valid safetensors index ({_one_line(e)}); is the download complete?"
            )
        missing = sorted(f for f in named if not (p / f).is_file())
        if missing:
            raise MoepruneError(
                f"{p} lacks shard {missing[0]} named in its index; the download is incomplete"
            )
    for f in sorted(p.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as handle:
                keys = set(handle.keys())
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            raise MoepruneError(
                f"could not read the weights of {path}: {f.name} is damaged ({_one_line(e)}); "
                "is the checkpoint complete?"
            )
        absent = sorted(named.get(f.name, set()) - keys)
        if absent:
            raise MoepruneError(f"{path}: shard {f.name} lacks {len(absent)} tensor(s) its index names (e.g. "
                                f"{absent[0]}); the download is incomplete or the index is wrong")


def load_tokenizer(path: str | Path):
    if not Path(path).exists():  # else transformers answers with a Hub repo-id error
        raise MoepruneError(
            f"tokenizer directory {path} does not exist; moeprune reads local tokenizers: pass "
            "--tokenizer PATH of a downloaded one"
        )
    try:
        return tf.AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise MoepruneError(f"no usable tokenizer in {path} ({_one_line(e)}); pass --tokenizer PATH")


def copy_side_files(src: str | Path, dst: Path) -> list[str]:
    """Copy the tokenizer and chat-template files of `src` that `save_pretrained` did not write.

    Only files a loader reads are carried over; anything else in the source directory (training
    logs, reports, notebooks) describes the source model, not the output.
    """
    copied = []
    s = Path(src)
    if not s.is_dir():
        return copied
    for f in sorted(s.iterdir()):
        if f.is_file() and fnmatch_any(f.name, SIDE_FILES) and not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def fnmatch_any(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def parameter_counts(model: nn.Module, adapter: Adapter | None = None) -> dict:
    """Parameters in routed experts, novices (MoNE vectors and low-rank novices' factors, stored as
    buffers: n·(H + 2·H·r) a layer) and the rest.

    Shared tensors are counted once; `total` includes the novices.
    """
    adapter = adapter or get_adapter(model.config)
    params = dict(model.named_parameters())  # a tensor shared by two modules is listed once
    # A weightless skeleton (meta device) leaves tied weights as two tensors, though the checkpoint
    # stores one and a loaded model shares it; count what the config ties once, either way.
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    untied_copies = sum(params[t].numel() for t, s in tied.items()
                        if t in params and s in params and params[t] is not params[s])
    total = sum(p.numel() for p in params.values()) - untied_copies
    routed = novices = 0
    for block in adapter.moe_blocks(model).values():
        routed += sum(p.numel() for p in adapter.expert_parameters(block).values())
        novices += novice_parameter_count(adapter.experts(block))
    return {"total": total + novices, "routed_experts": routed, "novices": novices, "other": total - routed}


def _choice_and_fit_lines(plan) -> list[str]:
    """Model-card bullets for `auto`'s choice per layer and each layer's compensation fit."""
    lines = []
    chosen = {lp.layer: lp.notes["chosen"] for lp in plan.layers if "chosen" in lp.notes}
    if chosen:
        per_layer = ", ".join(
            f"{i}: {m} ({plan.layer(i).notes['errors'][m]:.3g})" for i, m in sorted(chosen.items()))
        lines.append("- **Method chosen per layer** (`auto`; relative block-output error on held-out probe "
                     f"tokens): {per_layer}")
    fits = {lp.layer: lp.notes["compensation"] for lp in plan.layers if "compensation" in lp.notes}
    if fits:
        applied = sorted(i for i, f in fits.items() if f.get("applied"))
        detail = ", ".join(
            f"{i}: {f.get('held_out_relative_before', float('nan')):.3g} → "
            f"{f.get('held_out_relative_after', float('nan')):.3g}"
            + ("" if f.get("applied") else " (not applied)") for i, f in sorted(fits.items()))
        lines.append(f"- **Compensation** `{plan.compensation.get('fit')}` (closed-form ridge fit to the "
                     f"original layer's output), applied in layers {applied}; held-out relative error "
                     f"before → after: {detail}")
    return lines


def model_card(*, source: str, plan, before: dict, after: dict, command: str | None = None,
               notes: list[str] | None = None, loads_with: str = "AutoModelForCausalLM") -> str:
    """README.md for a pruned checkpoint: what was removed, how, on what data, and sizes.

    `before`/`after` hold parameter counts (`parameter_counts`) and optionally `bytes` (weight files
    on disk); `notes` are extra bullet lines.
    """
    from moeprune import __version__
    from moeprune.methods import METHODS

    spec = METHODS.get(plan.method)
    cal = plan.calibration or {}
    n_novices = max((len(lp.novices) for lp in plan.layers), default=0)
    plus = f" experts + {n_novices} novices" if n_novices else " experts"
    lines = [
        "---", "library_name: transformers", "tags: [moe, pruning, moeprune]", "---", "",
        f"# {Path(source).name}, {plan.num_experts_in}→{plan.num_experts_out}{plus} per layer", "",
        f"Made with moeprune {__version__} on {_dt.date.today().isoformat()} from `{source}`.", "",
        f"- **Method:** `{plan.method}`" + (f" ({spec.paper})" if spec else ""),
        f"- **Options:** `{json.dumps(plan.method_config)}`",
        f"- **Experts per MoE layer:** {plan.num_experts_in} → {plan.num_experts_out}"
        + (" at most, by measured damage (`--budget global`: counts per layer below)"
           if plan.per_layer_counts else "")
        + f" (top-k {plan.model.get('top_k')} unchanged)",
    ]
    if n_novices:
        kinds = {lp.notes.get("novice_vectors", "out_mean") for lp in plan.layers if lp.novices}
        never = {lp.layer: lp.notes["never_routed"] for lp in plan.layers if lp.notes.get("never_routed")}
        lines.append(
            f"- **Novices:** {n_novices} per MoE layer. The router keeps all {plan.num_experts_in} rows and "
            "its top-k; a token routed to a novice gets gate × novice vector, where the vector is "
            + (
                "zero (the no-novice ablation)"
                if kinds == {"zero"}
                else "the expert's mean output on the calibration data"
            )
            + (f"; never routed on the calibration data, so zero: {never}" if never else "")
        )
        low_rank = _low_rank_layers(plan)
        if low_rank:
            ranks = sorted(set(low_rank.values()))
            lines.append(
                f"- **Low-rank novices** (compensation `{plan.compensation.get('fit')}`) in layers "
                f"{sorted(low_rank)}: a novice outputs b + U Vᵀx (x the experts' input; U, V: hidden size H "
                f"× r, r = {ranks[0] if len(ranks) == 1 else ranks}), so each holds H + 2·H·r parameters"
            )
    lines += [f"- {n}" for n in notes or []]
    lines += _choice_and_fit_lines(plan)
    mtp = plan.mtp
    if mtp.get("layers"):
        names = ", ".join(f"`{p.rstrip('.')}`" for p in mtp["layers"])
        how = (f"routed experts reduced with layer {mtp['plan_from_layer']}'s plan (the last MoE decoder "
               "layer's: transformers does not run MTP layers, so their routing is not observed), every "
               "other tensor as stored" if "plan_from_layer" in mtp else "copied as stored")
        lines.append(f"- **MTP layers carried** (speculative decoding): {names}; {how}")
    if plan.flatten_groups:
        lines.append("- **Group-limited routing flattened:** n_group = topk_group = 1")
    if cal:
        lines.append(
            f"- **Calibration:** `{cal.get('source')}`, {cal.get('samples', cal.get('sequences'))} "
            f"sequences × {cal.get('seq_len')} tokens = {cal.get('tokens')} tokens, seed {cal.get('seed')}, "
            f"sha256 `{str(cal.get('sha256', ''))[:16]}`"
        )
    else:
        lines.append("- **Calibration:** none (this method reads only the weights)")
    if command:
        lines.append(f"- **Command:** `{command}`")
    lines += [
        "", "## Parameters", "", "| | before | after | change |", "|---|---:|---:|---:|",
    ]
    rows = [("total", "total"), ("routed_experts", "routed experts")]
    if before.get("novices") or after.get("novices"):
        rows.append(("novices", "novices (vectors, low-rank factors)" if _low_rank_layers(plan) else
                     "novice vectors"))
    rows += [("other", "everything else"), ("bytes", "bytes on disk (weights)")]
    for key, label in rows:
        b, a = before.get(key), after.get(key)
        if b is None or a is None:
            continue
        change = f"{100 * (a - b) / b:+.1f}%" if b else "—"
        lines.append(f"| {label} | {b:,} | {a:,} | {change} |")
    head = (
        "| layer | kept / merged groups | novices | removed |"
        if n_novices
        else "| layer | kept / merged groups | removed |"
    )
    lines += ["", "## Experts per layer", "", head, "|---:|---|---|---|" if n_novices else "|---:|---|---|"]
    for lp in plan.layers:
        groups = " ".join("+".join(map(str, g.members)) if len(g.members) > 1 else str(g.members[0])
                          for g in lp.groups)
        novice_cell = f" {' '.join(map(str, lp.novices)) or '—'} |" if n_novices else ""
        lines.append(f"| {lp.layer} | {groups} |{novice_cell} {' '.join(map(str, lp.dropped)) or '—'} |")
    lines += ["", "Expert ids are the input model's. The full plan is in `moeprune_plan.json`."]
    if n_novices:
        lines += [
            (
                "This checkpoint holds novices, which stock transformers cannot run (its config says so and "
                "refuses to load): load it with `moeprune.from_pretrained(path)`. "
                "`moeprune export-stock PATH --out DIR` writes a stock copy without novices (plain pruning)."
            ),
            "",
        ]
    elif plan.per_layer_counts:
        counts = ", ".join(f"{lp.layer}: {lp.num_experts_out}" for lp in plan.layers)
        lines += [
            (f"Each MoE layer keeps its own number of experts (`--budget global`; layer: kept = {counts}), "
             "which a stock config cannot describe, so stock transformers refuses to load it: load it with "
             "`moeprune.from_pretrained(path)`. There is no stock export (padding a layer with experts its "
             "router never selects is not exact for a bias-free softmax router)."),
            "",
        ]
    else:
        lines += [
            f"This checkpoint loads with `transformers.{loads_with}.from_pretrained` and no extra code.",
            "",
        ]
    return "\n".join(lines)


def _low_rank_layers(plan) -> dict[int, int]:
    """{layer: rank} of the layers whose novices compensation made low-rank (its notes say so)."""
    out = {}
    for lp in plan.layers:
        notes = lp.notes.get("compensation") or {}
        if lp.novices and notes.get("applied") and "novice_rank" in notes:
            out[lp.layer] = int(notes["novice_rank"])
    return out


def save_checkpoint(model: nn.Module, out: str | Path, *, source: str, plan, before: dict,
                    force: bool = False, command: str | None = None) -> Path:
    """Write the pruned model, tokenizer files, plan and model card to `out`, atomically.

    A model with novices (MoNE) is written in moeprune's novice format
    (`moeprune.store.novices.save_pretrained`).
    """
    from moeprune.store.novices import save_pretrained as save_weights

    after = parameter_counts(model)
    with atomic_directory(out, force=force) as tmp:
        save_weights(model, tmp)  # original per-expert key layout by default, as vLLM expects
        describe_output(tmp, source=source, plan=plan, before=before, after=after, command=command)
    return Path(out)


def describe_output(directory: Path, *, source: str, plan, before: dict, after: dict,
                    command: str | None = None) -> None:
    """Add the tokenizer files, the plan and the model card to a freshly written checkpoint directory."""
    before = {**before, "bytes": before.get("bytes", weights_bytes(source))}
    after = {**after, "bytes": weights_bytes(directory)}
    copy_side_files(source, directory)
    plan.save(directory / "moeprune_plan.json")
    loads_with = loader_name(directory)
    (directory / "README.md").write_text(model_card(source=source, plan=plan, before=before, after=after,
                                                    command=command, loads_with=loads_with))


def loader_name(path: str | Path) -> str:
    """The transformers Auto class a checkpoint directory loads with (`AutoModelForImageTextToText`, ...)."""
    try:
        return compat.model_class(load_config(path))[0]
    except (LookupError, MoepruneError):
        return "AutoModelForCausalLM"


# ---- novice (MoNE) checkpoints: loading either kind, counting, stock export ----
def from_pretrained(path: str | Path, *, device: str = "cpu", dtype: str | torch.dtype = "auto") -> nn.Module:
    """Load a moeprune output (novice checkpoint or stock) in eval mode.

    A novice checkpoint loads its plain-pruned part through transformers, then puts the novices'
    router rows back and attaches the novices, reproducing the in-memory pruned model exactly.
    Any other checkpoint loads as `moeprune.store.checkpoint.load_model` does.
    """
    from moeprune.store.novices import CONFIG_KEY, load_novice_model

    p = Path(path)
    if not p.exists():
        raise MoepruneError(f"model directory {p} does not exist")
    raw = read_config_dict(p)
    if CONFIG_KEY not in raw:
        return load_model(p, device=device, dtype=dtype)
    return load_novice_model(p, device=device, dtype=dtype)


def checkpoint_parameters(path: str | Path) -> dict:
    """Parameter counts of a checkpoint directory from its config alone (a meta-device model), novices
    included."""
    from moeprune.store.budget import budget_skeleton, is_budget_checkpoint
    from moeprune.store.novices import CONFIG_KEY, config_from_dict, novice_file_counts, stock_config_dict

    p = Path(path)
    if is_budget_checkpoint(p):
        return {**parameter_counts(budget_skeleton(p)), "novices": 0}
    raw = read_config_dict(p)
    section = raw.get(CONFIG_KEY)
    config = config_from_dict(stock_config_dict(raw) if section else raw)
    with torch.device("meta"):
        meta = compat.model_class(config)[1]._from_config(config)
    counts = parameter_counts(meta)
    counts["novices"] = 0
    if section:
        vectors, router = novice_file_counts(p, section)
        counts["novices"] = vectors
        counts["other"] += router
        counts["total"] += vectors + router
    return counts


def _kept_router_ids(path: Path, section: dict) -> dict[int, list[int]]:
    """{layer: the kept experts' router ids in the order the stock part stores them} of a novice
    checkpoint, from its routing maps."""
    from safetensors import safe_open

    from moeprune.store.novices import NOVICE_FILE

    kept_count = int(section["num_experts_kept"])
    out = {}
    with safe_open(str(path / section.get("file", NOVICE_FILE)), framework="pt") as f:
        for i in section["novice_layers"]:
            expert_map = f.get_tensor(f"layer.{i}.expert_map").long()  # [E] router id -> slot
            out[int(i)] = expert_map.argsort()[:kept_count].tolist()
    return out


def stock_group_problem(kept: dict[int, list[int]], num_experts: int, n_group: int, topk_group: int,
                        top_k: int, min_per_group: int) -> str | None:
    """Why a stock router with the same group-limited routing (n_group contiguous groups, topk_group of
    them, top-k) cannot route over these kept experts (`kept`: router ids in stored order), or None.

    A stock router splits its E_kept rows into n_group contiguous groups of E_kept / n_group, so every
    routing group must keep the same number (at least the `min_per_group` its score reads), stored in
    group order, and the `topk_group` selected groups must still hold top-k experts.
    """
    per_in = num_experts // n_group
    for i, ids in sorted(kept.items()):
        counts = [sum(1 for e in ids if e // per_in == g) for g in range(n_group)]
        if len(set(counts)) > 1 or counts[0] < min_per_group:
            return (f"layer {i} keeps {', '.join(map(str, counts))} experts in its {n_group} routing groups, "
                    f"but a stock group-limited router needs the same number in each (at least "
                    f"{min_per_group})")
        per_out = counts[0]
        if topk_group * per_out < top_k:
            return (f"layer {i} keeps {per_out} experts per routing group, so the {topk_group} groups a "
                    f"token may use hold fewer than its top-{top_k}")
        if any(e // per_in != j // per_out for j, e in enumerate(ids)):
            return f"layer {i} stores its kept experts out of routing-group order"
    return None


def _stock_groups(src: Path, section: dict, stock: dict, flatten_groups: bool) -> tuple[str | None, bool]:
    """Decide the group-limited routing of a novice checkpoint's stock copy, editing `stock` (its config
    dict) when flattening: (the model card's note, None without group-limited routing; flattened?)."""
    from moeprune.store.novices import config_from_dict, config_path_parent, sub_config_path

    adapter = get_adapter(config_from_dict(stock))
    n_group = adapter.n_group
    if n_group <= 1:
        return None, False
    topk_group = int(getattr(adapter.config, "topk_group", 1) or 1)
    problem = stock_group_problem(_kept_router_ids(src, section), int(section["num_experts"]), n_group,
                                  topk_group, adapter.top_k, adapter.min_experts_per_group)
    if problem is None:
        per_out = int(section["num_experts_kept"]) // n_group
        return (f"**Group-limited routing kept:** n_group = {n_group}, topk_group = {topk_group}; every "
                f"routing group keeps {per_out} experts"), False
    if not flatten_groups:
        raise MoepruneError(
            f"{src}: {problem}, so its stock copy cannot keep group-limited routing (n_group={n_group}); "
            "pass --flatten-groups to export it routing without groups (its routing then differs), or "
            "prune again with --option within_groups=true"
        )
    prefix = sub_config_path(adapter.full_config, adapter.config)
    names = type(adapter.config).attribute_map
    for field in ("n_group", "topk_group"):
        owner, _ = config_path_parent(stock, f"{prefix}{field}")
        stored = names.get(field, field)  # the key config.json uses (Kimi-Linear: num_expert_group)
        for key in [k for k in dict.fromkeys((field, stored)) if k in owner] or [stored]:
            owner[key] = 1
    if get_adapter(config_from_dict(stock)).n_group != 1:  # the written config must say what the card says
        raise MoepruneError(f"{src}: could not turn group-limited routing off in the stock config")
    return (f"Routing groups flattened because {problem} (the novice model routes with n_group = {n_group}, "
            f"topk_group = {topk_group})"), True


def export_stock(
    path: str | Path, out: str | Path, *, force: bool = False, command: str | None = None,
    flatten_groups: bool = False,
) -> Path:
    """Write the novice-free variant of a novice checkpoint: plain pruning of the same experts.

    The novices' router rows go, so their tokens route to the next-best kept experts. Nothing is
    loaded: the stock part of the checkpoint is copied, config.json gets back an integer expert
    count, and the plan and model card say what was exported.

    Group-limited routing (n_group > 1) is kept when every routing group kept the same number of
    experts, enough for the group score and top-k (MoNE with `within_groups=true` does); otherwise the
    export is refused, or with `flatten_groups` written with n_group = topk_group = 1.
    """
    from moeprune.plan import Plan
    from moeprune.store.novices import CONFIG_KEY, NOVICE_FILE, stock_config_dict

    src = Path(path)
    if not src.is_dir():
        raise MoepruneError(f"model directory {src} does not exist")
    raw = read_config_dict(src)
    from moeprune.store.budget import CONFIG_KEY as BUDGET_KEY
    from moeprune.store.budget import NO_STOCK

    if BUDGET_KEY in raw:
        raise MoepruneError(f"{src} cannot be exported to a stock checkpoint: {NO_STOCK}")
    if CONFIG_KEY not in raw:
        raise MoepruneError(f"{src} has no novices: it is already a stock checkpoint")
    section = raw[CONFIG_KEY]
    stock = stock_config_dict(raw)
    groups_note, flattened = _stock_groups(src, section, stock, flatten_groups)
    check_output_dir(out, force, inputs=(src,))
    before = checkpoint_parameters(src)
    before["bytes"] = weights_bytes(src)
    skip = {section.get("file", NOVICE_FILE), "config.json", "README.md", "moeprune_plan.json"}
    with atomic_directory(out, force=force) as tmp:
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name not in skip:
                shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(stock, indent=2, sort_keys=True) + "\n")
        tf.AutoConfig.from_pretrained(str(tmp))  # the stock config must load as is
        after = checkpoint_parameters(tmp)
        after["bytes"] = weights_bytes(tmp)
        if (src / "moeprune_plan.json").is_file():
            plan = Plan.load(src / "moeprune_plan.json")
            for lp in plan.layers:
                if lp.novices:
                    lp.notes["novices_exported_as_pruned"] = list(lp.novices)
                    lp.notes.pop("novice_vectors", None)
                    lp.novices = []
            plan.flatten_groups = plan.flatten_groups or flattened
            plan.save(tmp / "moeprune_plan.json")
            card = model_card(
                source=str(src),
                plan=plan,
                before=before,
                after=after,
                command=command,
                loads_with=loader_name(src),
                notes=[
                    (
                        f"**Exported without novices** from the MoNE checkpoint `{src}`: the novices' "
                        "router rows are removed, so this is plain pruning of the same experts."
                    )
                ] + ([groups_note] if groups_note else []),
            )
            (tmp / "README.md").write_text(card)
    return Path(out)
