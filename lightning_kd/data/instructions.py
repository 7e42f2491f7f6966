"""The generated instruction set: the embedded default of the chat data module.

Each conversation gives the assistant the beginning of a generated story (the grammar of
:mod:`lightning_kd.data.corpus`: its opening and the meeting, sometimes the discovery) and asks
one to three questions about it; every answer is stated in the excerpt (who the story is about,
what they are, where they went, whom they met or played with, what they saw). The first user
turn holds the excerpt and the first question; follow-up questions are further user turns.
About a third of the conversations start with a system prompt. A byte-tokenised conversation is
about 250 to 900 tokens (median about 480).

Only ``random.Random(seed)`` drives it, so the same ``(num_conversations, seed)`` gives the same
conversations on every machine.
"""

from __future__ import annotations

import random

from lightning_kd.checks import check_int
from lightning_kd.data.chat_records import Messages
from lightning_kd.data.corpus import Story

#: Bump when ``generate_instructions``'s output changes: token caches are keyed on it.
INSTRUCTIONS_VERSION = 1

_SYSTEM_PROMPTS = (
    "You are a helpful assistant. Answer questions about the story briefly.",
    "You answer questions about short stories in one sentence.",
    "You are a friendly teacher who helps children understand stories.",
)
_INSTRUCTIONS = (
    "Read the story and answer the question.",
    "Here is the beginning of a story.",
    "Please read this story.",
)


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _questions(story: Story, discovered: bool) -> list[tuple[str, str]]:
    """(question, answer) pairs whose answers the excerpt states."""
    hero, friend, place = story.hero, story.friend, story.place
    pairs = [
        ("Who is the story about?", f"The story is about {hero.name}."),
        (f"What is {hero.name}?", f"{hero.name} is {_a(hero.kind)}."),
        (f"Where did {hero.name} go one day?", f"{hero.name} went to {place.name}."),
        (f"Who did {hero.name} play with?", f"{hero.name} played with {friend.name}."),
        (f"What is the name of {hero.name}'s friend?",
         f"The friend is {friend.name}, {_a(friend.kind)}."),
    ]  # fmt: skip
    if discovered:
        pairs.append((f"What did {hero.name} see?", f"{hero.name} saw {story.found}."))
    return pairs


def _conversation(rng: random.Random) -> Messages:
    story = Story(rng)
    story.opening()
    story.meeting()
    discovered = rng.random() < 0.25
    if discovered:
        story.discovery()
    excerpt = " ".join(story.sentences)
    pairs = _questions(story, discovered)
    rng.shuffle(pairs)
    turns = pairs[: rng.choice((1, 1, 2, 3))]
    messages: Messages = []
    if rng.random() < 0.35:
        messages.append({"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)})
    for i, (question, answer) in enumerate(turns):
        if i == 0:
            question = f"{rng.choice(_INSTRUCTIONS)}\n\n{excerpt}\n\n{question}"
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
