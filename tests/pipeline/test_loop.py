"""Layer-by-layer (out-of-core) work equals the whole-model path: statistics, plans and written tensors."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers as tf
from helpers import copy_checkpoint, tree_digest
from safetensors.torch import load_file

import moeprune
from moeprune.arch import get_adapter
from moeprune.arch.tiny import TINY_FAMILIES
from moeprune.cli import main
from moeprune.errors import MoepruneError
from moeprune.methods import METHODS
from moeprune.observe import Stats, observe
from moeprune.pipeline import observe_layerwise
from moeprune.plan import Plan
from moeprune.store.checkpoint import load_model
from moeprune.surgery import apply_layer_plan

PRUNE = dict(ratio=0.25, samples=6, seq_len=32, batch_size=4, probe_size=64, progress=False,
             compensate="none")


def _ids(n=5, length=24, seed=0):
    return torch.randint(3, 500, (n, length), generator=torch.Generator().manual_seed(seed))


def _assert_stats_equal(a: Stats, b: Stats):
    assert sorted(a.layers) == sorted(b.layers)
    for i in a.layers:
        for k, v in a.layers[i].experts.tensors().items():
            assert torch.equal(v, b.layers[i].experts.tensors()[k]), (i, k)
        pa, pb = a.layers[i].probe, b.layers[i].probe
        assert torch.equal(pa.positions, pb.positions)
        assert torch.equal(pa.inputs, pb.inputs) and torch.equal(pa.router_logits, pb.router_logits)


def _weights(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors") and f != "moeprune_novices.safetensors":
            out.update(load_file(os.path.join(directory, f)))
    return out


def _assert_same_checkpoint(a, b):
    ta, tb = _weights(a), _weights(b)
    assert set(ta) == set(tb)
    unequal = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not unequal, unequal[:5]
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    if (a / "moeprune_novices.safetensors").exists():
        na, nb = load_file(a / "moeprune_novices.safetensors"), load_file(b / "moeprune_novices.safetensors")
        assert set(na) == set(nb) and all(torch.equal(na[k], nb[k]) for k in na)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "llama4_text"])
def test_layerwise_stats_equal_whole_model_stats(family, checkpoint):
    path = checkpoint(family)
    ids = _ids()
    whole = observe(load_model(path), ids, batch_size=2, probe_size=40, seed=0)
    layerwise = observe_layerwise(path, ids, batch_size=2, probe_size=40, seed=0)
    _assert_stats_equal(whole, layerwise)
    assert layerwise.calibration["tokens"] == whole.calibration["tokens"]


# per-layer sliding masks; MLA with complex rotary
@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v2"])
def test_layerwise_forward_equals_the_model(family, checkpoint):
    path = checkpoint(family)
    ids = _ids()
    model = load_model(path)
    from moeprune.arch import decoder_layers

    layers, _ = decoder_layers(model)
    got = []
    handle = layers[-1].register_forward_hook(
        lambda m, a, out: got.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(input_ids=ids[:2], use_cache=False)
        model(input_ids=ids[2:4], use_cache=False)
        model(input_ids=ids[4:], use_cache=False)
    handle.remove()
    from moeprune.pipeline import forward_layerwise

    assert torch.equal(forward_layerwise(path, ids, batch_size=2), torch.cat(got))


def test_hidden_states_spilled_to_disk_give_the_same_stats(checkpoint, tmp_path):
    path = checkpoint("qwen3_moe")
    ids = _ids()
    in_memory = observe_layerwise(path, ids, batch_size=2, probe_size=40)
    spill = tmp_path / "spill"
    on_disk = observe_layerwise(path, ids, batch_size=2, probe_size=40, hidden_budget=0, offload_dir=spill)
    _assert_stats_equal(in_memory, on_disk)
    assert spill.is_dir() and not any(spill.iterdir())  # spill files are removed afterwards


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_streaming_save_equals_save_pretrained(family, checkpoint, calib_file, tmp_path):
    path = checkpoint(family)
    whole = moeprune.prune(path, "reap", tmp_path / "whole", calib=str(calib_file), layerwise=False, **PRUNE)
    streamed = moeprune.prune(path, "reap", tmp_path / "streamed", calib=str(calib_file), layerwise=True,
                              **PRUNE)
    _assert_same_checkpoint(whole, streamed)
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    layers = tf.AutoConfig.from_pretrained(path).num_hidden_layers
    # one shard per decoder layer, one for the rest
    assert len(set(index["weight_map"].values())) == layers + 1
    model, info = tf.AutoModelForCausalLM.from_pretrained(streamed, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss", "llama4_text"])
def test_streaming_novice_checkpoint_equals_in_memory(family, checkpoint, calib_file, tmp_path):
    path = checkpoint(family)
    whole = moeprune.prune(path, "mone", tmp_path / "whole", calib=str(calib_file), layerwise=False, **PRUNE)
    streamed = moeprune.prune(path, "mone", tmp_path / "streamed", calib=str(calib_file), layerwise=True,
                              **PRUNE)
    _assert_same_checkpoint(whole, streamed)
    ids = _ids(2, 16)
    a, b = moeprune.from_pretrained(whole), moeprune.from_pretrained(streamed)
    assert torch.equal(a(ids).logits, b(ids).logits)


METHOD_CASES = [(m, {}) for m in sorted(METHODS)] + [("dek", {"coefficients": "learned"})]


def _untimed(obj):
    """A plan's layers without the planning times its notes record."""
    if isinstance(obj, Plan):
        return _untimed(obj.to_dict()["layers"])
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


