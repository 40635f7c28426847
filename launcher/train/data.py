"""Training data: a cheap pre-flight check (`validate_data`) and the loader the trainer uses.

`validate_data(recipe)` runs in the CLI process before any training process starts. It reads only
the first rows of local files with the standard library (pyarrow for Parquet), never imports torch,
and raises `FtlError` naming the file and the columns it found when the data cannot train the task.

`load_splits(recipe)` (used inside the training processes) loads the same files with `datasets`,
renames the columns through `data.columns` to ftl's field names and returns the train split and
the validation split when one is given (the held-out fraction is cut later, after the task has
turned records into examples: DAPT holds out windows, the others hold out records).

ftl's field names per task (a dataset's own names are mapped with `data.columns: {field: column}`):

| task | fields |
|---|---|
| sft | `instruction` + `output` (+ `input`), or `messages` (chat), or `prompt` + `completion` |
| dapt | `text` (a `.txt` file is one text) |
| classification | `text` + `label` (strings mapped through `data.label_map`) |
| dpo, reward | `chosen` + `rejected` (+ `prompt`) |
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from launcher.core.errors import FtlError
from launcher.spec.recipe import Recipe

SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet",
                  ".txt": "txt", ".text": "txt", ".md": "txt"}
FORMATS = ("jsonl", "json", "csv", "parquet", "txt")
ROW_LIMIT = 10_000  # rows read by the check (labels are checked on these)
COUNT_LIMIT_BYTES = 256 * 1024**2  # files up to this size are counted in full (a line count)

TASK_FIELDS = {
    "sft": "instruction + output (alpaca, optional input), or messages (chat), or conversations (ShareGPT), or "
           "prompt + completion",
    "dapt": "text",
    "classification": "text + label",
    "dpo": "chosen + rejected (optional prompt)",
    "reward": "chosen + rejected (optional prompt)",
}


@dataclass
class DataReport:
    """What the pre-flight check found (JSON-friendly: `asdict`)."""

    path: str
    format: str
    task: str
    kind: str  # sft: alpaca | chat | prompt-completion; dapt: text; classification: labelled-text; dpo: preference
    files: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)  # the dataset's own column names (first file)
    fields: list[str] = field(default_factory=list)  # the same after data.columns renaming
    rows_checked: int = 0
    rows: int | None = None  # all rows when they could be counted cheaply
    labels: dict[str, int] | None = None  # classification: count per label id among the rows checked
    checked: bool = True  # False for hub datasets (not read before training)
    validation: "DataReport | None" = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Where the data is


def is_hub(recipe: Recipe) -> bool:
    d = recipe.data
    if d.format == "hub":
        return True
    if d.path is None or d.format != "auto":
        return False
    p = Path(d.path).expanduser()
    if p.exists() or p.suffix.lower() in SUFFIX_FORMATS:
        return False  # a (possibly missing) local file
    return not os.path.isabs(d.path) and not d.path.startswith((".", "~")) and d.path.count("/") <= 1


def _format_of(path: Path, declared: str) -> str:
    if declared not in ("auto", "hub"):
        return declared
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise FtlError(f"{path}: cannot tell the data format from the suffix {path.suffix!r}; "
                       f"set data.format to one of {', '.join(FORMATS)}")
    return fmt


def _split_files(folder: Path, split: str) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    named = [p for p in files if p.stem == split or p.stem.startswith(f"{split}-") or p.stem.startswith(f"{split}_")]
    return named


def local_files(path: str, declared: str, split: str = "train") -> tuple[str, list[Path]]:
    """(format, files) for a local file or folder; raises FtlError naming the path."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FtlError(f"data.path = {str(p)!r}: no such file or folder")
    if p.is_file():
        return _format_of(p, declared), [p]
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    if declared in ("auto", "hub"):
        files = [f for f in files if f.suffix.lower() in SUFFIX_FORMATS]
    else:
        files = [f for f in files if SUFFIX_FORMATS.get(f.suffix.lower()) == declared]
    if not files:
        raise FtlError(f"data.path = {str(p)!r}: the folder holds no data files "
                       f"({', '.join(sorted(SUFFIX_FORMATS))})")
    named = [f for f in files if f in _split_files(p, split)]
    if named:
        files = named
    formats = {_format_of(f, declared) for f in files}
    if len(formats) > 1:
        raise FtlError(f"data.path = {str(p)!r}: the folder mixes formats {sorted(formats)}; keep one format per folder "
                       "or set data.format")
    return formats.pop(), files


