"""Files that readers may look at while they are written, and the times recorded in them.

Every JSON file ftl or its trainer writes into a run directory goes through `write_json`: readers
(another ftl, `ftl status`, a node) see the old or the new content, never half of it, and the data is
on disk (fsync) before the name points at it, so a crash leaves the previous version.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from launcher.core.errors import FtlError


class FileError(FtlError):
    pass


def utcnow() -> str:
    """Now, as the ISO time (UTC, whole seconds) every state and record file uses."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def iso_epoch(iso: str | None) -> float | None:
    """An ISO time as seconds since the epoch; 'Z' and naive times are UTC; None for none or nonsense."""
    if not iso:
        return None
    try:
        t = dt.datetime.fromisoformat(str(iso).replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.timestamp()


def write_atomic(path: str | Path, text: str, mode: int | None = None) -> None:
    """Write text to path so that readers see the old or the new content, never half of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_json(path: str | Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: str | Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default
    except json.JSONDecodeError as e:
        raise FileError(f"{path}: not valid JSON ({e}); was it edited by hand?") from None


def safe_extract(tar: tarfile.TarFile, dest: str | Path) -> None:
    """Extract only plain files and folders that stay inside dest (what came from a remote host)."""
    safe = [m for m in tar.getmembers() if not m.name.startswith(("/", "..")) and ".." not in Path(m.name).parts
            and (m.isfile() or m.isdir())]
    tar.extractall(dest, members=safe, filter="data")
