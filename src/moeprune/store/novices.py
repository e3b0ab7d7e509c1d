"""Novice (MoNE) checkpoints on disk: the format, and the in-memory novices to and from it.

On disk a novice checkpoint is the stock checkpoint of plain pruning (router rows and experts of the
kept experts, written by `save_pretrained` in the original key layout) plus `moeprune_novices.safetensors`
(per layer: the routing map, the novice vectors and the novices' router rows, and for low-rank novices
their factors `novice_u`, `novice_v` [n, H, r]; such a file is format 2, which older moeprune refuses
rather than load constant novices in their place). `config.json` holds
a `moeprune_novice` section with the real `model_type` and `architectures`, and advertises a
`model_type` that transformers does not know and that reads "load it with moeprune.from_pretrained".
`AutoConfig` (so `AutoModelForCausalLM`, and engines that read configs through it) then refuses the
checkpoint with a ValueError quoting that sentence, instead of silently loading the plain-pruned
model; `AutoTokenizer` catches exactly that ValueError and falls back to a generic config, so the
tokenizer still loads stock. (A non-integer expert count also refuses, through strict config
validation, but its error is not a ValueError and breaks `AutoTokenizer` too.)

The novices in memory are `moeprune.surgery.novices`'s. `moeprune.store.checkpoint` holds what
builds on ordinary checkpoints too: `from_pretrained` (novice or stock), `export_stock` (the
plain-pruned model as a stock checkpoint, without loading any weights), `checkpoint_parameters`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moeprune import compat
from moeprune.arch import get_adapter
from moeprune.arch.base import has_low_rank_novices, novice_parameter_count
from moeprune.errors import MoepruneError
from moeprune.store.files import read_config_dict
from moeprune.surgery.novices import (
    detach_novices,
    has_novices,
    novice_blocks,
    novice_refusal,
    novice_router_names,
    reattach_novices,
)

NOVICE_FILE = "moeprune_novices.safetensors"
CONFIG_KEY = "moeprune_novice"
FORMAT_VERSION = 1  # constant novices
LOW_RANK_FORMAT = 2  # with low-rank novices' factors
FORMATS = (FORMAT_VERSION, LOW_RANK_FORMAT)


def describe(model: nn.Module) -> dict | None:
    """Novice facts of an in-memory model (None when it has none), for `inspect` and the model card."""
    adapter = get_adapter(model.config)
    blocks = novice_blocks(model, adapter)
    if not blocks:
        return None
    per_layer = {i: int(adapter.experts(b).novice_vectors.shape[0]) for i, b in blocks.items()}
    kept = {int(adapter.experts(b).down_proj.shape[0]) for b in blocks.values()}
    return {
        "router_experts": adapter.num_experts,
        "experts_kept": min(kept) if len(kept) == 1 else sorted(kept),
        "novices_per_layer": per_layer,
        "novice_parameters": sum(novice_parameter_count(adapter.experts(b)) for b in blocks.values()),
    } | ({"novice_rank": {i: int(adapter.experts(b).novice_u.shape[2]) for i, b in blocks.items()
                          if has_low_rank_novices(adapter.experts(b))}}
         if any(has_low_rank_novices(adapter.experts(b)) for b in blocks.values()) else {})


def _refusal(model_type: str) -> str:
    """The `model_type` a novice checkpoint advertises: transformers quotes it when it refuses the checkpoint.

    Its error reads "has model type `<this>` but Transformers does not recognize this architecture"
    and then suggests upgrading transformers; the line breaks put the way out on lines of its own
    before that advice.
    """
    return (f"{model_type}+moeprune-novices`\n\n"
            "    This is a MoNE checkpoint written by moeprune: load it with moeprune.from_pretrained(path), "
            "or write a stock copy with `moeprune export-stock PATH --out DIR`.\n"
            "    Upgrading transformers, as suggested below, will not help.\n\n`")


@contextlib.contextmanager
def _transformers_quiet():
    """transformers' warnings and progress bars off inside the block; the caller's settings back after.

    Loading a novice checkpoint's stock part goes through paths that warn about the advertised
    `model_type` and draw a weight-loading bar, neither of which means anything here.
    """
    logging = tf.utils.logging
    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def is_novice_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and CONFIG_KEY in read_config_dict(p)


def novice_config(path: str | Path):
    """The config of a novice checkpoint as its loaded model holds it: the expert count is the router's E."""
    raw = read_config_dict(path)
    section = raw[CONFIG_KEY]
    d = stock_config_dict(raw)
    set_path(d, section["count_field"], int(section["num_experts"]))
    return config_from_dict(d)


def sub_config_path(config, target) -> str | None:
    """The dotted attribute path from `config` to its sub-config `target` ("" for itself, "text_config."
    for a vision-language model's text config), None when `target` is not inside it."""
    if config is target:
        return ""
    for key, value in vars(config).items():
        if isinstance(value, tf.PretrainedConfig):
            found = sub_config_path(value, target)
            if found is not None:
                return f"{key}.{found}"
    return None


