"""Novices (MoNE): experts replaced by a constant vector, at inference, on disk, and back.

A novice layer keeps its router exactly as it was (all E rows, same top-k, same gate
normalisation) while its experts tensors hold only the E_kept surviving experts. Two
non-persistent buffers on the experts module carry the rest:

- `expert_map [E]` (int64): router id -> slot; slots `< E_kept` are rows of the shrunken experts
  tensors, slot `E_kept + n` is novice `n`;
- `novice_vectors [n, H]`: one constant vector per novice.

The experts module gets an instance forward (a bound method, so `copy.deepcopy` and
`set_experts_implementation` keep working) that sends the kept (token, expert) pairs through the
family's own kernel on remapped ids, one pair per row, and adds `g_i(x) * novice_i` for the novice
pairs. Llama 4 runs its experts densely on a score-scaled input (`E_i(g_i(x) x)`), and the observer
records that scaled output as the expert's output, so there a novice contributes its mean as is,
for the tokens whose top-k holds it (read from the router's scores, passed by a router hook).

On disk a novice checkpoint is the stock checkpoint of plain pruning (router rows and experts of the
kept experts, written by `save_pretrained` in the original key layout) plus `moeprune_novices.safetensors`
(per layer: the routing map, the novice vectors and the novices' router rows). `config.json` holds
a `moeprune_novice` section with the real `model_type` and `architectures`, and advertises a
`model_type` that transformers does not know and that reads "load it with moeprune.from_pretrained".
`AutoConfig` (so `AutoModelForCausalLM`, and engines that read configs through it) then refuses the
checkpoint with a ValueError quoting that sentence, instead of silently loading the plain-pruned
model; `AutoTokenizer` catches exactly that ValueError and falls back to a generic config, so the
tokenizer still loads stock. (A non-integer expert count also refuses, through strict config
validation, but its error is not a ValueError and breaks `AutoTokenizer` too.) `export_stock`
writes the plain-pruned model as a stock checkpoint, without loading any weights.

Shape letters: T tokens, K top-k, H hidden, E router width, P kept pairs, Q novice pairs.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import types
from pathlib import Path

import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moeprune.arch import Adapter, get_adapter
from moeprune.arch.base import EXPERT_COUNT_ATTRS
from moeprune.arch.families import Llama4Text
from moeprune.errors import MoepruneError

NOVICE_FILE = "moeprune_novices.safetensors"
CONFIG_KEY = "moeprune_novice"
FORMAT_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin")


# ---- plan -> novice vectors -------------------------------------------------------------------
def check_novice_plan(plan) -> None:
    """A plan with novices must be a pruning plan whose kept experts and novices cover every expert.

    That is MoNE's shape: the router keeps all its rows, so every router id needs a kept expert or
    a novice behind it.
    """
    if not any(lp.novices for lp in plan.layers):
        return
    for lp in plan.layers:
        where = f"layer {lp.layer}"
        if not lp.is_pruning:
            raise MoepruneError(f"{where}: novices combine only with pruning (singleton groups with coefficient 1); "
                                "this plan also merges experts")
        covered = set(lp.kept) | set(lp.novices)
        missing = sorted(set(range(lp.num_experts_in)) - covered)
        if missing:
            raise MoepruneError(f"{where}: experts {missing} are neither kept nor novices; with novices the router "
                                "keeps all its rows, so every expert must be one or the other")


def _check_same_calibration(plan, stats) -> None:
    for key in ("sha256", "tokens", "seq_len", "seed", "source"):
        a, b = plan.calibration.get(key), stats.calibration.get(key)
        if a is not None and b is not None and a != b:
            raise MoepruneError(f"the statistics do not match the plan: calibration {key} is {b!r} in the stats but "
                                f"{a!r} in the plan; pass the stats directory the plan was made from")


def novice_vectors(plan, stats=None) -> dict[int, torch.Tensor]:
    """{layer: [n, H] float64} novice vectors of `plan`, in the order of each layer's `novices`.

    Vectors are a pure function of the statistics: `out_mean` of each novice (the unweighted mean
    of its raw output over the tokens routed to it), zero for an expert never routed, and zero for
    every novice when the plan was made with `novice=false` (`notes["novice_vectors"] == "zero"`).
    Plans record only the ids, so a plan with mean novices needs the stats it was made from.
    """
    layers = [lp for lp in plan.layers if lp.novices]
    if not layers:
        return {}
    H = int(plan.model.get("hidden_size") or (next(iter(stats.layers.values())).experts.mean.shape[1] if stats else 0))
    needs_stats = [lp.layer for lp in layers if lp.notes.get("novice_vectors", "out_mean") != "zero"]
    if needs_stats and stats is None:
        raise MoepruneError("this plan replaces experts with novices (their mean output on the calibration data), "
                            "which come from the statistics: pass the stats directory the plan was made from "
                            "(--stats DIR)")
    if stats is not None and needs_stats:
        _check_same_calibration(plan, stats)
    out = {}
    for lp in layers:
        ids = torch.tensor(lp.novices, dtype=torch.long)
        if lp.layer not in needs_stats:
            out[lp.layer] = torch.zeros(len(lp.novices), H, dtype=torch.float64)
            continue
        if lp.layer not in stats.layers:
            raise MoepruneError(f"the statistics have no layer {lp.layer}, which the plan gives novices")
        st = stats.layers[lp.layer].experts
        if st.num_experts != lp.num_experts_in:
            raise MoepruneError(f"layer {lp.layer}: the statistics have {st.num_experts} experts, the plan "
                                f"{lp.num_experts_in}")
        routed = (st.count[ids] > 0)[:, None]  # [n, 1]; never-routed experts get a zero novice
        out[lp.layer] = torch.where(routed, st.mean[ids], torch.zeros_like(st.mean[ids]))
    return out


# ---- runtime ----------------------------------------------------------------------------------
def is_novice_experts(experts: nn.Module) -> bool:
    return "expert_map" in experts._buffers and "novice_vectors" in experts._buffers


def novice_blocks(model: nn.Module, adapter: Adapter | None = None) -> dict[int, nn.Module]:
    """Layer index -> MoE block, for the blocks whose experts carry novices."""
    adapter = adapter or get_adapter(model.config)
    return {i: b for i, b in adapter.moe_blocks(model).items() if is_novice_experts(adapter.experts(b))}


def has_novices(model: nn.Module) -> bool:
    try:
        return bool(novice_blocks(model))
    except MoepruneError:
        return False


def _slots(experts: nn.Module) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(E_kept, kept router ids in slot order, novice router ids in novice order)."""
    kept_count = experts.gate_up_proj.shape[0]
    order = experts.expert_map.argsort()  # slots are a permutation of 0..E-1
    return kept_count, order[:kept_count], order[kept_count:]


