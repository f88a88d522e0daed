"""The pictures of a run: the hard-sample gallery explains itself, the curves are drawn without matplotlib, and both
reach the trackers (TensorBoard event files read back)."""

import glob
import os
import sys

import numpy as np
import pytest
import torch
from peft import LoraConfig
from PIL import Image

from trl_unigame import UniGameConfig, UniGameTrainer
from trl_unigame.buffer import HardSample
from trl_unigame.callbacks import HardSamplePicturesCallback
from trl_unigame.gallery import PLOT_COLORS, hard_sample_gallery, hardness_legend, line_plot, training_curves
from trl_unigame.selection import hardness
from trl_unigame.testing import tiny_janus


def samples(n=3):
    images = (torch.rand(n, 3, 16, 16) * 255).to(torch.uint8)
    return [
        HardSample(
            images[i],
            {"question": "What digit is this?", "answer": "one"},
            2.0 - i,
            consistency=None if i == 0 else 0.5,
            extra={"source": images[(i + 1) % n]},
        )
        for i in range(n)
    ]


def ink_rows(picture: Image.Image, top: int, bottom: int) -> int:
    """How many pixel rows of the band `[top, bottom)` hold dark (text) pixels."""
    band = np.asarray(picture.convert("L"))[top:bottom]
    return int((band < 100).any(axis=1).sum())


def test_gallery_has_a_title_column_headers_a_legend_and_readable_text():
    small = hard_sample_gallery(samples(), predictions=["two", "one", "one"], font_size=10)
    picture = hard_sample_gallery(
        samples(), predictions=["two", "one", "one"], consistency_weight=0.2, consistency_threshold=0.3
    )
    assert picture.mode == "RGB" and picture.width > small.width and picture.height > small.height  # text scales
    # Above the first image: a title, the legend and the column headers, in text at least 10 pixels tall.
    first_image_top = next(
        y for y in range(picture.height) if (np.asarray(picture)[y, 8:104] != 255).any(-1).sum() > 80
    )
    assert first_image_top > 4 * 14 and ink_rows(picture, 0, 30) >= 10
    # The legend is the trainer's rule: H = CE + w * max(0, tau - s) (`selection.hardness`), with its numbers.
    legend = hardness_legend(0.2, 0.3)
    assert "0.2 * max(0, 0.3 - s)" in legend and "s = consistency" in legend and "loss" in legend
    ce, s = torch.tensor([1.0, 1.0]), torch.tensor([0.1, 0.5])
    assert hardness(ce, s, 0.2, 0.3).tolist() == pytest.approx([1.0 + 0.2 * 0.2, 1.0])
    assert "w * max(0, tau - s)" in hardness_legend()


def test_curves_are_drawn_with_pil_when_matplotlib_is_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    callback = HardSamplePicturesCallback(every_n_steps=5)  # no matplotlib needed
    history = [
        {"step": s, "unigame/eps": 0.05 + 0.01 * s, "unigame/clean_loss": 2 / s, "unigame/adversarial_loss": 3 / s}
        for s in range(1, 6)
    ] + [{"step": 5, "eval_loss": 1.0}]
    path = callback.write_curves(history, str(tmp_path / "curves.png"))
    picture = np.asarray(Image.open(path).convert("RGB"))
    colours = {tuple(c) for c in picture.reshape(-1, 3).tolist()}
    assert PLOT_COLORS[0] in colours and PLOT_COLORS[1] in colours  # the clean and adversarial lines
    assert PLOT_COLORS[2] not in colours  # no buffer loss logged: no third line
    assert training_curves([{"step": 1, "loss": 1.0}]) is None  # no game log yet
    empty = line_plot({"eps": []}, "eps")
    assert empty.size == (520, 340)


def test_pictures_are_logged_to_tensorboard(tmp_path, vqa):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, processor = tiny_janus(seed=0)
    args = UniGameConfig(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        per_device_train_batch_size=2,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to=["tensorboard"],
        disable_tqdm=True,
        num_candidates=2,
        buffer_batch_size=2,
        consistency_threshold=-1.0,
        consistency_model=None,
        seed=0,
        dataloader_num_workers=0,
    )
    callback = HardSamplePicturesCallback(every_n_steps=1)
    trainer = UniGameTrainer(
        model,
        args,
        train_dataset=vqa,
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8),
        callbacks=[callback],
    )
    trainer.train()
    assert trainer.buffer.entries
    pictures = sorted(os.listdir(tmp_path / "out" / "pictures"))
    assert pictures == ["curves.png", "hard_samples_step1.png", "hard_samples_step2.png"]
    (events,) = glob.glob(str(tmp_path / "out" / "runs" / "*" / "events.out.tfevents.*"))
    accumulator = EventAccumulator(os.path.dirname(events), size_guidance={"images": 0})
    accumulator.Reload()
    assert {"unigame/hard_samples", "unigame/curves"} <= set(accumulator.Tags()["images"])
    assert [e.step for e in accumulator.Images("unigame/hard_samples")] == [1, 2]
    assert [e.step for e in accumulator.Images("unigame/curves")] == [2]  # the first log comes after step 1's pictures
    saved = Image.open(tmp_path / "out" / "pictures" / "hard_samples_step2.png")
    logged = accumulator.Images("unigame/hard_samples")[-1]
    assert (logged.width, logged.height) == saved.size
