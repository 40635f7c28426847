"""Gather into .gpu-kit/ what a GPU machine without a package registry lacks for ftl to train (scripts/gpu-kit).

    scripts/gpu-kit [--python-version 3.12] [--platform manylinux_2_28_x86_64] [--have FILE] [--out DIR]
                    [--max-mib 56] [--find-links DIR --no-index] [--pin SPEC ...]

The kit is ftl's own wheel (installed there with --no-deps), the wheels of ftl's requirements (pyproject.toml) that
the target lacks, with their own requirements, Liger's kernels, and DeepSpeed's sdist with the setuptools/wheel its
offline `--no-build-isolation` build needs. What the target already has (`--have`: `pip list --format=freeze` from
there; default scripts/gpu-machine-have.txt, the documented machine) is left out, and its requirements are not
followed. manifest.json says what to install in which order; bench/gpu_validate.py installs it offline.

Why a resolver of its own: pip's resolver would walk into torch, and the CUDA wheels torch pins (gigabytes, and not
all of them are served here). This one walks requirements breadth first from what is missing, evaluating markers
for the target (Python, Linux, x86-64), and asks pip only to download one level at a time (`--no-deps`, pinned to
the target's platform tags, so bitsandbytes comes as its manylinux wheel with the CUDA kernels, not the 105 MB
pure-Python one). A requirement on something the target has at a version that does not satisfy it is an error
(pin an older requirer with --pin), since the offline install there would fail the same way.

Exit codes: 0 built; 2 bad arguments; 3 no package source reachable from here (the reason is printed); 4 a
requirement cannot be met (a missing package, a conflict with the target); 5 the kit is over --max-mib.
"""

from __future__ import annotations

import argparse
import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_HAVE = ROOT / "scripts" / "gpu-machine-have.txt"
# Beyond ftl's own requirements: Liger's fused linear cross-entropy (train.cross_entropy=fused); the build tools
# DeepSpeed's sdist needs without build isolation.
EXTRA = ["liger-kernel"]
BUILD_TOOLS = ["setuptools", "wheel"]
SDIST_ONLY = {"deepspeed"}  # no wheel on PyPI; built there with DS_BUILD_OPS=0 (ops JIT-compiled by its nvcc)
SKIP = {"ftl"}


class KitError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------
# What the target has, what it runs


def read_have(path: Path) -> dict[str, Version | None]:
    """`pip list --format=freeze` lines (or bare names) -> {canonical name: version or None}."""
    have: dict[str, Version | None] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-e "):
            continue
        name, _, ver = line.partition("==")
        if " @ " in name:  # `name @ file:///...` (a local install)
            name = name.split(" @ ", 1)[0]
        have[canonicalize_name(name.strip())] = Version(ver.strip()) if ver.strip() else None
    return have


def platform_tags(platform: str) -> list[str]:
    """manylinux_2_Y_ARCH and every older manylinux tag that runs there (pip expands only its own platform)."""
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not m:
        return [platform]
    glibc, arch = int(m.group(1)), m.group(2)
    tags = [f"manylinux_2_{y}_{arch}" for y in range(glibc, 16, -1)]
    tags += [f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}"]
    return tags


@dataclass
class Target:
    python_version: str  # "3.12"
    platform: str  # "manylinux_2_28_x86_64"

    @property
    def tags(self) -> list[str]:
        return platform_tags(self.platform)

    def env(self, extra: str = "") -> dict[str, str]:
        """Marker environment of the target (what `python -c 'import packaging.markers'` would say there)."""
        machine = self.platform.split("_", 3)[-1] if self.platform.startswith("manylinux_") else "x86_64"
        full = self.python_version if self.python_version.count(".") == 2 else f"{self.python_version}.0"
        env = dict(default_environment())
        env.update(python_version=".".join(self.python_version.split(".")[:2]), python_full_version=full,
                   sys_platform="linux", platform_system="Linux", platform_machine=machine, os_name="posix",
                   implementation_name="cpython", platform_python_implementation="CPython", extra=extra)
        return env

    def applies(self, req: Requirement, extras: set[str]) -> bool:
        if req.marker is None:
            return True
        return any(req.marker.evaluate(self.env(x)) for x in (extras or {""}) | {""})


# ---------------------------------------------------------------------------------------------
# pip, one level at a time


