"""`moeprune analyze`: per-layer expert similarity (linear CKA) as heatmaps and JSON.

This is DEK's first experiment (arXiv 2407.09590): how alike are the experts of each MoE layer?
For every MoE layer it writes

- `layer_NNN.png`: the [E, E] CKA matrix as a heatmap (rows and columns ordered by group, with
  each group boxed, when a budget `experts` is given; in expert order otherwise);
- `layer_NNN.json`: the matrix, summary numbers, and the groups DEK would merge at that budget;
- `summary.json`: one entry per layer, plus what was analysed.

Inputs. The model-centric representations (`weight`, `flat`, `surrogate`) need only the model.
The data-centric one (`data`, every expert's output on the layer's probe tokens) needs both the
statistics of a calibration pass (for the probe tokens) and the model (to run the experts). So
`source` may be either:

- a model directory; pass `stats` (a directory from `moeprune observe`) for `data`;
- a stats directory; the model is `model` if given, else the checkpoint the stats were observed on.

The default representation is `data` when statistics are available, `weight` otherwise.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from moeprune.errors import MoepruneError
from moeprune.methods.dek import REPRESENTATIONS, expert_similarity
from moeprune.methods.groups import within_routing_groups
from moeprune.methods.merging import LINKAGES, distance_clustering


def dumps(obj) -> str:
    """JSON with one line per innermost list of numbers (a matrix row, a group), else indented."""
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\s+([-+.eE\d,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)


def _is_stats_dir(p: Path) -> bool:
    return (p / "stats.json").is_file() and (p / "stats.safetensors").is_file()


def resolve_inputs(source: str | Path, model: str | Path | None = None,
                   stats: str | Path | None = None) -> tuple[Path, Path | None]:
    """(model directory, stats directory or None) from the `analyze` arguments."""
    src = Path(source)
    if not src.exists():
        raise MoepruneError(f"{src} does not exist: give a model directory or a stats directory")
    if _is_stats_dir(src):
        if stats is not None:
            raise MoepruneError(
                f"{src} is already a stats directory; --stats is for a model directory source"
            )
        if model is None:
            observed = json.loads((src / "stats.json").read_text()).get("model", {}).get("source")
            if not observed or not Path(observed).is_dir():
                raise MoepruneError(
                    f"the statistics in {src} need their model to run the experts: pass --model PATH "
                    f"(they were observed on {observed or 'an unrecorded path'})"
                )
            model = observed
        return Path(model), src
    if model is not None:
        raise MoepruneError(f"{src} is a model directory; --model is for a stats directory source")
    if stats is not None and not _is_stats_dir(Path(stats)):
        raise MoepruneError(f"--stats {stats} is not a stats directory (written by `moeprune observe`)")
    return src, (Path(stats) if stats is not None else None)


def _order_and_boxes(groups: list[list[int]] | None, E: int) -> tuple[list[int], list[tuple[int, int]]]:
    if not groups:
        return list(range(E)), []
    order, boxes = [], []
    for g in groups:
        boxes.append((len(order), len(g)))
        order.extend(g)
    return order, boxes


def heatmap(sim: torch.Tensor, path: Path, title: str, groups: list[list[int]] | None = None) -> None:
    """Write the similarity matrix sim [E, E] as a PNG (matplotlib Agg canvas, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    E = sim.shape[0]
    order, boxes = _order_and_boxes(groups, E)
    M = sim[order][:, order].float().numpy()
    size = min(12.0, 3.0 + 0.18 * E)
    fig = Figure(figsize=(size + 1.2, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(M, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="linear CKA")
    step = max(1, E // 32)
    ticks = list(range(0, E, step))
    ax.set_xticks(ticks, [str(order[t]) for t in ticks], fontsize=7, rotation=90)
    ax.set_yticks(ticks, [str(order[t]) for t in ticks], fontsize=7)
    ax.set_xlabel("expert" + (" (ordered by group)" if groups else ""))
    ax.set_ylabel("expert")
    for start, n in boxes:
        if n > 1:
            ax.add_patch(
                Rectangle((start - 0.5, start - 0.5), n, n, fill=False, edgecolor="red", linewidth=1.5)
            )
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)


def _summary(sim: torch.Tensor) -> dict:
    E = sim.shape[0]
    off = sim.clone()
    off.fill_diagonal_(float("nan"))
    vals = off[~torch.isnan(off)]
    flat = torch.nan_to_num(off, nan=-1.0).argmax()
    a, b = int(flat // E), int(flat % E)
    return {"mean_offdiagonal_cka": round(float(vals.mean()), 6) if vals.numel() else None,
            "max_offdiagonal_cka": round(float(vals.max()), 6) if vals.numel() else None,
            "most_similar_pair": [min(a, b), max(a, b)] if vals.numel() else None}


def analyze(source: str | Path, out: str | Path, *, model: str | Path | None = None,
            stats: str | Path | None = None, representation: str | None = None, experts: int | None = None,
            linkage: str = "average", surrogate_tokens: int = 512, seed: int = 0, force: bool = False,
            flatten_groups: bool = False) -> dict:
    """Write per-layer CKA heatmaps and JSON to `out`; return the summary (also in summary.json)."""
    from moeprune.arch import get_adapter
    from moeprune.observe import Stats, check_same_model
    from moeprune.outputs import atomic_directory, check_output_dir
    from moeprune.pipeline.access import ModelWeights, ShardedWeights
    from moeprune.pipeline.sources import open_source
    from moeprune.plan import budget
    from moeprune.settings import RuntimeRequest, check_settings
    from moeprune.store.checkpoint import check_weight_files, load_config

    check_settings(surrogate_tokens=surrogate_tokens, seed=seed)
    model_dir, stats_dir = resolve_inputs(source, model, stats)
    representation = representation or ("data" if stats_dir is not None else "weight")
    if representation not in REPRESENTATIONS:
        raise MoepruneError(f"--representation {representation!r} is not one of {', '.join(REPRESENTATIONS)}")
    if linkage not in LINKAGES:
        raise MoepruneError(f"--linkage {linkage!r} is not one of {', '.join(LINKAGES)}")
    if representation == "data" and stats_dir is None:
        raise MoepruneError(
            "representation data compares expert outputs on the probe tokens of a calibration pass: "
            "pass --stats STATS (from `moeprune observe`), or use --representation weight"
        )
    check_output_dir(out, force, inputs=tuple(p for p in (model_dir, stats_dir) if p is not None))
    adapter = get_adapter(load_config(model_dir))
    keep = None
    if experts is not None:
        keep = budget(adapter.num_experts, adapter.top_k, experts=experts, n_group=adapter.n_group,
                      min_per_group=adapter.min_experts_per_group, flatten_groups=flatten_groups)
    n_group = 1 if flatten_groups else adapter.n_group
    st = Stats.load(stats_dir) if stats_dir is not None and representation == "data" else None
    if st is not None and (st.model.get("model_type") != adapter.family
                           or int(st.model.get("num_experts", -1)) != adapter.num_experts):
        raise MoepruneError(
            f"the statistics in {stats_dir} are of a {st.model.get('model_type')} model with "
            f"{st.model.get('num_experts')} experts, but {model_dir} is {adapter.family} with "
            f"{adapter.num_experts}: observe this model"
        )
    if st is not None:
        from moeprune.store.sharded import model_facts

        check_same_model(
            st.model, model_facts(model_dir), what=f"the statistics in {stats_dir}", model=str(model_dir),
            fix="observe this model, or give the model they were observed on with --model",
        )
    check_weight_files(model_dir)
    source, _why = open_source(model_dir, RuntimeRequest())  # one layer in memory at a time, as everywhere
    weights = ModelWeights(source.model) if source.in_memory else ShardedWeights(source)
    summary = {"model": str(model_dir), "stats": str(stats_dir) if st is not None else None,
               "representation": representation, "linkage": linkage, "experts_kept": keep,
               "num_experts": adapter.num_experts, "layers": {}}
    with atomic_directory(out, force=force) as tmp:
        for i in weights.layers():
            ls = st.layers.get(i) if st is not None else None
            if st is not None and ls is None:
                raise MoepruneError(f"the statistics in {stats_dir} have no MoE layer {i}")
            sim = expert_similarity(weights.layer(i), ls, representation, surrogate_tokens=surrogate_tokens,
                                    seed=seed, method="analyze")
            groups = None
            if keep is not None:
                groups = within_routing_groups(
                    sim.shape[0], keep, n_group, distance_clustering(1.0 - sim, linkage)
                )
            facts = {"layer": i, **_summary(sim), "groups": groups}
            title = f"layer {i}: linear CKA between experts ({representation})"
            if groups:
                title += f"\ngroups for {keep} experts boxed ({linkage} linkage)"
            heatmap(sim, tmp / f"layer_{i:03d}.png", title, groups)
            record = {"representation": representation, "linkage": linkage, "experts_kept": keep, **facts,
                      "cka": [[round(float(v), 6) for v in row] for row in sim]}
            (tmp / f"layer_{i:03d}.json").write_text(dumps(record))
            summary["layers"][str(i)] = facts
        (tmp / "summary.json").write_text(dumps(summary))
    return summary
