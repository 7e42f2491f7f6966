"""The generated instruction set: the embedded default of the chat data module.

Each conversation gives the assistant the opening of a generated story (the grammar of
:mod:`lightning_kd.data.corpus`: who the hero is, where they went and whom they met there)
and asks one to three questions about it; every answer is stated in the excerpt. The first
user turn holds the excerpt and the first question; follow-up questions are further user
turns. About a third of the conversations start with a short system prompt. Conversations are
kept short for small models: with the byte tokenizer's template one is about 150 to 370 tokens
(median about 230), so ``seq_len: 384`` keeps every one whole.

Only ``random.Random(seed)`` drives it, so the same ``(num_conversations, seed)`` gives the same
conversations on every machine.
"""

from __future__ import annotations

import random

from lightning_kd.checks import check_int
from lightning_kd.data.chat_records import Messages
from lightning_kd.data.corpus import Story

#: Bump when ``generate_instructions``'s output changes: token caches are keyed on it.
INSTRUCTIONS_VERSION = 2

_SYSTEM_PROMPTS = (
    "Answer briefly.",
    "Answer in one sentence.",
    "You help children read.",
)
_INSTRUCTIONS = ("Story:", "Read this.", "Here is a story.")


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _questions(story: Story) -> list[tuple[str, str]]:
    """(question, answer) pairs whose answers the excerpt states."""
    hero, friend, place = story.hero, story.friend, story.place
    return [
        ("Who is the story about?", f"It is about {hero.name}."),
        (f"What is {hero.name}?", f"{hero.name} is {_a(hero.kind)}."),
        (f"Where did {hero.name} go?", f"{hero.name} went to {place.name}."),
        (f"Who did {hero.name} meet?", f"{hero.name} met {friend.name}."),
    ]


def _conversation(rng: random.Random) -> Messages:
    story = Story(rng)
    story.opening()
    hero_sentence = story.sentences[0]  # who the hero is (the second one is a hobby)
    start = len(story.sentences)
    story.meeting()
    # The meeting up to the sentence that names the friend.
    friend = story.friend.name
    last = next(i for i in range(start, len(story.sentences)) if friend in story.sentences[i])
    excerpt = " ".join([hero_sentence, *story.sentences[start : last + 1]])
    pairs = _questions(story)
    rng.shuffle(pairs)
    turns = pairs[: rng.choice((1, 1, 2, 3))]
    messages: Messages = []
    if rng.random() < 0.35:
        messages.append({"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)})
    for i, (question, answer) in enumerate(turns):
        if i == 0:
            question = f"{rng.choice(_INSTRUCTIONS)} {excerpt}\n{question}"
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    return messages


def generate_instructions(num_conversations: int, seed: int = 0) -> list[Messages]:
    """Deterministic question-answering conversations about generated stories.

    Args:
        num_conversations: how many, > 0.
        seed: seed of the ``random.Random`` that drives the stories and the questions.

    Returns:
        ``num_conversations`` lists of ``{"role", "content"}`` messages (ASCII text), each with
        one to three user/assistant exchanges, some after a system message.

    Raises:
        ValueError: for ``num_conversations`` <= 0.
    """
    check_int("num_conversations", num_conversations, 1)
    rng = random.Random(seed)
    return [_conversation(rng) for _ in range(num_conversations)]
