"""Pictures for people, drawn with PIL only: a grid of images and a gallery of hard samples."""

from __future__ import annotations

from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

from .interfaces.base import to_pil_images


def _pil(image) -> Image.Image:
    """One image given as PIL, a `(3, H, W)` float tensor in `[0, 1]` or a uint8 tensor."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return to_pil_images(image.unsqueeze(0) if image.dim() == 3 else image)[0]


def image_grid(
    images: Sequence,
    num_columns: int,
    scale: int = 4,
    labels: Sequence[str] | None = None,
    padding: int = 2,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Lays images out in a grid, row by row, each enlarged `scale` times (nearest neighbour) with an optional label.

    Args:
        images (`Sequence`):
            PIL images or `(3, H, W)` tensors (float in `[0, 1]` or uint8), all of the same size.
        num_columns (`int`):
            Images per row.
        scale (`int`, *optional*, defaults to `4`):
            Enlargement factor.
        labels (`Sequence[str]`, *optional*):
            One short text under each image.
        padding (`int`, *optional*, defaults to `2`):
            Pixels between images.
        background (`tuple[int, int, int]`, *optional*, defaults to `(255, 255, 255)`):
            Colour between images.
    """
    pictures = [_pil(image) for image in images]
    if not pictures:
        raise ValueError("`images` is empty.")
    width, height = pictures[0].width * scale, pictures[0].height * scale
    label_height = 12 if labels is not None else 0
    num_rows = (len(pictures) + num_columns - 1) // num_columns
    cell_w, cell_h = width + padding, height + label_height + padding
    grid = Image.new("RGB", (num_columns * cell_w + padding, num_rows * cell_h + padding), background)
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for i, picture in enumerate(pictures):
        x, y = padding + (i % num_columns) * cell_w, padding + (i // num_columns) * cell_h
        grid.paste(picture.resize((width, height), Image.NEAREST), (x, y))
        if labels is not None:
            draw.text((x, y + height), str(labels[i]), fill=(0, 0, 0), font=font)
    return grid


def hard_sample_gallery(
    samples: Sequence[Any], predictions: Sequence[str] | None = None, scale: int = 6
) -> Image.Image:
    """Draws one line per hard sample: its source image, the decoded candidate, and the question, answer, the model's
    prediction on the candidate and the hardness `H`.

    Args:
        samples (`Sequence`):
            [`HardSample`] entries (the source image read from `extra["source"]`), or dicts with `image`, `source`,
            `question`, `answer`, `hardness` (and optionally `prediction`).
        predictions (`Sequence[str]`, *optional*):
            The model's answer on each candidate (overrides a dict's `prediction`).
        scale (`int`, *optional*, defaults to `6`):
            Enlargement factor of the images.
    """
    lines = []
    for i, sample in enumerate(samples):
        if isinstance(sample, dict):
            image, source, row, hardness = sample["image"], sample.get("source"), sample, sample["hardness"]
        else:
            image, source, row, hardness = sample.image, sample.extra.get("source"), sample.row, sample.hardness
        prediction = predictions[i] if predictions is not None else row.get("prediction", "")
        text = f"Q: {row.get('question', '')}\nA: {row.get('answer', '')}\npred: {prediction}\nH: {hardness:.3f}"
        lines.append((_pil(image), None if source is None else _pil(source), text))
    if not lines:
        raise ValueError("`samples` is empty.")
    size = max(max(c.width, c.height) for c, _, _ in lines) * scale
    text_width, line_height, padding = 220, max(size, 52), 4
    gallery = Image.new("RGB", (2 * (size + padding) + text_width + padding, len(lines) * (line_height + padding)))
    gallery.paste((255, 255, 255), (0, 0, gallery.width, gallery.height))
    draw, font = ImageDraw.Draw(gallery), ImageFont.load_default()
    for row_index, (candidate, source, text) in enumerate(lines):
        y = padding + row_index * (line_height + padding)
        for column, picture in enumerate((source, candidate)):
            if picture is not None:
                gallery.paste(picture.resize((size, size), Image.NEAREST), (padding + column * (size + padding), y))
        draw.multiline_text((2 * (size + padding) + padding, y), text, fill=(0, 0, 0), font=font, spacing=2)
    return gallery
