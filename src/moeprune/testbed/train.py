"""Train the testbed MoE models on the corpus, evaluate them, and cache them as HF checkpoints.

Pruning methods only separate on a *trained* MoE: on random weights every expert looks alike.
Two small models cover the two common shapes:

- `mixtral-8e`: Mixtral, 4 layers, hidden 256, 8 experts top-2 (about 8 M parameters);
- `qwen-fine`: Qwen2-MoE, fine-grained: 32 narrow experts top-4 plus a gated shared expert,
  about the same total size and the same active expert width per token.

A third, `demo-mixtral` (Mixtral, 2 layers, hidden 128, 8 experts top-2, about 2 M parameters),
is the one `moeprune demo` trains: small enough for a first run of a couple of minutes on 2
cores, trained enough to beat the bigram baseline clearly on both domains.

Each is trained from a fixed seed for a fixed number of steps, however long that takes, so the
result is a function of (model config, training config, corpus, tokenizer), and that is the cache
key; machine load changes only the wall time. Training checkpoints its whole state into
`<model dir>.partial/` every few dozen steps, so an interrupted build (Ctrl-C, a killed job)
resumes where it stopped, bit-identically on the same machine.

After training, `testbed_report.json` records the validation perplexity per domain next to an
add-one bigram baseline on the same tokens, and the per-layer expert-usage entropy, which shows
the router did not collapse. A model that does not beat the bigram on both domains is refused:
it is kept in `<model dir>.rejected/` for inspection, never under the cache key.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

from moeprune.errors import MoepruneError

from .cache import atomic_write_text, cache_root, finish_dir, stable_hash
from .corpus import Corpus, build_corpus
from .metrics import BigramModel, evaluate_tokens, usage_entropy
from .tokenizer import DEFAULT_VOCAB_SIZE, get_tokenizer, tokenizer_dir, tokenizer_fingerprint

FORMAT = 1  # bump when training or evaluation changes in a way the hash of the configs misses
TRAIN_DOMAINS = ("prose", "code")
EVAL_DOMAINS = ("prose", "code")


class TestbedQualityError(MoepruneError):
    """A trained testbed model failed its sanity check (for example it did not beat the bigram).

    A MoepruneError, so the CLI prints its one-line message (what failed, where the model was kept,
    what to do) and exits with status 2.
    """

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
    # Torch threads for training and evaluation when the caller names none (None: one per core).
    # The weights can depend on it (reduction order), so a set value is part of the cache key.
    threads: int | None = None

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
        # Measured about 3,500 tokens/s on 2 idle cores: 450 steps of 4,096 tokens is ~9 min
        # (longer on shared cores; an interrupted build resumes from its last checkpoint).
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
    "demo-mixtral": TestbedSpec(
        name="demo-mixtral",
        config_class="MixtralConfig",
        config_kwargs=dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-6,
                           intermediate_size=256, num_local_experts=8, num_experts_per_tok=2,
                           router_aux_loss_coef=0.02),
        train=TrainConfig(steps=400, batch_size=16, seq_len=128, lr=3e-3),
        # One thread: on 2 cores with one of them busy, two threads ran a step 5-10x slower than
        # one (each waits for the other at every parallel region), and a fixed count keeps the
        # weights the same on every machine (1 and 2 threads diverged in the 5th digit of the
        # loss after ~330 steps). On 2 idle cores a second thread would save about a third.
        threads=1,
    ),
}


# ---------------------------------------------------------------------------------------------
# Training


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
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


def sample_batch(
    streams: list[torch.Tensor], batch_size: int, seq_len: int, gen: torch.Generator
) -> torch.Tensor:
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
    seconds: float  # wall time of this call's steps (a resumed run counts only its own)
    tokens: int  # tokens of this call's steps
    final_loss: float  # LM loss, mean of the last logging interval
    final_aux_loss: float
    complete: bool  # always True on return: training stops only at cfg.steps (or by an exception)
    resumed_from: int = 0  # the checkpoint step this call started from (0: from the initial weights)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "training_log.jsonl"


def _save_checkpoint(work_dir: Path, state: dict) -> None:
    """Write the training state through a temporary file and rename it, so a kill never leaves half a file."""
    work_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{CHECKPOINT_FILE}.", dir=work_dir)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, work_dir / CHECKPOINT_FILE)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _load_checkpoint(work_dir: Path | None, cfg: TrainConfig) -> dict | None:
    """The saved training state in `work_dir` if it belongs to `cfg`, else None."""
    path = work_dir / CHECKPOINT_FILE if work_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=False)
    except Exception:  # noqa: BLE001 - an unreadable checkpoint only costs a restart from step 0
        return None
    return state if state.get("train") == asdict(cfg) and 0 < state.get("step", 0) <= cfg.steps else None


def _log_lines_up_to(path: Path, step: int) -> list[str]:
    """The log records of steps <= `step` (the ones a resumed run keeps)."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if json.loads(line)["step"] <= step]


