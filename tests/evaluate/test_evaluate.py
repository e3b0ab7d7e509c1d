"""moeprune.evaluate: perplexity windows, task builders, the lm-eval bridge, reports and `moeprune eval`."""

import json
import random
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from moeprune.arch.tiny import save_tiny_checkpoint
from moeprune.cli import main
from moeprune.errors import MoepruneError
from moeprune.evaluate import (
    cloze_items,
    comparison_rows,
    load_tasks,
    mc_items,
    parse_task_texts,
    perplexity,
    render_markdown,
    run_tasks,
    write_tasks,
)
from moeprune.evaluate.perplexity import token_stream

WORDS = ("king", "crown", "sword", "heart", "night", "honour", "blood", "love", "grief", "France", "England",
         "duke", "lord", "queen", "fair", "sweet", "death", "war", "peace", "speak", "thou", "thee", "shall")


def verse(seed: int = 0, lines: int = 240) -> str:
    """Deterministic verse-like text: speaker names, lines of 5-9 words, blank lines between speeches."""
    rng = random.Random(seed)
    out = []
    for k in range(lines):
        if k % 6 == 0:
            out += ["", rng.choice(("KING.", "QUEEN.", "YORK.", "GLOSTER."))]
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 9))]
        out.append(" ".join(words).capitalize() + rng.choice((",", ".", ";", "!", "")))
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaluate")
    prose = d / "prose.test.txt"
    prose.write_text(verse())
    code = d / "code.test.txt"
    code.write_text(Path(textwrap.__file__).read_text())  # real code, on every machine
    base, other = d / "base", d / "other"
    save_tiny_checkpoint("mixtral", base, seed=0)
    save_tiny_checkpoint("mixtral", other, seed=1)
    return {"dir": d, "prose": prose, "code": code, "base": base, "other": other}


@pytest.fixture(scope="module")
def tiny(files):
    from moeprune.store.checkpoint import load_model, load_tokenizer

    return load_model(files["base"]), load_tokenizer(files["base"])


# --------------------------------------------------------------------------- perplexity


def test_perplexity_uses_consecutive_non_overlapping_windows(tiny, files):
    model, tok = tiny
    L = 16
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()),
                                           with_kwargs=True)
    try:
        res = perplexity(model, tok, files["prose"], seq_len=L, max_tokens=200, batch_size=3)
    finally:
        hook.remove()
    tokens = token_stream(tok, [files["prose"].read_text()])
    W = 200 // L  # the ragged tail of 200 - 12*16 = 8 tokens is dropped
    assert res["windows"] == W and res["tokens"] == W * (L - 1) and res["seq_len"] == L
    assert res["text_tokens"] == tokens.numel()
    fed = torch.cat(seen)  # batches of 3, 3, 3, 3 windows
    assert [b.shape[0] for b in seen] == [3, 3, 3, 3]
    assert torch.equal(fed, tokens[: W * L].view(W, L))

    # the same number computed by hand, one window at a time
    nll = 0.0
    with torch.no_grad():
        for w in range(W):
            ids = tokens[w * L: (w + 1) * L]
            logp = torch.log_softmax(model(ids[None]).logits[0].double(), -1)
            nll -= logp[torch.arange(L - 1), ids[1:]].sum().item()
    assert res["nll"] == pytest.approx(nll / (W * (L - 1)), rel=1e-5)
    assert res["ppl"] == pytest.approx(torch.tensor(nll / (W * (L - 1))).exp().item(), rel=1e-5)


def test_perplexity_is_deterministic_and_reads_text_or_path(tiny, files):
    model, tok = tiny
    a = perplexity(model, tok, files["prose"], seq_len=32, max_tokens=256)
    b = perplexity(model, tok, str(files["prose"]), seq_len=32, max_tokens=256, batch_size=1)
    c = perplexity(model, tok, files["prose"].read_text(), seq_len=32, max_tokens=256)
    assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-6) and a["ppl"] == pytest.approx(c["ppl"], rel=1e-6)
    assert a["sha256"] == c["sha256"]


