"""Callbacks that show what the game does: a short console line per log, hard-sample galleries and curves of eps and
the losses (PIL only), also logged to the active trackers."""

from __future__ import annotations

import os

from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from transformers.utils import logging


logger = logging.get_logger(__name__)


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


class HardSamplePicturesCallback(TrainerCallback):
    r"""
    Every `every_n_steps` optimizer steps, draws (with PIL only) and writes to `output_dir/pictures/`:
    - `hard_samples_step{N}.png`: a titled table of the hardest decoded candidates in the buffer (the model's own
      drawings), each beside the real image it was mined from, with its question, answer, the model's answer, how hard
      it is for the model (the hardness, a loss) and how well it matches its prompt (the consistency), under column
      headers and a legend saying what the two numbers are ([`hard_sample_gallery`]);
    - `curves.png`: the total loss, the clean, adversarial and buffer losses, the adversarial minus the clean loss,
      and eps over steps ([`training_curves`]).

    Both PNGs hold what they say (texts, legend labels, lines) as a text chunk ([`~gallery.picture_contents`]).

    The same two pictures are logged as images (tags `unigame/hard_samples` and `unigame/curves`) to the `report_to`
    integrations that are active: TensorBoard (`add_image` on the `TensorBoardCallback`'s writer), Weights & Biases
    (`wandb.Image`) and Trackio (`trackio.Image`).

    Args:
        every_n_steps (`int`, *optional*, defaults to `100`): Interval in optimizer steps.
        max_samples (`int`, *optional*, defaults to `8`): Hard samples shown.
    """

    #: Tracker tags of the pictures.
    TAGS = {"hard_samples": "unigame/hard_samples", "curves": "unigame/curves"}

    def __init__(self, every_n_steps: int = 100, max_samples: int = 8):
        if every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be at least 1, got {every_n_steps}.")
        self.every_n_steps = every_n_steps
        self.max_samples = max_samples
        self.trainer = None
        self._tracker_failures: set[str] = set()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_n_steps or self.trainer is None:
            return control
        from .game.sharding import full_parameters

        # The gallery's answers are a forward on the main process alone: under FSDP2 or ZeRO-3 every process gathers
        # the parameters with it first (a no-op otherwise).
        with full_parameters(self.trainer.model_wrapped):
            if state.is_world_process_zero:
                self._write_pictures(args, state)
        return control

    def _write_pictures(self, args, state) -> None:
        directory = os.path.join(args.output_dir, "pictures")
        os.makedirs(directory, exist_ok=True)
        from .gallery import save_picture, training_curves

        pictures = {}
        gallery = self.hard_samples_picture(state.global_step)
        if gallery is not None:
            save_picture(gallery, os.path.join(directory, f"hard_samples_step{state.global_step}.png"))
            pictures[self.TAGS["hard_samples"]] = gallery
        curves = training_curves(state.log_history)
        if curves is not None:
            save_picture(curves, os.path.join(directory, "curves.png"))
            pictures[self.TAGS["curves"]] = curves
        self.log_images(pictures, state.global_step)

    def hard_samples_picture(self, step: int | None = None):
        """The gallery of the hardest buffer entries as a PIL image, or `None` while the buffer is empty."""
        from .gallery import gallery_title, hard_sample_gallery

        entries = self.trainer.buffer.entries[: self.max_samples]
        if not entries:
            return None
        args = self.trainer.args
        return hard_sample_gallery(
            entries,
            self._predict(entries),
            title=gallery_title(step),
            consistency_weight=getattr(args, "consistency_weight", None),
            consistency_threshold=getattr(args, "consistency_threshold", None),
        )

    def write_hard_samples(self, path: str, step: int | None = None) -> str | None:
        """Writes [`hard_samples_picture`] to `path`; returns `path`, or `None` (nothing written) while the buffer
        is empty."""
        from .gallery import save_picture

        picture = self.hard_samples_picture(step)
        if picture is None:
            return None
        save_picture(picture, path)
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
        """Writes [`training_curves`] of `log_history` to `path`; returns `path`, or `None` before the first log."""
        from .gallery import save_picture, training_curves

        picture = training_curves(log_history)
        if picture is None:
            return None
        save_picture(picture, path)
        return path

    def log_images(self, images: dict, step: int) -> list[str]:
        """Logs PIL images (tag -> image) to the trainer's active tracker callbacks: TensorBoard, Weights & Biases
        and Trackio. Returns the names of the trackers that received them. A tracker that fails is reported once and
        then left alone; training goes on."""
        if self.trainer is None or not images:
            return []
        logged = []
        for callback in self.trainer.callback_handler.callbacks:
            name = type(callback).__name__
            if name in self._tracker_failures:
                continue
            try:
                if _log_to_tracker(callback, images, step):
                    logged.append(name)
            except Exception as error:  # a tracker's failure must not stop training
                self._tracker_failures.add(name)
                logger.warning(f"HardSamplePicturesCallback could not log its pictures to {name}: {error}")
        return logged


def _log_to_tracker(callback, images: dict, step: int) -> bool:
    """Logs `images` to one of transformers' tracker callbacks when it is active; `False` for any other callback."""
    import importlib.util

    import numpy as np

    name = type(callback).__name__
    if name == "TensorBoardCallback":
        writer = getattr(callback, "tb_writer", None)
        if writer is None:
            return False
        for tag, image in images.items():
            writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
        writer.flush()
        return True
    if name == "WandbCallback" and importlib.util.find_spec("wandb") is not None:
        wandb = getattr(callback, "_wandb", None)
        if wandb is None or getattr(wandb, "run", None) is None:
            return False
        wandb.log({**{tag: wandb.Image(image) for tag, image in images.items()}, "train/global_step": step})
        return True
    if name == "TrackioCallback" and importlib.util.find_spec("trackio") is not None:
        trackio = getattr(callback, "_trackio", None)
        if trackio is None or not getattr(callback, "_initialized", False) or not hasattr(trackio, "Image"):
            return False
        trackio.log({**{tag: trackio.Image(image) for tag, image in images.items()}, "train/global_step": step})
        return True
    return False
