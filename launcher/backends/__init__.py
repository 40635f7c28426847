"""Where runs execute: one backend per cluster provider (local, slurm, ssh, runpod, lambda), behind one protocol
(launcher.backends.base.Backend)."""

from __future__ import annotations

from launcher.backends.base import Backend, follow_file, say
from launcher.backends.local import LocalBackend
from launcher.backends.rental import RentalBackend
from launcher.backends.slurm import SlurmBackend
from launcher.backends.ssh import SshBackend
from launcher.core.errors import FtlError
from launcher.spec.recipe import RENTED


def get_backend(provider: str, echo: bool = True) -> Backend:
    """The backend for cluster.provider; echo: copy the run's output to this terminal."""
    if provider == "local":
        return LocalBackend(echo=echo)
    if provider == "slurm":
        return SlurmBackend(echo=echo)
    if provider == "ssh":
        return SshBackend(echo=echo)
    if provider in RENTED:
        return RentalBackend(provider, echo=echo)
    raise FtlError(f"cluster.provider = {provider!r}: launching there is not implemented yet; "
                   "use the local provider (--cluster cluster/local.yaml), or estimate with `ftl estimate`")


__all__ = ["Backend", "LocalBackend", "RentalBackend", "SlurmBackend", "SshBackend", "follow_file", "get_backend", "say"]
