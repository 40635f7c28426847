"""Issue 16 item 3: the estimate's default view is short and fits 80 columns, its memory lines add up to the
peak, numbers are for people (ms/s/h, GiB with one decimal, dollars), and --detail still shows every line."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from launcher.cli import views
from launcher.estimate.search import estimate
from launcher.spec.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
QLORA = ROOT / "recipes" / "llama3-8b-qlora.yaml"

GOLDEN = """\
llama3-8b-qlora: llama-3.1-8b · qlora · sft · ddp on 1×1 NVIDIA H100 SXM5 80GB
parameters: 8.07 B total (model 8.03 B + LoRA 41.9 M); 41.9 M train (0.52%)
memory per GPU (GiB)
  weights                          5.5
  gradients                        0.1
  optimizer states                 0.1
  working memory (layer backward)  2.9
  overhead (context, allocator)    0.6
  peak                             9.2
fits: peak 9.2 GiB of 79.6 GiB usable
time: 803 ms a step × 3,074 steps = 41.1 min
cost: $1.71 at $2.5/GPU-hour
ftl estimate --detail: every memory line and phase, FLOPs, disk, data, MFU"""


def _render(monkeypatch, sets: list[str], detail: bool = False) -> tuple[str, dict]:
    buf = io.StringIO()
    monkeypatch.setattr(views, "console", Console(file=buf, width=80, color_system=None))
    d = estimate(load_recipe(QLORA, sets=sets)).to_json()
    views.render_estimate(d, detail=detail)
    return buf.getvalue(), d


def test_estimate_default_view_golden_at_80_columns(monkeypatch):
    text, _ = _render(monkeypatch, ["cluster.gpu=h100-sxm", "cluster.price_per_gpu_hour=2.5"])
    assert [ln.rstrip() for ln in text.splitlines()] == GOLDEN.splitlines(), text


@pytest.mark.parametrize("sets", [
    ["cluster.gpu=h100-sxm"],
    ["method=full", "train.optimizer=adamw", "cluster.gpu=a10g"],
    ["method=lora", "cluster.gpu=a100-80gb", "parallel.strategy=zero3", "cluster.gpus_per_node=4"],
])
def test_the_memory_lines_shown_add_up_to_the_peak(monkeypatch, sets):
    text, d = _render(monkeypatch, sets)
    lines = [ln.rstrip() for ln in text.split("memory per GPU (GiB)", 1)[1].split("\n")[1:]]
    shown = [float(ln.split()[-1]) for ln in lines[:5]]
    peak = float(lines[5].split()[-1])
    assert lines[5].split()[0] == "peak" and sum(shown) == pytest.approx(peak)
    assert peak == pytest.approx(round(d["per_device"]["peak_bytes"] / 1024**3, 1))
    assert len(text.splitlines()) <= 25 and "e+" not in text


def test_detail_shows_every_line_and_phase(monkeypatch):
    text, d = _render(monkeypatch, ["cluster.gpu=h100-sxm"], detail=True)
    pd = d["per_device"]
    for name in [*pd["detail"], *pd["phases"]]:
        assert name in text, name
    assert f"{pd['peak_bytes']:,}" in text and "TFLOP" in text and "8,030,261,248 in the model" in text


def test_the_parameter_total_counts_the_adapters_as_training_does():
    m = estimate(load_recipe(ROOT / "recipes" / "quickstart.yaml")).to_json()["model"]
    assert views.parameters_line(m).startswith("parameters: 984 k total (model 853 k + LoRA 131 k)")
    assert m["params_total"] + m["params_adapter"] == 984_192  # what the trainer logs for the quickstart


def test_models_table_keeps_every_name_whole_at_80_columns(monkeypatch):
    from launcher.cli import commands
    from launcher.spec.catalog import models as catalog_models

    buf = io.StringIO()
    monkeypatch.setattr(commands, "console", Console(file=buf, width=80, color_system=None))
    commands.models(as_json=False)
    text = buf.getvalue()
    assert max(len(ln.rstrip()) for ln in text.splitlines()) <= 80, text
    firsts = {ln.split()[0] for ln in text.splitlines() if ln and not ln.startswith(" ")}
    assert set(catalog_models()) <= firsts, text  # llama-3.1-8b, -70b and -405b can be told apart


def test_plan_table_fits_80_columns_without_cutting_words(monkeypatch):
    from typer.testing import CliRunner

    from launcher.cli import app, commands

    buf = io.StringIO()
    monkeypatch.setattr(commands, "console", Console(file=buf, width=80, color_system=None))
    res = CliRunner().invoke(app, ["plan", str(QLORA)])
    assert res.exit_code == 0, res.output
    table = buf.getvalue().split("chosen:")[0].splitlines()[2:]
    assert max(len(ln.rstrip()) for ln in table) <= 80, "\n".join(table)
    header, first = table[1].split(), table[2].split()
    assert header == ["profile", "strategy", "GPUs", "method", "µ×acc", "GiB", "time", "cost", "$/Mtok"], header
    profiles = {p.stem for p in (ROOT / "cluster").glob("*.yaml")}
    assert first[1] in profiles and first[-1].startswith("$"), first  # one row a line, names whole


def test_numbers_for_people():
    from launcher.cli import human as H

    assert [H.seconds(x) for x in (0.0123, 2.546, 803.2, 7829.0, 400000.0)] == \
        ["12.3 ms", "2.55 s", "13.4 min", "2.2 h", "4.6 days"]
    assert H.flops(7.253e15) == "7.25 PFLOP" and H.flops(1.9865e14) == "199 TFLOP"
    assert H.gib1(9932058730) == "9.2 GiB" and H.dollars(1.7149) == "$1.71" and H.dollars(0.0001) == "<$0.01"
    assert H.gpu_hours(2e-06) == "0.0072 GPU-s" and H.gpu_hours(0.5) == "30 GPU-min" and H.gpu_hours(12.34) == "12.3 GPU-h"
    assert H.sig4(8.078683471679687) == "8.079" and H.clock(65) == "1:05" and H.clock(3725) == "1:02:05"
    assert H.when("2026-01-02T03:04:05+00:00", now=1767323045.0 + 90) == "2026-01-02 03:04 UTC (90 s ago)"
    assert H.when(None) == "—"
