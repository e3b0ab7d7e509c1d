"""Checkpoints whose MoE layers keep different expert counts (`--budget global`): the format and loading.

A stock config holds one routed-expert count for every layer, so neither transformers nor vLLM can
build a model whose layers keep different counts. Such a checkpoint is written as the pipeline
writes any other (each layer's tensors in the original key layout, with their real shapes), its
config.json records the largest count, and a `moeprune_budget` section records every layer's count
and the real `model_type`. As for novice checkpoints (`moeprune.store.novices`), the advertised
`model_type` is one transformers does not know and that says how to load it, so `AutoConfig` (and
everything built on it) refuses the checkpoint with a ValueError quoting that sentence rather
than failing on a shape or, worse, loading something else.

`moeprune.from_pretrained` builds the family's model from the stock config with the largest count
on the meta device, slices each MoE block down to its own count (surgery, on meta tensors: no
memory), then loads the shards through transformers' own key conversion.

No stock export: padding every layer to the largest count with never-routed experts needs a router
row that is never selected, which a bias-free softmax router (Mixtral, Qwen, OLMoE, ...) cannot
guarantee for every input; and a -inf correction bias would turn group scores of DeepSeek-style
routers into -inf/NaN. So this format is the only exact one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from moeprune import compat
from moeprune.arch import get_adapter
from moeprune.errors import MoepruneError
from moeprune.store.files import checkpoint_dtype, read_config_dict, weight_map

CONFIG_KEY = "moeprune_budget"
FORMAT_VERSION = 1
NO_STOCK = ("its MoE layers keep different expert counts, and a stock config holds one; padding the smaller "
            "layers with never-routed experts is not exact (a bias-free softmax router can select any row), "
            "so there is no stock copy: load it with moeprune.from_pretrained, or prune with --budget "
            "uniform")


def _refusal(model_type: str) -> str:
    """The `model_type` a budget checkpoint advertises: transformers quotes it when it refuses to load."""
    return (f"{model_type}+moeprune-budget`\n\n"
            "    This checkpoint was written by moeprune with a different expert count per MoE layer "
            "(--budget global), which a stock config cannot describe: load it with "
            "moeprune.from_pretrained(path).\n"
            "    Upgrading transformers, as suggested below, will not help.\n\n`")


def is_budget_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and CONFIG_KEY in read_config_dict(p)


def write_budget_section(directory: str | Path, plan, *, count_field: str) -> None:
    """Turn a freshly written checkpoint's config.json (holding the largest count) into a budget one."""
    d = Path(directory)
    cfg = json.loads((d / "config.json").read_text())
    cfg[CONFIG_KEY] = {
        "format": FORMAT_VERSION,
        "model_type": cfg["model_type"],
        "architectures": cfg.get("architectures"),
        "count_field": count_field,
        "num_experts": plan.num_experts_in,
        "num_experts_max": plan.num_experts_out,
        "experts_per_layer": {str(lp.layer): lp.num_experts_out for lp in plan.layers},
        "note": "each MoE layer keeps its own expert count; config.json's count is the largest",
    }
    cfg["model_type"] = _refusal(cfg["model_type"])
    cfg["architectures"] = ["MoepruneBudgetCheckpoint"]
    (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _section(raw: dict) -> dict:
    section = raw[CONFIG_KEY]
    if section.get("format") != FORMAT_VERSION:
        raise MoepruneError(f"budget checkpoint format {section.get('format')!r} is not supported "
                            f"(expected {FORMAT_VERSION}); upgrade moeprune")
    return section


def budget_config(path: str | Path):
    """The stock config of a budget checkpoint (the largest count) and its per-layer counts {layer: count}."""
    from moeprune.store.novices import config_from_dict, set_path

    raw = read_config_dict(path)
    section = _section(raw)
    d = {k: v for k, v in raw.items() if k != CONFIG_KEY}
    d["model_type"] = section["model_type"]
    if section.get("architectures") is not None:
        d["architectures"] = section["architectures"]
    set_path(d, section["count_field"], int(section["num_experts_max"]))
    counts = {int(k): int(v) for k, v in section["experts_per_layer"].items()}
    return config_from_dict(d), counts


def budget_skeleton(path: str | Path, dtype: str | torch.dtype = "auto") -> nn.Module:
    """The family's model on the meta device with each MoE layer sliced to its recorded count."""
    from accelerate import init_empty_weights

    from moeprune.plan import Group, LayerPlan
    from moeprune.surgery import apply_layer_plan

    config, counts = budget_config(path)
    with init_empty_weights():  # parameters on the meta device, buffers (RoPE frequencies) real
        model = compat.model_class(config)[1]._from_config(
            config, dtype=checkpoint_dtype(config, dtype, Path(path)))
    model.eval()
    adapter = get_adapter(model.config)
    blocks = adapter.moe_blocks(model)
    if set(counts) != set(blocks):
        raise MoepruneError(f"{path}: the budget section names MoE layers {sorted(counts)}, but the model "
                            f"has {sorted(blocks)}; the checkpoint is damaged")
    E = adapter.num_experts
    for i, r in sorted(counts.items()):
        if not 1 <= r <= E:
            raise MoepruneError(f"{path}: layer {i} keeps {r} experts, outside [1, {E}]; the checkpoint is "
                                "damaged")
        if r < E:  # the first r: which experts they were is in the plan; on disk they are numbered 0..r-1
            apply_layer_plan(adapter, blocks[i], LayerPlan(i, E, [Group([e], [1.0]) for e in range(r)]))
    return model


@torch.no_grad()
def load_budget_model(path: str | Path, *, device: str = "cpu",
                      dtype: str | torch.dtype = "auto") -> nn.Module:
    """Load a budget checkpoint in eval mode: the skeleton with per-layer counts, then every shard."""
    from moeprune.runtime import quiet_transformers

    p = Path(path)
    model = budget_skeleton(p, dtype)
    conversion = compat.conversion_mapping(model)
    files = weight_map(p)
    handles = {f: safe_open(str(p / f), framework="pt") for f in set(files.values())}
    state = {k: handles[f].get_slice(k) for k, f in files.items()}
    with quiet_transformers():
        info = compat.load_converted(model, state, conversion)
    bad = sorted(set(info.unexpected_keys)
                 | {k[0] if isinstance(k, tuple) else k for k in info.mismatched_keys})
    if bad or info.conversion_errors:
        detail = bad[0] if bad else next(iter(info.conversion_errors.values()))
        raise MoepruneError(f"{p}: could not load {detail} into the model; the checkpoint does not match its "
                            "per-layer expert counts")
    for name, t in list(model.named_parameters()):  # views of the mapped shards: own the memory
        if not t.is_meta:
            owner, _, leaf = name.rpartition(".")
            owned = nn.Parameter(t.detach().clone(), requires_grad=False)
            model.get_submodule(owner)._parameters[leaf] = owned
    model.tie_weights()  # a tied lm_head is not on disk: share the embeddings, as from_pretrained does
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise MoepruneError(f"{p} has no weights for {len(missing)} tensors (e.g. {missing[0]}); the "
                            "checkpoint is incomplete")
    return model.to(device).eval()