def _novice_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """Experts forward with novices: [T, H], [T, K] router ids, [T, K] gates -> [T, H].

    Kept pairs run through the family's own kernel (whatever `experts_implementation` is set), one
    pair per row with remapped ids; a novice pair adds `g * novice`. Bound to an experts module.
    """
    T, H = hidden_states.shape
    kept_count = self.gate_up_proj.shape[0]
    slots = self.expert_map[top_k_index]  # [T, K]
    is_kept = slots < kept_count  # [T, K]
    out = torch.zeros(T, H, dtype=torch.float32, device=hidden_states.device)
    tok, k = is_kept.nonzero(as_tuple=True)  # [P]
    if tok.numel():
        y = type(self).forward(self, hidden_states[tok], slots[tok, k][:, None], top_k_weights[tok, k][:, None])
        out.index_add_(0, tok, y.float())  # [P, H] summed into the tokens
    tok_n, k_n = (~is_kept).nonzero(as_tuple=True)  # [Q]
    if tok_n.numel():
        v = self.novice_vectors[slots[tok_n, k_n] - kept_count].float()  # [Q, H]
        out.index_add_(0, tok_n, top_k_weights[tok_n, k_n, None].float() * v)
    return out.to(hidden_states.dtype)


def _llama4_keep_scores(self, router: nn.Module, args, output) -> None:
    """Router forward hook (bound to the experts module): hand this call's [T, E] scores to the experts."""
    self.__dict__["_moeprune_scores"] = output[0]


