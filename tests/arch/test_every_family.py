"""Every supported model type, as a tiny random model built from its config class (the full
vision-language class for multimodal types): the adapter's derived facts, an identity plan, pruning
through a checkpoint read layer by layer and reloaded with the input's own Auto class, surviving routes,
and untouched non-expert weights (vision and audio towers included).

The 11 original families are also covered in depth by the surgery/observer suites; here each type
gets the same battery. Types outside `FAST` are marked slow (`pytest -m "not slow"` skips them).
"""

from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
import transformers as tf
from helpers import manual_plan, saved_tensors, token_ids

from moeprune import api, compat
from moeprune.arch import SUPPORTED_MODEL_TYPES, get_adapter
from moeprune.arch.base import text_generator
from moeprune.arch.facts import BY_MODEL_TYPE
from moeprune.arch.tiny import TINY_OVERRIDES, save_tiny_checkpoint, tiny_model
from moeprune.plan import Group, LayerPlan
from moeprune.surgery import apply_layer_plan, apply_plan

E = 8
KEEP = [0, 1, 4, 5]  # two per group of a grouped router with n_group = 2
FAST = {"mixtral", "qwen3_moe", "deepseek_v3", "qwen3_vl_moe"}


def _params(types):
    return [pytest.param(mt, marks=() if mt in FAST else pytest.mark.slow) for mt in sorted(types)]


EVERY = _params(SUPPORTED_MODEL_TYPES)


@functools.cache
def _model(model_type: str):
    return tiny_model(model_type)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("every_family")
    cache = {}

    def get(model_type):
        if model_type not in cache:
            cache[model_type] = root / model_type
            save_tiny_checkpoint(model_type, cache[model_type])
        return cache[model_type]

    return get


def _inputs(model):
    ids = token_ids(n=2, length=16)
    return {"input_ids": ids}


def _logits(model, **kw):
    with torch.no_grad():
        return text_generator(model)(**kw, use_cache=False).logits


@pytest.mark.parametrize("model_type", EVERY)
def test_adapter_finds_the_language_models_experts_and_router(model_type):
    model = _model(model_type)
    adapter = get_adapter(model.config)
    blocks = adapter.moe_blocks(model)
    assert blocks, f"{model_type}: no MoE block found"
    tiny_top_k = TINY_OVERRIDES.get(model_type, {}).get(adapter.top_k_field, 2)  # ZAYA routes top-1 only
    assert adapter.num_experts == E and adapter.top_k == tiny_top_k
    exact, why = adapter.survivors_exact()
    assert isinstance(exact, bool) and why
    for block in blocks.values():
        experts = adapter.experts(block)
        for name, p in experts.named_parameters(recurse=False):
            assert p.shape[0] == E, (name, tuple(p.shape))
        tensors = adapter.router_expert_tensors(block)
        rows = E + int(adapter.skip_class)  # ZAYA's router scores a skip class after the experts
        assert any(getattr(owner, leaf).shape[axis] == rows for owner, leaf, axis in tensors)
        w = adapter.expert_weights(block, E - 1)
        assert w.down.shape[0] == adapter.config.hidden_size


@pytest.mark.parametrize("model_type", EVERY)
def test_identity_plan_is_bit_identical(model_type):
    model = _model(model_type)
    before = _logits(model, **_inputs(model))
    same = apply_plan(copy.deepcopy(model), manual_plan(model))
    assert torch.equal(before, _logits(same, **_inputs(model)))
    ref = model.state_dict()
    assert all(torch.equal(t, ref[n]) for n, t in same.state_dict().items())


@pytest.mark.parametrize("model_type", EVERY)
def test_pruned_checkpoint_reloads_with_its_own_auto_class(model_type, saved, tmp_path):
    src = saved(model_type)
    original = _model(model_type)
    plan = manual_plan(original, keep=KEEP)
    out = api.apply_checkpoint(src, plan, tmp_path / "out", layerwise=True, progress=False)

    config = tf.AutoConfig.from_pretrained(out)
    auto_name, cls = compat.model_class(config)
    assert cls is type(original)
    reloaded, info = getattr(tf, auto_name).from_pretrained(out, output_loading_info=True)
    assert type(reloaded) is type(original)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    adapter = get_adapter(reloaded.config)
    assert adapter.num_experts == len(KEEP)
    for block in adapter.moe_blocks(reloaded).values():
        for name, p in adapter.experts(block).named_parameters(recurse=False):
            assert p.shape[0] == len(KEEP), name

    # layer by layer (the checkpoint path) equals the same plan applied in memory
    in_memory = apply_plan(copy.deepcopy(original), plan)
    mem = in_memory.state_dict()
    for name, tensor in reloaded.eval().state_dict().items():
        assert torch.equal(tensor, mem[name]), name
    ids = _inputs(original)
    torch.testing.assert_close(_logits(reloaded, **ids), _logits(in_memory, **ids),
                               rtol=0, atol=1e-6)

    # every tensor outside the routed experts and routers (vision and audio towers, attention, embeddings,
    # shared experts) is written bit-identical
    before, after = saved_tensors(src), saved_tensors(out)
    assert set(after) <= set(before) | {k for k in after if ".experts." in k}
    renumbered = re.compile(r"\.experts\.\d+\.")  # per-expert keys on disk: expert 2 is now old expert 4
    untouched = [k for k in after if k in before and after[k].shape == before[k].shape
                 and not renumbered.search(k)]
    assert untouched
    for key in untouched:
        assert torch.equal(after[key], before[key]), key