def train_model(
    model: transformers.PreTrainedModel,
    streams: list[torch.Tensor],
    cfg: TrainConfig,
    *,
    log_path: Path | None = None,
    progress: bool = True,
    log_every: int = 10,
    threads: int | None = None,
    description: str = "training",
    work_dir: Path | None = None,
    checkpoint_every: int = 25,
    notify=None,
) -> TrainResult:
    """Train `model` in place on random windows of the token `streams` (each 1-D), seeded by `cfg.seed`.

    Training always runs to `cfg.steps`: the weights depend on the configs and the data, never on
    how fast the machine is. Writes one JSON line per `log_every` steps to `log_path` (step, loss,
    aux_loss, lr, tokens/s). With `work_dir`, the whole training state (weights, optimizer,
    schedule, both random generators, the loss accumulators) is saved there every
    `checkpoint_every` steps, and a later call with the same `cfg` and freshly initialised `model`
    continues from the last checkpoint; the result is bit-identical to an uninterrupted run on the
    same machine and thread count. `notify(line)` hears where training starts or resumes.
    """
    if any(len(s) <= cfg.seq_len for s in streams):
        raise ValueError(f"every stream must be longer than seq_len={cfg.seq_len}")
    say = notify or (lambda line: None)
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
    start, loss_acc, aux_acc, n_acc = 0, 0.0, 0.0, 0
    last_loss = last_aux = float("nan")
    state = _load_checkpoint(work_dir, cfg)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        start, (loss_acc, aux_acc, n_acc) = state["step"], state["accumulators"]
        last_loss, last_aux = state.get("last_losses", (last_loss, last_aux))
        say(f"[{description}] resuming from the checkpoint at step {start}/{cfg.steps} in {work_dir}")
    elif work_dir is not None:
        say(f"[{description}] training {cfg.steps} steps from the initial weights "
            f"(checkpoint every {checkpoint_every} steps in {work_dir}; Ctrl-C and run again to resume)")
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    kept_log = _log_lines_up_to(log_path, start) if log_path and start else []
    log_file = open(log_path, "w") if log_path else None  # noqa: SIM115 - closed in finally
    if log_file and kept_log:
        log_file.write("\n".join(kept_log) + "\n")
    bar = _progress_bar(progress)
    rng_outside = torch.get_rng_state()
    if state is not None:
        torch.set_rng_state(state["torch_rng"])  # nothing draws from it today; kept so that stays exact
    model.train()
    t0 = t_log = time.perf_counter()
    done = start
    try:
        with torch_threads(threads), bar:
            task = bar.add_task(description, total=cfg.steps, completed=start,
                                loss=loss_acc / n_acc if n_acc else float("nan"))
            for step in range(start, cfg.steps):
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
                done = step + 1
                bar.update(task, advance=1, loss=loss_acc / n_acc)
                now = time.perf_counter()
                if done % log_every == 0 or done == cfg.steps:
                    last_loss, last_aux = loss_acc / n_acc, aux_acc / n_acc
                    rec = {"step": done, "loss": round(last_loss, 5), "aux_loss": round(last_aux, 5),
                           "lr": sched.get_last_lr()[0],
                           "tokens_per_s": round(n_acc * tokens_per_step / max(now - t_log, 1e-9), 1),
                           "elapsed_s": round(now - t0, 2)}
                    if log_file:
                        log_file.write(json.dumps(rec) + "\n")
                        log_file.flush()
                    if progress and not bar.console.is_terminal and done % (log_every * 5) == 0:
                        # No live bar off a terminal (CI logs): a plain line with the same facts.
                        rate = (done - start) / max(now - t0, 1e-9)
                        left = (cfg.steps - done) / rate
                        bar.console.print(
                            f"{description}: step {done}/{cfg.steps}, loss {last_loss:.3f}, "
                            f"{rec['tokens_per_s']:,.0f} tokens/s, about {left:.0f} s left",
                            soft_wrap=True, markup=False, highlight=False)
                    loss_acc, aux_acc, n_acc, t_log = 0.0, 0.0, 0, now
                if work_dir is not None and (done % checkpoint_every == 0 or done == cfg.steps):
                    _save_checkpoint(work_dir, {
                        "step": done, "train": asdict(cfg), "model": model.state_dict(),
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                        "accumulators": (loss_acc, aux_acc, n_acc), "last_losses": (last_loss, last_aux)})
    except KeyboardInterrupt:
        saved = _load_checkpoint(work_dir, cfg)
        where = (f"the next run resumes from step {saved['step']} ({work_dir})" if saved
                 else "no checkpoint yet, the next run starts again")
        say(f"[{description}] interrupted at step {done}/{cfg.steps}; {where}")
        raise
    finally:
        torch.set_rng_state(rng_outside)
        if log_file:
            log_file.close()
    model.eval()
    seconds = time.perf_counter() - t0
    if n_acc:  # an interval shorter than log_every at the end
        last_loss, last_aux = loss_acc / n_acc, aux_acc / n_acc
    return TrainResult(done, seconds, (done - start) * tokens_per_step, last_loss, last_aux, True, start)


