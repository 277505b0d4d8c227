"""The chat format (kimi-linear-spec.md §7.3), in one place for the whole project.

    <|im_system|>system<|im_middle|>{system}<|im_end|><|im_user|>user<|im_middle|>{user}<|im_end|><|im_assistant|>assistant<|im_middle|>

No newlines between turns, the role name is plain text after the role marker, and no default system
prompt is injected (the spec's best evidence for Kimi Linear; pass a system message explicitly, e.g.
DEFAULT_SYSTEM_PROMPT). Tool results are system-role turns named `tool` (or the message's `name`).

Token ids are built turn by turn: markers become their special ids directly and message text is encoded
with special tokens read as plain text, so a document that contains `<|im_end|>` cannot close its own
turn. For text without special-token text the ids equal `tokenizer.encode(render_chat(...))`, because
the official encode also cuts text at every special token before encoding the pieces.

Generation (engine/generate.py) leaves the assistant turn open: the state holds the assistant's text
but not `<|im_end|>`. `next_turn_token_ids` therefore starts with `<|im_end|>`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kimi_desk.engine.errors import UserError

if TYPE_CHECKING:
    from kimi_desk.engine.config import KimiLinearConfig
    from kimi_desk.engine.tokenizer import Tokenizer

IM_SYSTEM = "<|im_system|>"
IM_USER = "<|im_user|>"
IM_ASSISTANT = "<|im_assistant|>"
IM_MIDDLE = "<|im_middle|>"
IM_END = "<|im_end|>"

# Role -> (marker, the role name written after it).
_ROLE_HEADERS = {
    "system": (IM_SYSTEM, "system"),
    "user": (IM_USER, "user"),
    "assistant": (IM_ASSISTANT, "assistant"),
    "tool": (IM_SYSTEM, "tool"),
}

# The system prompt of the official README's example; offered, never injected.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant provided by Moonshot-AI."

# Tokens that end an assistant turn (spec §7.2): <|im_end|> (the config eos), and, to be safe, [EOS] and [EOT].
END_OF_TURN_TOKENS = ("[EOS]", IM_END, "[EOT]")

# Between a document and the question after it. The document's text ends with a newline and the question
# starts with a non-space, so no pre-tokenizer piece crosses the boundary (see document_prompt).
DOCUMENT_QUESTION_SEPARATOR = "\n\n"

Message = Mapping[str, str]


class ChatFormatError(UserError):
    """A message list the chat format cannot render, or a tokenizer without the chat markers."""


def _header(message: Message) -> tuple[str, str]:
    role = message.get("role")
    if role not in _ROLE_HEADERS:
        raise ChatFormatError(f"unknown role {role!r}: expected one of {', '.join(_ROLE_HEADERS)}")
    if not isinstance(message.get("content"), str):
        raise ChatFormatError(f"a {role} message needs text content, got {type(message.get('content')).__name__}")
    marker, name = _ROLE_HEADERS[role]
    if role == "tool" and message.get("name"):
        name = message["name"]
    return marker, name


def render_chat(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The prompt as text, for display and debugging; the model is fed `chat_token_ids`."""
    parts = []
    for message in messages:
        marker, name = _header(message)
        parts.append(f"{marker}{name}{IM_MIDDLE}{message['content']}{IM_END}")
    if add_generation_prompt:
        parts.append(f"{IM_ASSISTANT}assistant{IM_MIDDLE}")
    return "".join(parts)


def _special_id(tokenizer: Tokenizer, name: str) -> int:
    token_id = tokenizer.special_tokens.get(name)
    if token_id is None:
        raise ChatFormatError(f"the tokenizer has no special token {name}, which the chat format needs")
    return token_id


def _turn_ids(tokenizer: Tokenizer, marker: str, name: str, content: str, close: bool = True) -> list[int]:
    ids = [
        _special_id(tokenizer, marker),
        *tokenizer.encode(name, allow_special=False),
        _special_id(tokenizer, IM_MIDDLE),
        *tokenizer.encode(content, allow_special=False),
    ]
    if close:
        ids.append(_special_id(tokenizer, IM_END))
    return ids


