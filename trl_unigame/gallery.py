"""Pictures for people, drawn with PIL only: a grid of images, a gallery of hard samples and line plots of the
game's curves. Each picture records what it says (its texts and their boxes, a plot's legend and lines) in
`image.info["drawn"]`, which [`save_picture`] writes into the PNG and [`picture_contents`] reads back."""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

from .interfaces.base import to_pil_images


#: The PNG text chunk that holds what a picture says (see [`save_picture`]).
CONTENTS_KEY = "unigame:drawn"


class _Canvas:
    """`ImageDraw.Draw` of `image` that records each text with the box it covers, and a plot's legend and lines."""

    def __init__(self, image: Image.Image):
        self.image, self.draw = image, ImageDraw.Draw(image)
        self.texts: list[dict] = []
        self.legend: list[str] = []
        self.styles: dict[str, str] = {}
        self.lines = 0

    def text(self, xy, text: str, font, **kwargs) -> None:
        self.draw.text(xy, text, font=font, **kwargs)
        box = self.draw.textbbox(xy, text, font=font, anchor=kwargs.get("anchor"))
        self.texts.append({"text": text, "box": [round(v) for v in box]})

    def multiline_text(self, xy, text: str, font, spacing: int = 4, **kwargs) -> None:
        self.draw.multiline_text(xy, text, font=font, spacing=spacing, **kwargs)
        box = self.draw.multiline_textbbox(xy, text, font=font, spacing=spacing)
        self.texts.append({"text": text, "box": [round(v) for v in box]})

    def finish(self) -> Image.Image:
        drawn = {"texts": self.texts, "legend": self.legend, "styles": self.styles, "lines": self.lines}
        self.image.info["drawn"] = drawn
        return self.image


def save_picture(picture: Image.Image, path: str) -> None:
    """Saves `picture` as a PNG, with what it says (`picture.info["drawn"]`: its texts and their boxes, a plot's legend
    labels, their line styles and the number of lines) as a text chunk, read back by [`picture_contents`]."""
    from PIL.PngImagePlugin import PngInfo

    metadata = PngInfo()
    if "drawn" in picture.info:
        metadata.add_text(CONTENTS_KEY, json.dumps(picture.info["drawn"]))
    picture.save(path, format="PNG", pnginfo=metadata)


def picture_contents(path: str) -> dict | None:
    r"""
    What a picture written by [`save_picture`] says.

    Args:
        path (`str`): The PNG file.

    Returns:
        `dict` or `None`: `{"size": [width, height], "texts": [{"text", "box": [left, top, right, bottom]}, ...],
        "legend": [label, ...], "styles": {label: line style}, "lines": int}` (pixels); `None` for a picture saved
        without them.
    """
    with Image.open(path) as picture:
        drawn = getattr(picture, "text", {}).get(CONTENTS_KEY)
        return None if drawn is None else {"size": list(picture.size), **json.loads(drawn)}


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
    """What the gallery's two numbers mean, in plain words, with the trainer's `w_clip` and `tau_clip` when they are
    known: how hard a candidate is for the model (the hardness, `trl_unigame.selection.hardness`) and how well it
    matches its prompt (the consistency)."""
    w = "w" if consistency_weight is None else f"{consistency_weight:g}"
    tau = "t" if consistency_threshold is None else f"{consistency_threshold:g}"
    return (
        "How hard for the model (loss): the model's loss on the right answer for the drawing (its cross-entropy), "
        f"plus {w} * max(0, {tau} - match) when the drawing matches its prompt poorly; the hardest first.\n"
        "Match with the prompt: how well the drawing matches the prompt it was drawn from, as the consistency scorer "
        "rates it (n/a: no scorer, the loss alone)."
    )


def gallery_title(step: int | None = None) -> str:
    """The hard-sample gallery's title, at optimizer step `step` when given."""
    at = "" if step is None else f" at step {step}"
    return f"Hard samples{at}: the model's own drawings it answers worst, kept to train on"


