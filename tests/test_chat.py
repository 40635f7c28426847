"""Chat data (launcher/train/chat.py): the tokens that carry the loss are exactly the assistant turns' tokens,
whether the template marks them ({% generation %}) or they come from rendering turn by turn; ShareGPT turns
map to roles; templates that cannot be split, and conversations that do not end with the assistant, are
refused with one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from launcher.core.errors import FtlError
from launcher.train.chat import has_generation_marks, messages_of, render, resolve_template

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "assets" / "tiny-llama"
CHAT = [json.loads(line)["messages"] for line in (ROOT / "recipes" / "data" / "chat.jsonl").read_text().splitlines()]
# ChatML as Qwen writes it, without generation marks: the turn-by-turn split is what finds the assistant tokens
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MULTI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
         {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 + 3?"},
         {"role": "assistant", "content": "6, since 3 + 3 = 6."}]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY)


def _trained_text(tok, template: str, messages, train_on: str, by_turns: bool = False) -> list[str]:
    """The text of each trained run of tokens, cut from the rendering by the tokens' character offsets."""
    ids, mask = render(messages, tok, template, train_on, by_turns=by_turns)
    text = tok.apply_chat_template(messages, chat_template=template, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == ids  # what trains is the tokenization of the rendered text, nothing added
    runs, cur = [], []
    for (a, b), m in zip(enc["offset_mapping"], mask + [0]):
        if m:
            cur.append((a, b))
        elif cur:
            runs.append(text[cur[0][0]:cur[-1][1]])
            cur = []
    if cur:
        runs.append(text[cur[0][0]:cur[-1][1]])
    return runs


def test_marked_template_and_turn_by_turn_agree_token_by_token(tok):
    """The shipped tiny Llama's template marks the assistant turns: its mask and the turn-by-turn split give
    the same tokens, on every shipped conversation and on a multi-turn one with a system prompt."""
    tpl = resolve_template(None, tok)
    assert has_generation_marks(tpl)
    for msgs in CHAT + [MULTI]:
        for train_on in ("assistant", "last"):
            assert render(msgs, tok, tpl, train_on) == render(msgs, tok, tpl, train_on, by_turns=True)
        want = [m["content"] + tok.eos_token for m in msgs if m["role"] == "assistant"]
        assert _trained_text(tok, tpl, msgs, "assistant") == want
        assert _trained_text(tok, tpl, msgs, "last") == want[-1:]
    ids, mask = render(MULTI, tok, tpl, "all")
    assert mask == [1] * len(ids)


def test_unmarked_template_trains_each_assistant_turn_and_its_end_marker(tok):
    """ChatML without marks: every assistant turn's content and its end-of-turn marker train, the role header
    (the generation prompt) and every system/user token do not."""
    assert not has_generation_marks(CHATML)
    want = [m["content"] + "<|im_end|>\n" for m in MULTI if m["role"] == "assistant"]
    assert _trained_text(tok, CHATML, MULTI, "assistant") == want
    assert _trained_text(tok, CHATML, MULTI, "last") == want[-1:]
    for msgs in CHAT:
        assert _trained_text(tok, CHATML, msgs, "assistant") == [
            m["content"] + "<|im_end|>\n" for m in msgs if m["role"] == "assistant"]


def test_sharegpt_turns_map_to_roles(tok):
    rec = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2 + 2?"},
                             {"from": "gpt", "value": "4."}]}
    assert messages_of(rec, "sharegpt") == MULTI[:3]
    with pytest.raises(FtlError, match="comes from 'robot'"):
        messages_of({"conversations": [{"from": "robot", "value": "x"}]}, "sharegpt")


def test_templates_and_conversations_that_cannot_train_are_refused(tok, tmp_path):
    rewrites = ("{% for m in messages %}{% if loop.last or m['role'] != 'assistant' %}{{ m['role'] + ': ' + m['content'] + "
                "'\\n' }}{% else %}{{ 'assistant: ...\\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")  # hides earlier answers
    with pytest.raises(FtlError, match="turn by turn"):
        render(MULTI, tok, rewrites, "assistant")
    with pytest.raises(FtlError, match="end with the assistant's turn"):
        render(MULTI[:2], tok, CHATML, "assistant")
    with pytest.raises(FtlError, match="data.chat_template = 'nope'"):
        resolve_template("nope", tok)
    f = tmp_path / "chatml.jinja"
    f.write_text(CHATML)
    assert resolve_template(str(f), tok) == CHATML and resolve_template(CHATML, tok) == CHATML


@pytest.mark.parametrize("template", [None, CHATML], ids=["tokenizer's (marked)", "chatml"])
def test_the_estimate_counts_chat_tokens_as_the_trainer_renders_them(tok, tmp_path, template):
    """The estimator renders conversations without transformers (launcher/spec/chat_template.py): the same
    text as the trainer's, character for character, and so the same token count, role tokens included."""
    from launcher.estimate.dataset import count_local
    from launcher.spec.chat_template import render as render_text
    from launcher.spec.chat_template import template_text

    sample = CHAT[:120] + [MULTI]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in sample))
    tpl, special = template_text(template, TINY)
    for msgs in sample:
        assert render_text(tpl, msgs, special) == tok.apply_chat_template(msgs, chat_template=tpl, tokenize=False)
    size = count_local(data, {}, str(TINY), chat_template=template)
    trainer = sum(len(render(m, tok, tpl, "assistant")[0]) for m in sample)
    assert size.examples == len(sample) and size.tokens == trainer, (size, trainer)
    assert "through the chat template" in size.source
    plain = sum(len(tok(m["content"]).input_ids) for msgs in sample for m in msgs)
    assert size.tokens > plain  # the role headers and end markers count


def test_an_alpaca_run_reads_the_first_line_as_the_instruction(tok):
    """ftl chat on an instruction-trained run: the first line is the instruction and the rest its input,
    rendered with the Alpaca template exactly as the training records were."""
    from launcher.spec.prompts import alpaca_prompt
    from launcher.spec.recipe import recipe_from_dict
    from launcher.train.tasks import generation_prompt

    r = recipe_from_dict({"name": "t", "model": str(TINY), "task": "sft"})
    rec = {"instruction": "Add the two numbers.", "input": "22 + 80"}
    assert generation_prompt(r, "alpaca", tok, "Add the two numbers.\n22 + 80") == alpaca_prompt(rec, None)
    assert generation_prompt(r, "alpaca", tok, "Name three colors.") == alpaca_prompt({"instruction": "Name three colors.", "input": ""}, None)