@dataclass
class Source:
    find_links: list[str] = field(default_factory=list)
    no_index: bool = False

    def args(self) -> list[str]:
        out = [a for d in self.find_links for a in ("--find-links", d)]
        return out + (["--no-index"] if self.no_index else [])


def pip_download(specs: list[str], dest: Path, target: Target, source: Source, sdist: bool = False) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps", "-d", str(dest),
           "--retries", "1", "--timeout", "30", *source.args()]
    if sdist:  # its metadata is prepared with this interpreter's setuptools (no build environment to download)
        cmd += ["--no-binary", ":all:", "--no-build-isolation"]
    else:
        cmd += ["--only-binary", ":all:", "--python-version", target.python_version, "--implementation", "cp",
                "--abi", "cp" + target.python_version.replace(".", "")[:3]]
        cmd += [a for t in target.tags for a in ("--platform", t)]
    res = subprocess.run(cmd + specs, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if "is ignored: it is neither a file nor a directory" not in ln]
    return res.returncode == 0, "\n".join(lines[-12:])


def dist_of(path: Path) -> tuple[str, Version] | None:
    try:
        if path.name.endswith(".whl"):
            name, ver, _, _ = parse_wheel_filename(path.name)
        elif path.name.endswith((".tar.gz", ".zip")):
            name, ver = parse_sdist_filename(path.name)
        else:
            return None
    except ValueError:
        return None
    return canonicalize_name(name), ver