def hard_sample_gallery(
    samples: Sequence[Any],
    predictions: Sequence[str] | None = None,
    scale: int = 6,
    title: str | None = None,
    consistency_weight: float | None = None,
    consistency_threshold: float | None = None,
    font_size: int = 14,
) -> Image.Image:
    """Draws a titled table with one line per hard sample: its real (source) image, the model's drawing (the decoded
    candidate), and the question, the answer, the model's answer on the drawing, how hard the drawing is for the model
    (the hardness) and how well it matches its prompt (the consistency), under column headers and a legend saying what
    the two numbers are ([`hardness_legend`]). The title and the legend wrap to the picture's width; what the picture
    says is recorded in `info["drawn"]` (see [`save_picture`]).

    Args:
        samples (`Sequence`):
            [`HardSample`] entries (the source image read from `extra["source"]`), or dicts with `image`, `source`,
            `question`, `answer`, `hardness` (and optionally `prediction`, `consistency`).
        predictions (`Sequence[str]`, *optional*):
            The model's answer on each candidate (overrides a dict's `prediction`).
        scale (`int`, *optional*, defaults to `6`):
            Enlargement factor of the images.
        title (`str`, *optional*):
            The title; defaults to [`gallery_title`]`()`.
        consistency_weight (`float`, *optional*):
            `w_clip` of the trainer (`consistency_weight`), written into the legend.
        consistency_threshold (`float`, *optional*):
            `tau_clip` of the trainer (`consistency_threshold`), written into the legend.
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
        match = "n/a" if consistency is None else f"{consistency:.3f}"
        text = (
            f"Q: {row.get('question', '')}\nA: {row.get('answer', '')}\nmodel's answer: {prediction}\n"
            f"how hard for the model (loss): {hardness:.3f}\nmatch with the prompt: {match}"
        )
        lines.append((_pil(image), None if source is None else _pil(source), text))
    if not lines:
        raise ValueError("`samples` is empty.")
    font, bold = _font(font_size), _font(font_size + 4)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_height = font_size + 4  # one line of text, with spacing
    title_height = font_size + 8  # one line of the title
    size = max(max(c.width, c.height) for c, _, _ in lines) * scale
    size = max(size, 4 * text_height)  # an image column is at least as tall as four lines of text
    padding = 8
    headers = ("real image", "the model's drawing", "question, answer, the model's answer")
    text_width = max(
        [measure.textlength(line, font=font) for _, _, text in lines for line in text.split("\n")]
        + [measure.textlength(headers[2], font=font)]
    )
    text_width = int(min(max(text_width, 20 * font_size), 48 * font_size))
    column = max(size, *(int(measure.textlength(h, font=font)) + padding for h in headers[:2]))
    width = 2 * (column + padding) + text_width + 2 * padding
    title = _wrap(measure, title or gallery_title(), bold, width - 2 * padding)
    legend = _wrap(measure, hardness_legend(consistency_weight, consistency_threshold), font, width - 2 * padding)
    rows_text = [_wrap(measure, text, font, text_width) for _, _, text in lines]
    row_heights = [max(size, len(wrapped) * text_height) for wrapped in rows_text]
    legend_top = padding + len(title) * title_height
    header_top = legend_top + len(legend) * text_height + padding
    body_top = header_top + text_height + padding // 2
    gallery = Image.new("RGB", (width, body_top + sum(h + padding for h in row_heights)), (255, 255, 255))
    canvas = _Canvas(gallery)
    draw = canvas.draw
    for index, line in enumerate(title):
        canvas.text((padding, padding + index * title_height), line, bold, fill=(0, 0, 0))
    for index, line in enumerate(legend):
        canvas.text((padding, legend_top + index * text_height), line, font, fill=(70, 70, 70))
    text_x = 2 * (column + padding) + padding
    for x, header in zip((padding, 2 * padding + column, text_x), headers):
        canvas.text((x, header_top), header, font, fill=(0, 0, 0))
    y = body_top
    for (candidate, source, _), wrapped, height in zip(lines, rows_text, row_heights):
        draw.line((padding, y - padding // 2, width - padding, y - padding // 2), fill=(200, 200, 200))
        for index, picture in enumerate((source, candidate)):
            x = padding + index * (column + padding)
            if picture is not None:
                gallery.paste(picture.resize((size, size), Image.NEAREST), (x, y))
            else:
                draw.rectangle((x, y, x + size - 1, y + size - 1), outline=(200, 200, 200))
                canvas.text((x + 4, y + 4), "not kept", font, fill=(150, 150, 150))
        canvas.multiline_text((text_x, y), "\n".join(wrapped), font, fill=(0, 0, 0))
        y += height + padding
    return canvas.finish()


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


#: Dash patterns of the plots' line styles: `(drawn, gap)` in pixels; `None` is a solid line.
LINE_STYLES = {"solid": None, "dashed": (9, 5), "dotted": (2, 4)}


def _dashed_line(draw: ImageDraw.ImageDraw, pixels: list[tuple[float, float]], color, pattern, width: int = 2):
    """A polyline drawn in `pattern` (`(drawn, gap)` pixels), the pattern running on across the points."""
    drawn, gap = pattern
    position = 0.0  # along the pattern's period
    for (x0, y0), (x1, y1) in zip(pixels, pixels[1:]):
        length = math.hypot(x1 - x0, y1 - y0)
        done = 0.0
        while done < length:
            phase = position % (drawn + gap)
            step = min((drawn - phase) if phase < drawn else (drawn + gap - phase), length - done)
            if phase < drawn:
                a, b = done / length, (done + step) / length
                start, end = (x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))
                draw.line((*start, *end), fill=color, width=width)
            done += step
            position += step


def _tick_label(tick: float, ticks: list[float]) -> str:
    """`tick` with as many decimals as tell it from its neighbours (`0.0095`, `0.01`, `0.0105`; not `0.01` thrice)."""
    if len(ticks) < 2 or max(abs(t) for t in ticks) >= 1e4 or 0 < max(abs(t) for t in ticks) < 1e-3:
        return f"{tick:.3g}"
    step = ticks[1] - ticks[0]
    decimals = 0
    while decimals < 6 and abs(round(step, decimals) - step) > 1e-9 * max(1.0, abs(step)):
        decimals += 1
    return f"{tick:.{decimals}f}"


def line_plot(
    series: dict[str, Sequence[tuple[float, float]]],
    title: str,
    x_label: str = "step",
    y_label: str = "",
    size: tuple[int, int] = (520, 340),
    font_size: int = 13,
    styles: dict[str, str] | None = None,
) -> Image.Image:
    """A line plot drawn with PIL: axes with round ticks, axis labels, a title and a legend (one line per series). The
    title and the legend wrap to the plot's width; what the plot says is recorded in `info["drawn"]` (its texts, legend
    labels and number of lines, see [`save_picture`]).

    Args:
        series (`dict[str, Sequence[tuple[float, float]]]`):
            Label -> `(x, y)` points (in x order); empty series are left out.
        title (`str`): Title above the plot.
        x_label (`str`, *optional*, defaults to `"step"`): Label of the x axis.
        y_label (`str`, *optional*): Label of the y axis (written above it).
        size (`tuple[int, int]`, *optional*, defaults to `(520, 340)`): Width and height in pixels.
        font_size (`int`, *optional*, defaults to `13`): Text height in pixels.
        styles (`dict[str, str]`, *optional*):
            Label -> line style, one of [`LINE_STYLES`] (`"solid"`, `"dashed"`, `"dotted"`); solid when not given, so
            that lines of equal values stay told apart by their style as well as their colour.
    """
    series = {label: [(float(x), float(y)) for x, y in points] for label, points in series.items() if points}
    series = {label: [(x, y) for x, y in points if math.isfinite(y)] for label, points in series.items()}
    series = {label: points for label, points in series.items() if points}
    styles = styles or {}
    width, height = size
    font, bold = _font(font_size), _font(font_size + 2)
    image = Image.new("RGB", size, (255, 255, 255))
    canvas = _Canvas(image)
    draw = canvas.draw
    y = 6
    for line in _wrap(draw, title, bold, width - 12):
        canvas.text((width // 2, y), line, bold, fill=(0, 0, 0), anchor="ma")
        y += font_size + 6
    legend_y, x = y + 2, 70
    for index, label in enumerate(series):
        entry = 22 + int(draw.textlength(label, font=font))
        if x > 70 and x + entry > width - 8:  # the next legend row
            legend_y, x = legend_y + font_size + 6, 70
        color, pattern = PLOT_COLORS[index % len(PLOT_COLORS)], LINE_STYLES[styles.get(label, "solid")]
        sample = [(x, legend_y + font_size // 2), (x + 18, legend_y + font_size // 2)]
        if pattern is None:
            draw.line(sample, fill=color, width=3)
        else:
            _dashed_line(draw, sample, color, (min(pattern[0], 6), pattern[1]), width=3)
        canvas.text((x + 22, legend_y), label, font, fill=(0, 0, 0))
        canvas.legend.append(label)
        canvas.styles[label] = styles.get(label, "solid")
        x += entry + 16
    # Below the legend, the y axis's label on a line of its own, then the frame.
    left, right, top, bottom = 70, width - 16, legend_y + 2 * font_size + 16, height - 2 * font_size - 14
    if not series:
        canvas.text((width // 2, (top + bottom) // 2), "no data yet", font, fill=(120, 120, 120), anchor="mm")
        return canvas.finish()
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

    y_ticks = _ticks(y_low, y_high)
    for tick in y_ticks:
        _, ty = to_pixel(x_low, tick)
        draw.line((left, ty, right, ty), fill=(232, 232, 232))
        draw.line((left - 4, ty, left, ty), fill=(0, 0, 0))
        canvas.text((left - 7, ty), _tick_label(tick, y_ticks), font, fill=(0, 0, 0), anchor="rm")
    integer_steps = all(float(x).is_integer() for x in xs)
    for tick in _ticks(x_low, x_high):
        if integer_steps and not float(tick).is_integer():
            continue
        tx, _ = to_pixel(tick, y_low)
        draw.line((tx, bottom, tx, bottom + 4), fill=(0, 0, 0))
        canvas.text((tx, bottom + 6), f"{tick:g}", font, fill=(0, 0, 0), anchor="ma")
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    canvas.text(((left + right) // 2, height - 4), x_label, font, fill=(0, 0, 0), anchor="md")
    if y_label:
        canvas.text((4, top - font_size - 4), y_label, font, fill=(0, 0, 0))
    for index, (label, points) in enumerate(series.items()):
        color, pattern = PLOT_COLORS[index % len(PLOT_COLORS)], LINE_STYLES[styles.get(label, "solid")]
        pixels = [to_pixel(px, py) for px, py in points]
        if len(pixels) > 1 and pattern is None:
            draw.line(pixels, fill=color, width=2, joint="curve")
        elif len(pixels) > 1:
            _dashed_line(draw, pixels, color, pattern)
        for px, py in pixels:
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=color)
        canvas.lines += 1
    return canvas.finish()


#: The training-log keys of the losses the model trains on, with their legend labels and line styles: told apart by
#: style as well as colour, since they are often nearly equal. The attacked loss is the perturber's own pass
#: (`perturber_update="exact"`), else the model's loss on its perturbed tokens (`perturbed_weight > 0`).
LOSS_CURVES = (
    ("unigame/clean_loss", "real images (clean)", "solid"),
    (("unigame/adversarial_loss", "unigame/perturbed_loss"), "attacked images (perturbed)", "dashed"),
    ("unigame/buffer_loss", "hard drawings (buffer)", "dotted"),
)
#: What the first-order step logs instead of an attacked loss: its estimate of what the attack adds, `<g, delta>`.
GAIN_ESTIMATE = "unigame/adversarial_gain_estimate"


def _logged(row: dict, keys) -> float | None:
    """The first of `keys` (one key, or several in order of preference) that `row` holds, else `None`."""
    for key in (keys,) if isinstance(keys, str) else keys:
        if key in row:
            return row[key]
    return None


def _side_by_side(panels: Sequence[Image.Image], columns: int = 2) -> Image.Image:
    """Panels of one size in a grid, row by row, with what each says (`info["drawn"]`) moved to its place."""
    width, height = panels[0].size
    rows = (len(panels) + columns - 1) // columns
    picture = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    drawn = {"texts": [], "legend": [], "styles": {}, "lines": 0}
    for index, panel in enumerate(panels):
        x, y = (index % columns) * width, (index // columns) * height
        picture.paste(panel, (x, y))
        contents = panel.info.get("drawn", {})
        for text in contents.get("texts", []):
            left, top, right, bottom = text["box"]
            drawn["texts"].append({"text": text["text"], "box": [left + x, top + y, right + x, bottom + y]})
        drawn["legend"] += contents.get("legend", [])
        drawn["styles"].update(contents.get("styles", {}))
        drawn["lines"] += contents.get("lines", 0)
    picture.info["drawn"] = drawn
    return picture


def training_curves(log_history: Sequence[dict], font_size: int = 13) -> Image.Image | None:
    """The game's curves over optimizer steps, drawn with PIL in four panels: the total loss the console prints; the
    model's loss on real images, on attacked (perturbed) ones and on the hard drawings of the buffer, each in its own
    line style; how much the attack adds (attacked minus clean loss), which shows what the two nearly equal curves
    hide; and the attack's strength, the perturber's budget `eps`. `None` when no training log has `unigame/eps` yet.

    Args:
        log_history (`Sequence[dict]`): `trainer.state.log_history`.
        font_size (`int`, *optional*, defaults to `13`): Text height in pixels.
    """
    rows = [row for row in log_history if "unigame/eps" in row and "step" in row]
    if not rows:
        return None
    total = {"total loss": [(r["step"], r["loss"]) for r in rows if "loss" in r]}
    losses = {
        label: [(r["step"], _logged(r, keys)) for r in rows if _logged(r, keys) is not None]
        for keys, label, _ in LOSS_CURVES
    }
    styles = {label: style for _, label, style in LOSS_CURVES}
    clean, attacked = LOSS_CURVES[0][0], LOSS_CURVES[1][0]
    gap = {"attacked - clean": [
        (r["step"], _logged(r, attacked) - r[clean]) for r in rows if _logged(r, attacked) is not None and clean in r
    ]}  # fmt: skip
    if not gap["attacked - clean"]:  # the first-order step: its own estimate of what the attack adds
        gap = {"first-order estimate": [(r["step"], r[GAIN_ESTIMATE]) for r in rows if GAIN_ESTIMATE in r]}
    eps = {"eps": [(r["step"], r["unigame/eps"]) for r in rows]}
    panels = (
        line_plot(total, "Total loss (as the console prints it)", y_label="loss", font_size=font_size),
        line_plot(losses, "How hard for the model (loss)", y_label="loss", font_size=font_size, styles=styles),
        line_plot(gap, "How much the attack adds to the loss", y_label="loss difference", font_size=font_size),
        line_plot(eps, "Attack strength (the perturber's budget eps)", y_label="eps", font_size=font_size),
    )
    return _side_by_side(panels)