@pytest.mark.slow
@pytest.mark.parametrize("method,options", METHOD_CASES,
                         ids=[f"{m}-{o}" if o else m for m, o in METHOD_CASES])
def test_every_method_plans_the_same_layer_by_layer(method, options, checkpoint, calib_file, tmp_path):
    path = checkpoint("mixtral")
    args = dict(calib=str(calib_file), options=options, **PRUNE)
    whole = moeprune.prune(path, method, tmp_path / "whole", layerwise=False, **args)
    streamed = moeprune.prune(path, method, tmp_path / "streamed", layerwise=True, **args)
    pa, pb = Plan.load(whole / "moeprune_plan.json"), Plan.load(streamed / "moeprune_plan.json")
    assert _untimed(pa) == _untimed(pb)
    assert pa.method_config == pb.method_config
    _assert_same_checkpoint(whole, streamed)


def test_two_pass_path_for_methods_that_rank_all_layers(checkpoint, calib_file, tmp_path, monkeypatch):
    """Methods whose plan for a layer reads other layers (mone scope=global) observe every layer first."""
    args = dict(calib=str(calib_file), options={"scope": "global"}, **PRUNE)
    path = checkpoint("qwen2_moe")  # here the global ranking happens to keep the same count in every layer
    whole = moeprune.prune(path, "mone", tmp_path / "whole-mone", layerwise=False, **args)
    streamed = moeprune.prune(path, "mone", tmp_path / "streamed-mone", layerwise=True, **args)
    _assert_same_checkpoint(whole, streamed)
    path = checkpoint("mixtral")  # here it does not, and both paths refuse alike after the pass
    with pytest.raises(MoepruneError, match="scope=global would keep different") as whole_error:
        moeprune.prune(path, "mone", tmp_path / "w", layerwise=False, **args)
    with pytest.raises(MoepruneError, match="scope=global would keep different") as streamed_error:
        moeprune.prune(path, "mone", tmp_path / "s", layerwise=True, **args)
    assert str(whole_error.value) == str(streamed_error.value)
    assert not (tmp_path / "s").exists()
    args.pop("options")
    from moeprune.methods.registry import MethodSpec

    calls = []
    monkeypatch.setattr(MethodSpec, "layer_local", lambda self, cfg: calls.append(self.name) or False)
    whole = moeprune.prune(path, "reap", tmp_path / "whole", layerwise=False, **args)
    streamed = moeprune.prune(path, "reap", tmp_path / "streamed", layerwise=True, **args)
    assert calls == ["reap", "reap"]  # both sources take the same two-pass walk
    _assert_same_checkpoint(whole, streamed)
    with pytest.raises(MoepruneError, match="drop --sequential"):
        moeprune.prune(path, "reap", tmp_path / "seq", sequential=True, **args)


