"""The shipped recipes as starting points: `ftl init` copies one, and the cluster profile it names, into the
user's folder, so that no one edits files inside the package.

A copy keeps the recipe's text and comments; only the paths that were relative to the shipped recipes folder
change: a local model folder and local data become absolute paths to the shipped ones, and the profile the
recipe names is copied beside it (the recipe then names the copy). Nothing is overwritten unless asked.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from launcher.core.errors import FtlError, did_you_mean
from launcher.core.files import write_atomic
from launcher.core import useryaml
from launcher.spec.recipe import PACKAGE_DIR

RECIPES_DIR = PACKAGE_DIR.parent / "recipes"
DEFAULT_EXAMPLE = "quickstart"


@dataclass(frozen=True)
class Example:
    name: str
    path: Path
    summary: str  # the first sentence of the recipe's leading comment


def examples() -> dict[str, Example]:
    """The shipped recipes by name, each with the first sentence of its leading comment."""
    out = {}
    for p in sorted(RECIPES_DIR.glob("*.yaml")):
        lead = []
        for line in p.read_text().splitlines():
            if not line.startswith("#"):
                break
            lead.append(line.lstrip("# ").strip())
        first = " ".join(lead).split(". ")[0].rstrip(".")
        out[p.stem] = Example(p.stem, p, first + "." if first else "")
    return out


def find_example(name: str) -> Example:
    known = examples()
    if not known:
        raise FtlError(f"no shipped recipes in {RECIPES_DIR}: this install of ftl has no examples")
    key = name.removesuffix(".yaml").removesuffix(".yml")
    if key not in known:
        raise FtlError(f"ftl init {name}: no such example.{did_you_mean(key, known)} "
                       "ftl init --list shows them")
    return known[key]


def _scalar(value: str) -> str:
    """A path as a YAML scalar: plain when it is, JSON-quoted (valid YAML) otherwise."""
    return value if re.fullmatch(r"[\w./~+-]+", value) else json.dumps(value)


def _swap(text: str, key: str, old: str, new: str, after: str | None = None) -> str:
    """Replace the value `old` of the first `key:` (after the first `after:` key, when given) with `new`."""
    start = 0
    if after is not None:
        m = re.search(rf"(?m)^{re.escape(after)}:", text)
        if m is None:
            raise FtlError(f"cannot find {after}: in the example")  # a shipped recipe changed shape: a bug
        start = m.end()
    pat = re.compile(rf"(?m)(\b{re.escape(key)}:[ \t]*)(['\"]?){re.escape(old)}\2(?=[ \t]*(?:[,}}#]|$))")
    m = pat.search(text, start)
    if m is None:
        raise FtlError(f"cannot find {key}: {old} in the example")
    return text[: m.start()] + m.group(1) + _scalar(new) + text[m.end():]


def copy_plan(ex: Example, dest: Path) -> dict[Path, str]:
    """{file to write: its text} for copying `ex` into the folder `dest`; reads and writes nothing else."""
    text = ex.path.read_text()
    raw = useryaml.read(ex.path) or {}
    files: dict[Path, str] = {}
    model = raw.get("model")
    if isinstance(model, str) and not Path(model).is_absolute() and (RECIPES_DIR / model / "config.json").is_file():
        text = _swap(text, "model", model, str((RECIPES_DIR / model).resolve()))
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    path = data.get("path")
    if isinstance(path, str) and not Path(path).is_absolute() and (RECIPES_DIR / path).exists():
        text = _swap(text, "path", path, str((RECIPES_DIR / path).resolve()), after="data")
    cluster = raw.get("cluster")
    ref = cluster if isinstance(cluster, str) else cluster.get("profile") if isinstance(cluster, dict) else None
    if isinstance(ref, str) and not Path(ref).is_absolute() and (RECIPES_DIR / ref).is_file():
        profile = (RECIPES_DIR / ref).resolve()
        files[dest / profile.name] = profile.read_text()
        text = _swap(text, "cluster" if isinstance(cluster, str) else "profile", ref, profile.name)
    files[dest / ex.path.name] = text
    return dict(reversed(list(files.items())))  # the recipe first


def init_example(name: str, dest: str | Path = ".", overwrite: bool = False) -> list[Path]:
    """Copy the example `name` (and its cluster profile) into `dest`; refuses to replace a file unless
    `overwrite` (a file that already holds the same text is left as it is). Returns the files written, the
    recipe first."""
    dest = Path(dest)
    if not dest.is_dir():
        raise FtlError(f"{dest}: not a folder; ftl init writes into an existing folder")
    plan = copy_plan(find_example(name), dest)
    plan = {p: t for p, t in plan.items() if not (p.is_file() and p.read_text(errors="replace") == t)}  # already there
    taken = [p for p in plan if p.exists() or p.is_symlink()]
    if taken and not overwrite:
        raise FtlError(f"{', '.join(str(p) for p in taken)} already exist{'s' if len(taken) == 1 else ''}; "
                       "nothing was written (pass --overwrite to replace, or run ftl init in another folder)")
    for path, text in plan.items():
        if overwrite:
            write_atomic(path, text)
        else:
            with open(path, "x") as f:  # exclusive: a file that appeared since the check is not replaced
                f.write(text)
    return list(plan)
