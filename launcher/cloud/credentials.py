"""Where the providers' API keys and URLs come from (no HTTP here, so reading a key stays light).

Keys: the env var first (RUNPOD_API_KEY, LAMBDA_API_KEY, as `ftl prices` uses), then the credentials
file $FTL_CONFIG_DIR/credentials.yaml (else $XDG_CONFIG_HOME/ftl/, else ~/.config/ftl/):

    runpod:
      api_key: rpa_...
    lambda:
      api_key: secret_...

A file readable by group or others is used but warned about (chmod 600 it).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import yaml

from launcher.cloud.base import AuthError
from launcher.core import useryaml
from launcher.core.useryaml import UserYamlError
from launcher.spec.catalog import provider_facts

log = logging.getLogger("ftl.providers")


def config_dir() -> Path:
    root = os.environ.get("FTL_CONFIG_DIR") or os.path.join(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config", "ftl")
    return Path(root)


def credentials_path() -> Path:
    return config_dir() / "credentials.yaml"


def api_key(provider: str) -> str:
    """The provider's key from its env var, else from the credentials file; AuthError naming both when absent."""
    env = provider_facts()[provider]["key_env"]
    key = os.environ.get(env, "").strip()
    if key:
        return key
    path = credentials_path()
    if path.is_file():
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("%s is readable by other users (mode %o): run chmod 600 %s", path, mode & 0o777, path)
        try:
            data = useryaml.read(path) or {}
        except (OSError, yaml.YAMLError, UserYamlError) as e:
            # the reason, never the content (it holds keys)
            why = f"not accepted at line {e.line}" if isinstance(e, UserYamlError) else type(e).__name__
            raise AuthError(f"{provider}: cannot read {path} ({why}); set {env} instead", env,
                            provider=provider) from None
        block = data.get(provider) if isinstance(data, dict) else None
        key = str((block or {}).get("api_key") or "").strip() if isinstance(block, dict) else ""
        if key:
            return key
    raise AuthError(f"{provider}: no API key: set {env} (an API key from the {provider} console) "
                    f"or put '{provider}: {{api_key: ...}}' in {path}", env, provider=provider)


def base_url(provider: str) -> str:
    facts = provider_facts()[provider]
    return (os.environ.get(facts["url_env"]) or facts["api_url"]).rstrip("/")
