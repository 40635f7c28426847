"""The training data pre-flight check (`launcher.train.data.validate_data`) and the loader.

validate_data runs in the CLI process before any training process starts: it must be cheap, must
not import torch, and every error must name the file and the columns it found.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.core.errors import FtlError
from launcher.spec.recipe import recipe_from_dict
from launcher.train.data import map_label, validate_data

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "recipes" / "data"
TINY = ROOT / "recipes" / "assets" / "tiny-llama"


def recipe(task: str, path, **data):
    raw = {"name": "t", "model": str(TINY), "task": task, "data": {"path": str(path), **data}}
    return recipe_from_dict(raw, ROOT / "recipes" / "x.yaml")


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def jsonl(tmp_path: Path, name: str, rows: list[dict]) -> Path:
    return write(tmp_path, name, "".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("task,file,kind,extra", [
    ("sft", "alpaca.jsonl", "alpaca", {}),
    ("sft", "chat.jsonl", "chat", {}),
    ("dapt", "corpus.txt", "text", {}),
    ("classification", "sentiment.csv", "labelled-text", {"label_map": {"negative": 0, "positive": 1}}),
    ("dpo", "pairs.jsonl", "preference", {}),
])
def test_shipped_data_passes_for_its_task(task, file, kind, extra):
    rep = validate_data(recipe(task, DATA / file, **extra))
    assert rep.kind == kind and rep.checked
    assert rep.rows and rep.rows_checked > 0
    if task == "classification":
        assert set(rep.labels) == {"0", "1"}


def test_sharegpt_and_a_named_schema(tmp_path):
    """ShareGPT conversations are chat data of their own kind; data.schema picks a shape where a record
    could be read two ways, and a schema the columns do not have is refused naming the columns."""
    share = [{"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}]
    assert validate_data(recipe("sft", jsonl(tmp_path, "s.jsonl", share))).kind == "sharegpt"
    both = [{"instruction": "2+2?", "output": "4", "prompt": "2+2?", "completion": "4"}]
    p = jsonl(tmp_path, "both.jsonl", both)
    assert validate_data(recipe("sft", p)).kind == "prompt-completion"  # auto: the first shape that fits
    assert validate_data(recipe("sft", p, schema="alpaca")).kind == "alpaca"
    with pytest.raises(FtlError, match="found columns"):
        validate_data(recipe("sft", p, schema="messages"))
    bad = [{"conversations": [{"from": "human", "value": "2+2?"}]}]
    with pytest.raises(FtlError, match="the last turn must be the assistant's"):
        validate_data(recipe("sft", jsonl(tmp_path, "b.jsonl", bad)))


def test_prompt_completion_and_column_mapping(tmp_path):
    p = jsonl(tmp_path, "qa.jsonl", [{"question": "2+2?", "answer": "4"}, {"question": "3+3?", "answer": "6"}])
    rep = validate_data(recipe("sft", p, columns={"instruction": "question", "output": "answer"}))
    assert rep.kind == "alpaca" and rep.fields == ["instruction", "output"] and rep.columns == ["question", "answer"]
    p2 = jsonl(tmp_path, "pc.jsonl", [{"prompt": "a", "completion": "b"}])
    assert validate_data(recipe("sft", p2)).kind == "prompt-completion"
    with pytest.raises(FtlError, match=r"data.columns.text = 'body': no such column.*\['question', 'answer'\]"):
        validate_data(recipe("dapt", p, columns={"text": "body"}))


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FtlError, match=f"{missing}.*no such file"):
        validate_data(recipe("sft", missing))


@pytest.mark.parametrize("name,text,why", [
    ("empty.jsonl", "", "the file is empty"),
    ("blank.jsonl", "\n\n  \n", "no records"),
    ("header.csv", "text,label\n", "header .* but no rows"),
    ("empty.json", "[]", "no records"),
    ("space.txt", "   \n", "only whitespace"),
])
def test_empty_files_are_named(tmp_path, name, text, why):
    p = write(tmp_path, name, text)
    task = "dapt" if name.endswith(".txt") else "classification" if name.endswith(".csv") else "sft"
    with pytest.raises(FtlError, match=f"{p}: .*{why}"):
        validate_data(recipe(task, p))


def test_wrong_columns_name_the_file_and_the_columns_found():
    with pytest.raises(FtlError) as e:
        validate_data(recipe("classification", DATA / "alpaca.jsonl"))
    msg = str(e.value)
    assert str(DATA / "alpaca.jsonl") in msg
    assert "['instruction', 'input', 'output']" in msg and "text + label" in msg and "data.columns" in msg
    with pytest.raises(FtlError, match=r"pairs.jsonl: task 'sft' needs .*found columns \['prompt', 'chosen', 'rejected'\]"):
        validate_data(recipe("sft", DATA / "pairs.jsonl"))
    with pytest.raises(FtlError, match=r"sentiment.csv: task 'dpo' needs .*found columns \['text', 'label'\]"):
        validate_data(recipe("dpo", DATA / "sentiment.csv"))


def test_unreadable_formats_are_named(tmp_path):
    bad = write(tmp_path, "bad.jsonl", '{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(FtlError, match=f"{bad}: not valid JSON Lines: line 2"):
        validate_data(recipe("dapt", bad))
    lines = write(tmp_path, "lines.json", '{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(FtlError, match=f"{lines}: not valid JSON.*JSON Lines"):
        validate_data(recipe("dapt", lines))
    pq = write(tmp_path, "garbage.parquet", b"this is not parquet at all")
    with pytest.raises(FtlError, match=f"{pq}: not a readable Parquet file"):
        validate_data(recipe("dapt", pq))
    latin = write(tmp_path, "latin.csv", "text,label\n".encode() + "caf\xe9,0\n".encode("latin-1"))
    with pytest.raises(FtlError, match=f"{latin}: not UTF-8"):
        validate_data(recipe("classification", latin))
    odd = write(tmp_path, "data.xyz", "whatever")
    with pytest.raises(FtlError, match=r"data.xyz: cannot tell the data format.*data.format"):
        validate_data(recipe("dapt", odd))
    arr = jsonl(tmp_path, "arr.jsonl", [])
    arr.write_text("[1, 2]\n")
    with pytest.raises(FtlError, match="line 1 is a JSON list, not an object"):
        validate_data(recipe("dapt", arr))


def test_parquet_is_read_with_pyarrow(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["good film", "bad film"], "label": ["positive", "negative"]}), p)
    rep = validate_data(recipe("classification", p, label_map={"negative": 0, "positive": 1}))
    assert rep.format == "parquet" and rep.rows == 2 and rep.labels == {"0": 1, "1": 1}


def test_labels_are_checked(tmp_path):
    p = write(tmp_path, "s.csv", "text,label\ngood,positive\nbad,negative\nmeh,neutral\n")
    with pytest.raises(FtlError, match=r"s.csv: row 3: label 'neutral' is not in data.label_map"):
        validate_data(recipe("classification", p, label_map={"negative": 0, "positive": 1}))
    with pytest.raises(FtlError, match=r"row 1: label 'positive' is a name; give data.label_map"):
        validate_data(recipe("classification", p))
    ints = write(tmp_path, "i.csv", "text,label\ngood,1\nbad,0\nodd,2\n")
    with pytest.raises(FtlError, match=r"row 3: label '2' is outside 0..1"):
        validate_data(recipe("classification", ints))
    rep = validate_data(recipe("classification", ints, label_map={"a": 0, "b": 1, "c": 2}))
    assert rep.labels == {"0": 1, "1": 1, "2": 1}  # ids that are label_map values are accepted as they are
    assert map_label("positive", {"negative": 0, "positive": 1}, 2) == 1 and map_label(1, None, 2) == 1
    with pytest.raises(FtlError, match="class ids must be 0..1"):
        validate_data(recipe("classification", ints, label_map={"a": 0, "b": 2}))


def test_chat_records_must_end_with_the_assistant(tmp_path):
    p = jsonl(tmp_path, "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                                    {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(FtlError, match=r"c.jsonl: row 2: the last turn must be the assistant's"):
        validate_data(recipe("sft", p))


def test_text_files_only_for_dapt():
    with pytest.raises(FtlError, match=r"corpus.txt: a .txt file is one raw text.*task 'sft' needs"):
        validate_data(recipe("sft", DATA / "corpus.txt"))


def test_folder_of_files_and_validation_split(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    for split, n in (("train", 5), ("validation", 2)):
        jsonl(d, f"{split}.jsonl", [{"text": f"doc {i}"} for i in range(n)])
    rep = validate_data(recipe("dapt", d, validation_split="validation"))
    assert rep.files == [str(d / "train.jsonl")] and rep.rows == 5
    assert rep.validation is not None and rep.validation.rows == 2
    with pytest.raises(FtlError, match="data.validation_split = 'test'"):
        validate_data(recipe("dapt", d, validation_split="test"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FtlError, match="the folder holds no data files"):
        validate_data(recipe("dapt", tmp_path / "empty"))


def test_hub_datasets_are_not_read():
    rep = validate_data(recipe("sft", "yahma/alpaca-cleaned"))
    assert rep.format == "hub" and rep.checked is False


def test_no_path_and_early_stopping_without_eval(tmp_path):
    r = recipe_from_dict({"name": "t", "model": str(TINY)}, ROOT / "recipes" / "x.yaml")
    with pytest.raises(FtlError, match="data.path is not set"):
        validate_data(r)
    r = recipe("sft", DATA / "alpaca.jsonl", validation_fraction=0)
    r.train.early_stopping_patience = 2
    with pytest.raises(FtlError, match="early_stopping_patience needs evaluation data"):
        validate_data(r)


def test_validate_data_does_not_import_torch():
    code = (
        "import sys; from launcher.spec.recipe import recipe_from_dict; from launcher.train.data import validate_data;"
        f"r = recipe_from_dict({{'name': 't', 'model': {str(TINY)!r}, 'task': 'classification',"
        f" 'data': {{'path': {str(DATA / 'sentiment.csv')!r}, 'label_map': {{'negative': 0, 'positive': 1}}}}}});"
        "validate_data(r); heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_load_splits_renames_columns(tmp_path):
    from launcher.train.data import load_splits

    p = write(tmp_path, "r.csv", "review,stars\ngood,positive\nNA,negative\n")
    train, val = load_splits(recipe("classification", p, columns={"text": "review", "label": "stars"},
                                    label_map={"negative": 0, "positive": 1}))
    assert val is None and train.column_names == ["text", "label"]
    assert train["text"] == ["good", "NA"]  # "NA" stays a text
