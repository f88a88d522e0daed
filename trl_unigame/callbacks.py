"""Callbacks that show what the game does: a short console line per log, hard-sample grids and curves of eps and the
losses."""

from __future__ import annotations

import os

from transformers import PrinterCallback, ProgressCallback, TrainerCallback


#: The training-log keys the console line shows, with their labels and formats.
CONSOLE_KEYS = (
    ("loss", "loss", "{:.4g}"),
    ("unigame/clean_loss", "clean loss", "{:.4g}"),
    ("unigame/buffer_size", "buffer", "{:.0f}"),
    ("unigame/kept_fraction", "kept", "{:.0%}"),
    ("unigame/eps", "eps", "{:.4g}"),
)


def console_line(logs: dict, state) -> str | None:
    r"""
    The short console line of a training log of the game: step, loss, clean loss, buffer size, the fraction of mined
    candidates kept and eps (the keys of `CONSOLE_KEYS` the log has). `None` for any other log (evaluation, the
    end-of-training summary), which is shown as transformers shows it.

    Args:
        logs (`dict`): The logs passed to `TrainerCallback.on_log`.
        state (`transformers.TrainerState`): The trainer's state.
    """
    if not logs or "loss" not in logs or not any(key.startswith("unigame/") for key in logs):
        return None
    parts = [f"step {state.global_step}/{state.max_steps}"]
    for key, label, form in CONSOLE_KEYS:
        value = logs.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{label} {form.format(value)}")
    return " | ".join(parts)


class UniGameProgressCallback(ProgressCallback):
    r"""
    `transformers.ProgressCallback` that writes each training log of the game as one short line ([`console_line`])
    above the progress bar, instead of the whole dictionary of metrics. The trainer's logs are unchanged: trackers
    (`report_to`) and `trainer.state.log_history` keep every key.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        line = console_line(logs, state)
        if line is None:
            return super().on_log(args, state, control, logs=logs, **kwargs)
        if state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.write(line)


class UniGamePrinterCallback(PrinterCallback):
    r"""
    `transformers.PrinterCallback` (the console output when `disable_tqdm=True`) that prints each training log of the
    game as one short line ([`console_line`]) instead of the whole dictionary; other logs print as before.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        line = console_line(logs, state)
        if line is None:
            return super().on_log(args, state, control, logs=logs, **kwargs)
        if state.is_local_process_zero:
            print(line)


def use_short_console_logs(trainer) -> None:
    """Replaces the trainer's `ProgressCallback` (or, with `disable_tqdm`, its `PrinterCallback`) by the UniGame one
    that prints a short line per training log. Other progress callbacks (a notebook's) are left as they are."""
    callbacks = trainer.callback_handler.callbacks
    for index, callback in enumerate(callbacks):
        if type(callback) is ProgressCallback:
            callbacks[index] = UniGameProgressCallback(max_str_len=callback.max_str_len)
        elif type(callback) is PrinterCallback:
            callbacks[index] = UniGamePrinterCallback()


def _require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "HardSamplePicturesCallback needs matplotlib: `pip install matplotlib` or `pip install trl-unigame[plots]`."
        ) from error
    return plt


class HardSamplePicturesCallback(TrainerCallback):
    r"""
    Every `every_n_steps` optimizer steps, writes to `output_dir/pictures/`:
    - `hard_samples_step{N}.png`: the hardest decoded candidates in the buffer, each with its question, answer,
      hardness `H` and consistency `s`;
    - `curves.png`: eps, the clean, adversarial and buffer losses over steps.

    Args:
        every_n_steps (`int`, *optional*, defaults to `100`): Interval in optimizer steps.
        max_samples (`int`, *optional*, defaults to `8`): Hard samples shown.
    """

    def __init__(self, every_n_steps: int = 100, max_samples: int = 8):
        _require_matplotlib()
        if every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be at least 1, got {every_n_steps}.")
        self.every_n_steps = every_n_steps
        self.max_samples = max_samples
        self.trainer = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_n_steps or not state.is_world_process_zero or self.trainer is None:
            return control
        directory = os.path.join(args.output_dir, "pictures")
        os.makedirs(directory, exist_ok=True)
        self.write_hard_samples(os.path.join(directory, f"hard_samples_step{state.global_step}.png"))
        self.write_curves(state.log_history, os.path.join(directory, "curves.png"))
        return control

    def write_hard_samples(self, path: str) -> str | None:
        """One row per hard sample: the source image (when known) beside the decoded hard candidate, with the
        question, the answer, the model's prediction on the candidate, `H` and `s`."""
        plt = _require_matplotlib()
        entries = self.trainer.buffer.entries[: self.max_samples]
        if not entries:
            return None
        predictions = self._predict(entries)
        fig, axes = plt.subplots(len(entries), 2, figsize=(6, 2.6 * len(entries)), squeeze=False)
        for (source_ax, candidate_ax), entry, prediction in zip(axes, entries, predictions):
            source = entry.extra.get("source")
            if source is not None:
                source_ax.imshow(source.permute(1, 2, 0).numpy())
                source_ax.set_title("source", fontsize=7)
            source_ax.axis("off")
            candidate_ax.imshow(entry.image.permute(1, 2, 0).numpy())
            candidate_ax.axis("off")
            s = "n/a" if entry.consistency is None else f"{entry.consistency:.2f}"
            candidate_ax.set_title(
                f"Q: {entry.row.get('question', '')[:48]}\nA: {entry.row.get('answer', '')[:32]} | "
                f"pred: {prediction[:32]}\nH={entry.hardness:.2f} s={s}",
                fontsize=7,
            )
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def _predict(self, entries) -> list[str]:
        import torch

        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model.training
        model.eval()
        try:
            with trainer.perturber.disabled():
                images = torch.stack([e.image for e in entries])
                return trainer.interface.answer(model, images, [e.row.get("question", "") for e in entries])
        except NotImplementedError:
            return ["" for _ in entries]
        finally:
            model.train(was_training)

    @staticmethod
    def write_curves(log_history: list[dict], path: str) -> str | None:
        plt = _require_matplotlib()
        keys = ["unigame/clean_loss", "unigame/adversarial_loss", "unigame/buffer_loss"]
        rows = [r for r in log_history if "unigame/eps" in r]
        if not rows:
            return None
        fig, (loss_ax, eps_ax) = plt.subplots(1, 2, figsize=(9, 3.2))
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                loss_ax.plot(*zip(*points), label=key.split("/")[1])
        loss_ax.set_xlabel("step")
        loss_ax.legend(fontsize=7)
        eps_ax.plot([r["step"] for r in rows], [r["unigame/eps"] for r in rows])
        eps_ax.set_xlabel("step")
        eps_ax.set_title("eps", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