def test_uniform_logits_give_vocab_size_perplexity(files):
    from moeprune.store.checkpoint import load_model, load_tokenizer

    model, tok = load_model(files["base"]), load_tokenizer(files["base"])
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()  # every logit 0: a uniform distribution
    res = perplexity(model, tok, files["prose"], seq_len=32, max_tokens=128)
    assert res["ppl"] == pytest.approx(model.config.vocab_size, rel=1e-6)  # float32 log-softmax


def test_perplexity_refuses_too_little_text_or_a_missing_file(tiny, files):
    model, tok = tiny
    with pytest.raises(MoepruneError, match="fewer than one window"):
        perplexity(model, tok, "a few words", seq_len=64)
    with pytest.raises(MoepruneError, match="does not exist"):
        perplexity(model, tok, str(files["dir"] / "missing.txt"))
    with pytest.raises(MoepruneError, match="max_position_embeddings"):
        perplexity(model, tok, files["prose"], seq_len=4096)


# --------------------------------------------------------------------------- task builders


@pytest.mark.parametrize("kind", ["prose", "code"])
def test_mc_items_are_deterministic_and_valid(files, kind):
    text = files[kind].read_text()
    items = mc_items(text, n=40, seed=3, domain=kind)
    assert items == mc_items(text, n=40, seed=3, domain=kind)
    assert items != mc_items(text, n=40, seed=4, domain=kind)
    assert len(items) == 40
    lines = [line.rstrip() for line in text.splitlines()]
    for it in items:
        choices = it["choices"]
        assert len(choices) == 4 and len({" ".join(c.split()) for c in choices}) == 4
        assert 0 <= it["gold"] < 4
        gold = choices[it["gold"]]
        assert len(it["context"]) >= 200
        # the gold is the real text: the context's lines, then the gold's lines, from the item's line on
        n_gold = gold.count("\n") + 1
        assert "\n".join(lines[it["line"] - 1: it["line"] - 1 + n_gold]) == gold
        assert "\n".join(lines[: it["line"] - 1]).endswith(it["context"])


@pytest.mark.parametrize("kind", ["prose", "code"])
def test_cloze_items_are_deterministic_and_valid(files, kind):
    text = files[kind].read_text()
    items = cloze_items(text, n=40, seed=3, domain=kind)
    assert items == cloze_items(text, n=40, seed=3, domain=kind)
    assert len(items) == 40
    lines = [line.rstrip() for line in text.splitlines()]
    for it in items:
        assert re.fullmatch(r"\s*[A-Za-z_][A-Za-z0-9_']+", it["target"]) and len(it["target"].strip()) >= 3
        # context + target is the real text up to the line's last word; only punctuation follows it
        head = "\n".join(lines[: it["line"]])
        upto_word = head[: re.search(r"[^A-Za-z0-9_]*$", head).start()]
        assert upto_word.endswith(it["context"] + it["target"])
        assert re.search(r"\w", it["context"].split("\n")[-1])  # never the first word of its line


def test_write_tasks_writes_local_lm_eval_yamls(files, tmp_path):
    names = write_tasks({"prose": files["prose"], "code": files["code"]}, tmp_path, n_items=25, seed=1)
    assert names == ["moeprune_prose_mc", "moeprune_prose_cloze", "moeprune_code_mc", "moeprune_code_cloze"]
    for name in names:
        cfg = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
        data = Path(cfg["dataset_kwargs"]["data_files"]["test"])
        assert cfg["dataset_path"] == "json" and cfg["test_split"] == "test" and data.is_absolute()
        assert len(data.read_text().splitlines()) == 25
    again = tmp_path / "again"
    write_tasks({"prose": files["prose"], "code": files["code"]}, again, n_items=25, seed=1)
    assert (again / "moeprune_code_mc.jsonl").read_text() == (tmp_path / "moeprune_code_mc.jsonl").read_text()
    with pytest.raises(MoepruneError, match="domain name"):
        write_tasks({"Prose!": files["prose"]}, tmp_path)
    with pytest.raises(MoepruneError, match="DOMAIN=PATH"):
        parse_task_texts(["prose.txt"])


