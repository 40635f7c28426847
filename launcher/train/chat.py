"""Chat data: a conversation rendered with the chat template, and the tokens that carry the loss.

`data.train_on` says which tokens train: `assistant` (every assistant turn), `last` (the last assistant
turn) or `all`. The assistant tokens are found two ways, which agree where both apply
(tests/test_chat.py checks it token by token):

* the template marks them (`{% generation %}` ... `{% endgeneration %}`): transformers'
  `apply_chat_template(..., return_assistant_tokens_mask=True)`;
* otherwise the conversation is rendered turn by turn: an assistant turn's text is what rendering
  through that turn adds to rendering the turns before it with the generation prompt (so the role
  header stays untrained and the end-of-turn marker trains), and its tokens are those of the whole
  rendering whose first character falls in that text. A template whose renderings are not prefixes of
  each other (it rewrites earlier turns, e.g. drops old reasoning) cannot be split so: a clear error.

The rendered text is tokenized without adding special tokens: the template writes the ones it wants.
`data.chat_template` is a template name the tokenizer carries, a Jinja string, or a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.core.errors import FtlError

# ShareGPT's `from` values (as axolotl and LLaMA-Factory read them) -> chat roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system", "tool": "tool"}
GENERATION_TAG = "generation"


def messages_of(record: dict[str, Any], kind: str) -> list[dict[str, str]]:
    """The record's conversation as [{role, content}]: `messages` as they are, ShareGPT `conversations`
    ({from, value}) mapped to roles."""
    if kind == "sharegpt":
        out = []
        for turn in record["conversations"]:
            who = str(turn.get("from", "")).lower()
            if who not in SHAREGPT_ROLES:
                raise FtlError(f"a ShareGPT turn comes from {turn.get('from')!r}; known: {', '.join(sorted(SHAREGPT_ROLES))}")
            out.append({"role": SHAREGPT_ROLES[who], "content": str(turn.get("value", ""))})
        return out
    return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]


def resolve_template(spec: str | None, tokenizer, base: Path | None = None) -> str:
    """The Jinja text of `data.chat_template` (None: the tokenizer's own)."""
    own = getattr(tokenizer, "chat_template", None)
    if spec is None:
        if isinstance(own, dict):
            own = own.get("default")
        if not own:
            raise FtlError("chat data needs a chat template: the model's tokenizer has none; set data.chat_template "
                           "(a Jinja string or a file)")
        return str(own)
    if "{{" in spec or "{%" in spec:
        return spec
    if isinstance(own, dict) and spec in own:
        return str(own[spec])
    path = Path(spec).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if path.is_file():
        return path.read_text(encoding="utf-8")
    names = sorted(own) if isinstance(own, dict) else []
    raise FtlError(f"data.chat_template = {spec!r}: not a template name the tokenizer knows"
                   f"{' (' + ', '.join(names) + ')' if names else ''}, a Jinja string or a file")


def has_generation_marks(template: str) -> bool:
    return any(f"{{%{d} {GENERATION_TAG} " in template or f"{{%{d} {GENERATION_TAG}%}}" in template
               for d in ("", "-", "+"))


def _render(tokenizer, template: str, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, template: str, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn, turn by turn."""
    full = _render(tokenizer, template, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, template, messages[:i], True)
        through = _render(tokenizer, template, messages[:i + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise FtlError("the chat template does not render the conversation turn by turn (a later turn changes "
                           "the text of an earlier one), so its assistant tokens cannot be told apart; use a template "
                           "with {% generation %} marks (data.chat_template) or data.train_on: all")
        spans.append((len(before), len(through)))
    return full, spans


def render(messages: list[dict[str, str]], tokenizer, template: str, train_on: str,
           by_turns: bool = False) -> tuple[list[int], list[int]]:
    """(input_ids, loss mask) of one conversation; `by_turns` forces the turn-by-turn split."""
    if not messages or messages[-1]["role"] != "assistant":
        last = messages[-1]["role"] if messages else None
        raise FtlError(f"a conversation must end with the assistant's turn (found role {last!r})")
    if has_generation_marks(template) and not by_turns:
        out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        runs = _runs(mask)
    else:
        text, spans = assistant_spans(tokenizer, template, messages)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        starts = [s for s, _ in enc["offset_mapping"]]
        mask = [int(any(a <= st < b for a, b in spans)) for st in starts]
        runs = [(min(i for i, st in enumerate(starts) if a <= st < b), 1 + max(i for i, st in enumerate(starts) if a <= st < b))
                for a, b in spans if any(a <= st < b for st in starts)]
    if train_on == "all":
        return ids, [1] * len(ids)
    if train_on == "last" and runs:
        a, b = runs[-1]
        mask = [int(a <= i < b) for i in range(len(ids))]
    if not any(mask):
        raise FtlError("no assistant token found in the rendered conversation (is the template's assistant turn "
                       "empty?); check data.chat_template or use data.train_on: all")
    return ids, mask


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of 1s: one per assistant turn."""
    runs, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs
