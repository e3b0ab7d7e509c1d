"""Loading inputs and writing outputs: checked model loading, atomic checkpoint writing, model card.

Outputs are written into a temporary sibling directory and renamed into place at the end, so a
failure never leaves a half-written checkpoint. The input model directory is only ever read.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers as tf
from torch import nn

from moeprune.arch import Adapter, get_adapter
from moeprune.errors import MoepruneError

# Files of a model directory that loaders read besides weights and config: carried over to the output.
SIDE_FILES = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json", "*.model",
              "*.tiktoken", "chat_template*", "generation_config.json", "preprocessor_config.json")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def load_config(path: str | Path):
    """The transformers config of a model directory, with a clear error when it is not one."""
    p = Path(path)
    if not p.exists():
        raise MoepruneError(f"model directory {p} does not exist")
    if not (p / "config.json").is_file():
        raise MoepruneError(f"{p} is not a model directory: it has no config.json")
    from moeprune.novice import is_novice_checkpoint, novice_config

    if is_novice_checkpoint(p):  # its config.json refuses stock loading on purpose
        return novice_config(p)
    try:
        return tf.AutoConfig.from_pretrained(str(p))
    except Exception as e:
        raise MoepruneError(f"could not read {p}/config.json ({_one_line(e)})")


def load_model(path: str | Path, *, device: str = "cpu", dtype: str | torch.dtype = "auto") -> nn.Module:
    """Load a causal LM and refuse checkpoints with missing or mismatched weights.

    MoNE checkpoints (with novices) load through `moeprune.novice.from_pretrained`.
    """
    from moeprune.novice import from_pretrained, is_novice_checkpoint

    if is_novice_checkpoint(path):
        return from_pretrained(path, device=device, dtype=dtype)
    config = load_config(path)
    get_adapter(config)  # unsupported families fail before any weight is read
    try:
        model, info = tf.AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, output_loading_info=True, device_map=None
        )
    except Exception as e:
        raise MoepruneError(f"could not load the weights of {path} ({_one_line(e)}); is the checkpoint complete?")
    bad = list(info.get("missing_keys", [])) + [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])]
    if bad:
        raise MoepruneError(f"{path} is missing or has mis-shaped weights ({len(bad)}, e.g. {sorted(bad)[0]}); "
                            "the checkpoint is incomplete or does not match its config")
    return model.to(device).eval()


def check_weight_files(path: str | Path) -> None:
    """Read the header of every safetensors file of a model directory (cheap), so a truncated or corrupt
    download fails before any expensive work."""
    from safetensors import safe_open

    for f in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            raise MoepruneError(f"could not read the weights of {path}: {f.name} is damaged ({_one_line(e)}); "
                                "is the checkpoint complete?")


def load_tokenizer(path: str | Path):
    try:
        return tf.AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise MoepruneError(f"no usable tokenizer in {path} ({_one_line(e)}); pass --tokenizer PATH")


def check_output_dir(out: str | Path, force: bool, inputs: tuple[str | Path, ...] = ()) -> Path:
    """Refuse an existing non-empty output directory unless `force`, and never an input directory."""
    o = Path(out).resolve()
    for src in inputs:
        s = Path(src).resolve()
        if o.is_relative_to(s) or s.is_relative_to(o):
            raise MoepruneError(f"output {out} would overwrite or sit inside the input {src}; choose another --out")
    if o.exists() and (not o.is_dir() or any(o.iterdir())) and not force:
        raise MoepruneError(f"output {out} already exists and is not empty; pass --force to replace it")
    return o


@contextmanager
def atomic_directory(out: str | Path, force: bool = False):
    """Yield a temporary directory next to `out`; on success it replaces `out` in one rename."""
    o = Path(out).resolve()
    o.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{o.name}.tmp-", dir=o.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if o.exists():
        if not force and (not o.is_dir() or any(o.iterdir())):
            shutil.rmtree(tmp, ignore_errors=True)
            raise MoepruneError(f"output {out} appeared while working; pass --force to replace it")
        old = o.parent / f".{o.name}.old-{os.getpid()}"
        o.rename(old)
    tmp.rename(o)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


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
    """Parameters in routed experts, novices (MoNE vectors, stored as buffers) and the rest.

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
        vectors = adapter.experts(block)._buffers.get("novice_vectors")
        novices += vectors.numel() if vectors is not None else 0
    return {"total": total + novices, "routed_experts": routed, "novices": novices, "other": total - routed}


