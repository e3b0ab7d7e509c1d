"""Calibration data: task-specific templates over JSONL fields."""

from __future__ import annotations

import json

import pytest
import transformers as tf

from moeprune.data import calibration_blocks, load_texts
from moeprune.errors import MoepruneError

# ---- task-specific calibration and the sweep ------------------------------------------------------

def test_calibration_template_joins_several_jsonl_fields(tmp_path, checkpoint):
    rows = [{"question": f"what is {i} plus {i}?", "answer": str(2 * i), "id": i} for i in range(400)]
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = load_texts(str(path), template="Q: {question} A: {answer}")
    assert texts[3] == "Q: what is 3 plus 3? A: 6"
    assert load_texts(str(path), field="question")[1] == "what is 1 plus 1?"
    with pytest.raises(MoepruneError, match="no field 'query' used by --calib-template"):
        load_texts(str(path), template="{query}")
    with pytest.raises(MoepruneError, match="plain text"):
        load_texts(_txt(tmp_path), template="{question}")
    tok = tf.AutoTokenizer.from_pretrained(str(checkpoint("mixtral")))
    cal = calibration_blocks(tok, str(path), samples=4, seq_len=16, template="Q: {question} A: {answer}")
    assert cal.provenance["template"] == "Q: {question} A: {answer}" and cal.input_ids.shape == (4, 16)


def _txt(tmp_path):
    p = tmp_path / "plain.txt"
    p.write_text("some text")
    return str(p)
