"""Real data that ships offline: scikit-learn's 1,797 scans of handwritten digits, rendered as small colour images.

Each 8x8 scan (ink 0-16) becomes a 16x16 RGB image: every scan pixel covers 2x2 image pixels and mixes the ink colour
into the background in proportion to its ink, so a 2x2 average of the image's ink gives back the scan exactly.

The split is fixed (a permutation of the scan indices with seed `SPLIT_SEED`, independent of any other seed):
- `test`: the first `NUM_TEST_SCANS` scans of the permutation, never seen by pretraining or fine-tuning;
- `validation`: the next `NUM_VALIDATION_SCANS`, for tuning fine-tuning, also kept out of pretraining;
- `train`: the rest (1,257 scans), the only scans pretraining sees.

Two worlds share the scans, the split and the skills:
- the frame world (the first tiny model): every digit fills the 16x16 frame;
- the canvas world (the second): a digit is drawn at any size from `WORLD_SIZES[0]` to `WORLD_SIZES[1]` pixels, at
  any place on the same 16x16 canvas. Its pretraining covers every size for understanding, and generates from
  captions that never name the size, so sampling itself spreads along that axis. Fine-tuning data is drawn at one
  setting (`WORLD_NARROW_SIZE`, the full frame) and measured on the others (`WORLD_BROAD_SIZES`): a natural shift.

Skills (one question each): pretraining asks `digit` and `color` and generates from captions; `after` and `even` are
left for fine-tuning, with every word they need already in the tokenizer's corpus ([`digits_corpus`]).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: Ink colours of the renders (RGB); the colour judge picks the nearest one.
INK_COLORS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 60, 220), "yellow": (225, 185, 0)}
#: Backgrounds; pretraining sees only `white`, the others are fragile conditions for robustness evaluation.
BACKGROUNDS = {"white": (255, 255, 255), "gray": (160, 160, 160), "black": (0, 0, 0)}
DIGITS_IMAGE_SIZE = 16
SPLIT_SEED = 2024
NUM_TEST_SCANS = 360
NUM_VALIDATION_SCANS = 180
SPLITS = ("train", "validation", "test")
#: The canvas world: sizes (px, inclusive) its pretraining draws from, the narrow setting fine-tuning sees (the full
#: frame) and the broad one it is measured on (the sizes fine-tuning never sees).
WORLD_SIZES = (8, 16)
WORLD_NARROW_SIZE = 16
WORLD_BROAD_SIZES = (8, 12)

#: skill -> question; answers are single words (see [`skill_answer`]).
SKILL_QUESTIONS = {
    "digit": "What digit is this?",
    "color": "What color is the digit?",
    "after": "What digit is after this?",
    "even": "Is the digit even?",
}
PRETRAINING_SKILLS = ("digit", "color")
FINE_TUNING_SKILLS = ("after", "even")


def skill_answer(skill: str, digit: int, color: str) -> str:
    """The one-word answer of `skill` for a scan of `digit` drawn in `color`."""
    if skill == "digit":
        return DIGIT_WORDS[digit]
    if skill == "color":
        return color
    if skill == "after":
        return DIGIT_WORDS[(digit + 1) % 10]
    if skill == "even":
        return "yes" if digit % 2 == 0 else "no"
    raise ValueError(f"Unknown skill {skill!r}; known skills: {list(SKILL_QUESTIONS)}.")


def caption(digit: int, color: str) -> str:
    """The caption of a render, e.g. `"a red seven"`."""
    return f"a {color} {DIGIT_WORDS[digit]}"


def digits_corpus() -> list[str]:
    """Every text the digits task can use (all skills' questions and answers, captions and a few spare words).

    The tokenizer of the pretrained tiny Janus is trained on it: a word missing here would become `<unk>`.
    """
    lines = list(SKILL_QUESTIONS.values())
    for color in INK_COLORS:
        for digit in range(10):
            lines.append(caption(digit, color))
            lines += [f"{q} {skill_answer(s, digit, color)}" for s, q in SKILL_QUESTIONS.items()]
    spare = "yes no odd even before after number digit color colour image shown white gray black background ink"
    lines += [spare, " ".join(DIGIT_WORDS), " ".join(str(d) for d in range(10))]
    return lines


@lru_cache(maxsize=1)
def load_digit_scans() -> tuple[np.ndarray, np.ndarray]:
    """Returns `(scans, digits)`: the 1,797 scans as uint8 `(N, 8, 8)` with ink 0-16, and their labels `(N,)`."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.uint8), data.target.astype(np.int64)


def split_scan_indices(split: str) -> np.ndarray:
    """Indices (into [`load_digit_scans`]) of the scans of a fixed split: `"train"`, `"validation"` or `"test"`."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}.")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(load_digit_scans()[1]))
    bounds = {
        "test": (0, NUM_TEST_SCANS),
        "validation": (NUM_TEST_SCANS, NUM_TEST_SCANS + NUM_VALIDATION_SCANS),
        "train": (NUM_TEST_SCANS + NUM_VALIDATION_SCANS, len(order)),
    }
    start, stop = bounds[split]
    return np.sort(order[start:stop])


def _rgb(value, table: dict, kind: str) -> np.ndarray:
    if isinstance(value, str):
        if value not in table:
            raise ValueError(f"Unknown {kind} {value!r}; choose one of {list(table)} or give an RGB tuple.")
        value = table[value]
    return np.asarray(value, dtype=np.float32)


def render_scan(
    scan: np.ndarray,
    color: str | tuple = "red",
    background: str | tuple = "white",
    offset: tuple[int, int] = (0, 0),
    digit_size: int = DIGITS_IMAGE_SIZE,
) -> np.ndarray:
    """Renders one 8x8 scan as a 16x16 RGB uint8 array.

    Args:
        scan (`np.ndarray`):
            The scan, ink 0-16, shape `(8, 8)`.
        color (`str` or `tuple`, *optional*, defaults to `"red"`):
            Ink colour: a name of `INK_COLORS` or an RGB tuple.
        background (`str` or `tuple`, *optional*, defaults to `"white"`):
            A name of `BACKGROUNDS` or an RGB tuple.
        offset (`tuple[int, int]`, *optional*, defaults to `(0, 0)`):
            `(dy, dx)` shift in image pixels; what moves out of the frame is lost, what comes in is background. With
            a `digit_size` below the frame, the top-left corner of the digit on the canvas instead.
        digit_size (`int`, *optional*, defaults to `16`):
            Side of the drawn digit in pixels (the canvas world): the 16x16 ink map resized (bilinear, antialiased)
            and placed at `offset` on the 16x16 canvas. `16` fills the frame.
    """
    ink = np.kron(scan.astype(np.float32) / 16.0, np.ones((2, 2), dtype=np.float32))
    if digit_size != DIGITS_IMAGE_SIZE:
        if not 1 <= digit_size < DIGITS_IMAGE_SIZE:
            raise ValueError(f"`digit_size` must be between 1 and {DIGITS_IMAGE_SIZE}, got {digit_size}.")
        top, left = offset
        if not (0 <= top <= DIGITS_IMAGE_SIZE - digit_size and 0 <= left <= DIGITS_IMAGE_SIZE - digit_size):
            raise ValueError(
                f"A digit of {digit_size} px placed at {offset} leaves the {DIGITS_IMAGE_SIZE}x{DIGITS_IMAGE_SIZE} "
                f"canvas: each coordinate must lie in [0, {DIGITS_IMAGE_SIZE - digit_size}]."
            )
        small = np.asarray(Image.fromarray(ink).resize((digit_size, digit_size), Image.BILINEAR))
        ink = np.zeros((DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE), dtype=np.float32)
        ink[top : top + digit_size, left : left + digit_size] = np.clip(small, 0.0, 1.0)
        offset = (0, 0)
    dy, dx = offset
    if dy or dx:
        size = ink.shape[0]
        shifted = np.zeros_like(ink)
        src = ink[max(0, -dy) : size - max(0, dy), max(0, -dx) : size - max(0, dx)]
        shifted[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
        ink = shifted
    ink_rgb, bg_rgb = _rgb(color, INK_COLORS, "ink colour"), _rgb(background, BACKGROUNDS, "background")
    pixels = bg_rgb * (1.0 - ink[..., None]) + ink_rgb * ink[..., None]
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


_SHIFT_DIRECTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1))


def digits_vqa_dataset(
    split: str = "train",
    skills: tuple[str, ...] | list[str] = PRETRAINING_SKILLS,
    seed: int = 0,
    shift: int = 0,
    background: str | tuple = "white",
    colors: tuple[str, ...] | list[str] | None = None,
    max_scans: int | None = None,
    every_color: bool = False,
    digit_size: int | tuple[int, int] | None = None,
):
    r"""
    Returns a `datasets.Dataset` of the digit scans of one fixed split, rendered 16x16 in colour, as VQA rows.

    One row per scan and skill, in scan order. Columns: `image` (PIL), `question`, `answer`, `caption` (e.g.
    `"a red seven"`), and the metadata `digit`, `color`, `scan_index`, `skill`, `shift`.

    Args:
        split (`str`, *optional*, defaults to `"train"`):
            `"train"`, `"validation"` or `"test"` (fixed; see the module docstring).
        skills (`tuple[str, ...]`, *optional*, defaults to `("digit", "color")`):
            Which questions to ask, among `"digit"`, `"color"` (the pretraining skills), `"after"` (the next digit,
            `(d + 1) mod 10`) and `"even"` (`yes`/`no`), which pretraining never asks.
        seed (`int`, *optional*, defaults to `0`):
            Seed of each scan's ink colour and shift direction.
        shift (`int`, *optional*, defaults to `0`):
            Moves each digit by this many image pixels up, down, left or right (pretraining saw shifts of at most 1).
        background (`str` or `tuple`, *optional*, defaults to `"white"`):
            Background colour: `"white"` (what pretraining saw), `"gray"`, `"black"` or an RGB tuple.
        colors (`tuple[str, ...]`, *optional*):
            Ink colours to draw from (names of `INK_COLORS`); all four by default.
        max_scans (`int`, *optional*):
            Keep only the first `max_scans` scans of the split.
        every_color (`bool`, *optional*, defaults to `False`):
            Render every scan once in each ink colour of `colors` (in that order) instead of once in a colour drawn
            with `seed`: four times the rows, for evaluations that should not depend on which colour a scan got.
            Shift directions are still drawn with `seed`, one per row.
        digit_size (`int` or `tuple[int, int]`, *optional*):
            The canvas world: draw each digit at this size in pixels, or at a size drawn with `seed` from the
            inclusive range `(low, high)`, at a place on the canvas drawn with `seed` (a 16 px digit fills the
            frame). Adds a `digit_size` column. `None` (the frame world) leaves the renders as they were.
    """
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    unknown = [s for s in skills if s not in SKILL_QUESTIONS]
    if unknown:
        raise ValueError(f"Unknown skill(s) {unknown}; known skills: {list(SKILL_QUESTIONS)}.")
    if shift < 0:
        raise ValueError(f"`shift` must be non-negative, got {shift}.")
    palette = list(colors) if colors is not None else list(INK_COLORS)
    scans, digits = load_digit_scans()
    indices = split_scan_indices(split)[:max_scans]
    rng = np.random.default_rng(seed)
    if every_color:
        color_ids = np.tile(np.arange(len(palette)), len(indices))
        indices = np.repeat(indices, len(palette))
    else:
        color_ids = rng.integers(len(palette), size=len(indices))
    directions = rng.integers(len(_SHIFT_DIRECTIONS), size=len(indices))
    sizes, places = world_layout(len(indices), digit_size, rng) if digit_size is not None else (None, None)
    if sizes is not None and shift:
        raise ValueError("`shift` moves a digit that fills the frame; with `digit_size` the place is drawn instead.")
    columns = ["image", "question", "answer", "caption", "digit", "color", "scan_index", "skill", "shift"]
    rows = {k: [] for k in columns + (["digit_size"] if sizes is not None else [])}
    for i, (index, color_id, direction) in enumerate(zip(indices, color_ids, directions)):
        digit, color = int(digits[index]), palette[color_id]
        dy, dx = _SHIFT_DIRECTIONS[direction]
        if sizes is None:
            image = Image.fromarray(render_scan(scans[index], color, background, (dy * shift, dx * shift)))
        else:
            image = Image.fromarray(render_scan(scans[index], color, background, places[i], digit_size=sizes[i]))
        for skill in skills:
            rows["image"].append(image)
            rows["question"].append(SKILL_QUESTIONS[skill])
            rows["answer"].append(skill_answer(skill, digit, color))
            rows["caption"].append(caption(digit, color))
            rows["digit"].append(digit)
            rows["color"].append(color)
            rows["scan_index"].append(int(index))
            rows["skill"].append(skill)
            rows["shift"].append(shift)
            if sizes is not None:
                rows["digit_size"].append(sizes[i])
    features = Features(
        {
            "image": ImageFeature(),
            "question": Value("string"),
            "answer": Value("string"),
            "caption": Value("string"),
            "digit": Value("int64"),
            "color": Value("string"),
            "scan_index": Value("int64"),
            "skill": Value("string"),
            "shift": Value("int64"),
            **({"digit_size": Value("int64")} if sizes is not None else {}),
        }
    )
    return Dataset.from_dict(rows, features=features)


def world_layout(
    count: int, digit_size: int | tuple[int, int], rng: np.random.Generator
) -> tuple[list[int], list[tuple[int, int]]]:
    """Sizes and top-left places of `count` digits of the canvas world: `digit_size` is one size or an inclusive
    range `(low, high)` to draw from (uniformly, with `rng`); each place is drawn uniformly on the canvas."""
    low, high = (digit_size, digit_size) if isinstance(digit_size, int) else tuple(digit_size)
    if not 1 <= low <= high <= DIGITS_IMAGE_SIZE:
        raise ValueError(f"`digit_size` must lie within [1, {DIGITS_IMAGE_SIZE}], got {digit_size!r}.")
    sizes = rng.integers(low, high + 1, size=count).tolist()
    places = [tuple(rng.integers(0, DIGITS_IMAGE_SIZE - size + 1, size=2).tolist()) for size in sizes]
    return sizes, places


def ink_statistics(scans) -> tuple[np.ndarray, np.ndarray]:
    """Where the ink of each scan lies and how far it spreads: `(centroids, spreads)`, the ink-weighted mean position
    `(row, column)` in scan pixels `(N, 2)`, and the ink-weighted root-mean-square distance from it `(N,)`.

    Args:
        scans: Ink maps `(N, h, w)` (the 8x8 scans of [`load_digit_scans`], or [`DigitJudge.read`] of images), as a
            NumPy array or a tensor; a scan without ink gets the centre of the frame and spread 0.
    """
    ink = np.asarray(scans.detach().cpu() if hasattr(scans, "detach") else scans, dtype=np.float64)
    n, h, w = ink.shape
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    total = ink.sum(axis=(1, 2))
    weight = np.where(total[:, None, None] > 0, ink / np.maximum(total, 1e-12)[:, None, None], 1.0 / (h * w))
    centroids = np.stack([(weight * rows).sum(axis=(1, 2)), (weight * cols).sum(axis=(1, 2))], axis=1)
    squared = (rows[None] - centroids[:, 0, None, None]) ** 2 + (cols[None] - centroids[:, 1, None, None]) ** 2
    spreads = np.sqrt((weight * squared).sum(axis=(1, 2)))
    return centroids, np.where(total > 0, spreads, 0.0)
