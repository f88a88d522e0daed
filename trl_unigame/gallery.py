"""Pictures for people, drawn with PIL only: a grid of images, a gallery of hard samples and line plots of the
game's curves."""

from __future__ import annotations

import math
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


def _font(size: int):
    """PIL's default font at `size` pixels (a scalable font in Pillow >= 10.1 with FreeType), else its bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # old Pillow, or Pillow without FreeType
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """`text` broken into lines no wider than `width` pixels (at word boundaries; a longer word stays whole)."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and draw.textlength(candidate, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def hardness_legend(consistency_weight: float | None = None, consistency_threshold: float | None = None) -> str:
    """What `H` and `s` mean in the gallery, with the trainer's `w_clip` and `tau_clip` when they are known."""
    w = "w" if consistency_weight is None else f"{consistency_weight:g}"
    tau = "tau" if consistency_threshold is None else f"{consistency_threshold:g}"
    return (
        f"H = hardness = U's loss on the candidate (its answer's cross-entropy) + {w} * max(0, {tau} - s); hardest "
        "first.\ns = consistency: the scorer's score of the candidate against its prompt (n/a: no scorer, H is the "
        "loss alone)."
    )


def hard_sample_gallery(
    samples: Sequence[Any],
    predictions: Sequence[str] | None = None,
    scale: int = 6,
    title: str | None = None,
    consistency_weight: float | None = None,
    consistency_threshold: float | None = None,
    font_size: int = 14,
) -> Image.Image:
    """Draws a titled table with one line per hard sample: its real (source) image, the decoded candidate, and the
    question, answer, the model's prediction on the candidate, the hardness `H` and the consistency `s`, under
    column headers and a line saying what `H` and `s` are.

    Args:
        samples (`Sequence`):
            [`HardSample`] entries (the source image read from `extra["source"]`), or dicts with `image`, `source`,
            `question`, `answer`, `hardness` (and optionally `prediction`, `consistency`).
        predictions (`Sequence[str]`, *optional*):
            The model's answer on each candidate (overrides a dict's `prediction`).
        scale (`int`, *optional*, defaults to `6`):
            Enlargement factor of the images.
        title (`str`, *optional*):
            The title line; defaults to "Hard samples: the hardest decoded candidates in the buffer".
        consistency_weight (`float`, *optional*):
            `w_clip` of the trainer (`consistency_weight`), written into the legend of `H`.
        consistency_threshold (`float`, *optional*):
            `tau_clip` of the trainer (`consistency_threshold`), written into the legend of `H`.
        font_size (`int`, *optional*, defaults to `14`):
            Text height in pixels (the title is 4 pixels larger).
    """
    lines = []
    for i, sample in enumerate(samples):
        if isinstance(sample, dict):
            image, source, row = sample["image"], sample.get("source"), sample
            hardness, consistency = sample["hardness"], sample.get("consistency")
        else:
            image, source, row = sample.image, sample.extra.get("source"), sample.row
            hardness, consistency = sample.hardness, sample.consistency
        prediction = predictions[i] if predictions is not None else row.get("prediction", "")
        s = "n/a" if consistency is None else f"{consistency:.3f}"
        text = (
            f"Q: {row.get('question', '')}\nA: {row.get('answer', '')}\npred: {prediction}\n"
            f"H: {hardness:.3f}    s: {s}"
        )
        lines.append((_pil(image), None if source is None else _pil(source), text))
    if not lines:
        raise ValueError("`samples` is empty.")
    font, bold = _font(font_size), _font(font_size + 4)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_height = font_size + 4  # one line of text, with spacing
    size = max(max(c.width, c.height) for c, _, _ in lines) * scale
    size = max(size, 4 * text_height)  # an image column is at least as tall as the four lines of text beside it
    padding = 8
    text_width = max(
        [measure.textlength(line, font=font) for _, _, text in lines for line in text.split("\n")]
        + [measure.textlength("question, answer, prediction", font=font)]
    )
    text_width = int(min(max(text_width, 20 * font_size), 48 * font_size))
    headers = ("real image", "decoded candidate", "question, answer, prediction")
    column = max(size, *(int(measure.textlength(h, font=font)) + padding for h in headers[:2]))
    width = 2 * (column + padding) + text_width + 2 * padding
    title = title or "Hard samples: the hardest decoded candidates in the buffer"
    legend = _wrap(measure, hardness_legend(consistency_weight, consistency_threshold), font, width - 2 * padding)
    rows_text = [_wrap(measure, text, font, text_width) for _, _, text in lines]
    row_heights = [max(size, len(wrapped) * text_height) for wrapped in rows_text]
    header_top = padding + (font_size + 8) + len(legend) * text_height + padding
    body_top = header_top + text_height + padding // 2
    gallery = Image.new("RGB", (width, body_top + sum(h + padding for h in row_heights)), (255, 255, 255))
    draw = ImageDraw.Draw(gallery)
    draw.text((padding, padding), title, fill=(0, 0, 0), font=bold)
    for index, line in enumerate(legend):
        draw.text((padding, padding + font_size + 8 + index * text_height), line, fill=(70, 70, 70), font=font)
    text_x = 2 * (column + padding) + padding
    for x, header in zip((padding, 2 * padding + column, text_x), headers):
        draw.text((x, header_top), header, fill=(0, 0, 0), font=font)
    y = body_top
    for (candidate, source, _), wrapped, height in zip(lines, rows_text, row_heights):
        draw.line((padding, y - padding // 2, width - padding, y - padding // 2), fill=(200, 200, 200))
        for index, picture in enumerate((source, candidate)):
            x = padding + index * (column + padding)
            if picture is not None:
                gallery.paste(picture.resize((size, size), Image.NEAREST), (x, y))
            else:
                draw.rectangle((x, y, x + size - 1, y + size - 1), outline=(200, 200, 200))
                draw.text((x + 4, y + 4), "not kept", fill=(150, 150, 150), font=font)
        draw.multiline_text((text_x, y), "\n".join(wrapped), fill=(0, 0, 0), font=font, spacing=4)
        y += height + padding
    return gallery


#: Line colours of the plots, in order.
PLOT_COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round values spanning `[low, high]`."""
    if high <= low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def line_plot(
    series: dict[str, Sequence[tuple[float, float]]],
    title: str,
    x_label: str = "step",
    y_label: str = "",
    size: tuple[int, int] = (520, 340),
    font_size: int = 13,
) -> Image.Image:
    """A line plot drawn with PIL: axes with round ticks, axis labels, a title and a legend (one line per series).

    Args:
        series (`dict[str, Sequence[tuple[float, float]]]`):
            Label -> `(x, y)` points (in x order); empty series are left out.
        title (`str`): Title above the plot.
        x_label (`str`, *optional*, defaults to `"step"`): Label of the x axis.
        y_label (`str`, *optional*): Label of the y axis (written above it).
        size (`tuple[int, int]`, *optional*, defaults to `(520, 340)`): Width and height in pixels.
        font_size (`int`, *optional*, defaults to `13`): Text height in pixels.
    """
    series = {label: [(float(x), float(y)) for x, y in points] for label, points in series.items() if points}
    series = {label: [(x, y) for x, y in points if math.isfinite(y)] for label, points in series.items()}
    series = {label: points for label, points in series.items() if points}
    width, height = size
    font, bold = _font(font_size), _font(font_size + 2)
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((width // 2, 6), title, fill=(0, 0, 0), font=bold, anchor="ma")
    legend_y = 6 + font_size + 8
    x = 70
    for index, label in enumerate(series):
        color = PLOT_COLORS[index % len(PLOT_COLORS)]
        draw.line((x, legend_y + font_size // 2, x + 18, legend_y + font_size // 2), fill=color, width=3)
        draw.text((x + 22, legend_y), label, fill=(0, 0, 0), font=font)
        x += 22 + int(draw.textlength(label, font=font)) + 16
    left, right, top, bottom = 70, width - 16, legend_y + font_size + 14, height - 2 * font_size - 14
    if not series:
        draw.text((width // 2, (top + bottom) // 2), "no data yet", fill=(120, 120, 120), font=font, anchor="mm")
        return image
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x_low, x_high = min(xs), max(xs)
    y_low, y_high = min(ys), max(ys)
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    if y_high == y_low:
        margin = abs(y_low) * 0.1 or 1.0
        y_low, y_high = y_low - margin, y_high + margin
    margin = 0.05 * (y_high - y_low)
    y_low, y_high = y_low - margin, y_high + margin

    def to_pixel(px: float, py: float) -> tuple[float, float]:
        return (
            left + (px - x_low) / (x_high - x_low) * (right - left),
            bottom - (py - y_low) / (y_high - y_low) * (bottom - top),
        )

    for tick in _ticks(y_low, y_high):
        _, ty = to_pixel(x_low, tick)
        draw.line((left, ty, right, ty), fill=(232, 232, 232))
        draw.line((left - 4, ty, left, ty), fill=(0, 0, 0))
        draw.text((left - 7, ty), f"{tick:.3g}", fill=(0, 0, 0), font=font, anchor="rm")
    integer_steps = all(float(x).is_integer() for x in xs)
    for tick in _ticks(x_low, x_high):
        if integer_steps and not float(tick).is_integer():
            continue
        tx, _ = to_pixel(tick, y_low)
        draw.line((tx, bottom, tx, bottom + 4), fill=(0, 0, 0))
        draw.text((tx, bottom + 6), f"{tick:g}", fill=(0, 0, 0), font=font, anchor="ma")
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    draw.text(((left + right) // 2, height - 4), x_label, fill=(0, 0, 0), font=font, anchor="md")
    if y_label:
        draw.text((4, top - font_size - 4), y_label, fill=(0, 0, 0), font=font)
    for index, points in enumerate(series.values()):
        color = PLOT_COLORS[index % len(PLOT_COLORS)]
        pixels = [to_pixel(px, py) for px, py in points]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=2, joint="curve")
        for px, py in pixels:
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=color)
    return image


#: The training-log keys of the loss plot, with their legend labels.
LOSS_CURVES = (
    ("unigame/clean_loss", "clean"),
    ("unigame/adversarial_loss", "adversarial"),
    ("unigame/buffer_loss", "buffer"),
)


def training_curves(log_history: Sequence[dict], font_size: int = 13) -> Image.Image | None:
    """The game's curves over optimizer steps, drawn with PIL: the clean, adversarial and buffer losses beside the
    perturber's budget `eps`. `None` when no training log has `unigame/eps` yet.

    Args:
        log_history (`Sequence[dict]`): `trainer.state.log_history`.
        font_size (`int`, *optional*, defaults to `13`): Text height in pixels.
    """
    rows = [row for row in log_history if "unigame/eps" in row and "step" in row]
    if not rows:
        return None
    losses = {label: [(r["step"], r[key]) for r in rows if key in r] for key, label in LOSS_CURVES}
    eps = {"eps": [(r["step"], r["unigame/eps"]) for r in rows]}
    panels = (
        line_plot(losses, "losses", y_label="loss", font_size=font_size),
        line_plot(eps, "perturber budget eps", y_label="eps", font_size=font_size),
    )
    curves = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), (255, 255, 255))
    x = 0
    for panel in panels:
        curves.paste(panel, (x, 0))
        x += panel.width
    return curves