def test_apply_layerwise_equals_in_memory_apply(checkpoint, calib_file, tmp_path):
    path = checkpoint("glm4_moe")
    stats_dir = tmp_path / "stats"
    moeprune.prune(path, "mone", tmp_path / "first", calib=str(calib_file), stats_out=stats_dir, **PRUNE)
    plan = Plan.load(tmp_path / "first" / "moeprune_plan.json")
    stats = Stats.load(stats_dir)
    whole = moeprune.apply_checkpoint(path, plan, tmp_path / "whole", stats=stats, layerwise=False)
    streamed = moeprune.apply_checkpoint(path, plan, tmp_path / "streamed", stats=stats, layerwise=True)
    _assert_same_checkpoint(whole, streamed)


def test_sequential_stats_see_the_pruned_earlier_layers(checkpoint, calib_file, tmp_path):
    """Layer k's statistics under --sequential equal a whole-model pass with layers < k already pruned."""
    path = checkpoint("qwen3_moe")
    stats_dir = tmp_path / "stats"
    out = moeprune.prune(path, "frequency", tmp_path / "seq", calib=str(calib_file), sequential=True,
                         stats_out=stats_dir, **PRUNE)
    seq_stats, plan = Stats.load(stats_dir), Plan.load(out / "moeprune_plan.json")
    plain_dir = tmp_path / "plain-stats"
    moeprune.prune(path, "frequency", tmp_path / "plain", calib=str(calib_file), layerwise=True,
                   stats_out=plain_dir, **PRUNE)
    plain = Stats.load(plain_dir)
    assert torch.equal(seq_stats.layers[0].experts.count, plain.layers[0].experts.count)
    assert not torch.equal(seq_stats.layers[2].experts.mean, plain.layers[2].experts.mean)
    from moeprune.data import calibration_blocks
    from moeprune.store.checkpoint import load_tokenizer

    cal = calibration_blocks(load_tokenizer(path), str(calib_file), samples=6, seq_len=32, seed=0)
    model = load_model(path)
    adapter = get_adapter(model.config)
    blocks = adapter.moe_blocks(model)
    for k in (1, 2):
        for j in range(k):
            if not getattr(blocks[j], "_pruned", False):
                apply_layer_plan(adapter, blocks[j], plan.layer(j))
                blocks[j]._pruned = True
        ref = observe(model, cal.input_ids, batch_size=4, probe_size=64, seed=0)
        for name in ("count", "gate_sum"):
            assert torch.equal(ref.layers[k].experts.tensors()[name],
                               seq_stats.layers[k].experts.tensors()[name])
        assert torch.allclose(ref.layers[k].experts.mean, seq_stats.layers[k].experts.mean, atol=1e-6)


def test_layerwise_failure_leaves_nothing_and_input_untouched(checkpoint, calib_file, tmp_path, monkeypatch):
    src = copy_checkpoint(checkpoint("mixtral"), tmp_path / "src")
    before = tree_digest(src)
    from moeprune.pipeline import sources

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sources, "free", broken)  # fails after the first layer is written
    with pytest.raises(RuntimeError, match="disk full"):
        moeprune.prune(src, "reap", tmp_path / "out", calib=str(calib_file), layerwise=True, **PRUNE)
    assert sorted(os.listdir(tmp_path)) == ["src"]
    assert tree_digest(src) == before


