"""Synthetic text tasks of the demo zoo and their fixed held-out sets.

Every example reads `"<task>: <input>="` followed by the answer, so the task is named in
the prompt: a merged adapter can in principle serve all tasks at once. `TASKS` are what
the per-task LoRAs learn; `PRETRAIN_TASKS` are the mixture the base model is pre-trained on.

The mixture holds generic primitives (copy a word, the letter after one letter, a whole word in
one case, a length) and every zoo skill under another command word (`ALIASES`: `flip` for
`reverse`, `order` for `sort`, ...). The base therefore answers `flip: lego=` but not
`reverse: lego=`, and a zoo adapter teaches it to answer the zoo task's word with a skill it
already has. That is the regime of real LoRAs on a pretrained LLM, which mostly steer an ability
the base has (a format, a style, an instruction) rather than build one from nothing, and it is
what makes their updates small and their sums work (issue 13). Measured on the same 128-wide
base: adapters that had to learn a skill from the primitives alone needed updates of
‖ΔW‖/‖W0‖ ≈ 0.43, and exact sums kept 76% of the tasks for pairs and 8% for all six; adapters
that teach a word for a skill the base has need 0.07 and keep 89% and 46% (`zoo_card.json`,
`targets` and `regime_search`). The base never sees the zoo tasks' held-out inputs under its own
words either.
"""

from __future__ import annotations

import random
import string
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache

LOWER = string.ascii_lowercase
DIGITS = string.digits
# Inputs of the generic pre-training mixture mix all character classes, so every
# embedding the zoo tasks use is trained before any adapter sees it.
MIXED = string.ascii_letters + string.digits

# Size of the fixed held-out set per task; training never samples these prompts.
N_HELD_OUT = 500


@dataclass(frozen=True)
class Task:
    """One synthetic task: how to draw an input and how to answer it.

    Attributes:
        name: The task name, also the word that opens the prompt and the adapter folder name.
        description: One line for people.
        make_input: Draws a random input string from a `random.Random`.
        solve: The exact answer for an input string.
        examples: A few fixed inputs to show in the app.
    """

    name: str
    description: str
    make_input: Callable[[random.Random], str]
    solve: Callable[[str], str]
    examples: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.name or not self.name.isidentifier():
            raise ValueError(f"task name {self.name!r} must be a non-empty identifier (it names a folder)")
        for text in self.examples:
            self.prompt(text)  # validates the characters

    def prompt(self, text: str) -> str:
        """The prompt for input `text`, e.g. `"reverse: abc="`."""
        from lego_viz.zoo.tokenizer import CHARS

        bad = sorted(set(text) - set(CHARS))
        if bad:
            raise ValueError(f"task {self.name!r}: input {text!r} has characters {bad} the zoo tokenizer lacks")
        return f"{self.name}: {text}="

    def make_example(self, rng: random.Random) -> tuple[str, str]:
        """Draw one `(prompt, answer)` pair."""
        text = self.make_input(rng)
        return self.prompt(text), self.solve(text)

    @property
    def example_prompts(self) -> list[str]:
        """The fixed example prompts for display."""
        return [self.prompt(text) for text in self.examples]


def _word(alphabet: str, low: int, high: int) -> Callable[[random.Random], str]:
    def draw(rng: random.Random) -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))

    return draw


def _caesar(text: str) -> str:
    return "".join(LOWER[(LOWER.index(c) + 1) % 26] for c in text)


def _mixed_case(rng: random.Random) -> str:
    # At least one letter of each case, so neither `upper` nor `lower` alone answers it.
    while True:
        text = _word(string.ascii_letters, 3, 6)(rng)
        if not (text.islower() or text.isupper()):
            return text


def _count_input(rng: random.Random) -> str:
    # 'a' is drawn often enough that every count from 0 to the word length occurs.
    return "".join("a" if rng.random() < 0.3 else rng.choice(LOWER[1:]) for _ in range(rng.randint(3, 8)))


def _registry(*tasks: Task) -> dict[str, Task]:
    return {task.name: task for task in tasks}


TASKS: dict[str, Task] = _registry(
    Task("reverse", "write the letters backwards", _word(LOWER, 3, 5), lambda s: s[::-1], ("lego", "merge")),
    Task("sort", "sort the digits in ascending order", _word(DIGITS, 4, 6), lambda s: "".join(sorted(s)), ("3141", "270513")),
    Task("caesar", "shift every letter one step (a->b, z->a)", _word(LOWER, 3, 6), _caesar, ("hal", "lora")),
    Task("double", "write every letter two times", _word(LOWER, 2, 5), lambda s: "".join(c + c for c in s), ("ab", "rank")),
    Task("swapcase", "swap upper and lower case", _mixed_case, str.swapcase, ("LoRA", "MsU")),
    Task("count", "how many times the letter a occurs", _count_input, lambda s: str(s.count("a")), ("banana", "lego")),
)