def count_path(config) -> str:
    """Where config.json holds the routed-expert count: the adapter's field inside the text config
    (`text_config.n_routed_experts` for Kimi-K2.5, `n_routed_experts` for DeepSeek-V3)."""
    adapter = get_adapter(config)
    prefix = sub_config_path(config, adapter.config)
    if prefix is None:
        raise MoepruneError(f"the {adapter.family} text config is not part of the model's config")
    return prefix + adapter.count_field


def config_path_parent(d: dict, path: str) -> tuple[dict, str]:
    """(the dict holding the last key of the dotted `path` in the config dict `d`, that key)."""
    *parents, leaf = path.split(".")
    for key in parents:
        if not isinstance(d.get(key), dict):
            raise MoepruneError(f"config.json has no {'.'.join(parents)} section, where the novice "
                                f"checkpoint says {leaf} is; the checkpoint is damaged")
        d = d[key]
    return d, leaf


def set_path(d: dict, path: str, value) -> None:
    """Set the dotted `path` of the nested config dict `d` (a flat key without dots)."""
    owner, leaf = config_path_parent(d, path)
    owner[leaf] = value


def refuse_novice_input(path: str | Path | None = None, model: nn.Module | None = None,
                        action: str = "prune") -> None:
    """Refuse to observe or prune a model that already has novices (its experts no longer match its
    router)."""
    on_disk = path is not None and Path(path).is_dir() and is_novice_checkpoint(path)
    if on_disk or (model is not None and has_novices(model)):
        raise novice_refusal(f"{path} is" if path is not None else "this model is", action)


def stock_config_dict(d: dict) -> dict:
    """config.json of a novice checkpoint -> the stock config of its plain-pruned part (E_kept experts)."""
    d = dict(d)
    section = d.pop(CONFIG_KEY)
    if section.get("format") not in FORMATS:
        raise MoepruneError(f"novice checkpoint format {section.get('format')!r} is not supported "
                            f"(expected one of {', '.join(map(str, FORMATS))}); upgrade moeprune")
    d["model_type"] = section["model_type"]
    if section.get("architectures") is not None:
        d["architectures"] = section["architectures"]
    set_path(d, section["count_field"], int(section["num_experts_kept"]))
    return d


def config_from_dict(d: dict):
    model_type = d.get("model_type")
    cls = compat.config_class(model_type)
    if cls is None:
        raise MoepruneError(f"unknown model_type {model_type!r} in config.json")
    try:
        return cls.from_dict(compat.decode_config_floats(d))
    except Exception as e:  # noqa: BLE001  (transformers raises many kinds; one line says which)
        raise MoepruneError(f"could not build the {model_type} config ({type(e).__name__}: {e})")


def save_pretrained(model: nn.Module, directory: str | Path) -> None:
    """Write `model` to `directory`: `save_pretrained` as is when it has no novices, else the novice format.

    The novice format is the plain-pruned stock checkpoint (router rows of the kept experts only) plus
    `moeprune_novices.safetensors` and a `moeprune_novice` section in config.json, whose advertised
    `model_type` is a refusal, so that stock model loaders fail loudly instead of loading the wrong model.
    """
    d = Path(directory)
    adapter = get_adapter(model.config)
    blocks = novice_blocks(model, adapter)
    if not blocks:
        model.save_pretrained(str(d))
        return
    E = adapter.num_experts
    kept_counts = {int(adapter.experts(b).down_proj.shape[0]) for b in blocks.values()}
    if len(kept_counts) != 1:
        raise MoepruneError(
            f"MoE layers keep different expert counts {sorted(kept_counts)}; a checkpoint holds one"
        )
    kept_count = kept_counts.pop()
    if len(blocks) != len(adapter.moe_blocks(model)):
        raise MoepruneError(
            "some MoE layers have novices and others not; a checkpoint holds one expert count"
        )
    tensors: dict[str, torch.Tensor] = {}
    restore = []
    # the count lives in the text config, which a vision-language model's config nests
    count_field = count_path(model.config)
    try:
        for i, block in sorted(blocks.items()):
            layer_tensors, undo = detach_novices(adapter, block, i)
            tensors.update(layer_tensors)
            restore.append(undo)
        adapter.write_num_experts(adapter.config, kept_count)
        model.save_pretrained(str(d))
    finally:
        for undo in restore:
            undo()
        adapter.write_num_experts(adapter.config, E)
    write_novice_file(d, tensors, count_field=count_field, num_experts=E, kept_count=kept_count,
                      layers=sorted(blocks))


