"""Batching for UniGame: the collator of `UniGameTrainer` and the wrapper that keeps raw rows for mining."""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Callable


ROWS_KEY = "unigame_rows"


def check_columns(dataset, required: list[str], name: str = "train_dataset", hint: str = "") -> None:
    """Raises a `ValueError` naming the missing columns and the columns found, before any training starts."""
    if dataset is None:
        return
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        return
    if isinstance(columns, dict):  # DatasetDict
        raise ValueError(
            f"`{name}` is a DatasetDict with splits {list(columns)}: pass one split, e.g. dataset['train']."
        )
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(f"`{name}` is missing the column(s) {missing}; it has {list(columns)}. {hint}".strip())
    try:
        if len(dataset) == 0:
            raise ValueError(f"`{name}` is empty: UniGame needs at least one sample to train on.")
    except TypeError:  # iterable datasets have no length
        pass


# Rows checked at start-up by `check_rows`, spread over the dataset.
ROWS_CHECKED = 64


def as_text(value, column: str = "text"):
    """A text field as a string: numbers become their text (`3` -> `"3"`), a list its first entry (VQA captions often
    come as lists). `None` raises a `ValueError` naming the column."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"The `{column}` value is an empty list: give it at least one entry.")
        value = value[0]
    if value is None:
        raise ValueError(f"The `{column}` value is None: every row needs one (filter such rows out before training).")
    if not isinstance(value, (str, int, float)):
        raise ValueError(f"The `{column}` value {value!r} is a {type(value).__name__}, not text.")
    return value if isinstance(value, str) else str(value)


def load_image(value, column: str = "image"):
    """An image value as a decoded PIL image, read as `datasets.Image()` reads it: a PIL image, a file path (`str` or
    `os.PathLike`, relative to the working directory) or an undecoded `{"path", "bytes"}` dict. Raises a `ValueError`
    naming the file when it is missing or cannot be decoded (truncated or corrupt)."""
    from io import BytesIO

    from PIL import Image

    if value is None:
        raise ValueError(f"The `{column}` value is None: every row needs an image.")
    source = None
    try:
        if isinstance(value, Image.Image):
            image, source = value, getattr(value, "filename", None)
        elif isinstance(value, (str, os.PathLike)):
            source = os.fspath(value)
            image = Image.open(source)
        elif isinstance(value, dict) and (value.get("bytes") is not None or value.get("path")):
            source = value.get("path")
            image = Image.open(BytesIO(value["bytes"]) if value.get("bytes") is not None else source)
        else:
            raise ValueError(
                f"The `{column}` value is a {type(value).__name__}, not an image or an image path: cast the column "
                "with `dataset.cast_column(column, datasets.Image())`."
            )
        image.load()  # PIL decodes lazily: a truncated file fails here, not in the image processor
    except OSError as error:
        what = f"file {source!r}" if source else "image (in-memory bytes)"
        raise ValueError(
            f"The `{column}` {what} cannot be read ({error}): replace the file or drop the row."
        ) from error
    return image


def check_rows(dataset, name: str = "train_dataset", columns=("image", "question", "answer")) -> None:
    """Reads up to `ROWS_CHECKED` rows spread over `dataset` and raises a `ValueError` naming the column and the row
    index of the first missing image or text, or of an image file that cannot be read, before any training starts.
    Warns once when rows have an empty question or answer (all rows are counted), and once when text columns hold
    numbers (an integer `answer` column), which are converted to text (`3` -> `"3"`, `3.0` -> `"3.0"`)."""
    if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "select"):
        return
    n = len(dataset)
    if n <= ROWS_CHECKED:
        indices = list(range(n))
    else:
        indices = sorted({round(i * (n - 1) / (ROWS_CHECKED - 1)) for i in range(ROWS_CHECKED)})
    present = [c for c in columns if c in dataset.column_names]
    checked = dataset.select(indices).select_columns(present)
    if "image" in present and hasattr(checked, "cast_column"):
        from datasets import Image

        try:  # undecoded, so a file that cannot be decoded is named with its row instead of failing in `datasets`
            checked = checked.cast_column("image", Image(decode=False))
        except (TypeError, ValueError):  # not castable (e.g. a list of images): checked decoded
            pass
    numbers = {}  # column -> (row index, value, its text) of the column's first number among the rows checked
    for index, row in zip(indices, checked):
        for column in present:
            try:
                if column == "image":
                    load_image(row[column], column)
                elif _is_number(row[column]) and column not in numbers:
                    numbers[column] = (index, row[column], as_text(row[column], column))
                else:
                    as_text(row[column], column)
            except ValueError as error:
                raise ValueError(f"`{name}` row {index}: {error}") from None
    if numbers:
        found = "; ".join(f"`{c}` (row {i}: {v!r} is read as {t!r})" for c, (i, v, t) in numbers.items())
        cast = ", ".join(f'`dataset.cast_column("{c}", datasets.Value("string"))`' for c in numbers)
        warnings.warn(
            f"`{name}` has numbers where text is expected, in {found}: they are converted to text. Cast the "
            f"column(s) yourself to choose the text (and silence this warning): {cast}.",
            UserWarning,
            stacklevel=3,
        )
    texts = [dataset[c] for c in ("question", "answer") if c in present]  # columns only: no image is decoded
    empty = [index for index, values in enumerate(zip(*texts)) if any(_is_empty_text(v) for v in values)]
    if empty:
        shown = ", ".join(str(i) for i in empty[:5]) + (", ..." if len(empty) > 5 else "")
        warnings.warn(
            f"`{name}` has {len(empty)} row(s) with an empty question or answer (rows {shown}): the model learns to "
            "answer nothing, or without being asked. Filter them out, e.g. `dataset.filter(lambda r: r['question'] "
            "and r['answer'])`.",
            UserWarning,
            stacklevel=3,
        )


def _is_number(value) -> bool:
    """Whether a text field holds a number (or, as a list, starts with one) that `as_text` turns into text."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    return isinstance(value, (int, float))