def _llama4_novice_forward(self, routed_in: torch.Tensor) -> torch.Tensor:
    """Llama 4 experts forward with novices: [E*T, H] score-scaled inputs -> [E*T, H] outputs.

    Kept experts run densely as usual; a novice's rows hold its vector for the tokens whose top-k
    holds it (score > 0; the router sets the others to sigmoid(-inf) = 0) and zero elsewhere.
    """
    scores = self.__dict__.pop("_moeprune_scores", None)  # [T, E]
    if scores is None:
        raise RuntimeError("Llama 4 novice experts need the router's scores: run the whole MoE block")
    T, E = scores.shape
    H = routed_in.shape[-1]
    kept_count, kept, novices = _slots(self)
    x = routed_in.view(E, T, H)
    out = routed_in.new_zeros(E, T, H)
    if kept_count:
        out[kept] = type(self).forward(self, x[kept].reshape(-1, H)).view(kept_count, T, H)
    routed = (scores[:, novices].T > 0).to(out.dtype)  # [n, T]
    out[novices] = routed[..., None] * self.novice_vectors.to(out.dtype)[:, None, :]
    return out.view(-1, H)


def attach_novices(adapter: Adapter, block: nn.Module, expert_map: torch.Tensor, vectors: torch.Tensor) -> None:
    """Give a block whose experts tensors already hold only the kept experts its routing map and novices.

    The router and every cached count outside the experts module stay at E; the experts' cached
    counts become E_kept, which is what their kernels index with.
    """
    ex = adapter.experts(block)
    if is_novice_experts(ex):
        raise MoepruneError("this MoE block already has novices")
    kept_count = ex.gate_up_proj.shape[0]
    E = expert_map.numel()
    if vectors.shape[0] != E - kept_count:
        raise MoepruneError(f"{vectors.shape[0]} novice vectors for {E - kept_count} novice slots")
    device, dtype = ex.gate_up_proj.device, ex.gate_up_proj.dtype
    ex.register_buffer("expert_map", expert_map.to(device=device, dtype=torch.long), persistent=False)
    ex.register_buffer("novice_vectors", vectors.to(device=device, dtype=dtype), persistent=False)
    for attr in EXPERT_COUNT_ATTRS:
        value = getattr(ex, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(ex, attr, kept_count)
    if isinstance(adapter, Llama4Text):
        ex.forward = types.MethodType(_llama4_novice_forward, ex)
        adapter.router(block).register_forward_hook(types.MethodType(_llama4_keep_scores, ex))
    else:
        ex.forward = types.MethodType(_novice_forward, ex)


@torch.no_grad()
def apply_novice_layer(adapter: Adapter, block: nn.Module, lp, vectors: torch.Tensor | None) -> None:
    """Surgery for one layer with novices: shrink the experts to the kept ones, keep the router whole."""
    E = lp.num_experts_in
    kept = [g.members[0] for g in lp.groups]
    if vectors is None:
        raise MoepruneError(f"layer {lp.layer}: no novice vectors given")
    if vectors.shape[0] != len(lp.novices):
        raise MoepruneError(f"layer {lp.layer}: {vectors.shape[0]} novice vectors for {len(lp.novices)} novices")
    ex = adapter.experts(block)
    keep = torch.tensor(kept, dtype=torch.long)
    for name, p in adapter.expert_parameters(block).items():
        _set(ex, name, p.index_select(0, keep.to(p.device)).contiguous(), like=p)
    expert_map = torch.empty(E, dtype=torch.long)
    expert_map[keep] = torch.arange(len(kept))
    expert_map[torch.tensor(lp.novices, dtype=torch.long)] = len(kept) + torch.arange(len(lp.novices))
    attach_novices(adapter, block, expert_map, vectors)


def _set(owner: nn.Module, name: str, value: torch.Tensor, like: torch.Tensor | None = None) -> None:
    """Put `value` in place of parameter/buffer `name` (wrapping it as a Parameter when it was one)."""
    if name in owner._parameters:
        if not isinstance(value, nn.Parameter):
            grad = like.requires_grad if like is not None else owner._parameters[name].requires_grad
            value = nn.Parameter(value, requires_grad=grad)
        owner._parameters[name] = value
    else:
        owner._buffers[name] = value


def _router_tensors(adapter: Adapter, block: nn.Module) -> list[tuple[str, nn.Module, str, int]]:
    """(dotted name inside the router, owner, attribute, expert axis) of every router tensor indexed by expert."""
    router = adapter.router(block)
    names = {id(m): n for n, m in router.named_modules()}
    return [((names[id(owner)] + "." if names[id(owner)] else "") + leaf, owner, leaf, axis)
            for owner, leaf, axis in adapter.router_expert_tensors(block)]


def describe(model: nn.Module) -> dict | None:
    """Novice facts of an in-memory model (None when it has none), for `inspect` and the model card."""
    adapter = get_adapter(model.config)
    blocks = novice_blocks(model, adapter)
    if not blocks:
        return None
    per_layer = {i: int(adapter.experts(b).novice_vectors.shape[0]) for i, b in blocks.items()}
    kept = {int(adapter.experts(b).gate_up_proj.shape[0]) for b in blocks.values()}
    return {
        "router_experts": adapter.num_experts,
        "experts_kept": min(kept) if len(kept) == 1 else sorted(kept),
        "novices_per_layer": per_layer,
        "novice_parameters": sum(int(adapter.experts(b).novice_vectors.numel()) for b in blocks.values()),
    }


# ---- on disk ----------------------------------------------------------------------------------
def weights_bytes(path: str | Path) -> int | None:
    """Bytes of the weight files (*.safetensors, *.bin, novices included) of a model directory."""
    p = Path(path)
    if not p.is_dir():
        return None
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


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


def read_config_dict(path: str | Path) -> dict:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise MoepruneError(f"{p} is not a model directory: it has no config.json")
    try:
        return json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise MoepruneError(f"{p}/config.json is not valid JSON ({e.msg})")


def is_novice_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and CONFIG_KEY in read_config_dict(p)


def novice_config(path: str | Path):
    """The config of a novice checkpoint as its loaded model holds it: the expert count is the router's E."""
    raw = read_config_dict(path)
    section = raw[CONFIG_KEY]
    return _config_from_dict({**_stock_config_dict(raw), section["count_field"]: int(section["num_experts"])})


def refuse_novice_input(path: str | Path | None = None, model: nn.Module | None = None, action: str = "prune") -> None:
    """Refuse to observe or prune a model that already has novices (its experts no longer match its router)."""
    if (path is not None and Path(path).is_dir() and is_novice_checkpoint(path)) or (model is not None and has_novices(model)):
        where = f"{path} is" if path is not None else "this model is"
        raise MoepruneError(f"{where} a MoNE model with novices, which moeprune cannot {action}: start from the "
                            "original model, or make a stock copy first with `moeprune export-stock PATH --out DIR`")


def _stock_config_dict(d: dict) -> dict:
    """config.json of a novice checkpoint -> the stock config of its plain-pruned part (E_kept experts)."""
    d = dict(d)
    section = d.pop(CONFIG_KEY)
    if section.get("format") != FORMAT_VERSION:
        raise MoepruneError(f"novice checkpoint format {section.get('format')!r} is not supported "
                            f"(expected {FORMAT_VERSION}); upgrade moeprune")
    d["model_type"] = section["model_type"]
    if section.get("architectures") is not None:
        d["architectures"] = section["architectures"]
    d[section["count_field"]] = int(section["num_experts_kept"])
    return d


def _config_from_dict(d: dict):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = d.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise MoepruneError(f"unknown model_type {model_type!r} in config.json")
    try:
        return CONFIG_MAPPING[model_type].from_dict(d)
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
    kept_counts = {int(adapter.experts(b).gate_up_proj.shape[0]) for b in blocks.values()}
    if len(kept_counts) != 1:
        raise MoepruneError(f"MoE layers keep different expert counts {sorted(kept_counts)}; a checkpoint holds one")
    kept_count = kept_counts.pop()
    if len(blocks) != len(adapter.moe_blocks(model)):
        raise MoepruneError("some MoE layers have novices and others not; a checkpoint holds one expert count")
    tensors: dict[str, torch.Tensor] = {}
    restore = []
    count_field = adapter.count_field
    try:
        for i, block in sorted(blocks.items()):
            layer_tensors, undo = detach_novices(adapter, block, i)
            tensors.update(layer_tensors)
            restore.append(undo)
        setattr(model.config, count_field, kept_count)
        model.save_pretrained(str(d))
    finally:
        for undo in restore:
            undo()
        setattr(model.config, count_field, E)
    write_novice_file(d, tensors, count_field=count_field, num_experts=E, kept_count=kept_count,
                      layers=sorted(blocks))


def detach_novices(adapter: Adapter, block: nn.Module, i: int) -> tuple[dict[str, torch.Tensor], callable]:
    """The novice-file tensors of MoE layer i; its router is left holding only the kept rows, as on disk.

    Returns the tensors and a function that puts the full router back.
    """
    ex = adapter.experts(block)
    _, kept, novices = _slots(ex)
    tensors = {f"layer.{i}.expert_map": ex.expert_map.detach().cpu().contiguous(),
               f"layer.{i}.novice_vectors": ex.novice_vectors.detach().cpu().contiguous()}
    swapped = []
    for dotted, owner, leaf, axis in _router_tensors(adapter, block):
        full = getattr(owner, leaf)
        tensors[f"layer.{i}.router.{dotted}"] = full.detach().index_select(axis, novices.to(full.device)).cpu().contiguous()
        swapped.append((owner, leaf, full))
        _set(owner, leaf, full.detach().index_select(axis, kept.to(full.device)).contiguous(), like=full)

    def undo():
        for owner, leaf, full in swapped:
            _set(owner, leaf, full)

    return tensors, undo


def write_novice_file(directory: Path, tensors: dict[str, torch.Tensor], *, count_field: str, num_experts: int,
                      kept_count: int, layers: list[int]) -> None:
    """Write the novice file next to a stock checkpoint of the kept experts and turn its config.json into a novice one."""
    d = Path(directory)
    save_file(tensors, str(d / NOVICE_FILE), metadata={"format": "moeprune-novices", "version": str(FORMAT_VERSION)})
    cfg = json.loads((d / "config.json").read_text())
    cfg[CONFIG_KEY] = {
        "format": FORMAT_VERSION,
        "file": NOVICE_FILE,
        "model_type": cfg["model_type"],
        "architectures": cfg.get("architectures"),
        "count_field": count_field,
        "num_experts": num_experts,
        "num_experts_kept": kept_count,
        "novice_layers": layers,
        "note": "router keeps all num_experts rows; tokens routed to a novice get gate * novice vector",
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
            expert_map = f.get_tensor(f"layer.{i}.expert_map").long()
            vectors = f.get_tensor(f"layer.{i}.novice_vectors")
            order = expert_map.argsort()
            kept, novices = order[:kept_count], order[kept_count:]
            for dotted, owner, leaf, axis in _router_tensors(adapter, block):
                key = f"layer.{i}.router.{dotted}"
                if key not in keys:
                    raise MoepruneError(f"{path}: {NOVICE_FILE} lacks {key}; the checkpoint is incomplete")
                stock = getattr(owner, leaf)  # kept rows only
                rows = f.get_tensor(key).to(device=stock.device, dtype=stock.dtype)
                shape = list(stock.shape)
                shape[axis] = E
                full = stock.new_empty(shape)
                full.index_copy_(axis, kept.to(stock.device), stock.detach())
                full.index_copy_(axis, novices.to(stock.device), rows)
                _set(owner, leaf, full, like=stock)
            adapter.set_block_num_experts(block, kept_count, E)  # router and block counts back to E
            attach_novices(adapter, block, expert_map, vectors)  # experts' counts to E_kept
    adapter.set_config_num_experts(model, kept_count, E)


def from_pretrained(path: str | Path, *, device: str = "cpu", dtype: str | torch.dtype = "auto") -> nn.Module:
    """Load a moeprune output (novice checkpoint or stock) in eval mode.

    A novice checkpoint loads its plain-pruned part through transformers, then puts the novices'
    router rows back and attaches the novices, reproducing the in-memory pruned model exactly.
    Any other checkpoint loads as `moeprune.store.checkpoint.load_model` does.
    """
    from moeprune.store.checkpoint import load_model

    p = Path(path)
    if not p.exists():
        raise MoepruneError(f"model directory {p} does not exist")
    raw = read_config_dict(p)
    if CONFIG_KEY not in raw:
        return load_model(p, device=device, dtype=dtype)
    section = raw[CONFIG_KEY]
    if not (p / section.get("file", NOVICE_FILE)).is_file():
        raise MoepruneError(f"{p} is a novice checkpoint but {section.get('file', NOVICE_FILE)} is missing")
    config = _config_from_dict(_stock_config_dict(raw))
    get_adapter(config)
    try:
        with _transformers_quiet():
            model, info = tf.AutoModelForCausalLM.from_pretrained(str(p), config=config, dtype=dtype,
                                                                  output_loading_info=True, device_map=None)
    except Exception as e:  # noqa: BLE001  (transformers raises many kinds; one line says which)
        raise MoepruneError(f"could not load the weights of {p} ({type(e).__name__}: {str(e).splitlines()[0]})")
    bad = list(info.get("missing_keys", [])) + [k[0] if isinstance(k, tuple) else k
                                                for k in info.get("mismatched_keys", [])]
    if bad:
        raise MoepruneError(f"{p} is missing or has mis-shaped weights ({len(bad)}, e.g. {min(bad)})")
    _install_from_file(model, p, section)
    return model.to(device).eval()


def _novice_file_counts(path: Path, section: dict) -> tuple[int, int]:
    """(novice vector elements, novice router elements) stored in a checkpoint's novice file."""
    vectors = router = 0
    with safe_open(str(path / section.get("file", NOVICE_FILE)), framework="pt") as f:
        names = list(f.keys())
        for k in names:
            n = 1
            for s in f.get_slice(k).get_shape():
                n *= s
            if k.endswith(".novice_vectors"):
                vectors += n
            elif ".router." in k:
                router += n
    return vectors, router


def checkpoint_parameters(path: str | Path) -> dict:
    """Parameter counts of a checkpoint directory from its config alone (a meta-device model), novices included."""
    from moeprune.store.checkpoint import parameter_counts

    p = Path(path)
    raw = read_config_dict(p)
    section = raw.get(CONFIG_KEY)
    config = _config_from_dict(_stock_config_dict(raw) if section else raw)
    with torch.device("meta"):
        meta = tf.AutoModelForCausalLM.from_config(config)
    counts = parameter_counts(meta)
    counts["novices"] = 0
    if section:
        vectors, router = _novice_file_counts(p, section)
        counts["novices"] = vectors
        counts["other"] += router
        counts["total"] += vectors + router
    return counts


def export_stock(path: str | Path, out: str | Path, *, force: bool = False, command: str | None = None) -> Path:
    """Write the novice-free variant of a novice checkpoint: plain pruning of the same experts.

    The novices' router rows go, so their tokens route to the next-best kept experts. Nothing is
    loaded: the stock part of the checkpoint is copied, config.json gets back an integer expert
    count, and the plan and model card say what was exported.
    """
    from moeprune.store.checkpoint import atomic_directory, check_output_dir, model_card
    from moeprune.plan import Plan

    src = Path(path)
    if not src.is_dir():
        raise MoepruneError(f"model directory {src} does not exist")
    raw = read_config_dict(src)
    if CONFIG_KEY not in raw:
        raise MoepruneError(f"{src} has no novices: it is already a stock checkpoint")
    check_output_dir(out, force, inputs=(src,))
    section = raw[CONFIG_KEY]
    stock = _stock_config_dict(raw)
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
            plan.save(tmp / "moeprune_plan.json")
            card = model_card(source=str(src), plan=plan, before=before, after=after, command=command,
                              notes=[(f"**Exported without novices** from the MoNE checkpoint `{src}`: the novices' "
                                      "router rows are removed, so this is plain pruning of the same experts.")])
            (tmp / "README.md").write_text(card)
    return Path(out)