# --------------------------------------------------------------------------- lm-eval bridge


def test_lm_eval_bridge_runs_a_local_task_on_an_in_memory_model(tiny, files, tmp_path):
    model, tok = tiny
    write_tasks({"prose": files["prose"]}, tmp_path, n_items=20)
    res = run_tasks(model, tok, ["moeprune_prose_mc", "moeprune_prose_cloze"], task_dir=tmp_path, limit=4,
                    batch_size=4)
    mc, cloze = res["moeprune_prose_mc"], res["moeprune_prose_cloze"]
    assert 0.0 <= mc["acc"] <= 1.0 and 0.0 <= mc["acc_norm"] <= 1.0 and mc["samples"] == 4
    assert 0.0 <= cloze["acc"] <= 1.0 and cloze["samples"] == 4


def test_lm_eval_bridge_fails_in_one_line(files, tmp_path, monkeypatch):
    write_tasks({"prose": files["prose"]}, tmp_path, n_items=10)
    with pytest.raises(MoepruneError, match="unknown lm-eval task 'moeprune_prose_nope'") as e:
        load_tasks(["moeprune_prose_mc", "moeprune_prose_nope"], tmp_path, include_defaults=False)
    assert "\n" not in str(e.value)
    (tmp_path / "moeprune_prose_mc.jsonl").unlink()  # the data of a task is gone
    with pytest.raises(MoepruneError, match="could not be fetched") as e:
        load_tasks(["moeprune_prose_mc"], tmp_path)
    assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the eval extra were not installed
    with pytest.raises(MoepruneError, match=r"pip install 'moeprune\[eval\]'"):
        load_tasks(["moeprune_prose_mc"], tmp_path)


# --------------------------------------------------------------------------- reports and the CLI


def test_comparison_rows_show_deltas_against_the_first():
    def model(ppl, acc, total):
        return {"name": f"m{total}", "path": f"/x/m{total}",
                "parameters": {"total": total, "routed_experts": total // 2},
                "perplexity": {"t.txt": {"ppl": ppl}}, "tasks": {"task_mc": {"acc": acc, "acc_stderr": 0.02}}}

    report = {"texts": ["t.txt"], "models": [model(10.0, 0.50, 1000), model(12.5, 0.45, 750)]}
    rows = dict(comparison_rows(report))
    assert rows["ppl t.txt"][1].delta == "+2.50" and rows["ppl t.txt"][1].relative == "+25.0%"
    assert rows["ppl t.txt"][1].better is False
    assert rows["task_mc acc"][1].delta == "-5.0 pt" and rows["task_mc acc"][1].value == "45.0 ±2.0"
    assert rows["parameters"][1].relative == "-25.0%"
    assert "+2.50 (+25.0%)" in render_markdown(report)


@pytest.mark.slow
def test_cli_eval_compares_two_checkpoints_and_writes_json(files, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = main(["eval", str(files["base"]), str(files["other"]), "--text", str(files["prose"]),
               "--task-text", f"prose={files['prose']}", "--task-items", "12", "--limit", "3",
               "--seq-len", "32", "--max-tokens", "256", "--batch-size", "4", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "ppl prose.test.txt" in printed and "moeprune_prose_mc acc" in printed
    assert "%)" in printed  # the second checkpoint's perplexity delta
    report = json.loads(out.read_text())
    rows = comparison_rows(report)
    assert all(cells[1].delta and not cells[0].delta for _, cells in rows)  # every row compares
    assert [m["name"] for m in report["models"]] == ["base", "other"]
    assert report["tasks"] == ["moeprune_prose_mc", "moeprune_prose_cloze"]
    for m in report["models"]:
        ppl = m["perplexity"][str(files["prose"])]
        assert ppl["windows"] == 8 and ppl["tokens"] == 8 * 31 and ppl["ppl"] > 1
        assert m["tasks"]["moeprune_prose_mc"]["samples"] == 3
        assert m["parameters"]["total"] > m["parameters"]["routed_experts"] > 0
    # exists
    assert main(["eval", str(files["base"]), "--text", str(files["prose"]), "--json", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
