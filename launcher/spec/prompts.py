"""SFT prompt rendering, shared by training, generation and the estimator's token count (no torch)."""

from __future__ import annotations

from typing import Any

from launcher.core.errors import FtlError

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class _Blank(dict):
    def __missing__(self, key: str) -> str:
        return ""


def alpaca_prompt(record: dict[str, Any], template: str | None) -> str:
    rec = _Blank({k: ("" if v is None else v) for k, v in record.items()})
    if template:
        try:
            return template.format_map(rec)
        except (ValueError, IndexError) as e:
            raise FtlError(f"data.prompt_template = {template!r}: not a valid format string ({e}); write fields as "
                           "{instruction} and {input}, and literal braces as {{ }}") from None
    tpl = ALPACA_TEMPLATE if str(rec["input"]).strip() else ALPACA_TEMPLATE_NO_INPUT
    return tpl.format_map(rec)