# The base's own word for each zoo skill (the module docstring says why the base has the skills).
ALIASES: dict[str, str] = {
    "reverse": "flip",
    "sort": "order",
    "caesar": "shift",
    "double": "twice",
    "swapcase": "invert",
    "count": "tally",
}


def _alias(task: Task) -> Task:
    return replace(task, name=ALIASES[task.name], description=f"{task.description} (the base's word for `{task.name}`)")


PRETRAIN_TASKS: dict[str, Task] = _registry(
    Task("copy", "repeat the input", _word(MIXED, 1, 8), lambda s: s, ("abc",)),
    Task("first", "the first character", _word(MIXED, 1, 8), lambda s: s[0], ("abc",)),
    Task("last", "the last character", _word(MIXED, 1, 8), lambda s: s[-1], ("abc",)),
    Task("length", "the number of characters", _word(MIXED, 1, 9), lambda s: str(len(s)), ("abc",)),
    Task("next", "the letter after a letter (z->a)", _word(LOWER, 1, 1), _caesar, ("a",)),
    Task("upper", "a lowercase word in upper case", _word(LOWER, 1, 8), str.upper, ("abc",)),
    Task("lower", "an uppercase word in lower case", _word(string.ascii_uppercase, 1, 8), str.lower, ("ABC",)),
    *(_alias(task) for task in TASKS.values()),
)
# The zoo task whose skill a pre-training task teaches under its own word.
ALIAS_OF: dict[str, str] = {alias: task for task, alias in ALIASES.items()}


def get_task(name: str) -> Task:
    """Look a task up by name in `TASKS` or `PRETRAIN_TASKS`; unknown names list the known ones."""
    task = TASKS.get(name) or PRETRAIN_TASKS.get(name)
    if task is None:
        known = ", ".join([*TASKS, *PRETRAIN_TASKS])
        raise KeyError(f"unknown zoo task {name!r}; known tasks: {known}")
    return task


def _seed(name: str, purpose: str) -> int:
    # crc32 rather than hash(): str hashing is salted per process.
    return zlib.crc32(f"{purpose}:{name}".encode())


@cache
def held_out(name: str, n: int = N_HELD_OUT) -> tuple[tuple[str, str], ...]:
    """The fixed held-out `(prompt, answer)` pairs of a task (unique prompts, seeded by the task name).

    Training on a zoo task (`TASKS`) never samples these prompts. A pre-training task with
    fewer distinct inputs than `n` (e.g. `next`) gets all of them.

    Args:
        name: Task name.
        n: How many pairs; at most `N_HELD_OUT`. The first `n` pairs are the same for every `n`.

    Returns:
        A tuple of (at most) `n` pairs, the same on every run and machine.
    """
    if not 1 <= n <= N_HELD_OUT:
        raise ValueError(f"held-out size must be in [1, {N_HELD_OUT}], got {n}")
    if n < N_HELD_OUT:
        return held_out(name, N_HELD_OUT)[:n]
    task = get_task(name)
    rng = random.Random(_seed(name, "held-out"))
    pairs: dict[str, str] = {}
    for _ in range(20 * N_HELD_OUT):
        prompt, answer = task.make_example(rng)
        pairs.setdefault(prompt, answer)
        if len(pairs) == N_HELD_OUT:
            break
    return tuple(pairs.items())


@cache
def _held_out_prompts(name: str) -> frozenset[str]:
    # Only the zoo tasks are measured for generalisation; other pre-training tasks exclude nothing.
    return frozenset(prompt for prompt, _ in held_out(name)) if name in TASKS else frozenset()


def _is_held_out(task: Task, text: str) -> bool:
    # The base's word for a zoo skill never sees that task's held-out inputs either: the held-out
    # accuracy then measures a skill applied to new inputs, not inputs the base has memorised.
    zoo_task = ALIAS_OF.get(task.name, task.name)
    return zoo_task in TASKS and TASKS[zoo_task].prompt(text) in _held_out_prompts(zoo_task)


def in_shard(prompt: str, shard: tuple[int, int] | None) -> bool:
    """Whether `prompt` belongs to data shard `(index, count)` (every prompt when `shard` is None).

    Shards split the prompts of a task into `count` disjoint parts by a hash of the prompt, so two
    adapters of one task trained on different shards never see the same training prompt.
    """
    if shard is None:
        return True
    index, count = shard
    return zlib.crc32(prompt.encode()) % count == index


def training_example(task: Task, rng: random.Random, shard: tuple[int, int] | None = None) -> tuple[str, str]:
    """Draw a `(prompt, answer)` pair; for a zoo task never one of its held-out prompts.

    Args:
        task: The task to draw from.
        rng: Source of randomness.
        shard: `(index, count)`: draw only prompts of that data shard (see `in_shard`); None for all.

    Returns:
        One `(prompt, answer)` pair.
    """
    if shard is not None and not 0 <= shard[0] < shard[1]:
        raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
    while True:
        text = task.make_input(rng)
        prompt = task.prompt(text)
        if not _is_held_out(task, text) and in_shard(prompt, shard):
            return prompt, task.solve(text)
