"""What goes to and comes back from rented instances, over SSH: the run's key, ftl itself, the run's files and
inputs, checkpoints while training and the results at the end.

The instances exist only for the run and share nothing with this machine, so the run directory is copied to
`<workdir>/runs/<run id>` on every node (state.json `remote_run_dir` says where) and its results are copied
back; paths inside the copies point at the copies.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from launcher.backends.ssh import Node, remote_dir, run_ssh, ssh_argv
from launcher.core.errors import FtlError
from launcher.core.files import safe_extract
from launcher.rundir import Run
from launcher.spec.recipe import Recipe

FETCH = ("checkpoints", "output", "metrics.jsonl", "result.json", "preflight", "logs")
SYNCED = ("recipe.yaml", "plan.json", "accelerate.yaml", "deepspeed.json", "command.sh")
SOURCE_TREE = Path(__file__).resolve().parents[3]  # the checkout ftl runs from (pyproject.toml, launcher/)

Note = Callable[[str], None]  # one line of ftl's own to the terminal and launch.log


class RentalError(FtlError):
    pass


def make_key(run: Run) -> tuple[Path, str]:
    """A fresh ed25519 pair for this run only (ssh/id_ed25519, 600); returns (private key path, public key)."""
    d = run.dir / "ssh"
    d.mkdir(mode=0o700, exist_ok=True)
    key = d / "id_ed25519"
    if not key.is_file():
        r = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"ftl-{run.id}", "-f", str(key)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RentalError(f"ssh-keygen failed: {r.stderr.strip()}")
    os.chmod(key, 0o600)
    return key, (d / "id_ed25519.pub").read_text().strip()


def _tar_bytes(members: list[tuple[Path, str]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for src, arc in members:
            tar.add(str(src), arcname=arc)
    return buf.getvalue()


def _tar_text(tar: tarfile.TarFile, name: str, text: str) -> None:
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
    tar.addfile(info, io.BytesIO(data))


def push(run: Run, n: Node, payload: bytes, cmd: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run cmd on the node with payload on its stdin."""
    try:
        return subprocess.run(ssh_argv(n, run.dir, cmd), input=payload, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess([], 255, b"", f"timed out after {timeout:.0f} s".encode())


def _ssh_retry(run: Run, n: Node, cmd: str, tries: int = 10) -> subprocess.CompletedProcess:
    r = run_ssh(n, run.dir, cmd)
    for _ in range(tries - 1):
        if r.returncode == 0:
            break
        time.sleep(2)
        r = run_ssh(n, run.dir, cmd)
    return r


# ---------------------------------------------------------------------------------------------
# bootstrap


def bootstrap(run: Run, recipe: Recipe, nodes: list[Node], note: Note) -> str:
    """Run the profile's setup lines, then make sure the interpreter imports ftl (install it if not)."""
    cl = recipe.cluster
    python = cl.python or "python3"
    q = shlex.quote
    for n in nodes:
        r = _ssh_retry(run, n, "true")  # first contact: sshd may still be starting
        if r.returncode != 0:
            raise RentalError(f"{n.label}: not reachable over SSH: {r.stderr.strip()[-300:]}")
        for line in cl.setup:
            r = run_ssh(n, run.dir, line, timeout=1800)
            if r.returncode != 0:
                raise RentalError(f"{n.label}: setup line failed (exit {r.returncode}): {line}: "
                                  f"{(r.stderr or r.stdout).strip()[-300:]}")
        check = f"{q(python)} -c {q('import launcher.agent')}"
        if run_ssh(n, run.dir, check, timeout=120).returncode != 0:
            note(f"ftl: {n.label}: {python} cannot import ftl; installing it from this checkout")
            install_ftl(run, n, python)
    note(f"ftl: bootstrapped {len(nodes)} node(s) ({python})")
    return python


def install_ftl(run: Run, n: Node, python: str) -> None:
    src = SOURCE_TREE
    if not (src / "pyproject.toml").is_file():
        raise RentalError(f"{n.label}: {python} cannot import ftl and there is no source tree to install; name an "
                          "image with ftl installed (cluster.image) or add setup lines that install it")
    members = [(src / "pyproject.toml", "ftl-src/pyproject.toml"), (src / "launcher", "ftl-src/launcher")]
    members += [(src / f, f"ftl-src/{f}") for f in ("README.md",) if (src / f).is_file()]
    q = shlex.quote
    cmd = (f"d=$(mktemp -d) && tar xf - -C \"$d\" && {q(python)} -m pip install -q \"$d/ftl-src\"")
    r = push(run, n, _tar_bytes(members), cmd, timeout=3600)
    if r.returncode != 0:
        raise RentalError(f"{n.label}: installing ftl failed: {r.stderr.decode(errors='replace').strip()[-400:]}")


# ---------------------------------------------------------------------------------------------
# the run to the nodes


def _base(run: Run, recipe: Recipe, node: Node) -> Path:
    if recipe.cluster.workdir:
        return Path(recipe.cluster.workdir)
    r = run_ssh(node, run.dir, "echo \"$HOME\"")
    home = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else "/tmp"
    return Path(home) / "ftl"


def sync(run: Run, recipe: Recipe, nodes: list[Node], resume_from: str | None, note: Note) -> Path:
    """Copy the run's files, local data and local model folder to <workdir>/runs/<id> on every node."""
    rdir = _base(run, recipe, nodes[0]) / "runs" / run.id
    members: list[tuple[Path, str]] = []
    d = run.recipe_dict()
    model = Path(str(d.get("model") or ""))
    if model.is_absolute() and model.is_dir():
        members.append((model, f"inputs/model/{model.name}"))
        d["model"] = str(rdir / "inputs" / "model" / model.name)
    data = (d.get("data") or {}).get("path")
    if data and Path(data).is_absolute() and Path(data).exists():
        members.append((Path(data), f"inputs/data/{Path(data).name}"))
        d["data"]["path"] = str(rdir / "inputs" / "data" / Path(data).name)
    d.setdefault("cluster", {})["workdir"] = str(rdir.parent.parent)
    if resume_from:
        ck = Path(resume_from)
        members.append((ck, f"checkpoints/{ck.name}"))
    local = str(run.dir)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for src, arc in members:
            tar.add(str(src), arcname=arc)
        for name in SYNCED:
            p = run.dir / name
            if p.is_file() and name != "recipe.yaml":
                _tar_text(tar, name, p.read_text().replace(local, str(rdir)))
        _tar_text(tar, "recipe.yaml", yaml.safe_dump(d, sort_keys=False).replace(local, str(rdir)))
        _tar_text(tar, "state.json", '{"run_id": %s, "status": "running", "cwd": %s}\n'
                  % (json.dumps(run.id), json.dumps(str(rdir))))
    payload = buf.getvalue()
    q = shlex.quote
    for n in nodes:
        r = push(run, n, payload, f"mkdir -p {q(str(rdir / 'logs'))} && tar xf - -C {q(str(rdir))}")
        if r.returncode != 0:
            raise RentalError(f"{n.label}: copying the run to {rdir} failed: "
                              f"{r.stderr.decode(errors='replace').strip()[-300:]}")
    note(f"ftl: synced the run ({len(payload) / 1e6:.1f} MB) to {rdir} on {len(nodes)} node(s)")
    return rdir


# ---------------------------------------------------------------------------------------------
# results back


def fetch_newest_checkpoint(run: Run, nodes: list[Node], note: Note) -> str | None:
    """The newest COMPLETE checkpoint (every node's part of it) and metrics.jsonl, if newer than the last one
    brought back; only the newest is kept here while training."""
    q = shlex.quote
    rdir = q(str(remote_dir(run)))
    node0 = min(nodes, key=lambda n: n.rank)
    find = (f"cd {rdir} && for d in $(ls -d checkpoints/checkpoint-* 2>/dev/null | sort -t- -k2 -n); do "
            f"[ -f \"$d/COMPLETE\" ] && echo \"$d\"; done | tail -n 1")
    r = run_ssh(node0, run.dir, find, timeout=60)
    name = r.stdout.strip().rsplit("/", 1)[-1] if r.returncode == 0 else ""
    st = run.state()
    if not name or name == st.get("synced_checkpoint"):
        return None
    for n in sorted(nodes, key=lambda m: -m.rank):  # every node's shards; node 0's files (COMPLETE) last
        extra = " metrics.jsonl" if n is node0 else ""
        cmd = f"cd {rdir} && tar cf - {q('checkpoints/' + name)}{extra} 2>/dev/null"
        p = subprocess.run(ssh_argv(n, run.dir, cmd), capture_output=True, timeout=3600)
        if not p.stdout:
            if n is node0:
                raise RentalError(f"{n.label}: {p.stderr.decode(errors='replace').strip()[-200:] or 'no data'}")
            continue
        with tarfile.open(fileobj=io.BytesIO(p.stdout), mode="r") as tar:
            safe_extract(tar, run.dir)
    old = st.get("synced_checkpoint")
    if old and old != name and (run.checkpoints_dir / old).is_dir():
        shutil.rmtree(run.checkpoints_dir / old, ignore_errors=True)
    run.update_state(synced_checkpoint=name)
    note(f"ftl: brought {name} back into {run.checkpoints_dir}")
    return name


def fetch(run: Run, nodes: list[Node], note: Note) -> None:
    """checkpoints/, output/, metrics, result.json, pre-flight answers and node logs: node 0's win."""
    rdir = remote_dir(run)
    q = shlex.quote
    names = " ".join(q(f) for f in FETCH)
    cmd = f"cd {q(str(rdir))} && tar cf - $(for f in {names}; do [ -e \"$f\" ] && echo \"$f\"; done)"
    for n in sorted(nodes, key=lambda m: -m.rank):
        try:
            p = subprocess.run(ssh_argv(n, run.dir, cmd), capture_output=True, timeout=3600)
        except subprocess.TimeoutExpired:
            note(f"ftl: {n.label}: fetching results timed out")
            continue
        if p.returncode != 0 or not p.stdout:
            note(f"ftl: {n.label}: could not fetch results: {p.stderr.decode(errors='replace').strip()[-300:]}")
            continue
        with tarfile.open(fileobj=io.BytesIO(p.stdout), mode="r") as tar:
            safe_extract(tar, run.dir)
    note(f"ftl: fetched results from {len(nodes)} node(s) into {run.dir}")
