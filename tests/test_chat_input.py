"""Multi-turn chats as ``generate --input``: ``messages`` lines checked before a model loads (a malformed one
named by file, line and field), rendered with the model's chat template, decoded exactly as plain greedy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retrieval_spec import models
from retrieval_spec.chat import parse_messages, render_messages
from retrieval_spec.errors import InputError
from test_cli import refused, run  # the CLI's one-line refusal, asserted as its own tests assert it

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Rewrite that in capitals."}]


def test_a_chat_keeps_its_roles_and_contents_in_order_and_drops_other_keys():
    given = [{**message, "name": "someone"} for message in CHAT]
    assert parse_messages(given, "chat.jsonl:1") == tuple(CHAT)


@pytest.mark.parametrize("messages, message", [
    ([], '"messages" must be a non-empty list of {"role", "content"} objects, got an empty list'),
    ("Hello", '"messages" must be a non-empty list of {"role", "content"} objects, got \'Hello\''),
    (["Hello"], 'messages[0] must be an object with "role" and "content", got \'Hello\''),
    ([{"role": "bot", "content": "x"}], "messages[0].role must be one of 'system', 'user', 'assistant', got 'bot'"),
    ([{"content": "x"}], "messages[0].role must be one of 'system', 'user', 'assistant', got nothing"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": ""}],
     "messages[1].content must be a non-empty string, got an empty string"),
    ([{"role": "user", "content": ["a"]}], "messages[0].content must be a non-empty string, got a list"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
     "the last message must be the user turn to answer, but messages[1].role is 'assistant'"),
])
def test_a_malformed_chat_line_is_named_by_file_line_and_field_before_a_model_loads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, messages, message: str):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n\n" + json.dumps({"id": "b", "messages": messages}) + "\n")
    refused(run("generate", "--input", str(path)), f"chat.jsonl:3: {message}")


def test_a_chat_with_no_chat_is_refused_naming_its_line(tmp_path: Path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": "plain"}) + "\n" + json.dumps({"messages": CHAT}) + "\n")
    refused(run("generate", "--input", str(path), "--no-chat"), "chat.jsonl:2:", "drop --no-chat")


class TemplateTokenizer:
    chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_a_chat_renders_every_turn_through_the_template_and_needs_one():
    rendered = render_messages(TemplateTokenizer(), parse_messages(CHAT, "x"))
    assert rendered == "<system>Be brief.<user>Name a colour.<assistant>Blue.<user>Rewrite that in capitals.<assistant>"
    tokenizer = TemplateTokenizer()
    tokenizer.chat_template = None
    with pytest.raises(InputError, match="no chat template"):
        render_messages(tokenizer, CHAT)


@pytest.mark.real_model
def test_a_chat_file_decodes_each_chat_exactly_as_plain_greedy_decodes_its_template(
        smollm2, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import torch

    monkeypatch.setattr(models, "load_model", lambda name, *args, **kwargs: smollm2)
    model, tokenizer = smollm2
    chats = [CHAT, CHAT[1:2]]
    path, out = tmp_path / "chat.jsonl", tmp_path / "out.jsonl"
    path.write_text("".join(json.dumps({"id": f"c{i}", "messages": m}) + "\n" for i, m in enumerate(chats)))
    result = run("generate", "--input", str(path), "--output", str(out), "--max-new-tokens", "12", "--quiet")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in rows] == ["c0", "c1"]
    for chat, row in zip(chats, rows):
        ids = tokenizer(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False, return_tensors="pt")["input_ids"]
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        assert np.array_equal(row["tokens"], plain[0, ids.shape[1]:].numpy())
