"""scripts/gpu-kit against a local fake wheelhouse: what it leaves out, what it follows, when it refuses.

No test may reach a package registry, so the kit is built here from small wheels made in the test (real names,
real requirement shapes: trl -> datasets -> fsspec[http], deepspeed as an sdist needing hjson, bitsandbytes with
an older pure wheel and a newer one for a glibc the target lacks) with `--find-links DIR --no-index`. The real kit
was built on the development machine from PyPI (docs/validation/README.md gives the size); a test cannot repeat
that without the network. ftl's own wheel is built for real from the checkout.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_kit  # noqa: E402

HAVE = """\
# the target (as pip list --format=freeze prints it)
torch==2.11.0+cu130
transformers==5.17.0
accelerate==1.15.0
peft==0.18.0
tokenizers==0.23.2
huggingface-hub==1.33.0
fsspec==2025.3.0
typer==0.20.0
rich==14.0.0
httpx==0.28.1
pyyaml==6.0.2
jinja2==3.1.6
numpy==2.5.2
pandas
pyarrow==24.0.0
packaging==25.0
cloudpickle
typing-extensions==4.15.0
"""


def wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = (), tag: str = "py3-none-any",
          pad: int = 0) -> Path:
    """A minimal valid wheel: dist-info METADATA, WHEEL, RECORD (+ `pad` bytes of incompressible data)."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-{tag}.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", meta)
        z.writestr(f"{dist}.dist-info/WHEEL", f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")
        if pad:
            z.writestr(f"{name.replace('-', '_')}/blob.bin", bytes(range(256)) * (pad // 256), zipfile.ZIP_STORED)
    return path


def sdist(folder: Path, name: str, version: str, requires: tuple[str, ...]) -> Path:
    """A minimal sdist that pip can prepare metadata for with this interpreter's setuptools."""
    base = f"{name}-{version}"
    files = {
        f"{base}/PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                            + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{base}/setup.py": f"from setuptools import setup\nsetup(name={name!r}, version={version!r}, "
                            f"install_requires={list(requires)!r}, py_modules=[])\n",
    }
    path = folder / f"{base}.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        for arc, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(arc)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def wheelhouse(tmp_path: Path) -> Path:
    w = tmp_path / "wheelhouse"
    w.mkdir()
    wheel(w, "trl", "1.16.0", ("accelerate>=1.10.1", "datasets>=4.7.0", "transformers>=4.56.2", "pandas>=2.1.1"))
    wheel(w, "datasets", "5.2.0", ("dill<0.4.2,>=0.3.0", "multiprocess<0.70.20", "fsspec[http]<=2026.9.0,>=2023.1.0",
                                   "huggingface-hub<3.0,>=1.31.0", "pyarrow>=24.0.0", "xxhash"))
    wheel(w, "xxhash", "3.5.0", tag="cp312-cp312-manylinux_2_17_x86_64")
    wheel(w, "fsspec", "2025.3.0", ('aiohttp!=4.0.0a0; extra == "http"',))  # the target's version: read for its extras
    wheel(w, "aiohttp", "3.14.5", ("yarl>=1.17",), tag="cp312-cp312-manylinux_2_17_x86_64")
    wheel(w, "yarl", "1.20.0", tag="cp312-cp312-manylinux_2_17_x86_64")
    wheel(w, "dill", "0.4.1")
    wheel(w, "multiprocess", "0.70.19", ("dill>=0.4.1",), tag="py312-none-any")
    wheel(w, "bitsandbytes", "0.42.0", pad=300_000)  # the old pure wheel: not wanted
    wheel(w, "bitsandbytes", "0.50.2", ("torch<3,>=2.4", "numpy>=1.17"), tag="py3-none-manylinux_2_24_x86_64", pad=100_000)
    wheel(w, "bitsandbytes", "0.51.0", tag="py3-none-manylinux_2_34_x86_64")  # needs a newer glibc than the target
    wheel(w, "pydantic", "2.14.4", ("pydantic-core==2.50.5", "annotated-types>=0.6.0", "typing-inspection>=0.4.2",
                                    "typing-extensions>=4.14.1"))
    wheel(w, "pydantic_core", "2.50.5", tag="cp312-cp312-manylinux_2_17_x86_64")
    wheel(w, "pydantic_core", "2.50.5", tag="cp311-cp311-manylinux_2_17_x86_64")  # another Python: not wanted
    wheel(w, "annotated-types", "0.8.0")
    wheel(w, "typing-inspection", "0.4.5", ("typing-extensions>=4.12.0",))
    wheel(w, "submitit", "1.5.4", ("cloudpickle>=1.2.1", "typing_extensions>=3.7.4.2"))
    wheel(w, "liger-kernel", "0.8.5", ("torch>=2.1.2", 'triton>=2.3.1; sys_platform == "linux"'))
    wheel(w, "triton", "3.6.0", tag="cp312-cp312-manylinux_2_27_x86_64")
    wheel(w, "hjson", "3.1.0")
    wheel(w, "setuptools", "80.0.0")
    wheel(w, "wheel", "0.48.0")
    wheel(w, "colorama", "0.4.6")  # a Windows-only requirement below: must not be followed
    sdist(w, "deepspeed", "0.19.8", ("hjson", "pydantic>=2.0.0", "torch>=2.0.0", 'colorama; sys_platform == "win32"'))
    return w


def build(tmp_path: Path, wheelhouse: Path, have: str = HAVE, *extra: str) -> tuple[int, Path, str]:
    have_file = tmp_path / "have.txt"
    have_file.write_text(have)
    out = tmp_path / "kit"
    # this machine's pip settings (mirrors, find-links, constraints) stay out: the wheelhouse is the only source
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_kit.py"), "--have", str(have_file), "--out",
                          str(out), "--find-links", str(wheelhouse), "--no-index", *extra],
                         capture_output=True, text=True, timeout=300, env=env)
    return res.returncode, out, res.stdout + res.stderr


@pytest.mark.slow
def test_kit_holds_what_the_target_lacks_and_nothing_it_has(tmp_path: Path, wheelhouse: Path) -> None:
    rc, kit, log = build(tmp_path, wheelhouse)
    assert rc == 0, log
    man = json.loads((kit / "manifest.json").read_text())
    got = {f["name"]: f for f in man["files"]}
    assert set(got) == {"trl", "datasets", "dill", "multiprocess", "aiohttp", "yarl", "bitsandbytes", "pydantic",
                        "pydantic-core", "annotated-types", "typing-inspection", "submitit", "liger-kernel", "triton",
                        "hjson", "setuptools", "wheel", "deepspeed", "xxhash", "ftl"}, log
    # the platform and the Python are pinned: the manylinux_2_24 wheel, not the pure one nor the glibc-2.34 one
    assert got["bitsandbytes"]["file"] == "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    assert got["pydantic-core"]["file"].startswith("pydantic_core-2.50.5-cp312-cp312")
    assert got["aiohttp"]["required_by"] == "fsspec"  # fsspec[http]: the target has fsspec, not its extra
    assert got["hjson"]["required_by"] == "deepspeed"  # from the sdist's PKG-INFO
    assert "colorama" not in got  # a win32 marker
    assert man["deepspeed"] == "deepspeed==0.19.8" and (kit / "deepspeed-0.19.8.tar.gz").is_file()
    assert man["build_tools"] == ["setuptools==80.0.0", "wheel==0.48.0"]
    assert "trl==1.16.0" in man["install"] and not any(r.startswith(("deepspeed", "setuptools")) for r in man["install"])
    assert man["ftl_wheel"].startswith("ftl-") and (kit / man["ftl_wheel"]).is_file()
    with zipfile.ZipFile(kit / man["ftl_wheel"]) as z:  # the catalog travels with the code
        assert "launcher/spec/catalog/models.yaml" in z.namelist()
    assert sorted(p.name for p in kit.iterdir()) == sorted([f["file"] for f in man["files"]] + ["manifest.json"])
    assert man["files_bytes"] == sum(p.stat().st_size for p in kit.iterdir() if p.name != "manifest.json")
    mib = sum(p.stat().st_size for p in kit.iterdir()) / 1024**2
    assert f"{len(man['files'])} files, {mib:.1f} MiB in {kit} (limit 56 MiB)" in log


@pytest.mark.slow
def test_kit_over_the_size_limit_fails_and_leaves_no_kit(tmp_path: Path, wheelhouse: Path) -> None:
    rc, kit, log = build(tmp_path, wheelhouse, HAVE, "--max-mib", "0.05")
    assert rc == 5, log
    assert "over the limit of 0.05 MiB" in log and "bitsandbytes" in log
    assert not kit.exists() and not kit.with_name("kit.tmp").exists()


@pytest.mark.slow
def test_kit_refuses_a_target_that_cannot_meet_a_requirement(tmp_path: Path, wheelhouse: Path) -> None:
    rc, kit, log = build(tmp_path, wheelhouse, HAVE.replace("transformers==5.17.0", "transformers==4.40.0"))
    assert rc == 4, log
    assert "trl needs transformers>=4.56.2, the target has transformers 4.40.0" in log
    assert not kit.exists()


def test_kit_says_when_no_package_source_is_reachable(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, kit, log = build(tmp_path, empty)
    assert rc == 3, log
    assert "cannot download packages from the local wheelhouse" in log and "pip said" in log
    assert not kit.exists()


def test_platform_tags_include_every_older_manylinux() -> None:
    tags = gpu_kit.platform_tags("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_24_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert "manylinux_2_29_x86_64" not in tags
    assert gpu_kit.platform_tags("win_amd64") == ["win_amd64"]


def test_have_list_reads_pip_freeze(tmp_path: Path) -> None:
    p = tmp_path / "have.txt"
    p.write_text("# comment\nTorch==2.11.0+cu130\nhuggingface_hub==1.33.0\nmylib @ file:///src/mylib\npeft\n\n")
    have = gpu_kit.read_have(p)
    assert {k: str(v) if v else v for k, v in have.items()} == {"torch": "2.11.0+cu130", "huggingface-hub": "1.33.0",
                                                                "mylib": None, "peft": None}


def test_the_documented_machine_lacks_what_the_kit_carries() -> None:
    """The shipped have-list (shared/gpu-machine.md, 2026-11) names what is there, and none of what is not."""
    have = gpu_kit.read_have(gpu_kit.DEFAULT_HAVE)
    assert str(have["torch"]) == "2.11.0+cu130" and str(have["transformers"]) == "5.17.0"
    for absent in ("trl", "datasets", "bitsandbytes", "deepspeed", "pydantic", "pydantic-core", "submitit",
                   "liger-kernel", "hjson", "dill", "multiprocess", "annotated-types", "typing-inspection"):
        assert absent not in have
