"""Multi-turn chats as prompts: a ``messages`` list checked once, then rendered with the model's chat template.

The second turn of a conversation copies heavily from the first (a rewrite, a shorter version, the same answer
in another form), and the first answer is in the prompt for prompt lookup to copy. A chat is a list of
``{"role", "content"}`` objects, as transformers' ``apply_chat_template`` and OpenAI-style APIs take it, ending
with the user turn to answer.

Pure Python: the CLI checks every line of an ``--input`` file before a model loads.
"""

from __future__ import annotations

from typing import Any, Sequence

from .errors import InputError

ROLES = ("system", "user", "assistant")

Message = dict[str, str]


def parse_messages(value: Any, where: str) -> tuple[Message, ...]:
    """Check a ``messages`` value and return its messages as ``{"role", "content"}`` dicts (other keys dropped).

    Args:
        value: what a JSON record holds under ``messages``.
        where: ``file:line`` (or an option) to name in errors.

    Raises:
        InputError: not a non-empty list of objects, a role outside :data:`ROLES`, a content that is not a
            non-empty string, or a last message that is not a user turn; the message names ``where`` and the
            field (``messages[2].role``).

    >>> parse_messages([{"role": "user", "content": "Hi", "name": "x"}], "chat.jsonl:1")
    ({'role': 'user', 'content': 'Hi'},)
    """
    if not isinstance(value, list) or not value:
        raise InputError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects, got '
                         f"{_describe(value)}")
    messages = []
    for i, message in enumerate(value):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InputError(f'{where}: {field} must be an object with "role" and "content", got {_describe(message)}')
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InputError(f"{where}: {field}.role must be one of {', '.join(map(repr, ROLES))}, got "
                             f"{_describe(role)}")
        if not isinstance(content, str) or not content:
            raise InputError(f"{where}: {field}.content must be a non-empty string, got {_describe(content)}")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise InputError(f"{where}: the last message must be the user turn to answer, but "
                         f"messages[{len(messages) - 1}].role is {messages[-1]['role']!r}")
    return tuple(messages)


def render_messages(tokenizer, messages: Sequence[Message]) -> str:
    """The prompt of a chat: every message through the model's chat template, ready for the assistant's answer.

    Raises:
        InputError: the tokenizer has no chat template to render a chat with.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise InputError('the model has no chat template, which a "messages" chat needs; give a "prompt" instead')
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, (str, list)) and not value:
        return "an empty string" if isinstance(value, str) else "an empty list"
    if isinstance(value, str):
        return repr(value)
    return {list: "a list", dict: "an object", bool: "a boolean"}.get(type(value), type(value).__name__)