def _progress_bar(enabled: bool):
    from moeprune.runtime import progress_display

    return progress_display("loss {task.fields[loss]:.3f}", enabled=enabled)


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
    with torch_threads(threads):
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
        # Only when the spec pins it, so the keys of the specs that do not stay as they were.
        **({"threads": spec.threads} if spec.threads is not None else {}),
    })


def testbed_paths(final: Path) -> tuple[Path, Path]:
    """(work directory with the resumable training state, where a rejected model is kept) of `final`."""
    return final.with_name(final.name + ".partial"), final.with_name(final.name + ".rejected")


def build_testbed(
    spec: TestbedSpec,
    corpus: Corpus,
    cache_dir: str | Path | None = None,
    *,
    progress: bool = True,
    rebuild: bool = False,
    strict: bool = True,
    threads: int | None = None,
    checkpoint_every: int = 25,
) -> Path:
    """Train, evaluate and save `spec` on `corpus` unless a cached copy exists; return its directory.

    Training runs to the spec's fixed step count however long that takes, checkpointing into
    `<final>.partial/` so an interrupted build resumes where it stopped. Only a model that beats the
    bigram baseline on every domain is stored under the final key. One that does not goes to
    `<final>.rejected/` (with its report), and `TestbedQualityError` says so; with `strict=False`
    that directory is returned instead, with a warning. The next strict call trains again.
    """
    say = _say(progress)
    threads = threads if threads is not None else spec.threads
    tokenizer = get_tokenizer(corpus, spec.vocab_size, cache_dir)
    tok_path = tokenizer_dir(corpus, spec.vocab_size, cache_dir)
    final = cache_root(cache_dir) / "testbeds" / f"{spec.name}-{testbed_key(spec, corpus, tok_path)}"
    work, rejected = testbed_paths(final)
    if rebuild:
        for d in (final, work):  # both are this package's own outputs for exactly this key
            if d.exists():
                shutil.rmtree(d)
    if (final / "testbed_report.json").exists():
        problem = _report_problem(json.loads((final / "testbed_report.json").read_text()))
        if problem is None:
            return final
        # Older versions stored such models under the final key; move it aside rather than serve it.
        if rejected.exists():
            shutil.rmtree(rejected)  # an older rejected build of the same key
        os.rename(final, rejected)
        say(f"[{spec.name}] the cached model {problem}; moved it to {rejected} and training again")
    elif (rejected / "testbed_report.json").exists() and not (work / CHECKPOINT_FILE).exists():
        report = json.loads((rejected / "testbed_report.json").read_text())
        problem = _report_problem(report)
        if not strict and report.get("complete"):
            warnings.warn(f"testbed {spec.name} {problem}; using it anyway (strict=False): {rejected}",
                          stacklevel=2)
            return rejected
        say(f"[{spec.name}] an earlier build was rejected ({problem}; report in {rejected}); training again")
    report = _train_and_save(spec, corpus, tokenizer, final, work, progress=progress, threads=threads,
                             checkpoint_every=checkpoint_every)
    problem = _report_problem(report)
    if problem is None:
        return final
    if strict:
        raise TestbedQualityError(_quality_message(report, problem, rejected))
    warnings.warn(f"testbed {spec.name} {problem}; using it anyway (strict=False): {rejected}", stacklevel=2)
    return rejected


def _report_problem(report: dict) -> str | None:
    """Why a testbed report does not qualify for the cache (None when it does)."""
    if not report.get("complete", False):
        tr = report.get("training", {})
        return (f"stopped after {tr.get('steps_done', '?')} of {report.get('train', {}).get('steps', '?')} "
                "training steps")
    if not report.get("beats_bigram", False):
        doms = report["evaluation"]["domains"]
        worse = ", ".join(f"{d} {v['perplexity']:.1f} vs {v['bigram_perplexity']:.1f}"
                          for d, v in doms.items() if not v["beats_bigram"])
        return f"does not beat the add-one bigram baseline (validation perplexity {worse})"
    return None


def _quality_message(report: dict, problem: str, rejected: Path) -> str:
    return (f"testbed {report['name']} {problem}; it was not cached (kept for inspection in {rejected}). "
            "Train it longer or larger (its TestbedSpec), or report this with "
            f"{rejected}/testbed_report.json")


