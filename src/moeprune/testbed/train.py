"""Train the testbed MoE models on the corpus, evaluate them, and cache them as HF checkpoints.

Pruning methods only separate on a *trained* MoE: on random weights every expert looks alike.
Two small models cover the two common shapes:

- `mixtral-8e`: Mixtral, 4 layers, hidden 256, 8 experts top-2 (about 8 M parameters);
- `qwen-fine`: Qwen2-MoE, fine-grained: 32 narrow experts top-4 plus a gated shared expert,
  about the same total size and the same active expert width per token.

Each is trained from a fixed seed for a fixed number of steps (sized to take about ten minutes
on 2 CPU cores), so the result is a function of (model config, training config, corpus,
tokenizer), and that is the cache key. A wall-clock budget stops a run on a much slower machine;
such a model is saved but marked incomplete in its report.

After training, `testbed_report.json` records the validation perplexity per domain next to an
add-one bigram baseline on the same tokens, and the per-layer expert-usage entropy, which shows
the router did not collapse. A model that does not beat the bigram on both domains is refused.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

from .cache import atomic_write_text, building_dir, cache_root, stable_hash
from .corpus import Corpus, build_corpus
from .metrics import BigramModel, evaluate_tokens, usage_entropy
from .tokenizer import DEFAULT_VOCAB_SIZE, get_tokenizer, tokenizer_dir, tokenizer_fingerprint

FORMAT = 1  # bump when training or evaluation changes in a way the hash of the configs misses
TRAIN_DOMAINS = ("prose", "code")
EVAL_DOMAINS = ("prose", "code")


class TestbedQualityError(RuntimeError):
    """A trained testbed model failed its sanity check (for example it did not beat the bigram)."""

    __test__ = False  # not a pytest test class, despite the name


@dataclass(frozen=True)
class TrainConfig:
    """Everything about training that changes the weights; all of it goes into the cache key."""

    steps: int = 500  # optimizer steps; fixed, not time-based, so the model is reproducible
    batch_size: int = 16  # sequences per step, half from each domain
    seq_len: int = 256  # tokens per training sequence, also the evaluation window
    lr: float = 2e-3  # peak AdamW learning rate
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    warmup_steps: int = 30  # linear warmup from 0
    weight_decay: float = 0.1  # on matrices only; norms and biases are not decayed
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # global gradient-norm clip
    seed: int = 0  # model init and batch sampling


@dataclass(frozen=True)
class TestbedSpec:
    """A named testbed: a transformers config class, its arguments, and how to train it."""

    __test__ = False  # not a pytest test class, despite the name

    name: str
    config_class: str  # a class in `transformers`, e.g. "MixtralConfig"
    config_kwargs: dict = field(hash=False)  # without vocab and special-token ids (from the tokenizer)
    train: TrainConfig = TrainConfig()
    vocab_size: int = DEFAULT_VOCAB_SIZE

    def make_config(self, tokenizer) -> transformers.PretrainedConfig:
        cls = getattr(transformers, self.config_class)
        cfg = cls(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            # Saved False so a plain forward with labels returns the LM loss alone; training asks
            # for router logits per call, which adds the aux loss there.
            output_router_logits=False,
            **self.config_kwargs,
        )
        cfg._experts_implementation = "eager"  # fastest on CPU; batched_mm is slow and memory-hungry
        return cfg


_ATTN = {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 4,
         "max_position_embeddings": 1024, "tie_word_embeddings": True, "rms_norm_eps": 1e-6}

TESTBEDS: dict[str, TestbedSpec] = {
    "mixtral-8e": TestbedSpec(
        name="mixtral-8e",
        config_class="MixtralConfig",
        config_kwargs=dict(**_ATTN, intermediate_size=256, num_local_experts=8, num_experts_per_tok=2,
                           router_aux_loss_coef=0.02),
        # Measured about 3,500 tokens/s on 2 idle cores: 450 steps of 4,096 tokens is ~9 min,
        # leaving room under the 15-minute budget when the cores are shared.
        train=TrainConfig(steps=450),
    ),
    "qwen-fine": TestbedSpec(
        name="qwen-fine",
        config_class="Qwen2MoeConfig",
        config_kwargs=dict(**_ATTN, intermediate_size=512, moe_intermediate_size=64, num_experts=32,
                           num_experts_per_tok=4, shared_expert_intermediate_size=256, norm_topk_prob=False,
                           decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.02),
        # Measured about 3,100 tokens/s on 2 idle cores: 400 steps of 4,096 tokens is ~9 min.
        train=TrainConfig(steps=400),
    ),
}


# ---------------------------------------------------------------------------------------------
# Training


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Use `n` intra-op threads inside the block and restore the caller's setting after."""
    old = torch.get_num_threads()
    torch.set_num_threads(n or os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine down to `min_lr_ratio` at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def sample_batch(streams: list[torch.Tensor], batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """`batch_size` random windows of `seq_len` tokens, split evenly over `streams`: [B, T]."""
    rows = []
    for i in range(batch_size):
        s = streams[i % len(streams)]
        start = int(torch.randint(0, len(s) - seq_len + 1, (1,), generator=gen))
        rows.append(s[start: start + seq_len])
    return torch.stack(rows)


@dataclass
class TrainResult:
    steps_done: int
    seconds: float
    tokens: int
    final_loss: float  # LM loss, mean of the last logging interval
    final_aux_loss: float
    complete: bool  # False when the time budget stopped training early

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def train_model(
    model: transformers.PreTrainedModel,
    streams: list[torch.Tensor],
    cfg: TrainConfig,
    *,
    log_path: Path | None = None,
    progress: bool = True,
    max_seconds: float | None = None,
    log_every: int = 10,
    threads: int | None = None,
    description: str = "training",
) -> TrainResult:
    """Train `model` in place on random windows of the token `streams` (each 1-D), seeded by `cfg.seed`.

    Writes one JSON line per `log_every` steps to `log_path` (step, loss, aux_loss, lr, tokens/s).
    """
    if any(len(s) <= cfg.seq_len for s in streams):
        raise ValueError(f"every stream must be longer than seq_len={cfg.seq_len}")
    aux_coef = float(getattr(model.config, "router_aux_loss_coef", 0.0))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # independent of the init stream
    tokens_per_step = cfg.batch_size * cfg.seq_len
    log_file = open(log_path, "w") if log_path else None  # noqa: SIM115 - closed in finally
    bar = _progress_bar(progress)
    model.train()
    t0 = t_log = time.perf_counter()
    step, loss_acc, aux_acc, n_acc = 0, 0.0, 0.0, 0
    last_loss = last_aux = float("nan")
    complete = True
    try:
        with _torch_threads(threads), bar:
            task = bar.add_task(description, total=cfg.steps, loss=float("nan"))
            for step in range(cfg.steps):
                x = sample_batch(streams, cfg.batch_size, cfg.seq_len, gen)  # [B, T]
                out = model(input_ids=x, labels=x, output_router_logits=True, use_cache=False)
                aux = out.aux_loss.item() if out.aux_loss is not None else 0.0
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                loss_acc += out.loss.item() - aux_coef * aux
                aux_acc += aux
                n_acc += 1
                bar.update(task, advance=1, loss=loss_acc / n_acc)
                done = step + 1
                elapsed = time.perf_counter() - t0
                if done % log_every == 0 or done == cfg.steps:
                    now = time.perf_counter()
                    last_loss, last_aux = loss_acc / n_acc, aux_acc / n_acc
                    rec = {"step": done, "loss": round(last_loss, 5), "aux_loss": round(last_aux, 5),
                           "lr": sched.get_last_lr()[0], "tokens_per_s": round(n_acc * tokens_per_step / (now - t_log), 1),
                           "elapsed_s": round(elapsed, 2)}
                    if log_file:
                        log_file.write(json.dumps(rec) + "\n")
                        log_file.flush()
                    if progress and not bar.console.is_terminal and done % (log_every * 5) == 0:
                        bar.console.print(f"{description}: {json.dumps(rec)}", soft_wrap=True, markup=False,
                                          highlight=False)
                    loss_acc, aux_acc, n_acc, t_log = 0.0, 0.0, 0, now
                if max_seconds is not None and elapsed > max_seconds and done < cfg.steps:
                    complete = False
                    bar.console.print(
                        f"[bold red]{description}: time budget of {max_seconds:.0f}s reached after "
                        f"{done}/{cfg.steps} steps; stopping early[/]"
                    )
                    break
    finally:
        if log_file:
            log_file.close()
    model.eval()
    seconds = time.perf_counter() - t0
    if n_acc:  # a partial interval left by an early stop
        last_loss, last_aux = loss_acc / n_acc, aux_acc / n_acc
    return TrainResult(step + 1, seconds, (step + 1) * tokens_per_step, last_loss, last_aux, complete)


def _progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), disable=not enabled,
    )


