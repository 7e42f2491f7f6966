"""Chat templates and completion-only loss masks computed from token offsets.

A conversation is rendered to one string by a Jinja chat template: a local Hugging Face
tokenizer's own (``apply_chat_template(messages, tokenize=False)``), or for the byte tokenizer
:data:`BYTE_CHAT_TEMPLATE`; ``chat_template=`` overrides either with a Jinja string of your own
(variables ``messages``, ``add_generation_prompt``, ``eos_token``, ``bos_token``; the function
``raise_exception(message)`` refuses a conversation, as in Hugging Face templates).

The byte template writes every turn as ``<|role|>\\n{content}`` followed by EOS::

    <|system|>\\nYou are kind.<EOS><|user|>\\nHi!<EOS><|assistant|>\\nHello.<EOS>

The text :data:`BYTE_EOS_TEXT` (``"<|eos|>"``, the byte tokenizer's ``eos_token``) becomes
the EOS id 256 when the rendered text is tokenised, as special-token strings do in Hugging
Face tokenizers; everything else is UTF-8 bytes.

**Which tokens are targets.** Each assistant message's *span* is found in the rendered text
(character offsets): its content (as written, or stripped, as templates that ``trim`` write
it), plus the end-of-turn marker right after it: a special token (e.g. ``<|im_end|>``,
``<|eot_id|>``, ``</s>``, the byte EOS), possibly after whitespace, so the student learns to
stop. The content is searched only in the message's own window: from the end of the messages
before it rendered alone with the generation prompt when the full text starts with that prefix
(else after the previous message found) to the end of the messages up to it rendered alone when
the full text starts with that (else the end of the text); the earliest match of the content as
written or stripped wins, so an answer is never located in a later turn. A conversation the
template refuses (its ``raise_exception(...)``, e.g. "System role not supported", or a Jinja
error) is an ``"unrenderable"`` record, as is one whose answer is not found. The text is then
tokenised once, with offsets (``return_offsets_mapping`` of a fast HF tokenizer, byte offsets
for the byte tokenizer), and a token is a target when its characters overlap an assistant span:
a token that BPE merged across the boundary of role marker and content counts as an assistant
token. Nothing is tokenised piece by piece, so
merges are exactly those of the full text. System and user turns, role markers and the
generation prompt are context. With the models' next-token convention the *label* of position
``t`` is token ``t + 1`` when that token is a target (see :mod:`lightning_kd.data.packing`).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from functools import cached_property

from lightning_kd.data.chat_records import Messages, RecordError
from lightning_kd.data.tokenizer import ByteTokenizer, HFTokenizer

#: The text that stands for the byte tokenizer's EOS (id 256) in rendered conversations.
BYTE_EOS_TEXT = "<|eos|>"

#: The built-in chat template of the byte tokenizer (Jinja).
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatEncoder:
    """Renders conversations and tokenises them, with a target flag per token.

    Args:
        tokenizer: the byte tokenizer or a local HF tokenizer (a fast one: offsets are needed).
        chat_template: a Jinja template overriding the tokenizer's (None: the tokenizer's own,
            or :data:`BYTE_CHAT_TEMPLATE`).

    Raises:
        ValueError: for an HF tokenizer that is not a fast one, or that has no chat template
            when ``chat_template`` is None.
    """

    def __init__(
        self, tokenizer: ByteTokenizer | HFTokenizer, chat_template: str | None = None
    ) -> None:
        if chat_template is not None and (not isinstance(chat_template, str) or not chat_template):
            raise ValueError(
                f"chat_template must be a Jinja template string or None, got {chat_template!r}."
            )
        self.tokenizer = tokenizer
        self.template = chat_template
        self._hf = None if isinstance(tokenizer, ByteTokenizer) else tokenizer.hf_tokenizer
        if self._hf is not None:
            where = getattr(tokenizer, "path", "?")
            if not self._hf.is_fast:
                raise ValueError(
                    f"the tokenizer at {where!r} is not a fast tokenizer; chat masks need token "
                    "offsets (save it with tokenizers installed to get tokenizer.json)."
                )
            if chat_template is None and not self._hf.chat_template:
                raise ValueError(
                    f"the tokenizer at {where!r} has no chat template; set chat_template= to a "
                    "Jinja template string."
                )
        elif chat_template is None:
            self.template = BYTE_CHAT_TEMPLATE

    @cached_property
    def _byte_template(self):  # the compiled Jinja template of the byte tokenizer
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception  # as in Hugging Face templates
        return env.from_string(self.template)

    @property
    def effective_template(self) -> str:
        """The Jinja template in use: the override, the tokenizer's own or the byte one."""
        return self.template if self.template is not None else self._hf.chat_template

    @cached_property
    def special_texts(self) -> list[str]:
        """The special-token strings that may close a turn, longest first."""
        if self._hf is None:
            return [BYTE_EOS_TEXT]
        texts = set(self._hf.all_special_tokens)
        texts |= {t.content for t in self._hf.added_tokens_decoder.values() if t.special}
        return sorted((t for t in texts if t), key=lambda t: (-len(t), t))

    def render(self, messages: Messages, add_generation_prompt: bool = False) -> str:
        """The conversation as one string, rendered by the chat template."""
        if self._hf is None:
            return self._byte_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                eos_token=BYTE_EOS_TEXT, bos_token="",
            )  # fmt: skip
        return self._hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt,
            chat_template=self.template,
        )  # fmt: skip

    def _prefix_end(self, text: str, messages: Messages, add_generation_prompt: bool) -> int:
        """The length of ``messages`` rendered alone when ``text`` starts with that rendering,
        else -1 (also when the template refuses to render them alone)."""
        try:
            prefix = self.render(messages, add_generation_prompt=add_generation_prompt)
        except _RENDER_ERRORS:
            return -1
        return len(prefix) if text.startswith(prefix) else -1

    def assistant_spans(self, text: str, messages: Messages) -> list[tuple[int, int]]:
        """[start, end) character spans of the assistant messages in ``text``, each with its
        end-of-turn marker (see the module docstring).

        Each message is searched in its own window of ``text``: from the end of the messages
        before it rendered alone (with the generation prompt before an assistant message) when
        ``text`` starts with that rendering, else from the end of the previous message found;
        up to the end of the messages up to it rendered alone when ``text`` starts with that,
        else the end of ``text``. So an answer is never located in a later turn.

        Raises:
            RecordError: ("unrenderable") when an assistant message is not in ``text``.
        """
        spans = []
        cursor = 0
        last = len(messages) - 1
        for i, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if i > 0:
                begin = self._prefix_end(text, messages[:i], role == "assistant")
                cursor = max(cursor, begin)
            stop = len(text) if i == last else self._prefix_end(text, messages[: i + 1], False)
            if stop < cursor:
                stop = len(text)
            start, end = _find(text, content, cursor, stop)
            if start < 0:
                if role != "assistant":
                    continue  # some templates move or drop system/user text
                raise RecordError(
                    "unrenderable",
                    f"assistant message {i} does not appear verbatim in the rendered chat "
                    "template, so its tokens cannot be located",
                )
            if role == "assistant":
                end = self._after_marker(text, end)
                spans.append((start, end))
            cursor = end
        return spans

    def _after_marker(self, text: str, end: int) -> int:
        """``end`` moved past whitespace and one special token that follows it, if any."""
        position = end
        while position < len(text) and text[position].isspace():
            position += 1
        for special in self.special_texts:
            if text.startswith(special, position):
                return position + len(special)
        return end

    def tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` and each token's [start, end) character offsets."""
        if self._hf is not None:
            encoded = self._hf(text, add_special_tokens=False, return_offsets_mapping=True)
            return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        position = 0
        for k, piece in enumerate(text.split(BYTE_EOS_TEXT)):
            if k:
                ids.append(self.tokenizer.eos_id)
                offsets.append((position, position + len(BYTE_EOS_TEXT)))
                position += len(BYTE_EOS_TEXT)
            for char in piece:
                data = char.encode("utf-8")
                ids.extend(data)
                offsets.extend([(position, position + 1)] * len(data))
                position += 1
        return ids, offsets

    def encode(self, messages: Messages) -> tuple[list[int], list[bool]]:
        """The conversation's token ids and, per token, whether it is a target.

        Returns:
            ``(ids, targets)``, two lists of the conversation's length.

        Raises:
            RecordError: ("unrenderable") when the chat template refuses the conversation
                (e.g. its ``raise_exception("System role not supported")``) or an assistant
                message cannot be located.
        """
        try:
            text = self.render(messages)
        except _RENDER_ERRORS as error:
            raise RecordError("unrenderable", _render_error_text(error)) from None
        spans = self.assistant_spans(text, messages)
        ids, offsets = self.tokenize(text)
        return ids, targets_from_offsets(offsets, spans)


def _raise_exception(message: str) -> None:
    """``raise_exception`` of chat templates, as Hugging Face defines it."""
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _render_error_text(error: Exception) -> str:
    """The message of a template error; the exception type when it has none."""
    text = str(error).strip()
    return text if text else f"the chat template raised {type(error).__name__}"


def _template_errors() -> tuple[type[Exception], ...]:
    from jinja2.exceptions import TemplateError

    # what rendering a record can raise: the template's own raise_exception and undefined
    # variables (TemplateError), and transformers' or Jinja's checks of the messages
    return (TemplateError, ValueError, TypeError, KeyError, IndexError)


_RENDER_ERRORS = _template_errors()


def _find(text: str, content: str, begin: int, stop: int) -> tuple[int, int]:
    """[start, end) of the earliest occurrence of ``content`` or its stripped form (the longer
    one on a tie) inside ``text[begin:stop]``; (-1, -1) when neither is there."""
    best = (-1, -1)
    for needle in (content, content.strip()):
        if not needle:
            continue
        start = text.find(needle, begin, stop)
        if start >= 0 and (best[0] < 0 or start < best[0]):
            best = (start, start + len(needle))
    return best


def targets_from_offsets(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[bool]:
    """Per token, whether its [start, end) characters overlap one of the sorted, disjoint
    ``spans`` (a zero-width token counts as covering its start character)."""
    starts = [a for a, _ in spans]
    flags = []
    for start, end in offsets:
        end = max(end, start + 1)
        k = bisect.bisect_left(starts, end) - 1  # the last span starting before this token ends
        flags.append(k >= 0 and spans[k][1] > start)
    return flags
