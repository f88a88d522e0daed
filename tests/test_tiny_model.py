"""The digits data, its judge and the pretrained tiny Janus shipped in the package."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from trl_unigame.digits import (
    DIGIT_WORDS,
    FINE_TUNING_SKILLS,
    INK_COLORS,
    PRETRAINING_SKILLS,
    SKILL_QUESTIONS,
    caption,
    digits_corpus,
    load_digit_scans,
    render_scan,
    split_scan_indices,
)
from trl_unigame.interfaces import get_interface
from trl_unigame.testing import DigitJudge, digits_vqa_dataset, pretrained_tiny_janus, pretrained_tiny_janus_path


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pixels(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def judge():
    return DigitJudge()


@pytest.fixture(scope="module")
def pretrained():
    model, processor = pretrained_tiny_janus()
    return model, get_interface(model, processor)


# ---------------------------------------------------------------------------------------------------------- data
def test_splits_are_fixed_disjoint_and_cover_every_scan():
    splits = {name: split_scan_indices(name) for name in ("train", "validation", "test")}
    assert [len(splits[n]) for n in ("train", "validation", "test")] == [1257, 180, 360]
    union = np.concatenate(list(splits.values()))
    assert len(np.unique(union)) == len(union) == len(load_digit_scans()[1])
    assert np.array_equal(split_scan_indices("test"), splits["test"])


def test_dataset_columns_determinism_and_answers():
    dataset = digits_vqa_dataset("validation", skills=("digit", "color", "after", "even"), seed=3, max_scans=10)
    assert {"image", "question", "answer", "caption", "digit", "color", "scan_index", "skill"} <= set(
        dataset.column_names
    )
    assert len(dataset) == 40
    assert set(dataset["scan_index"]) <= set(split_scan_indices("validation").tolist())
    again = digits_vqa_dataset("validation", skills=("digit", "color", "after", "even"), seed=3, max_scans=10)
    assert dataset["color"] == again["color"]
    assert torch.equal(_pixels(dataset["image"]), _pixels(again["image"]))
    for row in dataset:
        d, word = row["digit"], DIGIT_WORDS[row["digit"]]
        expected = {"digit": word, "color": row["color"], "after": DIGIT_WORDS[(d + 1) % 10]}
        expected["even"] = "yes" if d % 2 == 0 else "no"
        assert row["answer"] == expected[row["skill"]]
        assert row["question"] == SKILL_QUESTIONS[row["skill"]]
        assert row["caption"] == caption(d, row["color"])
    assert set(PRETRAINING_SKILLS).isdisjoint(FINE_TUNING_SKILLS)


def test_every_color_renders_each_scan_once_per_ink(judge):
    one = digits_vqa_dataset("test", skills=("digit", "after"), seed=1, max_scans=6)
    every = digits_vqa_dataset("test", skills=("digit", "after"), seed=1, max_scans=6, every_color=True)
    assert len(every) == 4 * len(one)
    scans = split_scan_indices("test")[:6].tolist()
    # Each scan once per colour and skill, scans in split order, colours in INK_COLORS order.
    assert every["scan_index"][::2] == [s for s in scans for _ in INK_COLORS]
    assert every["color"][::2] == list(INK_COLORS) * 6
    assert every["caption"][::2] == [caption(d, c) for d, c in zip(every["digit"][::2], every["color"][::2])]
    # The colour really is the ink: the judge reads it back.
    assert judge.predict(every["image"][::2])[1] == every["color"][::2]
    # Every render of a scan in colour c equals the seeded row that drew colour c for it.
    for row in one.select(range(0, len(one), 2)):
        k = 2 * (4 * scans.index(row["scan_index"]) + list(INK_COLORS).index(row["color"]))
        assert np.array_equal(np.asarray(every[k]["image"]), np.asarray(row["image"]))


def test_render_downsamples_to_the_scan_and_shift_moves_pixels():
    scans, _ = load_digit_scans()
    scan = scans[split_scan_indices("test")[0]]
    image = render_scan(scan, "blue").astype(np.float32)
    ink = (255 - image[..., 0]) / (255 - INK_COLORS["blue"][0])  # red channel: white -> blue ink
    down = ink.reshape(8, 2, 8, 2).mean(axis=(1, 3)) * 16
    assert np.abs(down - scan).max() < 0.1
    plain = _pixels(digits_vqa_dataset("test", skills=("digit",), max_scans=20)["image"])
    shifted = digits_vqa_dataset("test", skills=("digit",), shift=2, max_scans=20)
    assert shifted["answer"] == digits_vqa_dataset("test", skills=("digit",), max_scans=20)["answer"]
    changed = (_pixels(shifted["image"]) - plain).abs().flatten(1).amax(1) > 0.1
    assert changed.all()
    gray = _pixels(digits_vqa_dataset("test", skills=("digit",), background="gray", max_scans=2)["image"])
    assert (gray[:, :, 0, 0] - 160 / 255).abs().max() < 1e-6  # a corner is background


def test_processor_knows_every_word_of_every_skill(pretrained):
    tokenizer = pretrained[1].processor.tokenizer
    for line in digits_corpus():
        assert tokenizer.unk_token_id not in tokenizer(line, add_special_tokens=False)["input_ids"], line


# ---------------------------------------------------------------------------------------------------------- judge
def test_judge_scores_a_real_render_by_its_caption(judge):
    rows = digits_vqa_dataset("test", skills=("digit",), max_scans=30)
    pixels = _pixels(rows["image"])
    right = judge(pixels, rows["caption"])
    wrong_digit = judge(pixels, [caption((d + 3) % 10, c) for d, c in zip(rows["digit"], rows["color"])])
    other = {c: next(o for o in INK_COLORS if o != c) for c in INK_COLORS}
    wrong_color = judge(pixels, [caption(d, other[c]) for d, c in zip(rows["digit"], rows["color"])])
    assert right.shape == (30,) and right.median() > 0.8
    assert wrong_digit.median() < 0.1 and (right > wrong_digit).float().mean() >= 0.9
    assert (wrong_color == 0).all()
    digits, colors = judge.predict(rows["image"])  # PIL images are accepted too
    assert np.mean(np.array(digits) == np.array(rows["digit"])) >= 0.9 and colors == rows["color"]


# ---------------------------------------------------------------------------------------------------------- model
def test_pretrained_model_loads_and_answers_test_rows(pretrained):
    model, interface = pretrained
    assert os.path.isfile(os.path.join(pretrained_tiny_janus_path(), "model.safetensors"))
    assert not model.training
    rows = digits_vqa_dataset("test", skills=("digit",), max_scans=50)
    answers = interface.answer(model, rows["image"], rows["question"], max_new_tokens=3)
    assert np.mean([a == t for a, t in zip(answers, rows["answer"])]) >= 0.8
    colors = digits_vqa_dataset("test", skills=("color",), max_scans=20)
    answers = interface.answer(model, colors["image"], colors["question"], max_new_tokens=3)
    assert np.mean([a == t for a, t in zip(answers, colors["answer"])]) >= 0.9


def test_pretrained_model_generates_what_the_caption_says(pretrained, judge):
    model, interface = pretrained
    named = [(d, list(INK_COLORS)[(d + k) % 4]) for k in range(2) for d in range(10)]
    captions = [caption(d, c) for d, c in named]
    pixels = interface.generate_images(
        captions, guidance_scale=3.0, temperature=0.7, generator=torch.Generator().manual_seed(0)
    )
    assert pixels.shape == (20, 3, 16, 16)
    digits, colors = judge.predict(pixels)
    assert sum(d == t for d, (t, _) in zip(digits, named)) >= 14
    assert sum(c == t for c, (_, t) in zip(colors, named)) >= 16
    assert (judge(pixels, captions) > 0.5).float().mean() >= 0.6


def test_gallery_helpers_draw_with_pil():
    from trl_unigame.buffer import HardSample
    from trl_unigame.gallery import hard_sample_gallery, image_grid

    images = torch.rand(12, 3, 16, 16)
    grid = image_grid(list(images), num_columns=5, scale=2, labels=[str(i) for i in range(12)])
    assert grid.width > 5 * 32 and grid.height > 3 * 32
    uint8 = (images[:2] * 255).to(torch.uint8)
    samples = [
        HardSample(uint8[i], {"question": "What digit is this?", "answer": "one"}, 1.5, extra={"source": uint8[1 - i]})
        for i in range(2)
    ]
    gallery = hard_sample_gallery(samples, predictions=["two", "one"], scale=4)
    assert gallery.height >= 2 * 64 and gallery.mode == "RGB"


# ---------------------------------------------------------------------------------------------------------- script
@pytest.mark.slow
def test_pretraining_script_runs_and_its_losses_fall(tmp_path):
    log = tmp_path / "log.jsonl"
    env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    command = [sys.executable, os.path.join(REPO, "scripts", "pretrain_tiny_janus.py"), "--output_dir", str(tmp_path)]
    command += ["--max_steps", "30", "--batch_size", "32", "--skip_eval", "--num_threads", "1", "--log_file", str(log)]
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=600)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    for phase in ("vq", "joint"):
        losses = [r["loss"] for r in records if r["phase"] == phase]
        assert losses[-1] < 0.8 * losses[0], (phase, losses)
    from transformers import JanusForConditionalGeneration, JanusProcessor

    model = JanusForConditionalGeneration.from_pretrained(str(tmp_path))
    processor = JanusProcessor.from_pretrained(str(tmp_path))
    assert model.config.vq_config.num_embeddings == 256 and processor.tokenizer.unk_token_id is not None


def test_a_trained_perturber_raises_the_loss_of_a_model_that_answers_right(pretrained):
    from trl_unigame import Perturber

    model, interface = pretrained
    rows = digits_vqa_dataset("test", skills=("digit",), max_scans=16)
    inputs = interface.build_understanding_inputs(rows["image"], rows["question"], rows["answer"])
    perturber = Perturber.for_model(model, budget="relative", eps_max=0.1, eps_init=0.05, sites=["understanding"])
    perturber.attach(model)
    optimizer = torch.optim.Adam(perturber.parameters(), lr=1e-2)
    try:
        with perturber.disabled(), torch.no_grad():
            clean = interface.understanding_loss(model, inputs).mean().item()
        with torch.no_grad():
            untrained = interface.understanding_loss(model, inputs).mean().item()
        for _ in range(20):
            optimizer.zero_grad()
            (-interface.understanding_loss(model, inputs).mean()).backward()
            optimizer.step()
        with torch.no_grad():
            trained = interface.understanding_loss(model, inputs).mean().item()
    finally:
        perturber.detach()
        model.zero_grad(set_to_none=True)
    assert clean < 0.5  # the model answers these held-out scans
    assert trained > 2 * max(untrained, clean)


def test_mining_on_the_pretrained_model_keeps_candidates_that_look_like_their_captions(tmp_path, pretrained, judge):
    from peft import LoraConfig

    from trl_unigame import UniGameConfig, UniGameTrainer

    model, processor = pretrained_tiny_janus()
    args = UniGameConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        max_steps=2,
        per_device_train_batch_size=8,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        consistency_model=None,
        consistency_threshold=0.9,
        hardness_quantile=0.0,
        perturber_budget="relative",
        perturber_eps_max=0.1,
        perturber_eps_init=0.05,
        perturber_generation_eps_max=0.05,
        generation_guidance_scale=3.0,
        generation_temperature=0.7,
    )
    trainer = UniGameTrainer(
        model,
        args,
        train_dataset=digits_vqa_dataset("train", skills=("after",), max_scans=32),
        processing_class=processor,
        peft_config=LoraConfig(r=8, lora_alpha=16),
        consistency_scorer=judge,
    )
    trainer.train()
    entries = trainer.buffer.entries
    assert entries and all(e.consistency >= 0.9 for e in entries)
    rescored = judge(torch.stack([e.image for e in entries]), [e.row["prompt"] for e in entries])
    assert (rescored >= 0.9).float().mean() >= 0.9  # the judge, asked again, sees the captioned digit and colour


def test_a_gradient_reading_perturber_attacks_fresh_scans_far_harder(pretrained):
    from trl_unigame import Perturber
    from trl_unigame.game.adversary import SiteCapture

    model, interface = pretrained
    rows = digits_vqa_dataset("test", skills=("digit",), max_scans=32)
    train, fresh = (
        interface.build_understanding_inputs(part["image"], part["question"], part["answer"])
        for part in (rows.select(range(16)), rows.select(range(16, 32)))
    )

    def loss(inputs):
        return interface.understanding_loss(model, inputs).mean()

    rises = {}
    for mode in ("features", "features_and_gradient"):
        torch.manual_seed(0)
        perturber = Perturber.for_model(
            model, budget="relative", eps_max=0.1, eps_init=0.05, sites=["understanding"], inputs=mode
        ).attach(model)

        def gradient(inputs, perturber=perturber):  # U's loss gradient at the clean tokens, as the trainer gives it
            with perturber.disabled(), SiteCapture(interface) as capture, capture.recording():
                return capture.site_gradient(loss(inputs)) if perturber.sees_gradient else None

        optimizer = torch.optim.Adam(perturber.parameters(), lr=1e-2)
        try:
            for _ in range(20):  # the perturber alone learns, on the training scans
                optimizer.zero_grad()
                with perturber.gradients(understanding=gradient(train)):
                    (-loss(train)).backward()
                optimizer.step()
            with torch.no_grad(), perturber.disabled():
                clean = loss(fresh).item()
            g = gradient(fresh)
            with torch.no_grad(), perturber.gradients(understanding=g):
                rises[mode] = loss(fresh).item() - clean
        finally:
            perturber.detach()
            model.zero_grad(set_to_none=True)
    # On scans it never trained on, the per-token perturber barely moves the loss; reading the gradient, it attacks.
    assert rises["features_and_gradient"] > 3 * max(rises["features"], 0.01), rises


def test_answering_does_not_warn_about_generation_lengths(pretrained, caplog):
    import logging

    from transformers.utils import logging as hf_logging

    model, interface = pretrained
    rows = digits_vqa_dataset("test", skills=("digit",), max_scans=4)
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            answers = interface.answer(model, list(rows["image"]), list(rows["question"]), max_new_tokens=3)
    finally:
        hf_logging.disable_propagation()
    assert not [r for r in caplog.records if "max_new_tokens" in r.getMessage()]
    assert len(answers) == 4
