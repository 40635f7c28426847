"""Recorded GPU measurements (docs/validation/*.json, written by bench/gpu_validate.py) against today's estimator.

Goal: predicted peak allocated memory within ±10% of torch.cuda.max_memory_allocated. With no GPU
run recorded yet, only the recording tool's shape is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.estimate.search import estimate
from launcher.spec.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
POINTS = sorted((ROOT / "docs" / "validation").glob("*.json"))


@pytest.mark.parametrize("path", POINTS, ids=lambda p: p.stem)
def test_recorded_gpu_point(path):
    rec = json.loads(path.read_text())
    recipe = load_recipe(ROOT / rec["recipe"], sets=rec["sets"] + [f"cluster.gpu={rec['gpu']}", "cluster.gpus_per_node=1", "cluster.nodes=1"])
    est = estimate(recipe).to_json()
    measured = rec["measured"]["max_memory_allocated"]
    predicted = est["per_device"]["peak_allocated_bytes"]
    assert predicted == pytest.approx(measured, rel=0.10), f"{path.name}: predicted {predicted:,} vs measured {measured:,}"


def test_recording_tool_exists():
    assert (ROOT / "bench" / "gpu_validate.py").is_file()
