"""The hard-sample buffer: the hardest decoded candidates found so far, ranked by hardness."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .interfaces.base import to_uint8


@dataclass
class HardSample:
    """One buffer entry: a decoded image, the texts of the sample it came from, and its hardness `H`.

    `image` is a uint8 tensor `(3, H, W)`; `row` holds the source row's text fields (question, answer, ...); `step`
    is the optimizer step it was mined at.
    """

    image: torch.Tensor
    row: dict[str, Any]
    hardness: float
    consistency: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    step: int = 0


class HardSampleBuffer:
    r"""
    A fixed-capacity store of hard samples, ranked by hardness.

    When full, a new entry displaces the easiest one if it is harder. Sampling draws without replacement with
    probabilities `softmax(inverse_rank / temperature)`, where the hardest of `n` entries has inverse rank `n` and the
    easiest `1`; with `pop=True` the drawn entries leave the buffer.

    Args:
        capacity (`int`, *optional*, defaults to `50`):
            Largest number of entries kept (paper: 50; the authors' code: 4096).
        temperature (`float`, *optional*, defaults to `2.0`):
            Temperature of the rank softmax; higher is closer to uniform.
        pop (`bool`, *optional*, defaults to `False`):
            Remove sampled entries.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the buffer's own random generator (its state is part of `state_dict()`).
    """

    def __init__(self, capacity: int = 50, temperature: float = 2.0, pop: bool = False, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"`capacity` must be at least 1, got {capacity}.")
        if temperature <= 0:
            raise ValueError(f"`temperature` must be positive, got {temperature}.")
        self.capacity = capacity
        self.temperature = temperature
        self.pop = pop
        self.generator = torch.Generator().manual_seed(seed)
        self.entries: list[HardSample] = []  # kept sorted, hardest first

    def __len__(self) -> int:
        return len(self.entries)

    def push(
        self,
        image: torch.Tensor,
        row: dict[str, Any],
        hardness: float,
        consistency: float | None = None,
        extra: dict[str, Any] | None = None,
        step: int = 0,
    ) -> bool:
        """Adds one candidate mined at optimizer step `step` (with optional display `extra`, e.g. its source image);
        returns whether it was kept."""
        hardness = float(hardness)
        if hardness != hardness:  # NaN never enters
            return False
        if len(self.entries) >= self.capacity and hardness <= self.entries[-1].hardness:
            return False
        entry = HardSample(
            to_uint8(image),
            dict(row),
            hardness,
            None if consistency is None else float(consistency),
            dict(extra or {}),
            int(step),
        )
        position = next((i for i, e in enumerate(self.entries) if e.hardness < hardness), len(self.entries))
        self.entries.insert(position, entry)
        del self.entries[self.capacity :]
        return True

    def probabilities(self) -> torch.Tensor:
        """Sampling probability of each entry, in buffer order (hardest first)."""
        n = len(self.entries)
        inverse_rank = torch.arange(n, 0, -1, dtype=torch.float64)
        return torch.softmax(inverse_rank / self.temperature, dim=0)

    def sample(self, batch_size: int) -> list[HardSample]:
        """Draws up to `batch_size` distinct entries (all of them when fewer are held)."""
        if not self.entries or batch_size <= 0:
            return []
        k = min(batch_size, len(self.entries))
        index = torch.multinomial(self.probabilities(), k, replacement=False, generator=self.generator).tolist()
        drawn = [self.entries[i] for i in index]
        if self.pop:
            for i in sorted(index, reverse=True):
                del self.entries[i]
        return drawn

    def rescore(self, entries: list[HardSample], hardness: list[float]) -> None:
        """Gives drawn `entries` their hardness under the current model and re-ranks the buffer.

        Entries no longer held (popped or displaced since they were drawn) are ignored, and so is a NaN score.
        Without this, entries keep the hardness they had when mined: as the model learns them, new candidates stop
        displacing them and the buffer freezes.
        """
        held = {id(e) for e in self.entries}
        changed = False
        for entry, value in zip(entries, hardness):
            value = float(value)
            if id(entry) in held and value == value:
                entry.hardness = value
                changed = True
        if changed:
            self.entries.sort(key=lambda e: e.hardness, reverse=True)  # stable: ties keep their order

    def evict_older_than(self, step: int) -> int:
        """Removes the entries mined before optimizer step `step`; returns how many left."""
        kept = [e for e in self.entries if e.step >= step]
        removed = len(self.entries) - len(kept)
        self.entries = kept
        return removed

    @property
    def mean_hardness(self) -> float:
        return sum(e.hardness for e in self.entries) / len(self.entries) if self.entries else 0.0

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to restore the buffer exactly: entries (images, texts, scores) and the generator."""
        return {
            "capacity": self.capacity,
            "temperature": self.temperature,
            "pop": self.pop,
            "generator": self.generator.get_state(),
            "images": [e.image for e in self.entries],
            "rows": [e.row for e in self.entries],
            "hardness": [e.hardness for e in self.entries],
            "consistency": [e.consistency for e in self.entries],
            "extra": [e.extra for e in self.entries],
            "steps": [e.step for e in self.entries],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a `state_dict()`; a malformed one raises a `ValueError` and leaves the buffer as it was."""
        _check_state(state)
        extras = state.get("extra") or [{} for _ in state["images"]]
        steps = state.get("steps") or [0 for _ in state["images"]]
        try:  # everything is converted before anything is assigned
            entries = [
                HardSample(image, dict(row), float(h), None if c is None else float(c), dict(extra), int(step))
                for image, row, h, c, extra, step in zip(
                    state["images"], state["rows"], state["hardness"], state["consistency"], extras, steps
                )
            ]
            capacity, temperature, pop = int(state["capacity"]), float(state["temperature"]), bool(state["pop"])
            torch.Generator().set_state(state["generator"])
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"The buffer state holds a value of the wrong kind: {err}") from None
        if capacity < 1 or not temperature > 0:
            raise ValueError(f"The buffer state has capacity {capacity} and temperature {temperature}.")
        self.generator.set_state(state["generator"])
        self.capacity, self.temperature, self.pop = capacity, temperature, pop
        self.entries = entries


def _check_state(state: Any) -> None:
    """Raises a `ValueError` naming the first thing that makes `state` no buffer `state_dict()`."""
    if not isinstance(state, dict):
        raise ValueError(f"A buffer state is a dict, got {type(state).__name__}.")
    required = ("capacity", "temperature", "pop", "generator", "images", "rows", "hardness", "consistency")
    missing = [key for key in required if key not in state]
    if missing:
        raise ValueError(f"The buffer state lacks {missing}.")
    for key in ("images", "rows", "hardness", "consistency"):
        if not isinstance(state[key], (list, tuple)):
            raise ValueError(f"The buffer state's `{key}` is not a list.")
    if not isinstance(state["generator"], torch.Tensor) or state["generator"].dtype != torch.uint8:
        raise ValueError("The buffer state's `generator` is not a uint8 tensor (`torch.Generator.get_state()`).")
    n = len(state["images"])
    for key in ("rows", "hardness", "consistency", "extra", "steps"):
        if state.get(key) and len(state[key]) != n:
            raise ValueError(f"The buffer state has {n} images but {len(state[key])} `{key}`.")
    for i, image in enumerate(state["images"]):
        if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.dim() != 3:
            raise ValueError(f"The buffer state's image {i} is not a uint8 tensor (3, H, W).")
    for key in ("rows", "extra"):
        if not all(isinstance(value, dict) for value in state.get(key) or []):
            raise ValueError(f"The buffer state's `{key}` are not all dicts.")