def chat_token_ids(tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
    """The prompt's token ids. Message text never produces special ids."""
    ids: list[int] = []
    for message in messages:
        marker, name = _header(message)
        ids += _turn_ids(tokenizer, marker, name, message["content"])
    if add_generation_prompt:
        ids += generation_prompt_ids(tokenizer)
    return ids


def generation_prompt_ids(tokenizer: Tokenizer) -> list[int]:
    """`<|im_assistant|>assistant<|im_middle|>`: what the model continues from."""
    return [
        _special_id(tokenizer, IM_ASSISTANT),
        *tokenizer.encode("assistant", allow_special=False),
        _special_id(tokenizer, IM_MIDDLE),
    ]


def next_turn_token_ids(
    tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True
) -> list[int]:
    """The ids to feed after a generation, whatever ended it: `<|im_end|>` closes the assistant turn
    that generation left open (a stop token it sampled was not fed), then the new messages."""
    return [_special_id(tokenizer, IM_END), *chat_token_ids(tokenizer, messages, add_generation_prompt)]


def stop_token_ids(tokenizer: Tokenizer, config: KimiLinearConfig | None = None) -> frozenset[int]:
    """The ids that end an assistant turn: END_OF_TURN_TOKENS that the tokenizer has, by name, plus the
    config's eos id(s). For the released model: {163585, 163586, 163593}."""
    ids = {tokenizer.special_tokens[name] for name in END_OF_TURN_TOKENS if name in tokenizer.special_tokens}
    if config is not None:
        ids.update(config.stop_token_ids)
    if not ids:
        raise ChatFormatError(
            "no end-of-turn token: the tokenizer names none of "
            f"{', '.join(END_OF_TURN_TOKENS)} and no config eos was given"
        )
    return frozenset(ids)


@dataclass(frozen=True)
class DocumentPrompt:
    """A question about a long document, split where the document ends.

    `prefix_ids` (system turn, the user turn's header, the document and the separator) depend only on
    the system prompt and the document: read them once, keep the state, and answer any number of
    questions by feeding a copy of that state `suffix_ids` (the question, `<|im_end|>` and the
    generation prompt). `prefix_ids + suffix_ids` equals `chat_token_ids` of `document_messages(...)`.
    """

    prefix_ids: list[int]
    suffix_ids: list[int]

    @property
    def token_ids(self) -> list[int]:
        return self.prefix_ids + self.suffix_ids


def document_messages(document: str, question: str, system: str | None = None) -> list[dict[str, str]]:
    """The document as the first user content, followed by the question, in one user turn."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": document_text(document) + _question_text(question)})
    return messages


def document_prompt(tokenizer: Tokenizer, document: str, question: str, system: str | None = None) -> DocumentPrompt:
    """The ids of `document_messages(document, question, system)`, split after the document.

    The split is exact: the document part ends with a newline and the question part starts with a
    non-space character, and no piece of the pre-tokenizer pattern ever runs from a newline into a
    non-space character, so encoding the two parts apart gives the ids of encoding them together. (One
    exception, from the official encode's 400 000-character slices: when a multiple of 400 000 falls
    inside the question, counted from the document's start, the joint encoding cuts the question there.)
    """
    prefix = document_head_ids(tokenizer, system) + tokenizer.encode(document_text(document), allow_special=False)
    return DocumentPrompt(prefix, question_ids(tokenizer, question))


def document_head_ids(tokenizer: Tokenizer, system: str | None) -> list[int]:
    """What comes before the document: the system turn (if any) and the user turn's header."""
    head = chat_token_ids(tokenizer, [{"role": "system", "content": system}], False) if system is not None else []
    return head + _turn_ids(tokenizer, IM_USER, "user", "", close=False)


def document_head_text(system: str | None) -> str:
    """`document_head_ids` as text (for display and for fingerprinting a reading)."""
    head = render_chat([{"role": "system", "content": system}], False) if system is not None else ""
    return f"{head}{IM_USER}user{IM_MIDDLE}"


def question_ids(tokenizer: Tokenizer, question: str) -> list[int]:
    """What follows the document: the question, `<|im_end|>` and the generation prompt."""
    ids = tokenizer.encode(_question_text(question), allow_special=False)
    return ids + [_special_id(tokenizer, IM_END), *generation_prompt_ids(tokenizer)]


def follow_up_ids(tokenizer: Tokenizer, question: str) -> list[int]:
    """What follows an answer in a conversation over a document: `<|im_end|>` closing the assistant turn
    that generation left open, the question in a user turn of its own, and the generation prompt."""
    return next_turn_token_ids(tokenizer, [{"role": "user", "content": _question_text(question)}])


def document_text(document: str) -> str:
    """The document as it stands in the user turn: ending in the separator before the question."""
    return document.rstrip("\n") + DOCUMENT_QUESTION_SEPARATOR


def _question_text(question: str) -> str:
    question = question.strip()
    if not question:
        raise ChatFormatError("the question is empty")
    return question
