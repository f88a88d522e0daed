"""The game's metrics: collected during the steps of a logging period, reduced across processes when logged."""

from __future__ import annotations

import warnings
from collections import defaultdict

import torch


# Counts: logged as their sum over the period and the processes (0 when nothing happened); the rest as means.
COUNTED = (
    "unigame/skipped_perturber_steps",
    "unigame/skipped_understanding_steps",
    "unigame/skipped_generation_adversary_steps",
)


class GameMetrics:
    """Values the game's parts record (`add`) and the trainer logs (`reduce`) beside the host's own logs."""

    def __init__(self):
        self._values: dict[str, list[float]] = defaultdict(list)

    def add(self, key: str, value: float) -> None:
        self._values[key].append(float(value))

    def skip(self, step: int, player: str, why: str) -> None:
        """Warns that a player's update of this step is dropped, and counts it."""
        warnings.warn(f"UniGame step {step}: {why}; the {player} update of this step is skipped.", stacklevel=3)
        self.add(f"unigame/skipped_{player}_steps", 1.0)

    def state_dict(self) -> dict[str, list[float]]:
        """The values recorded since the last log (this process's), for a checkpoint: a resumed run logs them as the
        uninterrupted run would have."""
        return {key: list(values) for key, values in self._values.items() if values}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self._values.clear()
        for key, values in state.items():
            self._values[key].extend(float(v) for v in values)

    def __contains__(self, key: str) -> bool:
        return bool(self._values.get(key))

    def reduce(self) -> dict[str, float]:
        """The period's metrics over every process (a mean of all values recorded anywhere, or a sum for counts), then
        clears them. Under `torch.distributed` it is a collective: every process must call it together, as the
        Trainer's `log` does with its training logs (a training log sent from one process alone would wait forever)."""
        local = {key: (sum(values), len(values)) for key, values in self._values.items() if values}
        self._values.clear()
        parts = [local]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                parts = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(parts, local)
        totals: dict[str, list[float]] = {}
        for part in parts:
            for key, (total, count) in part.items():
                merged = totals.setdefault(key, [0.0, 0])
                merged[0] += total
                merged[1] += count
        metrics = {key: total / count for key, (total, count) in totals.items() if key not in COUNTED}
        for key in COUNTED:
            metrics[key] = totals.get(key, [0.0, 0])[0]
        return metrics