def _is_empty_text(value) -> bool:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    return isinstance(value, str) and not value.strip()


class UniGameDataCollator:
    r"""
    Collates rows with an image, a question and an answer into understanding inputs, and keeps each row's texts
    (under `"unigame_rows"`) for mining.

    Args:
        interface ([`VisualTokenInterface`]):
            The model's interface (it owns tokenization and the prompt format).
        prompt_column (`str`, *optional*, defaults to `"caption"`):
            Column used as the generation prompt when a row has it; the question otherwise.
    """

    def __init__(self, interface, prompt_column: str = "caption"):
        self.interface = interface
        self.prompt_column = prompt_column

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        texts, images = [], []
        for position, r in enumerate(rows):
            try:
                image = load_image(r.get("image"))
                question, answer = as_text(r["question"], "question"), as_text(r["answer"], "answer")
                prompt = r.get(self.prompt_column)
                prompt = as_text(prompt, self.prompt_column) if prompt not in (None, "", []) else question
            except ValueError as error:
                raise ValueError(f"Row {position} of the batch (question {r.get('question')!r}): {error}") from None
            texts.append({"question": question, "answer": answer, "prompt": prompt})
            images.append(image)
        batch = self.interface.build_understanding_inputs(
            images, [t["question"] for t in texts], [t["answer"] for t in texts]
        )
        batch[ROWS_KEY] = texts
        return batch


class RowKeepingCollator:
    """Wraps a host trainer's collator so that each batch also carries its rows' text fields for mining.

    Args:
        collator (`Callable`): The host's collator.
        describe (`Callable[[dict], dict]`): Maps a raw row to its text fields (`question`, `answer`, `prompt`, ...).
    """

    def __init__(self, collator: Callable, describe: Callable[[dict], dict]):
        self.collator = collator
        self.describe = describe

    def __call__(self, rows):
        # Described first, and copied: host collators may rewrite rows in place (e.g. fill images into messages).
        described = [copy.deepcopy(self.describe(r)) for r in rows]
        batch = self.collator(rows)
        batch[ROWS_KEY] = described
        return batch


def _majority(answers) -> str:
    """VQAv2's `answers` (list of strings or of dicts with `answer`) reduced to the most frequent answer."""
    from collections import Counter

    texts = [a["answer"] if isinstance(a, dict) else str(a) for a in answers]
    if not texts:
        raise ValueError("A row has an empty `answers` list.")
    counts = Counter(texts)
    return max(texts, key=lambda t: (counts[t], -texts.index(t)))


def message_text(content) -> str:
    """Plain text of a message content, a message, a conversation (list of messages) or a string."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return message_text(content.get("content", content.get("text", "")))
    parts = []
    for item in content:
        if isinstance(item, dict) and "role" in item:
            parts.append(message_text(item["content"]))
        elif isinstance(item, dict) and item.get("type") == "text":
            parts.append(item.get("text", ""))
    return " ".join(p for p in parts if p).strip()


def first_turn(messages, role: str) -> str:
    """Text of the first message of `role` in a conversation; empty when there is none."""
    return next((message_text(m["content"]) for m in messages if m["role"] == role), "")


def to_vqa_format(
    dataset,
    image_column: str = "image",
    question_column: str = "question",
    answer_column: str = "answer",
    prompt_column: str | None = "caption",
):
    r"""
    Maps a dataset to the columns [`UniGameTrainer`] reads: `image`, `question`, `answer` (and `caption` when present).

    Understands three layouts:
    - plain VQA: the given image/question/answer columns;
    - VQAv2: an `answers` list (strings or `{"answer": ...}` dicts), reduced to its majority answer;
    - TRL's conversational format: `messages` (first user turn = question, first assistant turn = answer) with
      `images` (the first image is used).

    Raises:
        ValueError: naming the columns found when none of the layouts fits.
    """
    columns = list(dataset.column_names)
    if "messages" in columns and ("images" in columns or "image" in columns):
        images_col = "images" if "images" in columns else "image"

        def from_messages(row):
            user = next(m for m in row["messages"] if m["role"] == "user")
            assistant = next(m for m in row["messages"] if m["role"] == "assistant")
            image = row[images_col][0] if isinstance(row[images_col], list) else row[images_col]
            return {"image": image, "question": message_text(user), "answer": message_text(assistant)}

        return dataset.map(from_messages, remove_columns=columns)
    answer_source = answer_column if answer_column in columns else ("answers" if "answers" in columns else None)
    missing = [c for c in (image_column, question_column) if c not in columns]
    if answer_source is None:
        missing.append(f"{answer_column} (or a VQAv2 `answers` list)")
    if missing:
        raise ValueError(
            f"The dataset is missing the column(s) {missing}; it has {columns}. Name the right ones with "
            "--image_column/--question_column/--answer_column, or use TRL's conversational format (messages + images)."
        )
    keep = [c for c in (prompt_column,) if c and c in columns]

    def to_row(row):
        answer = row[answer_source]
        answer = _majority(answer) if isinstance(answer, list) else answer
        return {"question": row[question_column], "answer": answer}

    mapped = dataset.map(to_row, remove_columns=[c for c in columns if c not in keep and c != image_column])
    if image_column != "image":
        mapped = mapped.rename_column(image_column, "image")
    return mapped
