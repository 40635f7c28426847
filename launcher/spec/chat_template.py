"""Chat templates rendered without transformers, so that `ftl estimate` counts a conversation's tokens as
the trainer renders them (role headers and end-of-turn markers included), without importing the training
stack.

The environment is the one transformers renders templates in (`render_jinja_template`, transformers 5:
a sandboxed Jinja environment with trim_blocks, lstrip_blocks and loop controls, `raise_exception` and
`strftime_now` as globals, the tokenizer's special tokens as variables); `{% generation %}` blocks, which
transformers uses to mark assistant tokens, render their body unchanged. tests/test_chat.py checks the
text is the trainer's, character for character.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from launcher.core.errors import FtlError

SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}`: the body, rendered as it is."""

    tags = {"generation"}

    def parse(self, parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise(message: str) -> None:
    raise FtlError(f"the chat template refused the conversation: {message}")


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: dt.datetime.now().strftime(fmt)
    return env


def tokenizer_template(model_dir: str | Path) -> tuple[str | None, dict[str, str]]:
    """(the tokenizer's own chat template, its special tokens) from a model folder's tokenizer files."""
    folder = Path(model_dir)
    cfg: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").is_file():
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):  # named templates: the default one
        tpl = next((t.get("template") for t in tpl if t.get("name") == "default"), None)
    if tpl is None and (folder / "chat_template.jinja").is_file():
        tpl = (folder / "chat_template.jinja").read_text()
    special = {}
    for k in SPECIAL:
        v = cfg.get(k)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            special[k] = v
    return tpl, special


def template_text(spec: str | None, model_dir: str | Path | None) -> tuple[str | None, dict[str, str]]:
    """data.chat_template (a Jinja string or a file) or the tokenizer's, with the special tokens."""
    own, special = tokenizer_template(model_dir) if model_dir else (None, {})
    if spec is None:
        return own, special
    if "{{" in spec or "{%" in spec:
        return spec, special
    if Path(spec).expanduser().is_file():
        return Path(spec).expanduser().read_text(encoding="utf-8"), special
    return own, special  # a named template: the tokenizer's file lists it; the trainer resolves it


def render(template: str, messages: list[dict[str, Any]], special: dict[str, str],
           add_generation_prompt: bool = False) -> str:
    return _environment().from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                       **special)