def validation_files(recipe: Recipe) -> tuple[str, list[Path]] | None:
    """Local validation data named by data.validation_split: a file path, or `<split>.*` files in the data folder."""
    d = recipe.data
    if not d.validation_split or d.path is None or is_hub(recipe):
        return None
    base = Path(d.path).expanduser()
    folder = base if base.is_dir() else base.parent
    cand = Path(d.validation_split).expanduser()
    if not cand.is_absolute():
        cand = folder / cand
    if cand.exists():
        return local_files(str(cand), d.format)
    if base.is_dir():
        named = _split_files(base, d.validation_split)
        if named:
            return _format_of(named[0], d.format), named
    raise FtlError(f"data.validation_split = {d.validation_split!r}: for local data give a file (absolute, or relative "
                   f"to {folder}) or name files '<split>.<ext>' in the data folder; none found")


# ---------------------------------------------------------------------------------------------
# Reading the first rows with the standard library


def _rows(path: Path, fmt: str, limit: int) -> tuple[list[str], list[dict[str, Any]], int | None]:
    """(columns, up to `limit` rows, total rows when cheap) of one file; FtlError when unreadable or empty."""
    if path.stat().st_size == 0:
        raise FtlError(f"{path}: the file is empty")
    try:
        if fmt == "jsonl":
            return _jsonl(path, limit)
        if fmt == "json":
            return _json(path, limit)
        if fmt == "csv":
            return _csv(path, limit)
        if fmt == "parquet":
            return _parquet(path, limit)
        if fmt == "txt":
            text = path.read_text(encoding="utf-8")
            if not text.strip():
                raise FtlError(f"{path}: the file holds only whitespace")
            return ["text"], [{"text": text[:2000]}], 1
    except UnicodeDecodeError as e:
        raise FtlError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); is it really {fmt}?") from None
    raise FtlError(f"{path}: unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")


