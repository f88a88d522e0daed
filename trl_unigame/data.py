"""Batching for UniGame: the collator of `UniGameTrainer` and the wrapper that keeps raw rows for mining."""

from __future__ import annotations

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
        raise ValueError(f"`{name}` is a DatasetDict with splits {list(columns)}: pass one split, e.g. dataset['train'].")
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(
            f"`{name}` is missing the column(s) {missing}; it has {list(columns)}. {hint}".strip()
        )
    try:
        if len(dataset) == 0:
            raise ValueError(f"`{name}` is empty: UniGame needs at least one sample to train on.")
    except TypeError:  # iterable datasets have no length
        pass


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
        batch = self.interface.build_understanding_inputs(
            [r["image"] for r in rows], [r["question"] for r in rows], [r["answer"] for r in rows]
        )
        batch[ROWS_KEY] = [
            {
                "question": r["question"],
                "answer": r["answer"],
                "prompt": r.get(self.prompt_column) or r["question"],
            }
            for r in rows
        ]
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
        batch = self.collator(rows)
        batch[ROWS_KEY] = [self.describe(r) for r in rows]
        return batch
