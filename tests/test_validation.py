"""Recorded GPU measurements against today's estimator: every point in docs/validation/ (or $FTL_VALIDATION_DIR).

bench/gpu_validate.py (scripts/gpu-validate) writes the records: one JSON object a line in *.jsonl (an older
single-object *.json is read too). A record keeps the recipe and the `--set` overrides it was measured with; this
re-estimates them with the estimator as it is now and asks for the predicted peak allocated within ±10% of
torch.cuda.max_memory_allocated and the predicted peak (overhead included) within ±20% of max_memory_reserved. So a
change to the estimator that moves it away from what a GPU measured fails here.

Only measurements are points: records of entries that were skipped or failed, and the environment line, are not.
A CPU rehearsal record (`scripts/gpu-validate --rehearse`, never written to docs/validation/) has no allocator
figures: for it only the re-estimate is checked, so that a rehearsal folder runs this same code
(tests/test_gpu_validate.py points FTL_VALIDATION_DIR at one, and at a record out of tolerance, which must fail).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from bench.gpu_validate import cluster_sets, read_records
from launcher.estimate.search import estimate
from launcher.spec.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = {"max_memory_allocated": ("peak_allocated_bytes", 0.10), "max_memory_reserved": ("peak_bytes", 0.20)}
MEASURED = ("ok", "cut")  # a cut run stopped at a step boundary after measuring at least one step


def validation_dir() -> Path:
    return Path(os.environ.get("FTL_VALIDATION_DIR") or ROOT / "docs" / "validation")


def points(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    """(id, record) for every measured entry in the folder's *.jsonl and *.json files."""
    out = []
    for path in sorted(folder.glob("*.json")):
        rec = json.loads(path.read_text())
        out.append((path.stem, rec))
    for path in sorted(folder.glob("*.jsonl")):
        for rec in read_records(path):
            if rec.get("record") == "entry" and rec.get("status") in MEASURED:
                out.append((f"{path.stem}:{rec['name']}", rec))
    return out


def reestimate(rec: dict[str, Any]) -> dict[str, Any]:
    """Today's `ftl estimate --json` for the record's recipe and sets, on one device of its GPU (none: the CPU)."""
    recipe = load_recipe(ROOT / rec["recipe"], sets=list(rec["sets"]) + cluster_sets(rec.get("gpu")))
    return estimate(recipe).to_json()


def problems(rec: dict[str, Any]) -> list[str]:
    """What is wrong with one record against today's estimator ([]: within tolerance)."""
    if not rec.get("gpu") and not rec.get("rehearsal"):
        return ["no GPU named: not a GPU measurement (rehearsal records stay out of docs/validation/)"]
    per_device = reestimate(rec)["per_device"]
    measured = rec.get("measured") or {}
    found = []
    for key, (predicted_key, tol) in TOLERANCE.items():
        value = measured.get(key)
        if value is None:
            if rec.get("gpu"):
                found.append(f"measured.{key} is missing")
            continue
        predicted = per_device[predicted_key]
        if abs(predicted - value) > tol * value:
            found.append(f"{predicted_key} {predicted:,} vs {key} {value:,} ({predicted / value - 1:+.1%}, "
                         f"tolerance ±{tol:.0%})")
    return found


@pytest.mark.parametrize("rec", [pytest.param(rec, id=rid) for rid, rec in points(validation_dir())])
def test_recorded_gpu_point(rec: dict[str, Any]) -> None:
    found = problems(rec)
    assert not found, f"{rec.get('name')}: " + "; ".join(found)


def test_recording_tool_exists() -> None:
    assert (ROOT / "bench" / "gpu_validate.py").is_file() and (ROOT / "scripts" / "gpu-validate").is_file()