def _columns_of(rows: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows[:100]:
        for k in r:
            if k not in cols:
                cols.append(k)
    return cols


def _jsonl(path: Path, limit: int) -> tuple[list[str], list[dict[str, Any]], int | None]:
    rows: list[dict[str, Any]] = []
    total = 0
    count_all = path.stat().st_size <= COUNT_LIMIT_BYTES
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            total += 1
            if len(rows) < limit:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise FtlError(f"{path}: not valid JSON Lines: line {n}: {e.msg} (column {e.colno})") from None
                if not isinstance(rec, dict):
                    raise FtlError(f"{path}: line {n} is a JSON {type(rec).__name__}, not an object with named fields")
                rows.append(rec)
            elif not count_all:
                break
    if not rows:
        raise FtlError(f"{path}: the file holds no records (only blank lines)")
    return _columns_of(rows), rows, total if count_all else None


def _json(path: Path, limit: int) -> tuple[list[str], list[dict[str, Any]], int | None]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        hint = " (one object per line is JSON Lines: name the file .jsonl or set data.format: jsonl)" if e.msg == "Extra data" else ""
        raise FtlError(f"{path}: not valid JSON: line {e.lineno}: {e.msg}{hint}") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if "data" in data and isinstance(data["data"], list):
            data = data["data"]
        elif lists and all(isinstance(v, list) for v in data.values()) and len({len(v) for v in lists}) == 1:
            data = [dict(zip(data, vals)) for vals in zip(*data.values())]  # columns -> records
        else:
            raise FtlError(f"{path}: a JSON object must hold its records under 'data' (or be a mapping of equal-length "
                           f"columns); found keys {list(data)[:10]}")
    if not isinstance(data, list):
        raise FtlError(f"{path}: JSON data must be a list of records; found a {type(data).__name__}")
    if not data:
        raise FtlError(f"{path}: the file holds no records (an empty list)")
    bad = next((i for i, r in enumerate(data[:limit]) if not isinstance(r, dict)), None)
    if bad is not None:
        raise FtlError(f"{path}: record {bad} is a {type(data[bad]).__name__}, not an object with named fields")
    rows = data[:limit]
    return _columns_of(rows), rows, len(data)


def _csv(path: Path, limit: int) -> tuple[list[str], list[dict[str, Any]], int | None]:
    count_all = path.stat().st_size <= COUNT_LIMIT_BYTES
    with open(path, newline="", encoding="utf-8") as f:
        try:
            reader = csv.DictReader(f)
            header = reader.fieldnames
            if not header:
                raise FtlError(f"{path}: the file has no header row")
            rows: list[dict[str, Any]] = []
            total = 0
            for rec in reader:
                total += 1
                if len(rows) < limit:
                    if None in rec:
                        raise FtlError(f"{path}: row {total} has more fields than the header {header}")
                    rows.append(rec)
                elif not count_all:
                    break
        except csv.Error as e:
            raise FtlError(f"{path}: not readable as CSV: {e}") from None
    if not rows:
        raise FtlError(f"{path}: the file has a header {header} but no rows")
    return list(header), rows, total if count_all else None


def _parquet(path: Path, limit: int) -> tuple[list[str], list[dict[str, Any]], int | None]:
    try:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        cols = list(pf.schema_arrow.names)
        total = pf.metadata.num_rows
        rows: list[dict[str, Any]] = []
        for batch in pf.iter_batches(batch_size=min(limit, 1000)):
            rows += batch.to_pylist()
            if len(rows) >= limit:
                break
    except ImportError:
        raise FtlError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise FtlError(f"{path}: not a readable Parquet file ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not rows:
        raise FtlError(f"{path}: the Parquet file has columns {cols} but no rows")
    return cols, rows[:limit], total


# ---------------------------------------------------------------------------------------------
# Fields and labels


def rename_map(columns: dict[str, str]) -> dict[str, str]:
    """data.columns is {ftl field: dataset column}; this is {dataset column: ftl field}."""
    return {col: fld for fld, col in columns.items() if col != fld}


def fields_of(raw_columns: list[str], columns: dict[str, str], where: str) -> list[str]:
    missing = [f"data.columns.{fld} = {col!r}" for fld, col in columns.items() if col not in raw_columns]
    if missing:
        raise FtlError(f"{where}: {', '.join(missing)}: no such column; the file has columns {raw_columns}")
    ren = rename_map(columns)
    return [ren.get(c, c) for c in raw_columns]


# data.schema -> (kind, the fields it needs)
SFT_SCHEMAS = {"messages": ("chat", {"messages"}), "sharegpt": ("sharegpt", {"conversations"}),
               "prompt_completion": ("prompt-completion", {"prompt", "completion"}),
               "alpaca": ("alpaca", {"instruction", "output"})}


def sft_kind(fields: list[str], schema: str = "auto") -> str | None:
    """The kind of SFT example: data.schema's, or the first whose fields are all there (auto)."""
    f = set(fields)
    for name, (kind, needs) in SFT_SCHEMAS.items():
        if schema in ("auto", name) and needs <= f:
            return kind
    return None


def data_kind(task: str, fields: list[str], schema: str = "auto") -> str | None:
    f = set(fields)
    if task == "sft":
        return sft_kind(fields, schema)
    if task == "dapt":
        return "text" if "text" in f else None
    if task == "classification":
        return "labelled-text" if {"text", "label"} <= f else None
    if task in ("dpo", "reward"):
        return "preference" if {"chosen", "rejected"} <= f else None
    raise FtlError(f"task = {task!r}: unknown task")


def map_label(value: Any, label_map: dict[str, int] | None, num_labels: int) -> int:
    """A dataset label as a class id: names through label_map, ids as they are. ValueError when neither."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError("empty label")
    if isinstance(value, bool):
        value = int(value)
    if label_map:
        if isinstance(value, str) and value in label_map:
            return int(label_map[value])
        ids = set(int(v) for v in label_map.values())
        as_int = _as_int(value)
        if as_int is not None and as_int in ids:
            return as_int
        raise ValueError(f"label {value!r} is not in data.label_map {label_map}")
    as_int = _as_int(value)
    if as_int is None:
        raise ValueError(f"label {value!r} is a name; give data.label_map (name -> id) to map names to classes")
    if not 0 <= as_int < num_labels:
        raise ValueError(f"label {value!r} is outside 0..{num_labels - 1}; give data.label_map for more classes")
    return as_int


def _as_int(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _check_rows(path: Path, recipe: Recipe, fields: list[str], rows: list[dict[str, Any]], report: DataReport) -> None:
    ren = rename_map(recipe.data.columns)
    canon = [{ren.get(k, k): v for k, v in r.items()} for r in rows]
    task = recipe.task
    if task == "classification":
        counts: dict[str, int] = {}
        for i, r in enumerate(canon):
            try:
                lid = map_label(r.get("label"), recipe.data.label_map, recipe.num_labels)
            except ValueError as e:
                raise FtlError(f"{path}: row {i + 1}: {e}") from None
            counts[str(lid)] = counts.get(str(lid), 0) + 1
        report.labels = dict(sorted(counts.items()))
        if len(counts) < 2:
            report.notes.append(f"only one class among the first {len(canon)} rows")
    if task == "sft" and report.kind in ("chat", "sharegpt"):
        col, keys = ("messages", ("role", "content")) if report.kind == "chat" else ("conversations", ("from", "value"))
        for i, r in enumerate(canon[:200]):
            msgs = r.get(col)
            if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and all(k in m for k in keys) for m in msgs):
                raise FtlError(f"{path}: row {i + 1}: '{col}' must be a list of {{{', '.join(keys)}}} objects")
            last = msgs[-1].get(keys[0])
            if (last if report.kind == "chat" else {"gpt": "assistant", "assistant": "assistant"}.get(str(last).lower(), last)) != "assistant":
                raise FtlError(f"{path}: row {i + 1}: the last turn must be the assistant's (a conversation trains "
                               f"on its assistant turns); found {keys[0]} {last!r}")
    needed = {"dapt": ["text"], "classification": ["text"], "dpo": ["chosen", "rejected"], "reward": ["chosen", "rejected"],
              "sft": {"alpaca": ["instruction", "output"], "prompt-completion": ["prompt", "completion"]}.get(report.kind, [])}[task]
    for i, r in enumerate(canon[:200]):
        empty = [f for f in needed if r.get(f) is None or (isinstance(r.get(f), str) and not r.get(f).strip() and f != "completion")]
        if empty:
            raise FtlError(f"{path}: row {i + 1}: empty {', '.join(empty)}")


def _check_files(recipe: Recipe, fmt: str, files: list[Path], what: str) -> DataReport:
    task = recipe.task
    d = recipe.data
    if fmt == "txt" and task != "dapt":
        raise FtlError(f"{files[0]}: a .txt file is one raw text, which only task 'dapt' trains on; task {task!r} needs "
                       f"columns {TASK_FIELDS[task]} (jsonl, json, csv or parquet)")
    first = files[0]
    cols, rows, total = _rows(first, fmt, ROW_LIMIT)
    fields = fields_of(cols, d.columns if fmt != "txt" else {}, str(first))
    kind = data_kind(task, fields, d.schema)
    if kind is None:
        mapped = f" (after data.columns {d.columns})" if d.columns else ""
        raise FtlError(f"{first}: task {task!r} needs columns {TASK_FIELDS[task]}; found columns {cols}{mapped}. "
                       f"Map yours with data.columns, e.g. --set data.columns.{_example_field(task)}=<your column>")
    report = DataReport(path=str(d.path if what == "train" else first), format=fmt, task=task, kind=kind,
                        files=[str(f) for f in files], columns=cols, fields=fields, rows_checked=len(rows), rows=total)
    _check_rows(first, recipe, fields, rows, report)
    for other in files[1:]:
        ocols, orows, ototal = _rows(other, fmt, min(ROW_LIMIT, 100))
        ofields = fields_of(ocols, d.columns if fmt != "txt" else {}, str(other))
        if data_kind(task, ofields, d.schema) != kind:
            raise FtlError(f"{other}: columns {ocols} differ from {first.name}'s {cols}; every file of the data must "
                           "have the same columns")
        _check_rows(other, recipe, ofields, orows, DataReport(str(other), fmt, task, kind))
        report.rows = None if report.rows is None or ototal is None else report.rows + ototal
    if report.rows_checked < (report.rows or 0):
        report.notes.append(f"checked the first {report.rows_checked} of {report.rows} rows")
    return report


def _example_field(task: str) -> str:
    return {"sft": "instruction", "dapt": "text", "classification": "text", "dpo": "chosen", "reward": "chosen"}[task]


def validate_data(recipe: Recipe) -> DataReport:
    """Check that the recipe's data exists, is readable and has the task's fields; FtlError otherwise.

    Cheap: reads the first rows (up to 10,000) of local files with the standard library; hub datasets
    are not read (reported with checked=False)."""
    d = recipe.data
    if not d.path:
        raise FtlError(f"data.path is not set: task {recipe.task!r} needs data with {TASK_FIELDS[recipe.task]}")
    if recipe.task == "classification" and d.label_map is not None:
        ids = sorted(int(v) for v in d.label_map.values())
        if ids != list(range(len(ids))):
            raise FtlError(f"data.label_map = {d.label_map}: class ids must be 0..{len(ids) - 1}, each once")
    if recipe.train.early_stopping_patience and not d.validation_split and d.validation_fraction == 0:
        raise FtlError("train.early_stopping_patience needs evaluation data: set data.validation_split or a "
                       "data.validation_fraction above 0")
    if is_hub(recipe):
        return DataReport(path=d.path, format="hub", task=recipe.task, kind="unknown", checked=False,
                          notes=["hub dataset: not read before training (its columns are checked when it loads)"])
    fmt, files = local_files(d.path, d.format, d.split)
    report = _check_files(recipe, fmt, files, "train")
    val = validation_files(recipe)
    if val is not None:
        report.validation = _check_files(recipe, val[0], val[1], "validation")
    return report


# ---------------------------------------------------------------------------------------------
# Loading with `datasets` (training processes only)


def _load_local(fmt: str, files: list[Path], split: str = "train"):
    from datasets import Dataset, load_dataset

    if fmt == "txt":
        return Dataset.from_dict({"text": [f.read_text(encoding="utf-8") for f in files]})
    builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}[fmt]
    kwargs: dict[str, Any] = {}
    if fmt == "json":
        head = files[0].read_text(encoding="utf-8", errors="ignore").lstrip()[:1]
        if head == "{":
            kwargs["field"] = "data"
    if fmt == "csv":
        kwargs["keep_default_na"] = False  # the text "NA" stays a text
    try:
        return load_dataset(builder, data_files=[str(f) for f in files], split=split, **kwargs)
    except ValueError as e:
        if "split" in str(e).lower() or "Unknown" in str(e):
            raise FtlError(f"data.split = {split!r}: local files have one split 'train' (slices such as "
                           f"'train[:1000]' work); {e}") from None
        raise


def _rename(ds, columns: dict[str, str]):
    for col, fld in rename_map(columns).items():
        if col not in ds.column_names:
            raise FtlError(f"data.columns.{fld} = {col!r}: no such column; the dataset has columns {ds.column_names}")
        if fld in ds.column_names:
            ds = ds.remove_columns(fld)
        ds = ds.rename_column(col, fld)
    return ds


def load_splits(recipe: Recipe):
    """(train, validation or None) as `datasets.Dataset`s with ftl's field names."""
    d = recipe.data
    if is_hub(recipe):
        from datasets import load_dataset

        try:
            train = load_dataset(d.path, split=d.split)
            val = load_dataset(d.path, split=d.validation_split) if d.validation_split else None
        except Exception as e:  # noqa: BLE001 - network, auth, missing split: say which
            raise FtlError(f"data.path = {d.path!r}: could not load the hub dataset ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:300]})") from None
    else:
        fmt, files = local_files(d.path, d.format, d.split)
        split = d.split if d.split.startswith("train") else "train"
        train = _load_local(fmt, files, split)
        vf = validation_files(recipe)
        val = _load_local(vf[0], vf[1]) if vf else None
    train = _rename(train, d.columns)
    if val is not None:
        val = _rename(val, d.columns)
    kind = data_kind(recipe.task, train.column_names, d.schema)
    if kind is None:
        raise FtlError(f"{d.path}: task {recipe.task!r} needs columns {TASK_FIELDS[recipe.task]}; found columns "
                       f"{train.column_names}")
    return train, val