def _train_and_save(spec, corpus, tokenizer, final: Path, work: Path, *, progress, threads,
                    checkpoint_every) -> dict:
    """Train (or resume) into `work`, evaluate, and write the model to `final` or, if it fails, beside it."""
    say = _say(progress)
    cfg = spec.train
    train_ids = [encode_file(tokenizer, corpus.path(d, "train")) for d in TRAIN_DOMAINS]
    say(
        f"[{spec.name}] training tokens: "
        + ", ".join(f"{d} {len(t):,}" for d, t in zip(TRAIN_DOMAINS, train_ids))
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = transformers.AutoModelForCausalLM.from_config(spec.make_config(tokenizer))
    model.set_experts_implementation("eager")
    params = count_parameters(model)
    say(f"[{spec.name}] parameters: {params['total']:,} ({params['active_per_token']:,} active per token)")
    result = train_model(model, train_ids, cfg, log_path=work / LOG_FILE, progress=progress, threads=threads,
                         description=spec.name, work_dir=work, checkpoint_every=checkpoint_every, notify=say)
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    say(f"[{spec.name}] trained {result.steps_done} steps{resumed}, the last "
        f"{result.steps_done - result.resumed_from} in {result.seconds:.0f}s "
        f"({result.tokens_per_s:,.0f} tokens/s), loss {result.final_loss:.3f}")
    t_eval = time.perf_counter()
    evaluation = evaluate_testbed(model, tokenizer, corpus, cfg.seq_len, train_ids=train_ids, threads=threads)
    _, rejected = testbed_paths(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        model.config.output_router_logits = False
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.copyfile(work / LOG_FILE, tmp / LOG_FILE)
        report = {
            "name": spec.name,
            "key": final.name,
            "complete": result.steps_done == cfg.steps,
            "beats_bigram": evaluation["beats_bigram"],
            "corpus_version": corpus.version,
            "corpus_dir": str(corpus.root),
            "tokenizer_fingerprint": tokenizer_fingerprint(tmp),
            "config_class": spec.config_class,
            "config": spec.config_kwargs,
            "train": asdict(cfg),
            "parameters": params,
            "training": {
                "steps_done": result.steps_done, "resumed_from": result.resumed_from,
                "seconds": round(result.seconds, 1), "tokens": result.tokens,
                "tokens_per_s": round(result.tokens_per_s, 1), "final_loss": round(result.final_loss, 4),
                "final_aux_loss": round(result.final_aux_loss, 4), "threads": threads or os.cpu_count(),
            },
            "evaluation": evaluation,
            "evaluation_seconds": round(time.perf_counter() - t_eval, 1),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": sys.version.split()[0]},
        }
        atomic_write_text(tmp / "testbed_report.json", json.dumps(report, indent=1))
        problem = _report_problem(report)
        if problem is None:
            finish_dir(tmp, final)
        else:
            finish_dir(tmp, rejected, replace=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)  # the training state is no longer needed either way
    say(f"[{spec.name}] saved to {final if problem is None else rejected}")
    return report


def summarise_report(report: dict) -> str:
    """A few human-readable lines from a `testbed_report.json` dict."""
    ev, tr = report["evaluation"], report["training"]
    lines = [
        (
            f"{report['name']}: {report['parameters']['total']:,} parameters "
            f"({report['parameters']['active_per_token']:,} active), {tr['steps_done']} steps in "
            f"{tr['seconds']:.0f}s at {tr['tokens_per_s']:,.0f} tokens/s, final loss {tr['final_loss']:.3f}"
        )
    ]
    for d, v in ev["domains"].items():
        lines.append(
            f"  {d:6s} validation ppl {v['perplexity']:8.2f}   bigram {v['bigram_perplexity']:8.2f}   "
            f"usage entropy/layer {v['usage_entropy']}"
        )
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
    threads: int | None = None,
) -> Path:
    """The directory of the trained testbed `name`, building corpus, tokenizer and model if missing.

    The directory loads with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`
    and also holds `testbed_report.json` and `training_log.jsonl`.
    """
    if name not in TESTBEDS:
        raise MoepruneError(f"unknown testbed {name!r}; known: {', '.join(TESTBEDS)}")
    corpus = build_corpus(cache_dir)
    return build_testbed(TESTBEDS[name], corpus, cache_dir, progress=progress, rebuild=rebuild,
                         strict=strict, threads=threads)


def load_testbed(
    path: str | Path,
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """Load a testbed directory as (model in eval mode with eager experts, tokenizer)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    model.set_experts_implementation("eager")
    model.eval()
    return model, transformers.AutoTokenizer.from_pretrained(path)
