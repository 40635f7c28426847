"""`ftl preview`: the examples as the trainer builds them, the trained tokens marked, and the statistics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.spec.recipe import load_recipe
from launcher.train.preview import packed_rows, preview

ROOT = Path(__file__).resolve().parent.parent
QUICK = ROOT / "recipes" / "quickstart.yaml"

# the shipped chat data through the quickstart's tiny Llama: example 2 of the training split, as printed
GOLDEN_CHAT = """--- example 2: 56 tokens ---
<|begin_of_text|><|system|>
You are a patient tutor who answers clearly.<|end_of_text|><|user|>
What color is a ripe banana?<|end_of_text|><|assistant|>
[[A ripe banana is yellow.<|end_of_text|>]]<|user|>
What sound does a frog make?<|end_of_text|><|assistant|>
[[A frog says croak.<|end_of_text|>]]
chat data: 475 training examples, 25 held out ({data})
tokens per example: min 19, median 54, p95 99, max 126 (27,264 in all)
longer than max_seq_len 128: 0 (truncated)
[[...]]: tokens that carry the loss
"""


def test_chat_preview_golden():
    """Not a terminal: the trained tokens in [[brackets]]; every assistant turn (train_on: assistant)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "launcher.cli", "preview", str(QUICK), "--set", "data.path=data/chat.jsonl",
                          "-n", "2"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout[res.stdout.index("--- example 2"):]
    assert out == GOLDEN_CHAT.format(data=ROOT / "recipes" / "data" / "chat.jsonl")
    assert "Rendering prompts" not in res.stderr  # no library progress bars


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_alpaca_preview_marks_the_completion_as_trl_does(train_on):
    r = load_recipe(QUICK, sets=[f"data.train_on={train_on}"])
    p = preview(r, n=3)
    assert p.kind == "alpaca" and len(p.examples) == 3
    for ex in p.examples:
        trained = [t for t, tr in ex.segments if tr]
        if train_on == "all":
            assert len(ex.segments) == 1 and ex.segments[0][1]
        else:
            assert len(trained) == 1 and trained[0].endswith("<|end_of_text|>")
            assert ex.segments[0][0].rstrip().endswith("### Response:")  # the prompt does not train
    st = p.stats
    assert st["examples"] + st["held_out"] == 1000 and st["over_max_seq_len"] == 0
    assert st["tokens_min"] <= st["tokens_median"] <= st["tokens_p95"] <= st["tokens_max"] <= r.data.max_seq_len


def test_truncation_and_packing_are_reported():
    r = load_recipe(QUICK, sets=["data.max_seq_len=48", "data.packing=true"])
    p = preview(r, n=1)
    st = p.stats
    assert st["over_max_seq_len"] > 0
    ex = p.examples[0]
    assert ex.tokens - ex.truncated == 48 or ex.truncated == 0
    assert 0 < st["packing_efficiency"] <= 1


def test_best_fit_decreasing_rows():
    assert packed_rows([5, 5, 5, 5], 10) == 2
    assert packed_rows([6, 6, 4, 4], 10) == 2  # 6+4, 6+4
    assert packed_rows([7, 7, 7], 10) == 3
    assert packed_rows([30, 3], 10) == 2  # cut to 10, then 3 in a row of its own
