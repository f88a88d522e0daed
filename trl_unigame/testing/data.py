"""The shapes dataset: drawn squares, circles and triangles whose colour or shape answers the question."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


# Shapes and colours drawn by `tiny_vqa_dataset`; every answer is a single word of this vocabulary.
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
SHAPES = ("square", "circle", "triangle")


def shapes_corpus() -> list[str]:
    """The sentences the tiny tokenizers are trained on: every question, answer and caption of `tiny_vqa_dataset`,
    and the chat template's own text."""
    words = list(COLORS) + list(SHAPES)
    lines = []
    for color in COLORS:
        for shape in SHAPES:
            lines += [
                f"What color is the {shape}? {color}",
                f"What shape is shown? {shape}",
                f"A {color} {shape} on a white background.",
                f"Is there a {color} {shape}? yes no",
            ]
    lines += [" ".join(words), "<|User|>: \n\n<|Assistant|>:"]
    return lines


def draw_shape(color: str, shape: str, size: int = 32) -> Image.Image:
    """Draws one filled `shape` in `color` on a white square image."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    m = size // 6
    box = (m, m, size - m, size - m)
    fill = COLORS[color]
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=fill)
    return image


def tiny_vqa_dataset(n: int = 32, seed: int = 0, image_size: int = 32):
    """Returns a `datasets.Dataset` of drawn shapes with columns `image`, `question`, `answer` and `caption`.

    The image determines the answer (its colour or its shape), so a model can learn the task.
    """
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(seed)
    rows = {"image": [], "question": [], "answer": [], "caption": []}
    colors = list(COLORS)
    for _ in range(n):
        color = colors[rng.integers(len(colors))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        rows["image"].append(draw_shape(color, shape, image_size))
        if rng.random() < 0.5:
            rows["question"].append(f"What color is the {shape}?")
            rows["answer"].append(color)
        else:
            rows["question"].append("What shape is shown?")
            rows["answer"].append(shape)
        rows["caption"].append(f"A {color} {shape} on a white background.")
    features = Features(
        {"image": ImageFeature(), "question": Value("string"), "answer": Value("string"), "caption": Value("string")}
    )
    return Dataset.from_dict(rows, features=features)