def _experts_routes(adapter, block, x):
    """(block output [T, H], the top-k ids the experts received [T, K]) for hidden states x [B, L, H]."""
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("ids", args[1] if len(args) > 1 else kwargs["top_k_index"])

    handle = adapter.experts(block).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = adapter.moe_forward(block, x)  # the block itself, or its MoE lines (Gemma 4's layer)
    finally:
        handle.remove()
    return out.reshape(-1, x.shape[-1]), seen["ids"].reshape(-1, adapter.top_k)


# Llama 4's dense experts take no top-k ids; tests/surgery checks its survivors
@pytest.mark.parametrize("model_type", _params(
    t for t in SUPPORTED_MODEL_TYPES if not getattr(BY_MODEL_TYPE[t].adapter, "dense_experts", False)))
def test_surviving_routes_are_exact_where_the_family_says_so(model_type):
    model = _model(model_type)
    adapter = get_adapter(model.config)
    exact, why = adapter.survivors_exact()
    if not exact:  # nothing is claimed, so nothing to check but that the reason is given
        assert len(why) > 20
        return
    torch.manual_seed(3)
    for layer, block in adapter.moe_blocks(model).items():
        x = torch.randn(2, 64, adapter.config.hidden_size)
        before, ids = _experts_routes(adapter, block, x)
        # keep the two most used experts of each half (each routing group when n_group = 2), so that
        # enough tokens keep their whole top-k even where a correction bias concentrates the routing
        counts = torch.bincount(ids.reshape(-1), minlength=E)
        halves = counts.view(2, E // 2)  # [2, E/2]
        keep = sorted(int(h * E // 2 + i) for h in (0, 1) for i in halves[h].topk(2).indices)
        pruned = copy.deepcopy(block)
        apply_layer_plan(adapter, pruned, LayerPlan(layer, E, [Group([e], [1.0]) for e in keep]))
        after, _ = _experts_routes(adapter, pruned, x)
        survived = torch.isin(ids, torch.tensor(keep)).all(dim=-1)  # [T]
        assert survived.sum() >= 4, "too few surviving tokens to check anything"
        diff = (after[survived] - before[survived]).abs().max().item()
        assert diff <= 1e-5, f"{model_type} layer {layer}: claimed exact ({why}) but changed by {diff:.2e}"


@pytest.mark.parametrize("config,says", [
    (tf.LlamaConfig(), "not a Mixture-of-Experts model"),
    (tf.SwitchTransformersConfig(), "encoder-decoder model; moeprune prunes the routed experts of decoder"),
    (tf.NllbMoeConfig(), "encoder-decoder model"),
])
def test_an_unsupported_model_is_told_what_is_missing(config, says):
    from moeprune.errors import MoepruneError

    with pytest.raises(MoepruneError, match=says) as e:
        get_adapter(config)
    assert "\n" not in str(e.value) and repr(config.model_type) in str(e.value)


def test_a_moe_config_whose_layers_are_all_dense_is_refused_in_one_line(tmp_path):
    save_tiny_checkpoint("qwen2_moe", tmp_path / "dense", mlp_only_layers=[0, 1, 2])
    from moeprune.errors import MoepruneError

    with pytest.raises(MoepruneError, match="no MoE block found") as e:
        api.inspect(tmp_path / "dense")
    assert "\n" not in str(e.value)
    calib = tmp_path / "calib.txt"
    calib.write_text("some text " * 200)
    with pytest.raises(MoepruneError, match="no MoE block found"):
        api.prune(tmp_path / "dense", "frequency", tmp_path / "out", experts=4, calib=str(calib),
                  progress=False)
    assert not (tmp_path / "out").exists()


def test_the_readme_lists_every_supported_model_type():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("| model_type |", 1)[1].split("\n\n", 1)[0]
    assert all(f"`{mt}`" in table for mt in SUPPORTED_MODEL_TYPES), [
        mt for mt in SUPPORTED_MODEL_TYPES if f"`{mt}`" not in table]


@pytest.mark.parametrize("model_type", EVERY)
def test_a_calibrated_prune_runs_layer_by_layer_and_reloads(model_type, saved, calib_file, tmp_path):
    """What a new user runs: calibration through the layer walk (the state a layer hands the next
    included), a plan from real statistics, a checkpoint that reloads with its own Auto class."""
    out = api.prune(saved(model_type), "reap", tmp_path / "out", ratio=0.5, calib=str(calib_file), samples=4,
                    seq_len=32, batch_size=2, probe_size=32, progress=False, layerwise=True)
    config = tf.AutoConfig.from_pretrained(out)
    auto_name, cls = compat.model_class(config)
    reloaded = getattr(tf, auto_name).from_pretrained(out).eval()
    assert type(reloaded) is type(_model(model_type))
    assert get_adapter(reloaded.config).num_experts == E // 2
    assert torch.isfinite(_logits(reloaded, **_inputs(reloaded))).all()
