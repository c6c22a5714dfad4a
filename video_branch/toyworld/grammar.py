"""The toy world's prompt grammar and its fixed train / held-out split.

A prompt is ``"a <colour> <shape> moving <direction>"``. Every (colour, shape, direction) combination is one prompt;
the held-out set is a fixed subset of combinations never used for RL training, chosen so that each colour, shape and
direction still appears in training with every other word.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

# Saturated, well separated colours: the reward tells them apart after VAE decoding blurs them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "cyan": (40, 210, 220),
    "magenta": (210, 50, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Unit motion in image coordinates (x to the right, y downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
SPLIT_SEED = 10

_PROMPT_RE = re.compile(r"^\s*an?\s+(\w+)\s+(\w+)\s+moving\s+(\w+)\s*\.?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Prompt:
    colour: str
    shape: str
    direction: str

    @property
    def text(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction}"


def parse_prompt(text: str) -> Prompt:
    """``"a red circle moving left"`` -> Prompt('red', 'circle', 'left'); anything else raises ValueError."""
    m = _PROMPT_RE.match(text)
    if m is None:
        raise ValueError(
            f"toy-world prompt {text!r} does not match 'a <colour> <shape> moving <direction>' "
            f"(colours {list(COLOURS)}, shapes {list(SHAPES)}, directions {list(DIRECTIONS)})"
        )
    colour, shape, direction = (w.lower() for w in m.groups())
    for word, allowed, kind in ((colour, COLOURS, "colour"), (shape, SHAPES, "shape"),
                                (direction, DIRECTIONS, "direction")):
        if word not in allowed:
            raise ValueError(f"toy-world prompt {text!r}: unknown {kind} {word!r}; expected one of {list(allowed)}")
    return Prompt(colour, shape, direction)


def all_prompts() -> list[Prompt]:
    return [Prompt(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]


def split_prompts(seed: int = SPLIT_SEED) -> tuple[list[Prompt], list[Prompt]]:
    """(train, heldout): one held-out colour per (shape, direction) pair, each colour held out exactly twice.

    So the held-out set has 12 of the 72 combinations; every colour, shape and direction word and every pair of
    words among (shape, direction) is still seen in training with other colours.
    """
    pairs = [(s, d) for s in SHAPES for d in DIRECTIONS]
    random.Random(seed).shuffle(pairs)
    colours = list(COLOURS)
    held = {Prompt(colours[i % len(colours)], s, d) for i, (s, d) in enumerate(pairs)}
    train = [p for p in all_prompts() if p not in held]
    heldout = [p for p in all_prompts() if p in held]
    return train, heldout


def vocabulary() -> list[str]:
    """Every word the grammar can produce, in a fixed order (for the offline word-level tokenizer)."""
    return ["a", "an", "moving", *COLOURS, *SHAPES, *DIRECTIONS]


def write_prompt_files(train_path, heldout_path, seed: int = SPLIT_SEED) -> None:
    train, heldout = split_prompts(seed)
    for path, prompts in ((train_path, train), (heldout_path, heldout)):
        with open(path, "w") as f:
            f.write("".join(p.text + "\n" for p in prompts))


def read_prompt_file(path) -> list[str]:
    with open(path) as f:
        lines = [ln.strip() for ln in f]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    for p in prompts:
        parse_prompt(p)
    return prompts


def word_counts(prompts: Sequence[Prompt]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in prompts:
        for w in (p.colour, p.shape, p.direction):
            counts[w] = counts.get(w, 0) + 1
    return counts