# ---------------------------------------------------------------------------------------------
# Evaluation


def encode_file(tokenizer, path: Path) -> torch.Tensor:
    """Token ids of a whole text file, as the CLI would tokenize it: [N]."""
    text = path.read_text(encoding="utf-8")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def evaluate_testbed(
    model: transformers.PreTrainedModel,
    tokenizer,
    corpus: Corpus,
    seq_len: int,
    *,
    split: str = "validation",
    train_ids: list[torch.Tensor] | None = None,
    batch_size: int = 8,
    threads: int | None = None,
) -> dict:
    """Perplexity per domain, the bigram baseline on the same predictions, and routing entropy.

    The bigram is fitted on the training tokens of both domains (what the model saw), so it is the
    strongest bigram available without peeking at evaluation text.
    """
    if train_ids is None:
        train_ids = [encode_file(tokenizer, corpus.path(d, "train")) for d in TRAIN_DOMAINS]
    # Separate streams, so no pair spans the end of one domain and the start of the next.
    bigram = BigramModel(train_ids, len(tokenizer))
    report: dict = {"split": split, "seq_len": seq_len, "domains": {}}
    total_counts: list[torch.Tensor] = []
    with _torch_threads(threads):
        for dom in EVAL_DOMAINS:
            ids = encode_file(tokenizer, corpus.path(dom, split))  # [N]
            res = evaluate_tokens(model, ids, seq_len, batch_size, count_experts=True)
            big = bigram.perplexity(ids.numpy(), seq_len)
            report["domains"][dom] = {
                "tokens": len(ids),
                "predicted_tokens": res.n_predicted,
                "perplexity": round(res.perplexity, 4),
                "bigram_perplexity": round(big, 4),
                "beats_bigram": res.perplexity < big,
                "expert_counts": [c.tolist() for c in res.expert_counts],
                "usage_entropy": [round(usage_entropy(c), 4) for c in res.expert_counts],
            }
            total_counts = [a + b for a, b in zip(total_counts, res.expert_counts, strict=True)] \
                if total_counts else res.expert_counts
    report["usage_entropy"] = [round(usage_entropy(c), 4) for c in total_counts]
    report["beats_bigram"] = all(d["beats_bigram"] for d in report["domains"].values())
    return report