def requires_dist(path: Path) -> list[str]:
    """Requires-Dist of a wheel (METADATA) or an sdist (PKG-INFO)."""
    text = ""
    if path.name.endswith(".whl"):
        with zipfile.ZipFile(path) as z:
            meta = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
            text = z.read(meta).decode() if meta else ""
    else:
        with tarfile.open(path) as t:
            member = next((m for m in t.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO")), None)
            f = t.extractfile(member) if member else None
            text = f.read().decode() if f else ""
    return email.parser.Parser().parsestr(text).get_all("Requires-Dist") or []


# ---------------------------------------------------------------------------------------------
# The walk


@dataclass
class Got:
    name: str
    version: Version
    file: Path
    why: str
    sdist: bool = False


@dataclass
class Walk:
    target: Target
    source: Source
    have: dict[str, Version | None]
    work: Path
    got: dict[str, Got] = field(default_factory=dict)
    specs: dict[str, SpecifierSet] = field(default_factory=dict)
    extras: dict[str, set[str]] = field(default_factory=dict)
    have_extras: dict[str, set[str]] = field(default_factory=dict)  # extras asked of what the target has
    problems: list[str] = field(default_factory=list)
    level: int = 0

    def run(self, top: list[tuple[Requirement, str]]) -> None:
        queue = top
        while queue:
            fetch: dict[str, str] = {}
            meta_only: dict[str, str] = {}
            for req, why in queue:
                self._want(req, why, fetch, meta_only)
            queue = self._fetch(fetch, meta_only)

    def _want(self, req: Requirement, why: str, fetch: dict[str, str], meta_only: dict[str, str]) -> None:
        n = canonicalize_name(req.name)
        if n in SKIP:
            return
        if n in self.have:
            ver = self.have[n]
            if ver is not None and not req.specifier.contains(ver, prereleases=True):
                self.problems.append(f"{why} needs {req}, the target has {n} {ver}")
            new = set(req.extras) - self.have_extras.get(n, set())
            if new:  # the extras' own requirements are not there: read them from its metadata
                self.have_extras.setdefault(n, set()).update(new)
                meta_only[n] = why
            return
        self.specs[n] = self.specs.get(n, SpecifierSet()) & req.specifier
        old = self.extras.get(n, set())
        self.extras[n] = old | set(req.extras)
        g = self.got.get(n)
        if g is None or not self.specs[n].contains(g.version, prereleases=True):
            fetch[n] = why if g is None else g.why
        elif self.extras[n] != old:
            meta_only[n] = why  # a new extra of something already fetched: follow its requirements

    def _fetch(self, fetch: dict[str, str], meta_only: dict[str, str]) -> list[tuple[Requirement, str]]:
        self.level += 1
        nxt: list[tuple[Requirement, str]] = []
        for sdist in (False, True):
            names = [n for n in fetch if (n in SDIST_ONLY) == sdist]
            if not names:
                continue
            dest = self.work / f"level-{self.level}-{'sdist' if sdist else 'wheels'}"
            specs = [f"{n}{self.specs[n]}" for n in names]
            ok, out = pip_download(specs, dest, self.target, self.source, sdist=sdist)
            if not ok:
                raise KitError(4, f"pip cannot download {' '.join(specs)} for Python {self.target.python_version} "
                                  f"on {self.target.platform}:\n{out}")
            for f in sorted(dest.iterdir()):
                d = dist_of(f)
                if d is None or d[0] not in fetch:
                    continue
                n, ver = d
                self.got[n] = Got(n, ver, f, fetch[n], sdist)
                nxt += self._requirements(f, n, self.extras.get(n, set()))
        meta = {n: why for n, why in meta_only.items() if n not in fetch}
        for n, why in meta.items():
            nxt += self._metadata_requirements(n, why)
        return nxt

    def _requirements(self, f: Path, n: str, extras: set[str]) -> list[tuple[Requirement, str]]:
        out = []
        for line in requires_dist(f):
            try:
                r = Requirement(line)
            except InvalidRequirement:
                continue
            if self.target.applies(r, extras):
                out.append((r, n))
        return out

    def _metadata_requirements(self, n: str, why: str) -> list[tuple[Requirement, str]]:
        """Requirements of extras asked of a package that is not fetched (the target has it, or it was fetched before)."""
        if n in self.got:
            reqs = self._requirements(self.got[n].file, n, self.extras.get(n, set()))
            return [(r, n) for r, _ in reqs if "extra" in str(r.marker)]
        ver = self.have.get(n)
        dest = self.work / f"meta-{n}"
        ok, out = pip_download([f"{n}=={ver}" if ver else n], dest, self.target, self.source)
        files = [f for f in dest.iterdir()] if ok and dest.is_dir() else []
        if not files:
            self.problems.append(f"{why} needs {n}[{','.join(sorted(self.have_extras[n]))}]: could not read {n}'s "
                                 f"metadata to follow the extras ({out.splitlines()[-1] if out else 'no file'})")
            return []
        extras = self.have_extras[n]
        return [(r, n) for r, _ in self._requirements(files[0], n, extras) if r.marker is not None and "extra" in str(r.marker)]


# ---------------------------------------------------------------------------------------------
# ftl's own wheel and requirements


def ftl_requirements() -> list[str]:
    return list(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def build_ftl_wheel(dest: Path, work: Path) -> Path:
    """ftl as a wheel, built from a copy of the package (the working tree is left as it is)."""
    src = work / "ftl-src"
    shutil.copytree(ROOT / "launcher", src / "launcher", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    out = work / "ftl-wheel"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-deps",
                          "--no-build-isolation", "-q", "-w", str(out), str(src)], capture_output=True, text=True,
                         timeout=600)
    wheels = sorted(out.glob("ftl-*.whl")) if out.is_dir() else []
    if res.returncode or not wheels:
        raise KitError(4, f"building ftl's wheel failed (needs setuptools in {sys.executable}):\n"
                          f"{(res.stdout + res.stderr)[-2000:]}")
    shutil.copy(wheels[0], dest / wheels[0].name)
    return dest / wheels[0].name


def probe(source: Source, target: Target, work: Path, name: str) -> None:
    """One small download first, so that 'no registry here' is said as such."""
    ok, out = pip_download([name], work / "probe", target, source)
    if not ok:
        where = f"the local wheelhouse {', '.join(source.find_links)}" if source.no_index else "the package registry"
        raise KitError(3, f"gpu-kit: cannot download packages from {where} on this machine; the kit needs a "
                          f"machine that reaches PyPI (or --find-links DIR --no-index with a local wheelhouse).\n"
                          f"pip said:\n{out}")


# ---------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="scripts/gpu-kit", description=__doc__.splitlines()[0])
    ap.add_argument("--python-version", default="3.12", help="the target's Python (default 3.12)")
    ap.add_argument("--platform", default="manylinux_2_28_x86_64", help="the target's newest manylinux tag")
    ap.add_argument("--have", type=Path, default=DEFAULT_HAVE, help="pip list --format=freeze of the target")
    ap.add_argument("--out", type=Path, default=ROOT / ".gpu-kit", help="the kit folder (replaced)")
    ap.add_argument("--max-mib", type=float, default=56.0, help="fail above this size (the carry limit less the project)")
    ap.add_argument("--find-links", action="append", default=[], help="a local wheelhouse (pip --find-links)")
    ap.add_argument("--no-index", action="store_true", help="do not ask the registry (with --find-links)")
    ap.add_argument("--pin", action="append", default=[], help="constrain a requirement, e.g. --pin trl==1.10.0")
    ap.add_argument("--requirements", nargs="+", default=None, help=argparse.SUPPRESS)  # tests: instead of ftl's
    return ap.parse_args(argv)


def build(args: argparse.Namespace) -> dict:
    target = Target(args.python_version, args.platform)
    source = Source(list(args.find_links), args.no_index)
    have = read_have(args.have)
    reqs = args.requirements if args.requirements is not None else ftl_requirements() + EXTRA + BUILD_TOOLS
    top = [(Requirement(r), "ftl") for r in reqs + args.pin]
    missing = [r for r, _ in top if canonicalize_name(r.name) not in have | {n: None for n in SKIP}]
    work = Path(tempfile.mkdtemp(prefix="ftl-gpu-kit-"))
    try:
        wheels = [r.name for r in missing if canonicalize_name(r.name) not in SDIST_ONLY]
        if wheels:
            probe(source, target, work, wheels[0])
        walk = Walk(target, source, have, work)
        walk.run(top)
        if walk.problems:
            raise KitError(4, "gpu-kit: the target's packages do not meet these requirements (the offline install there "
                              "would fail):\n  " + "\n  ".join(walk.problems) + "\nPin an older requirer (--pin NAME==VER) "
                              "or pass the target's real list with --have.")
        staging = args.out.with_name(args.out.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for g in walk.got.values():
            shutil.copy(g.file, staging / g.file.name)
        wheel = build_ftl_wheel(staging, work)
        manifest = write_manifest(staging, walk, wheel, args)
        total = sum(p.stat().st_size for p in staging.iterdir())  # what is carried: the files and the manifest
        print_table(manifest)
        if total > args.max_mib * 1024**2:
            shutil.rmtree(staging, ignore_errors=True)
            raise KitError(5, f"gpu-kit: the kit is {total / 1024**2:.1f} MiB, over the limit of {args.max_mib:g} MiB "
                              f"(the largest: {manifest['files'][0]['file']}); nothing written to {args.out}")
        shutil.rmtree(args.out, ignore_errors=True)
        os.replace(staging, args.out)
        print(f"gpu-kit: {len(manifest['files'])} files, {total / 1024**2:.1f} MiB in {args.out} "
              f"(limit {args.max_mib:g} MiB)")
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_manifest(kit: Path, walk: Walk, wheel: Path, args: argparse.Namespace) -> dict:
    got = sorted(walk.got.values(), key=lambda g: g.name)
    build_tools = {canonicalize_name(b) for b in BUILD_TOOLS}
    files = [{"file": g.file.name, "name": g.name, "version": str(g.version), "bytes": (kit / g.file.name).stat().st_size,
              "required_by": g.why} for g in got]
    files.append({"file": wheel.name, "name": "ftl", "version": str(parse_wheel_filename(wheel.name)[1]),
                  "bytes": wheel.stat().st_size, "required_by": "(ftl itself, installed with --no-deps)"})
    files.sort(key=lambda f: -f["bytes"])
    ds = next((g for g in got if g.name in SDIST_ONLY), None)
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python_version": args.python_version,
        "platform": args.platform,
        "platform_tags": platform_tags(args.platform),
        "have": str(args.have),
        "have_header": [ln for ln in args.have.read_text().splitlines()[:3] if ln.startswith("#")],
        "build_tools": [f"{g.name}=={g.version}" for g in got if g.name in build_tools],
        "install": [f"{g.name}=={g.version}" for g in got if g.name not in build_tools and g.name not in SDIST_ONLY],
        "deepspeed": f"{ds.name}=={ds.version}" if ds else None,
        "ftl_wheel": wheel.name,
        "files": files,
        "files_bytes": sum(f["bytes"] for f in files),
    }
    (kit / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def print_table(manifest: dict) -> None:
    for f in manifest["files"]:
        print(f"  {f['bytes'] / 1024**2:8.2f} MiB  {f['name']:24s} {f['version']:14s} {f['file']}  ({f['required_by']})")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.no_index and not args.find_links:
        print("gpu-kit: --no-index needs --find-links DIR (a local wheelhouse)", file=sys.stderr)
        return 2
    if not args.have.is_file():
        print(f"gpu-kit: --have {args.have}: no such file", file=sys.stderr)
        return 2
    try:
        build(args)
    except KitError as e:
        print(str(e), file=sys.stderr)
        return e.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
