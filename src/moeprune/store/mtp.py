"""Multi-token-prediction (MTP) layers: carried to the output, routed experts reduced like the decoder's.

DeepSeek-V3 (and V3.2), GLM-4.5 and GLM-5, Qwen3-Next, Qwen3.5-MoE, EXAONE-MoE, Mellum, MiMo-V2 and
others (Bailing's hybrid, once that family is supported) ship one or more MTP layers next to the
decoder, which vLLM runs as a speculative-decoding draft. transformers builds no module for them
and drops their weights on load (`_keys_to_ignore_on_load_unexpected`), while the config still
announces them (`num_nextn_predict_layers`, `mtp_num_hidden_layers`, ...). On disk they take one of two forms:

- appended decoder layers, `{layers}{n}.` with n >= num_hidden_layers (DeepSeek-V3's
  `model.layers.61.*`, GLM-4.5's `model.layers.92.*`): a decoder layer (attention, routed and shared
  experts, router) plus `eh_proj`, `enorm`, `hnorm`, `shared_head.*` and sometimes `embed_tokens`;
- an `mtp` module, `mtp.layers.{m}.`, `mtp.{m}.` or `model.mtp.layers.{m}.` (Qwen3-Next, Qwen3.5,
  EXAONE-MoE, Mellum, MiMo-V2), with its own tensors outside the layers beside it (`mtp.fc`,
  `mtp.pre_fc_norm_*`, `mtp.norm`), copied as stored; routed experts there, outside a layer, are
  refused (they would stay unreduced against the config's count).

Only on-disk keys that land in no tensor of the model are taken for MTP keys, so a model tensor is
never one; any other such key is still refused by the checkpoint reader.

How an MTP layer's plan is chosen: transformers never runs an MTP layer, so its routing cannot be
observed on calibration data. The one rule implemented (no weight-only criterion for MTP layers yet):
each MTP layer takes the plan of the last MoE decoder layer, the one whose outputs it reads: the same
kept experts, or the same merge groups with the same coefficients (and alignment permutations), so
its expert count matches the one the config now gives. A plan with novices (MoNE) reduces the MTP
layer by plain pruning of the same kept experts: novice vectors are mean outputs of the decoder
layer's experts, meaningless for the MTP layer's, and the stock config counts the kept experts only.

How it is applied: the MTP layer's routed-expert and router tensors are renamed to the last MoE
decoder layer's on-disk names, loaded through transformers' own conversion into a weightless copy of
the model (`store.sharded.skeleton`), changed by the same `surgery.apply_layer_plan` the decoder
layers go through, turned back into on-disk names (`compat.on_disk_names`) and renamed back to the
MTP layer. Every other MTP tensor (eh_proj, norms, attention, shared experts, embed/head copies,
`mtp.fc`) is copied as stored, bit-identical. The layer-by-layer and in-memory paths both call this
on the checkpoint's files, so they write the same tensors; the output plan's `mtp` field and the model
card record which layers were carried and whose plan they took.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from moeprune import compat
from moeprune.errors import MoepruneError
from moeprune.plan import LayerPlan
from moeprune.runtime import quiet_transformers

# a path component `mtp` (`mtp.`, `model.mtp.`), then optionally the layer: `layers.{m}.` or `{m}.`
_MTP_MODULE = re.compile(r"^((?:[^.]+\.)*?mtp\.)((?:layers\.)?\d+\.)?")
HOW = ("transformers does not run MTP layers, so their routing cannot be observed: each takes the plan "
       "of the last MoE decoder layer (whose outputs it reads), with the same kept experts or merge "
       "groups; novices, if any, are pruned there")


@dataclass
class MtpLayout:
    """The MTP tensors of a checkpoint, by on-disk key."""

    layers: dict[str, list[str]] = field(default_factory=dict)  # layer prefix (`mtp.layers.0.`) -> keys
    other: list[str] = field(default_factory=list)  # MTP tensors outside a layer (`mtp.fc.weight`)
    decoder_prefix: str = ""  # on-disk prefix of the decoder layers (`model.layers.`)

    def __bool__(self) -> bool:
        return bool(self.layers or self.other)

    @property
    def keys(self) -> set[str]:
        return {k for ks in self.layers.values() for k in ks} | set(self.other)

    @property
    def num_shards(self) -> int:
        """Output shards the MTP tensors take: one per layer, one for the tensors outside them."""
        return len(self.layers) + (1 if self.other else 0)


def _decoder_prefixes(targets: dict[str, str], layer_prefix: str) -> set[str]:
    """On-disk prefixes of the decoder layers (`model.layers.`), read off the keys that land in them.

    An on-disk key of layer i holds i as its first all-digit path component.
    """
    found = set()
    for key, target in targets.items():
        if not target.startswith(layer_prefix):
            continue
        index = target[len(layer_prefix):].split(".", 1)[0]
        m = re.match(rf"^((?:[^.]+\.)*?){index}\.", key)
        if m and not any(part.isdigit() for part in m.group(1).split(".")):
            found.add(m.group(1))
    return found


def find_mtp(targets: dict[str, str], known, layer_prefix: str, num_layers: int) -> MtpLayout:
    """The MTP tensors among on-disk keys: `targets` maps each to its in-model name, `known` holds the
    model's tensor names, the decoder is `num_layers` layers under `layer_prefix` (in-model)."""
    unknown = sorted(k for k, t in targets.items() if t not in known)
    layout = MtpLayout()
    if not unknown:
        return layout
    prefixes = _decoder_prefixes(targets, layer_prefix)
    if len(prefixes) == 1:
        layout.decoder_prefix = next(iter(prefixes))
    for key in unknown:
        prefix = None
        for p in prefixes:
            index = key[len(p):].split(".", 1)[0] if key.startswith(p) else ""
            if index.isdigit() and int(index) >= num_layers:
                prefix = f"{p}{index}."
        m = _MTP_MODULE.match(key)
        if prefix is None and m:
            if m.group(2) is None:
                layout.other.append(key)
                continue
            prefix = m.group(1) + m.group(2)
        if prefix is not None:
            layout.layers.setdefault(prefix, []).append(key)
    experts = [k for k in layout.other if ".experts." in k]
    if experts:  # routed experts outside a layer would be written unreduced, against the config's count
        raise MoepruneError(
            f"the checkpoint's MTP tensor {experts[0]} holds routed experts outside an MTP layer "
            "(mtp.layers.N.), a layout moeprune cannot reduce; it is not supported yet"
        )
    if layout.layers and not layout.decoder_prefix:
        raise MoepruneError(
            f"the checkpoint holds MTP layers ({next(iter(layout.layers))}...) but its decoder layers' "
            f"on-disk names do not follow one pattern ({sorted(prefixes) or 'none found'}), so their "
            "experts cannot be matched; convert the checkpoint to the layout transformers saves"
        )
    return layout