def count_parameters(model: transformers.PreTrainedModel) -> dict:
    """Total parameters, those in routed experts, and those active per token (top-k of the routed)."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    n_experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 1
    active = total - routed + routed * cfg.num_experts_per_tok // n_experts
    return {"total": total, "routed_experts": routed, "active_per_token": active}


# ---------------------------------------------------------------------------------------------
# Building and caching


def testbed_key(spec: TestbedSpec, corpus: Corpus, tok_path: Path) -> str:
    return stable_hash({
        "format": FORMAT,
        "config_class": spec.config_class,
        "config": spec.config_kwargs,
        "train": asdict(spec.train),
        "corpus": corpus.version,
        "tokenizer": tokenizer_fingerprint(tok_path),
        "transformers": transformers.__version__.split(".")[:2],  # init code can change between minors
    })


def build_testbed(
    spec: TestbedSpec,
    corpus: Corpus,
    cache_dir: str | Path | None = None,
    *,
    progress: bool = True,
    rebuild: bool = False,
    strict: bool = True,
    max_seconds: float | None = 15 * 60,
    threads: int | None = None,
) -> Path:
    """Train, evaluate and save `spec` on `corpus` unless a cached copy exists; return its directory.

    `max_seconds` bounds the training loop's wall time (not part of the cache key). With `strict`,
    a model that does not beat the bigram baseline raises `TestbedQualityError` (it is still saved,
    so the report can be read).
    """
    tokenizer = get_tokenizer(corpus, spec.vocab_size, cache_dir)
    tok_path = tokenizer_dir(corpus, spec.vocab_size, cache_dir)
    final = cache_root(cache_dir) / "testbeds" / f"{spec.name}-{testbed_key(spec, corpus, tok_path)}"
    if rebuild and final.exists():
        shutil.rmtree(final)
    if not (final / "testbed_report.json").exists():
        _train_and_save(spec, corpus, tokenizer, final, progress=progress, max_seconds=max_seconds,
                        threads=threads)
    _check_report(final, strict)
    return final


def _train_and_save(spec, corpus, tokenizer, final: Path, *, progress, max_seconds, threads) -> None:
    say = _say(progress)
    cfg = spec.train
    train_ids = [encode_file(tokenizer, corpus.path(d, "train")) for d in TRAIN_DOMAINS]
    say(f"[{spec.name}] training tokens: " + ", ".join(f"{d} {len(t):,}" for d, t in zip(TRAIN_DOMAINS, train_ids)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = transformers.AutoModelForCausalLM.from_config(spec.make_config(tokenizer))
    model.set_experts_implementation("eager")
    params = count_parameters(model)
    say(f"[{spec.name}] parameters: {params}")
    with building_dir(final) as tmp:
        result = train_model(model, train_ids, cfg, log_path=tmp / "training_log.jsonl", progress=progress,
                             max_seconds=max_seconds, threads=threads, description=spec.name)
        say(f"[{spec.name}] trained {result.steps_done} steps in {result.seconds:.0f}s "
            f"({result.tokens_per_s:,.0f} tokens/s), loss {result.final_loss:.3f}")
        t_eval = time.perf_counter()
        evaluation = evaluate_testbed(model, tokenizer, corpus, cfg.seq_len, train_ids=train_ids, threads=threads)
        model.config.output_router_logits = False
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        report = {
            "name": spec.name,
            "key": final.name,
            "complete": result.complete,
            "beats_bigram": evaluation["beats_bigram"],
            "corpus_version": corpus.version,
            "corpus_dir": str(corpus.root),
            "tokenizer_fingerprint": tokenizer_fingerprint(tmp),
            "config_class": spec.config_class,
            "config": spec.config_kwargs,
            "train": asdict(cfg),
            "parameters": params,
            "training": {
                "steps_done": result.steps_done, "seconds": round(result.seconds, 1), "tokens": result.tokens,
                "tokens_per_s": round(result.tokens_per_s, 1), "final_loss": round(result.final_loss, 4),
                "final_aux_loss": round(result.final_aux_loss, 4), "max_seconds": max_seconds,
                "threads": threads or os.cpu_count(),
            },
            "evaluation": evaluation,
            "evaluation_seconds": round(time.perf_counter() - t_eval, 1),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": sys.version.split()[0]},
        }
        atomic_write_text(tmp / "testbed_report.json", json.dumps(report, indent=1))
    say(f"[{spec.name}] saved to {final}")


def _check_report(final: Path, strict: bool) -> None:
    report = json.loads((final / "testbed_report.json").read_text())
    if not report["complete"]:
        warnings.warn(
            f"testbed {report['name']} at {final} stopped at its time budget after "
            f"{report['training']['steps_done']}/{report['train']['steps']} steps; rebuild it on a less "
            f"loaded machine (get_testbed(..., rebuild=True)) for the reference model", stacklevel=3)
    if strict and not report["beats_bigram"]:
        doms = report["evaluation"]["domains"]
        detail = "; ".join(f"{d}: model {v['perplexity']:.2f} vs bigram {v['bigram_perplexity']:.2f}"
                           for d, v in doms.items())
        raise TestbedQualityError(
            f"testbed {report['name']} does not beat the add-one bigram baseline on validation text "
            f"({detail}). It is saved at {final} for inspection; train longer or larger."
        )


def summarise_report(report: dict) -> str:
    """A few human-readable lines from a `testbed_report.json` dict."""
    ev, tr = report["evaluation"], report["training"]
    lines = [(f"{report['name']}: {report['parameters']['total']:,} parameters "
             f"({report['parameters']['active_per_token']:,} active), {tr['steps_done']} steps in "
             f"{tr['seconds']:.0f}s at {tr['tokens_per_s']:,.0f} tokens/s, final loss {tr['final_loss']:.3f}")]
    for d, v in ev["domains"].items():
        lines.append(f"  {d:6s} validation ppl {v['perplexity']:8.2f}   bigram {v['bigram_perplexity']:8.2f}   "
                     f"usage entropy/layer {v['usage_entropy']}")
    lines.append(f"  routing entropy per layer (both domains): {ev['usage_entropy']}")
    if not report["beats_bigram"]:
        lines.append("  FAILED: does not beat the bigram baseline on every domain")
    return "\n".join(lines)


def _say(enabled: bool):
    def say(msg: str) -> None:
        if enabled:
            print(msg, file=sys.stderr, flush=True)
    return say


def get_testbed(
    name: str,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    *,
    rebuild: bool = False,
    strict: bool = True,
    max_seconds: float | None = 15 * 60,
    threads: int | None = None,
) -> Path:
    """The directory of the trained testbed `name`, building corpus, tokenizer and model if missing.

    The directory loads with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`
    and also holds `testbed_report.json` and `training_log.jsonl`.
    """
    if name not in TESTBEDS:
        raise KeyError(f"unknown testbed {name!r}; known: {', '.join(TESTBEDS)}")
    corpus = build_corpus(cache_dir)
    return build_testbed(TESTBEDS[name], corpus, cache_dir, progress=progress, rebuild=rebuild,
                         strict=strict, max_seconds=max_seconds, threads=threads)


def load_testbed(path: str | Path) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """Load a testbed directory as (model in eval mode with eager experts, tokenizer)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    model.set_experts_implementation("eager")
    model.eval()
    return model, transformers.AutoTokenizer.from_pretrained(path)
