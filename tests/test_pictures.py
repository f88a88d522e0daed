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
from trl_unigame.gallery import (
    LOSS_CURVES,
    gallery_title,
    hard_sample_gallery,
    hardness_legend,
    line_plot,
    picture_contents,
    save_picture,
    training_curves,
)
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


def assert_every_text_fits(contents):
    """Every text of a saved picture lies inside it (nothing cut at an edge), as the font renderer measured it."""
    width, height = contents["size"]
    for text in contents["texts"]:
        left, top, right, bottom = text["box"]
        assert 0 <= left and 0 <= top and right <= width and bottom <= height, (text, contents["size"])


#: Shorthand a person reading a picture does not know.
JARGON = ("H:", "H =", "s:", "s =", "U's")


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
    # The legend is the trainer's rule, CE + w * max(0, tau - s) (`selection.hardness`), with its numbers, in words.
    legend = hardness_legend(0.2, 0.3)
    assert "0.2 * max(0, 0.3 - match)" in legend and "How hard for the model (loss)" in legend
    assert "Match with the prompt" in legend and "consistency scorer" in legend
    ce, s = torch.tensor([1.0, 1.0]), torch.tensor([0.1, 0.5])
    assert hardness(ce, s, 0.2, 0.3).tolist() == pytest.approx([1.0 + 0.2 * 0.2, 1.0])
    assert "w * max(0, t - match)" in hardness_legend()


@pytest.mark.parametrize("scale", [1, 6])
def test_the_galleries_title_and_legend_fit_and_speak_plainly(tmp_path, scale):
    # At step 100 the title is the longest the callback draws; a narrow gallery (small images) wraps it.
    picture = hard_sample_gallery(samples(), ["two", "one", "one"], scale=scale, title=gallery_title(100))
    save_picture(picture, str(tmp_path / "hard_samples_step100.png"))
    contents = picture_contents(str(tmp_path / "hard_samples_step100.png"))
    assert_every_text_fits(contents)
    texts = [text["text"] for text in contents["texts"]]
    title_lines = texts[: next(i for i, t in enumerate(texts) if t.startswith("How hard"))]
    assert " ".join(title_lines) == gallery_title(100)  # the whole title, over as many lines as it needs
    assert title_lines[-1].endswith("kept to train on")
    said = "\n".join(texts)
    assert "how hard for the model (loss): 2.000" in said and "match with the prompt: n/a" in said
    assert "model's answer: two" in said and "the model's drawing" in said
    assert not [word for word in JARGON if word in said]


def test_curves_tell_clean_from_adversarial_and_plot_the_total_loss(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # drawn with PIL
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    callback = HardSamplePicturesCallback(every_n_steps=5)
    # The clean and the adversarial loss nearly equal, as in a run: on one axis their lines lie on each other.
    history = [
        {"step": s, "loss": 4 / s, "unigame/eps": 0.05 + 0.01 * s, "unigame/clean_loss": 2 / s,
         "unigame/adversarial_loss": 2 / s + 0.001 * s}
        for s in range(1, 6)
    ] + [{"step": 5, "eval_loss": 1.0}]  # fmt: skip
    path = callback.write_curves(history, str(tmp_path / "curves.png"))
    contents = picture_contents(path)
    assert_every_text_fits(contents)
    clean, adversarial, buffer = (label for _, label, _ in LOSS_CURVES)
    # the total loss (the console's), both losses in styles of their own, their difference, eps; no buffer loss logged
    assert contents["legend"] == ["total loss", clean, adversarial, "attacked - clean", "eps"]
    assert contents["lines"] == 5
    assert contents["styles"][clean] != contents["styles"][adversarial]
    said = "\n".join(text["text"] for text in contents["texts"])
    assert "How hard for the model (loss)" in said and "How much the attack adds" in said
    assert not [word for word in JARGON if word in said]
    with_buffer = training_curves([{**row, "unigame/buffer_loss": 1.0} for row in history])
    assert buffer in with_buffer.info["drawn"]["legend"] and with_buffer.info["drawn"]["lines"] == 6
    assert training_curves([{"step": 1, "loss": 1.0}]) is None  # no game log yet
    empty = line_plot({"eps": []}, "eps")
    assert empty.size == (520, 340) and empty.info["drawn"]["lines"] == 0


def test_a_long_title_and_legend_wrap_inside_a_plot(tmp_path):
    labels = [f"a rather long series label number {i}" for i in range(4)]
    picture = line_plot({label: [(0, i), (1, i + 1)] for i, label in enumerate(labels)}, "a title " * 12)
    save_picture(picture, str(tmp_path / "plot.png"))
    contents = picture_contents(str(tmp_path / "plot.png"))
    assert_every_text_fits(contents)
    assert contents["legend"] == labels and contents["lines"] == 4


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
    for name in pictures:  # what the callback saved says what it is, inside the picture
        assert_every_text_fits(picture_contents(str(tmp_path / "out" / "pictures" / name)))
    saved = Image.open(tmp_path / "out" / "pictures" / "hard_samples_step2.png")
    logged = accumulator.Images("unigame/hard_samples")[-1]
    assert (logged.width, logged.height) == saved.size


def test_curves_of_a_first_order_run_show_the_perturbed_loss_and_the_estimated_gain():
    # The first-order step logs no attacked loss of its own: the model's loss on its perturbed tokens and the step's
    # first-order estimate of what the attack adds stand in, so no panel is left empty (the main job runs this step).
    history = [
        {"step": s, "loss": 4 / s, "unigame/eps": 0.05, "unigame/clean_loss": 2 / s, "unigame/perturbed_loss": 3 / s,
         "unigame/adversarial_gain_estimate": 0.01 * s}
        for s in range(1, 6)
    ]  # fmt: skip
    drawn = training_curves(history).info["drawn"]
    clean, attacked, _ = (label for _, label, _ in LOSS_CURVES)
    assert drawn["legend"] == ["total loss", clean, attacked, "attacked - clean", "eps"] and drawn["lines"] == 5
    gain_only = [{k: v for k, v in row.items() if k != "unigame/perturbed_loss"} for row in history]
    drawn = training_curves(gain_only).info["drawn"]
    assert drawn["legend"] == ["total loss", clean, "first-order estimate", "eps"] and drawn["lines"] == 4
    assert "no data yet" not in [text["text"] for text in drawn["texts"]]