def _expert_axis_names(model: nn.Module, adapter, layer_name: str, block: nn.Module) -> set[str]:
    """In-model names of the block's routed-expert tensors and router tensors along the expert axis."""
    wanted = {id(p) for p in adapter.expert_parameters(block).values()}
    wanted |= {id(getattr(owner, leaf)) for owner, leaf, _ in adapter.router_expert_tensors(block)}
    layer = model.get_submodule(layer_name.rstrip("."))
    return {layer_name + n for n, t in layer.state_dict(keep_vars=True).items() if id(t) in wanted}


class MtpCarrier:
    """Writes a checkpoint's MTP tensors, reduced with a decoder layer's plan (see the module docstring).

    `model` is the source's model (loaded or weightless), read for names only; the MTP layers take the
    plan of its last MoE layer. `skeleton()` builds a weightless copy of it (same config and dtype) to
    load the MTP experts into, once, on the first MTP layer with routed experts. Every MTP layer's
    routed experts and router are matched against that decoder layer's on disk (names and shapes, from
    the shard headers) here, so a mismatch fails before any weight is read.
    """

    def __init__(self, path: Path, weight_map: dict[str, str], layout: MtpLayout, model: nn.Module, skeleton):
        from moeprune.arch import decoder_layers, get_adapter

        self.path = Path(path)
        self.weight_map = weight_map
        self.layout = layout
        self._skeleton = skeleton
        adapter = get_adapter(model.config)
        blocks = adapter.moe_blocks(model)
        _, layer_prefix = decoder_layers(model)
        self.last = max(blocks)
        self.template = f"{layout.decoder_prefix}{self.last}."  # the last MoE layer's on-disk prefix
        self.wanted = _expert_axis_names(model, adapter, f"{layer_prefix}{self.last}.", blocks[self.last])
        conversion = compat.conversion_mapping(model)
        meta = model.state_dict()
        on_disk = [k for k in weight_map if k.startswith(self.template)]
        targets = compat.in_model_names(model, on_disk, conversion, meta)
        decoder = {k for k in on_disk if targets[k] in self.wanted}  # the template's expert-axis keys
        # per MTP layer: the template's on-disk name -> the MTP key, for the tensors along the expert axis
        self.moving: dict[str, dict[str, str]] = {}
        for prefix, keys in layout.layers.items():
            as_decoder = {self.template + k[len(prefix):]: k for k in keys}
            targets = compat.in_model_names(model, as_decoder, conversion, meta)
            self.moving[prefix] = {k: orig for k, orig in as_decoder.items() if targets[k] in self.wanted}
            self._check(prefix, self.moving[prefix], decoder)

    def _shape(self, key: str) -> list[int]:
        with safe_open(str(self.path / self.weight_map[key]), framework="pt") as f:
            return list(f.get_slice(key).get_shape())

    def _check(self, prefix: str, moving: dict[str, str], decoder: set[str]) -> None:
        """The MTP layer's expert-axis tensors are the decoder layer's (`decoder`, on-disk keys), by name and
        shape; or it has none (a dense MTP layer)."""
        if not moving:
            return
        for k, orig in sorted(moving.items()):
            if k not in decoder:
                raise MoepruneError(f"{self.path}: the MTP layer's {orig} has no counterpart in decoder "
                                    f"layer {self.last} ({k}); its experts cannot take that layer's plan")
            if self._shape(k) != self._shape(orig):
                raise MoepruneError(
                    f"{self.path}: the MTP layer's {orig} has shape {self._shape(orig)}, but decoder layer "
                    f"{self.last}'s {k} has {self._shape(k)}; its experts cannot take that layer's plan"
                )
        lacking = sorted(decoder - set(moving))
        if lacking:
            raise MoepruneError(
                f"{self.path}: the MTP layer {prefix} has routed experts but no "
                f"{prefix}{lacking[0][len(self.template):]}, which decoder layer {self.last} has; "
                "the checkpoint is incomplete"
            )

    def record(self, lp: LayerPlan | None) -> dict:
        """What the output plan records about the MTP layers (empty without any)."""
        if not self.layout:
            return {}
        rec = {"layers": sorted(self.layout.layers), "other_tensors": len(self.layout.other)}
        if lp is not None:
            rec.update(plan_from_layer=lp.layer, how=HOW)
            if lp.novices:
                rec["novices_pruned"] = list(lp.novices)
        return rec

    def _raw(self, keys: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.weight_map[k], []).append(k)
        for name, ks in sorted(by_file.items()):
            with safe_open(str(self.path / name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in ks})
        return out

    def shards(self, lp: LayerPlan | None) -> Iterator[dict[str, torch.Tensor]]:
        """One dict of on-disk tensors per MTP layer, then one of the MTP tensors outside the layers.

        `lp` is the plan of the last MoE decoder layer; None copies every MTP tensor as stored.
        """
        if lp is not None and lp.layer != self.last:
            raise ValueError(f"MTP layers take the plan of layer {self.last}, not {lp.layer}")
        model = None
        for prefix, keys in sorted(self.layout.layers.items()):
            moving = self.moving[prefix] if lp is not None else {}
            out = self._raw([k for k in keys if k not in set(moving.values())])
            if moving:
                if model is None:
                    model = self._skeleton()
                out.update(self._reduce(model, prefix, moving, lp))
            yield out
        if self.layout.other:
            yield self._raw(self.layout.other)

    def _reduce(self, model: nn.Module, prefix: str, moving: dict[str, str],
                lp: LayerPlan) -> dict[str, torch.Tensor]:
        """The MTP layer's expert-axis tensors after `lp`, in its on-disk names: loaded into the skeleton's
        layer `lp.layer` under that layer's names, changed by the surgery, named back."""
        from moeprune.arch import decoder_layers, get_adapter
        from moeprune.surgery import apply_layer_plan

        adapter = get_adapter(model.config)
        layers, layer_prefix = decoder_layers(model)
        L = lp.layer
        pristine = copy.deepcopy(layers[L])  # weightless: the template goes back to it afterwards
        block = adapter.moe_blocks(model)[L]
        out = {}
        try:
            handles, state = {}, {}
            for k, orig in moving.items():
                name = self.weight_map[orig]
                if name not in handles:
                    handles[name] = safe_open(str(self.path / name), framework="pt")
                state[k] = handles[name].get_slice(orig)  # read inside the loader, cast to the model's dtype
            with quiet_transformers():  # else the loader shows a progress bar
                info = compat.load_converted(model, state, compat.conversion_mapping(model))
            bad = sorted(set(info.unexpected_keys) | {k[0] if isinstance(k, tuple) else k
                                                      for k in info.mismatched_keys})
            now = model.state_dict()
            bad += sorted(n for n in self.wanted if now[n].is_meta)
            if bad or info.conversion_errors:
                detail = bad[0] if bad else next(iter(info.conversion_errors.values()))
                raise MoepruneError(f"{self.path}: the MTP layer {prefix} does not fit decoder layer {L}'s "
                                    f"experts ({detail}); its experts cannot take that layer's plan")
            plain = LayerPlan(layer=L, num_experts_in=lp.num_experts_in, groups=lp.groups,
                              router_merge=lp.router_merge)  # novices: pruned here (module docstring)
            apply_layer_plan(adapter, block, plain)
            changed = {n: t for n, t in model.state_dict().items() if n in self.wanted}
            for key, tensor in compat.on_disk_names(model, changed).items():
                # the layer's own part of the saved name, after its index (the saved prefix may differ
                # from the read one where the conversion moves prefixes)
                m = re.match(rf"^((?:[^.]+\.)*?){L}\.", key)
                if m is None or any(part.isdigit() for part in m.group(1).split(".")):
                    raise MoepruneError(f"{self.path}: decoder layer {L}'s tensor is saved as {key}, without "
                                        f"its layer index, so the MTP layer {prefix} cannot be written")
                out[prefix + key[m.end():]] = tensor.detach().clone()
        finally:
            layers[L] = pristine  # the loaded layer goes with its last reference
        return out


def carrier_for(path: str | Path | None, model: nn.Module, skeleton) -> MtpCarrier | None:
    """The MTP carrier of the checkpoint at `path` for the loaded `model`, or None without MTP tensors (or
    without safetensors files to read them from)."""
    from moeprune.arch import decoder_layers
    from moeprune.store.files import weight_map

    if path is None or not Path(path).is_dir():
        return None
    try:
        wm = weight_map(Path(path))
    except MoepruneError:
        return None
    layers, layer_prefix = decoder_layers(model)
    meta = model.state_dict()
    targets = compat.in_model_names(model, wm, compat.conversion_mapping(model), meta)
    layout = find_mtp(targets, meta, layer_prefix, len(layers))
    return MtpCarrier(Path(path), wm, layout, model, skeleton) if layout else None
