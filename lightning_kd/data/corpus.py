"""The generated story corpus: the embedded default text of the data pipeline.

(Documents read from files live in :mod:`lightning_kd.data.text_files`; ``expand_paths`` and
``read_documents`` are re-exported here for code written against version 0.1.)

``generate_corpus`` is the embedded default corpus of the demo, so that it runs without any
download. It writes short English-like children's stories from a small probabilistic grammar:
characters with names, kinds and pronouns, places, objects in the singular and the plural,
simple sentence templates with subject-verb, pronoun, determiner and article agreement, and
some dialogue. The structure is real but small, so a tiny model learns it in minutes and a
bigger teacher learns it better: the gap distillation is meant to close. Only
``random.Random(seed)`` drives it (no sets, no ``hash()``), so the output is identical on every
machine and Python version that keeps ``random``'s documented reproducibility.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lightning_kd.checks import check_int
from lightning_kd.data.text_files import SUPPORTED_EXTENSIONS, expand_paths, read_documents

__all__ = [
    "CORPUS_VERSION",
    "SUPPORTED_EXTENSIONS",
    "expand_paths",
    "generate_corpus",
    "read_documents",
]

#: Bump when ``generate_corpus``'s output changes: caches of tokenised corpora are keyed on it.
CORPUS_VERSION = 1


# --------------------------------------------------------------------------------- grammar
@dataclass(frozen=True)
class _Character:
    name: str
    kind: str
    female: bool

    @property
    def subj(self) -> str:
        return "she" if self.female else "he"

    @property
    def obj(self) -> str:
        return "her" if self.female else "him"

    @property
    def poss(self) -> str:
        return "her" if self.female else "his"

    @property
    def epithet(self) -> str:
        """ " the fox" after an animal's name; nothing after a child's."""
        return "" if self.kind in ("girl", "boy") else f" the {self.kind}"


@dataclass(frozen=True)
class _Thing:
    """An object of the story world: its nouns and what one does with it."""

    singular: str
    plural: str
    adjectives: tuple[str, ...]
    verb: str  # infinitive phrase whose object is the thing: "kick", "play with"
    verb_past: str


@dataclass(frozen=True)
class _Feature:
    """Something to see at a place: "a big slide" (singular), "tall trees" (plural) or
    "soft moss" (a mass noun)."""

    noun: str  # without determiner: "big slide"
    kind: str  # "one", "many" or "mass"

    @property
    def phrase(self) -> str:  # "a big slide", "tall trees", "soft moss"
        return _a(self.noun) if self.kind == "one" else self.noun

    @property
    def be(self) -> str:
        return "were" if self.kind == "many" else "was"


@dataclass(frozen=True)
class _Place:
    name: str  # with its determiner: "the park"
    features: tuple[_Feature, ...]


def _features(*specs: str) -> tuple[_Feature, ...]:
    """Features from "a big slide" / "tall trees+" (plural) / "soft moss" (mass) specs."""
    out = []
    for spec in specs:
        if spec.startswith(("a ", "an ")):
            out.append(_Feature(spec.split(" ", 1)[1], "one"))
        elif spec.endswith("+"):
            out.append(_Feature(spec[:-1], "many"))
        else:
            out.append(_Feature(spec, "mass"))
    return tuple(out)


_GIRLS = ("Lily", "Mia", "Anna", "Sara", "Zoe", "Emma", "Lucy", "Ella", "Rosa", "Nora", "Amy")
_BOYS = ("Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Finn", "Luke", "Noah", "Dan")
_PET_NAMES = ("Spot", "Bella", "Coco", "Pip", "Rex", "Daisy", "Milo", "Ruby", "Bo", "Kiki")
_ANIMALS = ("dog", "cat", "rabbit", "bear", "fox", "bird", "duck", "mouse", "owl", "frog")
_TRAITS = (
    "little", "brave", "curious", "shy", "kind", "clever", "sleepy", "cheerful",
    "funny", "gentle", "quiet", "happy", "young", "old", "small", "friendly",
)  # fmt: skip
_FEELINGS_GOOD = ("happy", "glad", "proud", "excited")
_FEELINGS_BAD = ("sad", "scared", "worried", "upset")
_WEATHER = ("sunny", "warm", "cold", "windy", "bright", "quiet")
_HOBBIES = (
    "play outside", "sing songs", "run fast", "look at the stars", "draw pictures",
    "help {poss} mom", "eat sweet fruit", "read books", "jump in puddles", "climb trees",
    "build things with sticks", "dance in the rain",
)  # fmt: skip
_PLACES = (
    _Place("the park", _features("tall trees+", "a big slide", "a small pond", "green grass")),
    _Place("the forest", _features("old trees+", "a narrow path", "soft moss", "a dark cave")),
    _Place("the beach", _features("warm sand", "big waves+", "a wooden pier", "white rocks+")),
    _Place("the garden", _features("red roses+", "a little fence", "a tall sunflower")),
    _Place("the river", _features("cold water", "a wooden bridge", "smooth stones+")),
    _Place("the farm", _features("a red barn", "a muddy field", "a big tractor", "an old gate")),
    _Place("the market", _features("busy stalls+", "fresh bread", "a loud bell", "a fruit cart")),
    _Place("the hill", _features("a lonely tree", "soft grass", "a long path")),
    _Place("the lake", _features("blue water", "a little boat", "tall reeds+", "a sandy shore")),
    _Place("the meadow", _features("yellow flowers+", "a small stream", "busy bees+", "an oak")),
)
_THINGS = (
    _Thing("ball", "balls", ("red", "blue", "big", "bouncy", "striped"), "kick", "kicked"),
    _Thing("kite", "kites", ("yellow", "long", "bright", "paper"), "fly", "flew"),
    _Thing("book", "books", ("old", "thick", "small", "magic"), "read", "read"),
    _Thing("box", "boxes", ("wooden", "heavy", "old", "tiny", "shiny"), "open", "opened"),
    _Thing("hat", "hats", ("funny", "green", "tall", "warm"), "wear", "wore"),
    _Thing("key", "keys", ("golden", "rusty", "small", "shiny"), "keep", "kept"),
    _Thing("shell", "shells", ("pink", "pretty", "round", "white"), "keep", "kept"),
    _Thing("apple", "apples", ("red", "sweet", "green", "juicy"), "eat", "ate"),
    _Thing("drum", "drums", ("loud", "small", "blue", "old"), "play", "played"),
    _Thing("flower", "flowers", ("purple", "pretty", "tall", "orange"), "pick", "picked"),
    _Thing("map", "maps", ("old", "torn", "secret", "big"), "follow", "followed"),
    _Thing("umbrella", "umbrellas", ("orange", "big", "striped", "black"), "open", "opened"),
    _Thing("egg", "eggs", ("big", "speckled", "white", "blue"), "carry", "carried"),
    _Thing("toy car", "toy cars", ("red", "fast", "little", "shiny"), "push", "pushed"),
)
_STUCK = ("in a tall tree", "under a big rock", "in the deep mud", "behind a thorny bush")
_SHELTERS = ("a big tree", "a small hut", "an old barn", "a dry cave")
_MORALS = (
    "it is good to share",
    "friends help each other",
    "being brave is important",
    "it is kind to ask for help",
    "patience is a good thing",
)
_NUMBERS = ("two", "three", "four", "some")


def _a(phrase: str) -> str:
    """``phrase`` with the right indefinite article (every noun and adjective here starts with
    a letter whose sound follows its spelling)."""
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


def _cap(text: str) -> str:
    """``text`` with its first letter upper-cased (after an opening quote, if any)."""
    i = 1 if text.startswith('"') else 0
    return text[:i] + text[i].upper() + text[i + 1 :]


class Story:
    """One story: picks its cast, place and object, then tells it part by part.

    Public for :mod:`lightning_kd.data.instructions`, which tells the first parts and asks
    about the cast (``hero``, ``friend``, ``place``, ``found``).

    Narration is in the past tense, dialogue in the present; the found object is singular or
    plural, and every determiner, pronoun and verb that refers to it agrees.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.hero = self._character()
        friend = self._character()
        while friend.name == self.hero.name:
            friend = self._character()
        self.friend = friend
        self.place = rng.choice(_PLACES)
        self.thing = rng.choice(_THINGS)
        self.adjective = rng.choice(self.thing.adjectives)
        self.plural = rng.random() < 0.3
        self.count = rng.choice(_NUMBERS)
        self.sentences: list[str] = []

    def _character(self) -> _Character:
        rng = self.rng
        roll = rng.random()
        if roll < 0.35:
            return _Character(rng.choice(_GIRLS), "girl", True)
        if roll < 0.7:
            return _Character(rng.choice(_BOYS), "boy", False)
        return _Character(rng.choice(_PET_NAMES), rng.choice(_ANIMALS), rng.random() < 0.5)

    # ---- agreement with the found object
    @property
    def noun(self) -> str:
        return self.thing.plural if self.plural else self.thing.singular

    @property
    def found(self) -> str:
        """ "a red ball" / "three red balls"."""
        if self.plural:
            return f"{self.count} {self.adjective} {self.thing.plural}"
        return _a(f"{self.adjective} {self.thing.singular}")

    @property
    def it(self) -> str:
        return "them" if self.plural else "it"

    @property
    def it_subj(self) -> str:
        return "they" if self.plural else "it"

    @property
    def was(self) -> str:
        return "were" if self.plural else "was"

    @property
    def is_(self) -> str:
        return "are" if self.plural else "is"

    @property
    def this(self) -> str:
        return "these" if self.plural else "this"

    def say(self, *sentences: str) -> None:
        self.sentences.extend(_cap(s) for s in sentences)

    # ---- parts of the story
    def opening(self) -> None:
        rng, hero = self.rng, self.hero
        who = _a(f"{rng.choice(_TRAITS)} {hero.kind}")
        form = rng.randrange(4)
        if form == 0:
            self.say(f"once upon a time, there was {who} named {hero.name}.")
        elif form == 1:
            self.say(f"there was once {who} called {hero.name}.")
        elif form == 2:
            self.say(f"{hero.name} was {who} who lived near {self.place.name}.")
        else:
            weather = rng.choice(_WEATHER)
            self.say(f"one {weather} morning, {who} named {hero.name} woke up early.")
        hobby = rng.choice(_HOBBIES).format(poss=hero.poss)
        form = rng.randrange(3)
        if form == 0:
            self.say(f"{hero.subj} liked to {hobby}.")
        elif form == 1:
            self.say(f"{hero.subj} loved to {hobby} more than anything.")
        else:
            self.say(f"every day, {hero.name} wanted to {hobby}.")

    def meeting(self) -> None:
        rng, hero, friend, place = self.rng, self.hero, self.friend, self.place
        if rng.random() < 0.5:
            self.say(
                f"one day, {hero.name} went to {place.name} with {hero.poss} friend "
                f"{friend.name}{friend.epithet}."
            )
        else:
            trait = rng.choice(_TRAITS)
            self.say(
                f"one day, {hero.name} went to {place.name}.",
                f"there {hero.subj} met {_a(trait + ' ' + friend.kind)} named {friend.name}.",
                f'"Hello, I am {hero.name}," said {hero.name}. "What is your name?"',
                f'"My name is {friend.name}," said the {friend.kind}.',
            )
        if rng.random() < 0.6:
            feature = rng.choice(place.features)
            self.say(f"there {feature.be} {feature.phrase} at {place.name}.")
        feeling = rng.choice(_FEELINGS_GOOD)
        self.say(f"{hero.name} and {friend.name} played together, and they were {feeling}.")

    def discovery(self) -> None:
        rng, hero, friend = self.rng, self.hero, self.friend
        if rng.random() < 0.5:
            self.say(f"then {hero.subj} saw {self.found} on the ground.")
        else:
            self.say(
                f"suddenly, {hero.name} saw something behind a bush.",
                f"{self.it_subj} {self.was} {self.found}!",
            )
        form = rng.randrange(3)
        if form == 0:
            self.say(f'"Look at {self.this} {self.noun}, {friend.name}!" said {hero.name}.')
        elif form == 1:
            answer = (
                f"{self.adjective} {self.noun}"
                if self.plural
                else _a(f"{self.adjective} {self.noun}")
            )
            self.say(
                f'"What {self.is_} {self.this}?" asked {friend.name}.',
                f'"{_cap(self.it_subj)} {self.is_} {answer}," said {hero.name}.',
            )
        else:
            exclamation = f"{_cap(self.this)} {self.noun} {self.is_} so {self.adjective}!"
            self.say(f"{hero.name} picked {self.it} up.", f'"{exclamation}" {hero.subj} said.')
        if rng.random() < 0.5:
            self.say(
                f'"Can we {self.thing.verb} {self.it}?" asked {friend.name}.',
                f'"Yes, we can," said {hero.name}.',
            )

    def problem_and_solution(self) -> None:
        rng, hero, friend = self.rng, self.hero, self.friend
        form = rng.randrange(4)
        if form == 0:  # the object gets stuck; the friend helps
            self.say(
                f"but the wind blew, and the {self.noun} landed {rng.choice(_STUCK)}.",
                f"{hero.name} tried to reach {self.it}, but {hero.subj} was too small.",
                f"{hero.subj} felt {rng.choice(_FEELINGS_BAD)}.",
                f"then {friend.name} had an idea.",
                f"{friend.subj} found a long stick and pushed the {self.noun} out.",
                f'"Thank you, {friend.name}!" said {hero.name}.',
            )
        elif form == 1:  # rain
            self.say(
                "then the sky turned dark, and it began to rain.",
                f"{hero.name} and {friend.name} were {rng.choice(_FEELINGS_BAD)}.",
                f'"Come with me!" said {friend.name}.',
                f"they ran to {rng.choice(_SHELTERS)} and waited.",
                "soon the rain stopped, and the sun came out again.",
            )
        elif form == 2:  # lost on the way home
            feature = rng.choice(self.place.features)
            self.say(
                "when it was time to go home, they could not find the way.",
                f"{friend.name} was {rng.choice(_FEELINGS_BAD)}.",
                f'"Do not worry," said {hero.name}. "I remember the {feature.noun}."',
                f"{hero.subj} took {friend.name} by the hand, and they walked home together.",
            )
        else:  # a quarrel, then sharing
            self.say(
                f"but {friend.name} wanted the {self.noun} too.",
                f'"{_cap(self.it_subj)} {self.is_} mine!" said {friend.name}.',
                f'"No, {self.it_subj} {self.is_} mine!" said {hero.name}.',
                f"{hero.name} felt {rng.choice(('upset', 'sad'))}, and so did {friend.name}.",
                f'then {hero.name} said, "Let us share."',
                f"they took turns, and each of them {self.thing.verb_past} the {self.noun}.",
            )

    def ending(self) -> None:
        rng, hero, friend = self.rng, self.hero, self.friend
        form = rng.randrange(4)
        if form == 0:
            self.say(f"from that day on, {hero.name} and {friend.name} were best friends.")
        elif form == 1:
            self.say(f"{hero.name} learned that {rng.choice(_MORALS)}.")
        elif form == 2:
            self.say(f"that night, {hero.name} dreamed about the {self.noun}.")
        else:
            self.say(f"{hero.name} and {friend.name} went home, and they were very happy.")
        if rng.random() < 0.3:
            self.say("the end.")

    def tell(self) -> str:
        """The whole story as one string."""
        self.opening()
        self.meeting()
        self.discovery()
        self.problem_and_solution()
        self.ending()
        return " ".join(self.sentences)


def generate_corpus(num_chars: int, seed: int = 0) -> list[str]:
    """Deterministic short stories from a small English grammar (the demo's default corpus).

    Stories are generated until their total length reaches ``num_chars``; the last story is
    kept whole, so the total is a little above ``num_chars``. The same ``(num_chars, seed)``
    gives the same stories on every machine.

    Args:
        num_chars: the number of characters to generate, > 0.
        seed: seed of the ``random.Random`` that drives the grammar.

    Returns:
        The stories, one string each (ASCII, about 500-900 characters).

    Raises:
        ValueError: for ``num_chars`` <= 0.
    """
    check_int("num_chars", num_chars, 1)
    rng = random.Random(seed)
    stories: list[str] = []
    total = 0
    while total < num_chars:
        story = Story(rng).tell()
        stories.append(story)
        total += len(story)
    return stories
