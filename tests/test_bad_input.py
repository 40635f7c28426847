"""Bad input (issue 15): each class the 2026-12-01 fuzz found in the YAML reader (launcher/core/useryaml.py),
the schema's numbers and the paths ends in one error naming the file or key, the value (at most 200
characters) and the fix -- quickly, never a traceback, never a walk of the filesystem."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from launcher.core.errors import RecipeError
from launcher.spec.recipe import load_recipe, parse_set

GOOD = "name: t\nmodel: llama-3.2-1b\n"


def _load(tmp_path: Path, text: str | bytes) -> RecipeError:
    p = tmp_path / "r.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert e.value.file == str(p)
    assert len(str(e.value)) < 600 and "\n" not in str(e.value)
    return e.value


def test_a_good_recipe_still_reads(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(GOOD + "train: {gradient_checkpointing: true, lr: 2.0e-4}\ncluster: {price_date: 2026-10-01}\n")
    r = load_recipe(p)
    assert r.train.gradient_checkpointing is True and str(r.cluster.price_date) == "2026-10-01"


@pytest.mark.parametrize("text,line,words", [
    (GOOD + "train:\n  lr: 0.1\ntrain:\n  epochs: 2\n", 5, "given twice (lines 3 and 5)"),
    (GOOD + "train: {gradient_checkpointing: yes}\n", 3, "write true or false"),
    (GOOD + "train: {epochs: 1:30}\n", 3, "base-60"),
    (GOOD + "train: {seed: 010}\n", 3, "octal"),
    (GOOD + "hub_model_id: !!binary aGVsbG8=\n", 3, "tag"),
    (GOOD + "cluster: !!python/object:os.system {}\n", 3, "tag"),
])
def test_yaml_11_surprises_and_duplicates_are_refused_with_the_line(tmp_path, text, line, words):
    e = _load(tmp_path, text)
    assert e.field == f"line {line}" and words in e.fix, str(e)


def test_not_utf8(tmp_path):
    e = _load(tmp_path, GOOD.encode() + b"name2: caf\xe9\n")
    assert "not UTF-8" in e.fix and e.field == "line 3"


def test_alias_bomb_is_refused_fast_and_not_printed(tmp_path):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    t = time.monotonic()
    e = _load(tmp_path, GOOD + "\n".join(levels) + "\n")
    assert time.monotonic() - t < 2.0
    assert "expands to more than" in e.fix


def test_deep_nesting_is_refused(tmp_path):
    e = _load(tmp_path, GOOD + "x: " + "[" * 500 + "]" * 500 + "\n")
    assert "nested" in e.fix


def test_huge_file_is_refused_before_reading(tmp_path):
    e = _load(tmp_path, GOOD + "# " + "x" * (2 << 20) + "\n")
    assert "at most" in e.fix


def test_set_values_go_through_the_same_rules():
    assert parse_set("train.gradient_checkpointing=true") == (["train", "gradient_checkpointing"], True)
    assert parse_set("name=plain words") == (["name"], "plain words")
    with pytest.raises(RecipeError, match="write true or false"):
        parse_set("train.gradient_checkpointing=on")
    with pytest.raises(RecipeError, match="base-60"):
        parse_set("train.epochs=1:30")


@pytest.mark.parametrize("train,words", [
    ({"lr": float("inf")}, "finite"),
    ({"lr": "inf"}, "finite"),
    ({"epochs": "1e400"}, "finite"),
    ({"micro_batch_size": True}, "a boolean"),
    ({"micro_batch_size": 10**400}, "digits"),
])
def test_infinities_booleans_as_numbers_and_huge_integers_are_refused(train, words):
    from launcher.spec.recipe import recipe_from_dict

    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"name": "t", "model": "llama-3.2-1b", "train": train})
    assert words in e.value.fix and e.value.field.startswith("train.") and len(str(e.value)) < 400, str(e.value)
    assert "Value error" not in str(e.value)


def test_budget_flag_must_be_finite():
    from launcher.spec.recipe import recipe_from_dict

    with pytest.raises(RecipeError, match="finite"):
        recipe_from_dict({"name": "t", "model": "llama-3.2-1b", "budget": {"max_cost_usd": float("inf")}})


@pytest.mark.parametrize("sets,field", [
    (["model=/tmp/" + "a" * 300 + "/x"], "model"),
    (["data.path=/tmp/" + "b" * 5000], "data.path"),
])
def test_unusable_paths_are_one_error_naming_the_key(sets, field):
    root = Path(__file__).resolve().parent.parent
    with pytest.raises(RecipeError) as e:
        load_recipe(root / "recipes" / "quickstart.yaml", sets=sets)
    assert e.value.field == field and "at most" in e.value.fix and len(str(e.value)) < 400


def test_nul_bytes_and_long_recipe_names_are_refused():
    from launcher.spec.recipe import recipe_from_dict

    with pytest.raises(RecipeError, match="NUL byte"):
        recipe_from_dict({"name": "t", "model": "a\x00b"})
    with pytest.raises(RecipeError, match="not a usable path"):
        load_recipe(Path("/tmp") / ("q" * 300 + ".yaml"))


def test_a_data_folder_is_counted_like_the_trainer_reads_it_never_walked(tmp_path):
    """The estimate counts a folder's own data files (as the trainer reads them), not its subfolders':
    data.path: / does not walk the filesystem."""
    from launcher.estimate.dataset import count_local

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "hidden.jsonl").write_text('{"text": "not read"}\n' * 5)
    (tmp_path / "train.jsonl").write_text('{"text": "read"}\n' * 3)
    size = count_local(tmp_path, {}, None)
    assert size is not None and size.examples == 3
    t = time.monotonic()
    count_local(Path("/"), {}, None)  # only the files at the top of /, if any
    assert time.monotonic() - t < 2


@pytest.mark.parametrize("raw,field,words", [
    ({"lora": {"target_modules": "q_proj"}}, "lora.target_modules", "[q_proj]"),
    ({"lora": {"target_modules": 0}}, "lora.target_modules", "'all-linear'; or a valid list"),
    ({"train": {"max_steps": "ten"}}, "train.max_steps", "without quotes"),
])
def test_errors_name_the_key_not_pydantics_internals(raw, field, words):
    from launcher.spec.recipe import recipe_from_dict

    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"name": "t", "model": "llama-3.2-1b", **raw})
    assert e.value.field == field and words in e.value.fix, str(e.value)
    assert "literal[" not in str(e.value) and "Input should" not in str(e.value)


def test_json_at_the_bounds_parses_everywhere():
    """The largest recipe the schema accepts gives JSON with no NaN or Infinity and every integer within int64;
    one step past the bounds is refused at validation."""
    import json

    from launcher.estimate.search import estimate
    from launcher.spec.recipe import recipe_from_dict

    raw = {"name": "t", "model": "llama-3.1-405b", "method": "full", "task": "dapt",
           "data": {"max_seq_len": 2**24, "num_examples": 10**15 // 2**24, "avg_tokens_per_example": 2**24},
           "train": {"micro_batch_size": 1, "grad_accum": 1024, "epochs": 10_000},
           "cluster": {"gpu": "h100-sxm", "gpus_per_node": 64, "nodes": 1, "price_per_gpu_hour": 1000}}
    d = estimate(recipe_from_dict(raw)).to_json()
    json.dumps(d, allow_nan=False)

    def ints(o):
        if isinstance(o, dict):
            for v in o.values():
                yield from ints(v)
        elif isinstance(o, list):
            for v in o:
                yield from ints(v)
        elif isinstance(o, int) and not isinstance(o, bool):
            yield o

    assert max(ints(d)) < 2**63 and isinstance(d["flops_per_step"], float)
    for change, field in (({"train": {**raw["train"], "grad_accum": 65536}}, "train.grad_accum"),
                          ({"data": {**raw["data"], "num_examples": 10**12}}, "data.num_examples"),
                          ({"cluster": {**raw["cluster"], "nodes": 5000}}, "cluster.nodes")):
        with pytest.raises(RecipeError) as e:
            recipe_from_dict({**raw, **change})
        assert e.value.field == field, str(e.value)


@pytest.mark.parametrize("value,ok", [("2e-4", True), ("1.0e-5", True), (".5e-3", True), ("0.001", True),
                                      ("'2e-4'", False), ('"0.001"', False), ("'8'", False)])
def test_numbers_in_exponent_notation_read_and_quoted_numbers_are_refused(tmp_path, value, ok):
    """YAML 1.2 numbers (2e-4: PyYAML's YAML 1.1 reads it as a string) are numbers; a quoted number where a
    number goes is refused with the fix."""
    p = tmp_path / "r.yaml"
    key = "micro_batch_size" if value.strip("'\"") == "8" else "lr"
    p.write_text(GOOD + f"train: {{{key}: {value}}}\n")
    if ok:
        assert isinstance(load_recipe(p).train.lr, float)
        return
    e = _load(tmp_path, GOOD + f"train: {{{key}: {value}}}\n")
    assert e.field == f"train.{key}" and "written as a string" in e.fix and "without quotes" in e.fix
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    with pytest.raises(RecipeError, match="without quotes") as e:
        load_recipe(good, sets=[f"train.{key}={value}"])
    assert e.value.field == f"train.{key}"


@pytest.mark.parametrize("flags,words", [
    (["--budget", "-1"], "--budget -1.0: give a positive, finite amount"),
    (["--budget", "inf"], "--budget inf"),
    (["--deadline", "abc"], "--deadline 'abc'"),
    (["--deadline", "9999999999999999d"], "is not a deadline"),
])
def test_launch_dry_run_checks_the_rental_caps(flags, words):
    """launch --dry-run refuses a budget or deadline a real launch would refuse, before anything."""
    from typer.testing import CliRunner

    from launcher.cli.commands import app

    root = Path(__file__).resolve().parent.parent
    res = CliRunner().invoke(app, ["launch", str(root / "recipes" / "llama3-8b-qlora.yaml"), "--cluster",
                                   str(root / "cluster" / "runpod-8xh100.yaml"), "--dry-run", *flags])
    assert res.exit_code == 2 and words in res.stderr and "dry run" not in res.stdout, res.stderr