def write_novice_file(
    directory: Path, tensors: dict[str, torch.Tensor], *, count_field: str, num_experts: int, kept_count: int,
    layers: list[int],
) -> None:
    """Write the novice file next to a stock checkpoint of the kept experts and turn its config.json into a
    novice one."""
    d = Path(directory)
    version = LOW_RANK_FORMAT if any(k.endswith(".novice_u") for k in tensors) else FORMAT_VERSION
    save_file(tensors, str(d / NOVICE_FILE), metadata={"format": "moeprune-novices", "version": str(version)})
    cfg = json.loads((d / "config.json").read_text())
    cfg[CONFIG_KEY] = {
        "format": version,
        "file": NOVICE_FILE,
        "model_type": cfg["model_type"],
        "architectures": cfg.get("architectures"),
        "count_field": count_field,
        "num_experts": num_experts,
        "num_experts_kept": kept_count,
        "novice_layers": layers,
        "note": "router keeps all num_experts rows; tokens routed to a novice get gate * novice vector"
        + (" (low-rank: gate * (vector + novice_u @ novice_v^T x))" if version == LOW_RANK_FORMAT else ""),
    }
    cfg["model_type"] = _refusal(cfg["model_type"])
    cfg["architectures"] = ["MoepruneNoviceCheckpoint"]
    (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def _install_from_file(model: nn.Module, path: Path, section: dict) -> None:
    adapter = get_adapter(model.config)
    E, kept_count = int(section["num_experts"]), int(section["num_experts_kept"])
    blocks = adapter.moe_blocks(model)
    with safe_open(str(path / section.get("file", NOVICE_FILE)), framework="pt") as f:
        keys = set(f.keys())
        for i in section["novice_layers"]:
            if i not in blocks:
                raise MoepruneError(f"{path}: the novice file names layer {i}, which is not an MoE layer")
            block = blocks[i]
            rows = {}
            for dotted in novice_router_names(adapter, block):
                key = f"layer.{i}.router.{dotted}"
                if key not in keys:
                    raise MoepruneError(f"{path}: {NOVICE_FILE} lacks {key}; the checkpoint is incomplete")
                rows[dotted] = f.get_tensor(key)
            factors = [f"layer.{i}.novice_u", f"layer.{i}.novice_v"]
            present = [k in keys for k in factors]
            if any(present) and not all(present):
                raise MoepruneError(f"{path}: {NOVICE_FILE} holds only one of {' and '.join(factors)}; the "
                                    "checkpoint is incomplete")
            low_rank = tuple(f.get_tensor(k) for k in factors) if all(present) else None
            reattach_novices(adapter, block, f.get_tensor(f"layer.{i}.expert_map").long(),
                             f.get_tensor(f"layer.{i}.novice_vectors"), rows, low_rank)
    adapter.set_config_num_experts(model, kept_count, E)


def load_novice_model(
    path: str | Path, *, device: str = "cpu", dtype: str | torch.dtype = "auto"
) -> nn.Module:
    """Load a novice checkpoint in eval mode, reproducing the in-memory pruned model exactly.

    Its plain-pruned part loads through transformers; then the novices' router rows go back and the
    novices are attached (`moeprune.surgery.novices.reattach_novices`).
    """
    p = Path(path)
    raw = read_config_dict(p)
    section = raw[CONFIG_KEY]
    if not (p / section.get("file", NOVICE_FILE)).is_file():
        raise MoepruneError(f"{p} is a novice checkpoint but {section.get('file', NOVICE_FILE)} is missing")
    config = config_from_dict(stock_config_dict(raw))
    get_adapter(config)
    try:
        with _transformers_quiet():
            model, info = compat.model_class(config)[1].from_pretrained(str(p), config=config, dtype=dtype,
                                                                  output_loading_info=True, device_map=None)
    except Exception as e:  # noqa: BLE001  (transformers raises many kinds; one line says which)
        raise MoepruneError(
            f"could not load the weights of {p} ({type(e).__name__}: {str(e).splitlines()[0]})"
        )
    bad = list(info.get("missing_keys", [])) + [k[0] if isinstance(k, tuple) else k
                                                for k in info.get("mismatched_keys", [])]
    if bad:
        raise MoepruneError(f"{p} is missing or has mis-shaped weights ({len(bad)}, e.g. {min(bad)})")
    _install_from_file(model, p, section)
    return model.to(device).eval()


def novice_file_counts(path: Path, section: dict) -> tuple[int, int]:
    """(novice elements: vectors and low-rank factors, novice router elements) stored in a checkpoint's
    novice file."""
    vectors = router = 0
    with safe_open(str(path / section.get("file", NOVICE_FILE)), framework="pt") as f:
        names = list(f.keys())
        for k in names:
            n = 1
            for s in f.get_slice(k).get_shape():
                n *= s
            if k.endswith((".novice_vectors", ".novice_u", ".novice_v")):
                vectors += n
            elif ".router." in k:
                router += n
    return vectors, router