def test_cli_prune_layerwise_and_auto_choice(checkpoint, calib_file, tmp_path, capsys, monkeypatch):
    path = checkpoint("olmoe")
    argv = ["prune", str(path), "--method", "frequency", "--ratio", "0.25", "--calib", str(calib_file),
            "--samples", "4", "--seq-len", "32", "--batch-size", "2"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--layerwise"]) == 0
    assert "layer by layer (as asked)" in capsys.readouterr().err
    import moeprune.runtime as rt

    monkeypatch.setattr(rt, "available_memory", lambda: 10**12)  # plenty of memory: still layer by layer
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    assert "layer by layer (the default)" in capsys.readouterr().err
    _assert_same_checkpoint(tmp_path / "a", tmp_path / "b")
    assert main([*argv, "--out", str(tmp_path / "c"), "--in-memory"]) == 0
    assert "whole model in memory (as asked)" in capsys.readouterr().err
    _assert_same_checkpoint(tmp_path / "a", tmp_path / "c")
    # the whole model would not fit: refused up front
    monkeypatch.setattr(rt, "available_memory", lambda: 1000)
    assert main([*argv, "--out", str(tmp_path / "g"), "--in-memory"]) == 2
    assert "needs the whole model in memory" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()
    monkeypatch.setattr(rt, "available_memory", lambda: 10**12)
    assert main([*argv, "--out", str(tmp_path / "d"), "--sequential", "--in-memory"]) != 0
    assert "--sequential works layer by layer" in capsys.readouterr().err
    spill = tmp_path / "spill"
    assert main([*argv, "--out", str(tmp_path / "e"), "--layerwise", "--hidden-memory", "0", "--offload-dir",
                 str(spill)]) == 0
    _assert_same_checkpoint(tmp_path / "a", tmp_path / "e")
    assert spill.is_dir() and not any(spill.iterdir())
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "f"), "--hidden-memory", "-1"]) == 2
    assert "--hidden-memory -1.0 is below 0" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method,options", [("dek", {"coefficients": "learned"}), ("uncurl", {}),
                                            ("naee", {})])
def test_planning_with_sharded_weights_equals_the_loaded_model(method, options, checkpoint, calib_file,
                                                               tmp_path):
    path = checkpoint("mixtral")
    stats_dir = tmp_path / "stats"
    moeprune.prune(path, "frequency", tmp_path / "out", calib=str(calib_file), stats_out=stats_dir, **PRUNE)
    stats = Stats.load(stats_dir)
    from moeprune.api import model_weights

    whole = moeprune.make_plan_for(stats, method, ratio=0.25, weights=model_weights(path, False),
                                   options=options)
    sharded = moeprune.make_plan_for(stats, method, ratio=0.25, weights=model_weights(path, True),
                                     options=options)
    assert _untimed(whole) == _untimed(sharded)


@pytest.mark.slow
def test_hub_style_shards_spanning_layers(tmp_path, calib_file):
    """Hub checkpoints cut shards by size: a layer spread over several files, a file holding several
    layers."""
    from moeprune.arch.tiny import tiny_model, tiny_tokenizer

    src = tmp_path / "src"
    tiny_model("qwen2_moe").save_pretrained(src, max_shard_size="60KB")
    tiny_tokenizer().save_pretrained(src)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    files_of_layer0 = {f for k, f in index.items() if ".layers.0." in k}
    assert len(files_of_layer0) > 1 and len(set(index.values())) > 4
    whole = moeprune.prune(src, "reap", tmp_path / "whole", calib=str(calib_file), layerwise=False, **PRUNE)
    streamed = moeprune.prune(src, "reap", tmp_path / "streamed", calib=str(calib_file), layerwise=True,
                              **PRUNE)
    _assert_same_checkpoint(whole, streamed)


# plain; sliding masks + sinks; tied lm_head
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "ernie4_5_moe"])
def test_layerwise_perplexity_equals_in_memory(family, checkpoint, calib_file):
    from moeprune.evaluate.perplexity import perplexity
    from moeprune.pipeline import perplexity_layerwise
    from moeprune.store.checkpoint import load_tokenizer

    path = checkpoint(family)
    tok = load_tokenizer(path)
    whole = perplexity(load_model(path), tok, calib_file, seq_len=32, max_tokens=320, batch_size=4)
    streamed = perplexity_layerwise(path, tok, calib_file, seq_len=32, max_tokens=320, batch_size=4)
    assert streamed == whole


def test_cli_eval_layerwise_equals_in_memory(checkpoint, calib_file, tmp_path, capsys):
    path = checkpoint("qwen3_moe")
    args = ["eval", str(path), "--text", str(calib_file), "--seq-len", "32", "--max-tokens", "320"]
    assert main([*args, "--in-memory", "--json", str(tmp_path / "a.json")]) == 0
    assert main([*args, "--layerwise", "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text())["models"][0] for f in ("a.json", "b.json"))
    assert a["perplexity"] == b["perplexity"] and a["parameters"] == b["parameters"]
    capsys.readouterr()
    assert main([*args, "--layerwise", "--task-text", f"code={calib_file}"]) == 2
    assert "lm-eval tasks need" in capsys.readouterr().err