def model_card(*, source: str, plan, before: dict, after: dict, command: str | None = None,
               notes: list[str] | None = None) -> str:
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
        f" (top-k {plan.model.get('top_k')} unchanged)",
    ]
    if n_novices:
        kinds = {lp.notes.get("novice_vectors", "out_mean") for lp in plan.layers if lp.novices}
        never = {lp.layer: lp.notes["never_routed"] for lp in plan.layers if lp.notes.get("never_routed")}
        lines.append(
            f"- **Novices:** {n_novices} per MoE layer. The router keeps all {plan.num_experts_in} rows and its top-k; "
            "a token routed to a novice gets gate × novice vector, where the vector is "
            + ("zero (the no-novice ablation)" if kinds == {"zero"} else "the expert's mean output on the calibration data")
            + (f"; never routed on the calibration data, so zero: {never}" if never else ""))
    lines += [f"- {n}" for n in notes or []]
    if plan.flatten_groups:
        lines.append("- **Group-limited routing flattened:** n_group = topk_group = 1")
    if cal:
        lines.append(
            f"- **Calibration:** `{cal.get('source')}`, {cal.get('samples', cal.get('sequences'))} sequences × "
            f"{cal.get('seq_len')} tokens = {cal.get('tokens')} tokens, seed {cal.get('seed')}, "
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
        rows.append(("novices", "novice vectors"))
    rows += [("other", "everything else"), ("bytes", "bytes on disk (weights)")]
    for key, label in rows:
        b, a = before.get(key), after.get(key)
        if b is None or a is None:
            continue
        change = f"{100 * (a - b) / b:+.1f}%" if b else "—"
        lines.append(f"| {label} | {b:,} | {a:,} | {change} |")
    head = "| layer | kept / merged groups | novices | removed |" if n_novices else "| layer | kept / merged groups | removed |"
    lines += ["", "## Experts per layer", "", head, "|---:|---|---|---|" if n_novices else "|---:|---|---|"]
    for lp in plan.layers:
        groups = " ".join("+".join(map(str, g.members)) if len(g.members) > 1 else str(g.members[0])
                          for g in lp.groups)
        novice_cell = f" {' '.join(map(str, lp.novices)) or '—'} |" if n_novices else ""
        lines.append(f"| {lp.layer} | {groups} |{novice_cell} {' '.join(map(str, lp.dropped)) or '—'} |")
    lines += ["", "Expert ids are the input model's. The full plan is in `moeprune_plan.json`."]
    if n_novices:
        lines += [("This checkpoint holds novices, which stock transformers cannot run (its config says so and "
                   "refuses to load): load it with `moeprune.from_pretrained(path)`. "
                   "`moeprune export-stock PATH --out DIR` writes a stock copy without novices (plain pruning)."), ""]
    else:
        lines += ["This checkpoint loads with `transformers.AutoModelForCausalLM.from_pretrained` and no extra code.", ""]
    return "\n".join(lines)


def save_checkpoint(model: nn.Module, out: str | Path, *, source: str, plan, before: dict,
                    force: bool = False, command: str | None = None) -> Path:
    """Write the pruned model, tokenizer files, plan and model card to `out`, atomically.

    A model with novices (MoNE) is written in moeprune's novice format (`moeprune.novice.save_pretrained`).
    """
    from moeprune.novice import save_pretrained as save_weights

    after = parameter_counts(model)
    with atomic_directory(out, force=force) as tmp:
        save_weights(model, tmp)  # original per-expert key layout by default, as vLLM expects
        describe_output(tmp, source=source, plan=plan, before=before, after=after, command=command)
    return Path(out)


def describe_output(directory: Path, *, source: str, plan, before: dict, after: dict,
                    command: str | None = None) -> None:
    """Add the tokenizer files, the plan and the model card to a freshly written checkpoint directory."""
    from moeprune.novice import weights_bytes

    before = {**before, "bytes": before.get("bytes", weights_bytes(source))}
    after = {**after, "bytes": weights_bytes(directory)}
    copy_side_files(source, directory)
    plan.save(directory / "moeprune_plan.json")
    (directory / "README.md").write_text(model_card(source=source, plan=plan, before=before, after=after,
                                                    command=command))
