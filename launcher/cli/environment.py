"""What `ftl env` reports: the versions, GPUs, tools and keys a bug report needs, never a key's value.

Nothing here may fail on a missing or broken package: each one reads "not installed" (or its error),
and torch is imported only when `ftl env` runs (the light commands never import this function's torch).
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from launcher import __version__
from launcher.cloud.base import AuthError
from launcher.cloud.credentials import api_key, credentials_path
from launcher.spec.catalog import provider_facts

# distribution names, in the order a bug report reads them
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "deepspeed", "bitsandbytes", "liger-kernel",
            "flash-attn", "datasets", "huggingface-hub", "tokenizers", "wandb", "tensorboard", "submitit")
TOOLS = ("nvidia-smi", "sbatch", "srun", "ssh", "rsync")
OTHER_KEYS = ("HF_TOKEN", "WANDB_API_KEY")  # variables whose presence (never value) matters to a run
NOT_INSTALLED = "not installed"


def package_versions() -> dict[str, str]:
    """Installed version of each package, or 'not installed' (read from metadata: nothing is imported)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = NOT_INSTALLED
    return out


def torch_facts() -> dict[str, Any]:
    """CUDA/ROCm build, NCCL and the GPUs torch sees; {'error': ...} when torch cannot be imported."""
    if importlib.util.find_spec("torch") is None:
        return {"installed": False}
    try:
        import torch  # a diagnostic command: the one place outside the trainer that imports torch on purpose
    except Exception as e:  # a broken install is what the user needs to see, not a traceback
        return {"installed": True, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    facts: dict[str, Any] = {"installed": True, "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None),
                             "cuda_available": False, "gpus": [], "nccl": None}
    try:
        facts["cuda_available"] = bool(torch.cuda.is_available())
        if facts["cuda_available"]:
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                facts["gpus"].append({"index": i, "name": p.name, "memory_bytes": int(p.total_memory)})
            nccl = torch.cuda.nccl.version()
            facts["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    except Exception as e:
        facts["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return facts


def bitsandbytes_backend(torch: dict[str, Any]) -> str | None:
    """The backend bitsandbytes would load (its own rule: ROCm, else CUDA when available, else CPU) and whether its
    native library ships for this build, found without importing bitsandbytes (which takes seconds)."""
    spec = importlib.util.find_spec("bitsandbytes")
    if spec is None or not spec.origin:
        return None
    folder = Path(spec.origin).parent
    if torch.get("hip"):
        return "ROCm"
    if torch.get("cuda_available") and torch.get("cuda"):
        lib = f"libbitsandbytes_cuda{str(torch['cuda']).replace('.', '')[:3]}"
        found = any(folder.glob(lib + ".*"))
        return f"CUDA {torch['cuda']} ({lib} {'found' if found else 'missing: 4-bit and 8-bit layers will fail'})"
    return "CPU" + (" (no GPU seen by torch)" if torch.get("installed") else "")


def driver() -> dict[str, Any]:
    """The NVIDIA driver and GPUs nvidia-smi reports (None without nvidia-smi)."""
    if not shutil.which("nvidia-smi"):
        return {"driver": None, "gpus": []}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return {"driver": None, "gpus": [], "error": f"nvidia-smi: {type(e).__name__}"}
    rows = [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not rows:
        return {"driver": None, "gpus": [], "error": f"nvidia-smi exited {out.returncode}: "
                                                     f"{(out.stderr or out.stdout).strip()[:200]}"}
    return {"driver": rows[0][1] if len(rows[0]) > 1 else None,
            "gpus": [{"name": r[0], "memory": r[2] if len(r) > 2 else None} for r in rows]}


def key_presence() -> dict[str, str]:
    """Where each provider key would come from ('env RUNPOD_API_KEY', 'credentials file', 'not set'), and whether
    the other variables a run reads are set: names only, never values."""
    out = {}
    for provider, facts in provider_facts().items():
        env = facts["key_env"]
        if os.environ.get(env, "").strip():
            out[env] = "set"
            continue
        try:
            api_key(provider)
            out[env] = f"not set; {provider} key found in {credentials_path()}"
        except AuthError as e:
            out[env] = "not set" if "no API key" in str(e) else f"not set; {credentials_path()} cannot be read"
    for env in OTHER_KEYS:
        out[env] = "set" if os.environ.get(env, "").strip() else "not set"
    return out


def environment() -> dict[str, Any]:
    """Everything `ftl env` shows, as JSON-friendly data."""
    t = torch_facts()
    return {
        "ftl": __version__,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "packages": package_versions(),
        "torch": t,
        "bitsandbytes_backend": bitsandbytes_backend(t),
        "nvidia": driver(),
        "tools": {name: shutil.which(name) for name in TOOLS},
        "keys": key_presence(),
    }
