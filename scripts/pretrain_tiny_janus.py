"""Pretrains the tiny digits Janus from scratch on the `train` split of the digit scans, then measures it on `test`.

Two phases, every part of `JanusForConditionalGeneration` trained:
1. the VQ tokenizer (encoder, codebook, decoder), with a straight-through cosine quantiser whose codes are stored at
   unit length, so that `encode` (raw distances) and `decode` (normalised codes) agree with training;
2. understanding ("What digit is this?", "What color is the digit?": vision encoder, aligner, LLM, text head) and
   generation (caption -> image tokens: generation embeddings, aligner and head, same LLM) jointly, with the caption
   dropped 10% of the time exactly as `JanusInterface.generate_images` builds its unconditional prompt.
Renders are drawn in the 4 ink colours and shifted by up to 1 pixel for augmentation. Deterministic for a seed.

Two worlds (`trl_unigame.digits`): `--world frame` (the first tiny model: every digit fills the 16x16 frame) and
`--world canvas` (the second: each scan is drawn `--canvas_variants` times, at a size drawn from 8 to 16 px and a
place drawn on the canvas; captions never name the size, so the generator learns to spread its drawings over it).

Usage:
    python scripts/pretrain_tiny_janus.py --output_dir trl_unigame/assets/tiny_janus_digits \
        --gallery_path docs/images/tiny_model_gallery.png
    python scripts/pretrain_tiny_janus.py --world canvas --output_dir trl_unigame/assets/tiny_janus_digits_canvas \
        --gallery_path docs/images/tiny_model_canvas_gallery.png
    # a smoke run
    python scripts/pretrain_tiny_janus.py --output_dir /tmp/tiny_janus --max_steps 20 --skip_eval
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import GenerationConfig, HfArgumentParser, JanusForConditionalGeneration

from trl_unigame.digits import (
    BACKGROUNDS,
    DIGIT_WORDS,
    DIGITS_IMAGE_SIZE,
    INK_COLORS,
    PRETRAINING_SKILLS,
    SKILL_QUESTIONS,
    WORLD_BROAD_SIZES,
    WORLD_NARROW_SIZE,
    WORLD_SIZES,
    caption,
    digits_vqa_dataset,
    load_digit_scans,
    render_scan,
    skill_answer,
    split_scan_indices,
    world_layout,
)
from trl_unigame.gallery import image_grid
from trl_unigame.interfaces.janus import JanusInterface
from trl_unigame.testing import DigitJudge, digits_janus_config, digits_janus_processor


WORLDS = ("frame", "canvas")


@dataclass
class PretrainArguments:
    output_dir: str = field(metadata={"help": "Where to write the checkpoint (config, weights, processor)."})
    world: str = field(
        default="frame",
        metadata={"help": "`frame` (digits fill the frame) or `canvas` (any size and place).", "choices": WORLDS},
    )
    canvas_variants: int = field(
        default=3, metadata={"help": "Canvas world: renders of each scan and colour, each at its own size and place."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the weights, the batches and the augmentation."})
    vq_steps: int = field(default=800, metadata={"help": "Optimizer steps of the VQ phase."})
    joint_steps: int = field(
        default=2400, metadata={"help": "Optimizer steps of the understanding + generation phase."}
    )
    max_steps: int | None = field(default=None, metadata={"help": "Caps the steps of each phase (for smoke runs)."})
    batch_size: int = field(default=64, metadata={"help": "Images per step (each phase; per loss in the joint one)."})
    vq_learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate of the VQ phase."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the joint phase."})
    digit_share: float = field(
        default=0.5, metadata={"help": "Share of understanding rows that ask the digit (the rest ask the colour)."}
    )
    generation_every: int = field(
        default=1, metadata={"help": "Train generation on every N-th step of the joint phase (understanding: every step)."}
    )
    caption_dropout: float = field(
        default=0.1, metadata={"help": "Probability of training a caption unconditionally."}
    )
    num_threads: int = field(
        default=1, metadata={"help": "CPU threads of torch (1 is fastest for these small ops when cores are shared)."}
    )
    log_file: str | None = field(default=None, metadata={"help": "JSON-lines file of the losses (every 10 steps)."})
    skip_eval: bool = field(default=False, metadata={"help": "Skip the measurement on the test split."})
    eval_scans: int | None = field(default=None, metadata={"help": "Test scans measured (all 360 by default)."})
    gallery_path: str | None = field(default=None, metadata={"help": "PNG of generated digits, one column per digit."})


def lr_at(step: int, total: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def render_training_set(world: str = "frame", variants: int = 3, seed: int = 0):
    """Every train scan in every ink colour: images `(N, 3, 16, 16)` in `[0, 1]`, digits `(N,)`, colour ids `(N,)`.
    The canvas world draws each (scan, colour) `variants` times at sizes and places drawn with `seed`."""
    scans, digits = load_digit_scans()
    rng = np.random.default_rng(seed)
    images, labels, colors = [], [], []
    for index in split_scan_indices("train"):
        for color_id, color in enumerate(INK_COLORS):
            if world == "canvas":
                sizes, places = world_layout(variants, WORLD_SIZES, rng)
                renders = [render_scan(scans[index], color, "white", p, s) for s, p in zip(sizes, places)]
            else:
                renders = [render_scan(scans[index], color)]
            images += renders
            labels += [int(digits[index])] * len(renders)
            colors += [color_id] * len(renders)
    images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return images, torch.tensor(labels), torch.tensor(colors)


def shift_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Moves each image by -1, 0 or 1 pixel on each axis, filling with the (white) background."""
    padded = F.pad(images, (1, 1, 1, 1), value=1.0)
    offsets = torch.randint(0, 3, (len(images), 2), generator=generator).tolist()
    size = images.shape[-1]
    return torch.stack([padded[i, :, y : y + size, x : x + size] for i, (y, x) in enumerate(offsets)])


class Logger:
    def __init__(self, path: str | None):
        self.file = open(path, "w") if path else None

    def log(self, record: dict, bar) -> None:
        bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if isinstance(v, float)})
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()


# ------------------------------------------------------------------------------------------------------ phase 1: VQ
def cosine_quantize(vq, latents: torch.Tensor):
    """Straight-through cosine quantisation of `(B, D, h, w)` latents; returns (quantised, codebook loss, indices)."""
    b, d, h, w = latents.shape
    z = F.normalize(latents.permute(0, 2, 3, 1).reshape(-1, d), dim=-1)
    codes = F.normalize(vq.quantize.embedding.weight, dim=-1)
    indices = (z @ codes.T).argmax(-1)
    q = codes[indices]
    loss = (q - z.detach()).pow(2).sum(-1).mean() + 0.25 * (z - q.detach()).pow(2).sum(-1).mean()
    quantised = (z + (q - z).detach()).view(b, h, w, d).permute(0, 3, 1, 2)
    return quantised, loss, indices, z


def train_vq(model, images, args, steps, generator, logger) -> None:
    vq = model.model.vqmodel
    vq.train()
    optimizer = torch.optim.AdamW(vq.parameters(), lr=args.vq_learning_rate, weight_decay=0.0)
    usage = torch.zeros(vq.quantize.num_embeddings)
    bar = tqdm(range(steps), desc="VQ")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, args.vq_learning_rate)
        batch = images[torch.randint(len(images), (args.batch_size,), generator=generator)]
        x = shift_augment(batch, generator) * 2 - 1
        quantised, codebook_loss, indices, z = cosine_quantize(vq, vq.quant_conv(vq.encoder(x)))
        recon = vq.decoder(vq.post_quant_conv(quantised))
        recon_loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        loss = recon_loss + codebook_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        usage += torch.bincount(indices, minlength=len(usage)).float()
        # Codes unused for a while restart on encoder outputs of the batch (until the last quarter of the phase).
        if (step + 1) % 50 == 0:
            dead = (usage == 0).nonzero().squeeze(-1)
            if len(dead) and step < 0.75 * steps:
                picks = torch.randint(len(z), (len(dead),), generator=generator)
                vq.quantize.embedding.weight.data[dead] = z.detach()[picks]
            usage.zero_()
        if step % 10 == 0 or step == steps - 1:
            logger.log({"phase": "vq", "step": step, "loss": loss.item(), "recon_loss": recon_loss.item()}, bar)
    # Unit-length codes: `quantize.forward` (raw distances) then picks the cosine-nearest code, as in training.
    vq.quantize.embedding.weight.data = F.normalize(vq.quantize.embedding.weight.data, dim=-1)
    vq.eval()


# --------------------------------------------------------------------------------------- phase 2: understanding + generation
class JointBatches:
    """Token templates built once through the project's interface; each step only picks rows and images."""

    def __init__(self, interface, processor, images):
        # Understanding: one template per (question, answer) of the pretraining skills.
        self.pairs = {}
        questions, answers = [], []
        for skill in PRETRAINING_SKILLS:
            for digit in range(10):
                for color in INK_COLORS:
                    key = (skill, skill_answer(skill, digit, color))
                    if key not in self.pairs:
                        self.pairs[key] = len(questions)
                        questions.append(SKILL_QUESTIONS[skill])
                        answers.append(key[1])
        templates = interface.build_understanding_inputs(images[: len(questions)], questions, answers)
        self.und = {k: templates[k] for k in ("input_ids", "attention_mask", "labels")}
        # Generation: the prompt of every caption, left-padded as `generate_images` builds it, and its unconditional twin.
        tokenizer = processor.tokenizer
        texts = [interface._chat_prompt(caption(d, c), with_image=False) for c in INK_COLORS for d in range(10)]
        enc = processor(text=texts, generation_mode="image", return_tensors="pt", padding=True, padding_side="left")
        boi_id = tokenizer.convert_tokens_to_ids(processor.image_start_token)
        keep = (enc["input_ids"] == tokenizer.bos_token_id) | (enc["input_ids"] == boi_id)
        self.cond_ids = enc["input_ids"]
        self.uncond_ids = enc["input_ids"].masked_fill(~keep, tokenizer.pad_token_id)
        self.prompt_mask = enc["attention_mask"]

    def understanding(self, skills, digits, colors):
        rows = [
            self.pairs[(s, skill_answer(s, d, c))]
            for s, d, c in zip(skills, digits.tolist(), [list(INK_COLORS)[i] for i in colors.tolist()])
        ]
        return {k: v[rows] for k, v in self.und.items()}

    def generation_prompts(self, digits, colors, drop):
        rows = colors * 10 + digits
        ids = torch.where(drop[:, None], self.uncond_ids[rows], self.cond_ids[rows])
        return ids, self.prompt_mask[rows]


def generation_loss(model, prompt_ids, prompt_mask, image_tokens) -> torch.Tensor:
    """Next-image-token cross-entropy: the prompt (ending with BOI) then the image tokens fed back as in generation."""
    embeds = torch.cat(
        [
            model.get_input_embeddings()(prompt_ids),
            model.prepare_embeddings_for_image_generation(image_tokens[:, :-1]),
        ],
        dim=1,
    )
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(image_tokens[:, :-1].shape)], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.model.language_model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    logits = model.model.generation_head(hidden[:, prompt_ids.shape[1] - 1 :]).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), image_tokens.reshape(-1))


def train_joint(model, interface, processor, data, args, steps, generator, logger) -> None:
    images, digits, colors = data
    vq = model.model.vqmodel
    with torch.no_grad():
        tokens = torch.cat([vq.encode(chunk * 2 - 1).image_tokens.view(len(chunk), -1) for chunk in images.split(512)])
    batches = JointBatches(interface, processor, images)
    model.train()
    vq.eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.01)
    bar = tqdm(range(steps), desc="understanding + generation")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, args.learning_rate)
        pick = torch.randint(len(images), (args.batch_size,), generator=generator)
        if args.digit_share == 0.5:  # the draw the frame model was trained with
            skill_ids = torch.randint(2, (len(pick),), generator=generator).tolist()
        else:
            skill_ids = (torch.rand(len(pick), generator=generator) >= args.digit_share).long().tolist()
        skills = [PRETRAINING_SKILLS[i] for i in skill_ids]
        inputs = batches.understanding(skills, digits[pick], colors[pick])
        inputs["pixel_values"] = shift_augment(images[pick], generator) * 2 - 1
        und_loss = interface.understanding_loss(model, inputs).mean()

        loss = und_loss
        if step % args.generation_every == 0:
            pick = torch.randint(len(images), (args.batch_size,), generator=generator)
            drop = torch.rand(len(pick), generator=generator) < args.caption_dropout
            prompt_ids, prompt_mask = batches.generation_prompts(digits[pick], colors[pick], drop)
            gen_loss = generation_loss(model, prompt_ids, prompt_mask, tokens[pick])
            loss = loss + gen_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 10 == 0 or step == steps - 1:
            record = {"phase": "joint", "step": step, "loss": loss.item()}
            record.update(understanding_loss=und_loss.item(), generation_loss=gen_loss.item())
            logger.log(record, bar)
    model.requires_grad_(True).eval()


# ------------------------------------------------------------------------------------------------------ evaluation
def accuracy(interface, model, dataset, batch_size: int = 60) -> float:
    correct = 0
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        predictions = interface.answer(model, rows["image"], rows["question"], max_new_tokens=3)
        correct += sum(p == a for p, a in zip(predictions, rows["answer"]))
    return correct / len(dataset)


def judged_generations(interface, model, judge, seed, max_scans, guidance_scale, temperature):
    """Draws every test caption once and judges it: `({generation_digit_accuracy, generation_color_accuracy},
    the side in pixels of each drawn digit)`."""
    captions = digits_vqa_dataset("test", skills=("digit",), seed=seed, max_scans=max_scans)
    generator = torch.Generator().manual_seed(seed)
    judged_digit, judged_color, sizes = [], [], []
    for start in range(0, len(captions), 60):
        rows = captions[start : start + 60]
        pixels = interface.generate_images(
            rows["caption"], guidance_scale=guidance_scale, temperature=temperature, generator=generator
        )
        digits, colors = judge.predict(pixels)
        judged_digit += [d == t for d, t in zip(digits, rows["digit"])]
        judged_color += [c == t for c, t in zip(colors, rows["color"])]
        sizes += judge.digit_sizes(pixels).tolist()
    judged = {
        "generation_digit_accuracy": float(np.mean(judged_digit)),
        "generation_color_accuracy": float(np.mean(judged_color)),
    }
    return judged, sizes


def evaluate_canvas(
    model, processor, seed: int = 0, max_scans: int | None = None, guidance_scale=3.0, temperature=0.7
):
    """The canvas world's premise on the test split: the old skills at the narrow setting (digits filling the frame)
    and across the broad one, and how the generator's drawings spread over digit sizes against the narrow setting's."""
    interface = JanusInterface(model, processor)
    metrics = {}
    settings = {"narrow": WORLD_NARROW_SIZE, "broad": WORLD_BROAD_SIZES, "all": WORLD_SIZES}
    for name, sizes in settings.items():
        for skill in PRETRAINING_SKILLS:
            dataset = digits_vqa_dataset("test", skills=(skill,), seed=seed, max_scans=max_scans, digit_size=sizes)
            metrics[f"test_{skill}_accuracy_{name}"] = accuracy(interface, model, dataset)
    judge = DigitJudge(size_invariant=True)
    judged, drawn_sizes = judged_generations(interface, model, judge, seed, max_scans, guidance_scale, temperature)
    metrics.update(judged)
    narrow = digits_vqa_dataset(
        "test", skills=("digit",), seed=seed, max_scans=max_scans, digit_size=WORLD_NARROW_SIZE
    )
    narrow_sizes = judge.digit_sizes(list(narrow["image"])).float()
    drawn = torch.tensor(drawn_sizes, dtype=torch.float32)
    metrics["generation_digit_size"] = {
        "drawn_mean": float(drawn.mean()),
        "drawn_std": float(drawn.std()),
        "drawn_share_at_most_12px": float((drawn <= WORLD_BROAD_SIZES[1]).float().mean()),
        "narrow_mean": float(narrow_sizes.mean()),
        "narrow_std": float(narrow_sizes.std()),
        "narrow_share_at_most_12px": float((narrow_sizes <= WORLD_BROAD_SIZES[1]).float().mean()),
        "drawn_histogram": {
            str(k): int((drawn == k).sum()) for k in range(DIGITS_IMAGE_SIZE + 1) if (drawn == k).any()
        },
    }
    return metrics


def evaluate(model, processor, seed: int = 0, max_scans: int | None = None, guidance_scale=3.0, temperature=0.7):
    """Quality on the test split: answers per skill, answers under fragile conditions, and judged generations."""
    interface = JanusInterface(model, processor)
    metrics = {}
    for skill in ("digit", "color", "after", "even"):
        dataset = digits_vqa_dataset("test", skills=(skill,), seed=seed, max_scans=max_scans)
        metrics[f"test_{skill}_accuracy"] = accuracy(interface, model, dataset)
    for shift in (1, 2):
        dataset = digits_vqa_dataset("test", skills=("digit",), seed=seed, shift=shift, max_scans=max_scans)
        metrics[f"test_digit_accuracy_shift{shift}"] = accuracy(interface, model, dataset)
    dataset = digits_vqa_dataset("test", skills=("digit",), seed=seed, background="gray", max_scans=max_scans)
    metrics["test_digit_accuracy_gray_background"] = accuracy(interface, model, dataset)

    metrics.update(judged_generations(interface, model, DigitJudge(), seed, max_scans, guidance_scale, temperature)[0])
    return metrics


def draw_gallery(model, processor, path: str, seed: int = 0, samples_per_color: int = 1) -> None:
    """One column per digit, one row per ink colour (and sample), generated at guidance 3 / temperature 0.7."""
    interface = JanusInterface(model, processor)
    prompts = [caption(d, c) for c in INK_COLORS for _ in range(samples_per_color) for d in range(10)]
    pixels = interface.generate_images(
        prompts, guidance_scale=3.0, temperature=0.7, generator=torch.Generator().manual_seed(seed)
    )
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    image_grid(list(pixels), num_columns=10, scale=4, labels=[DIGIT_WORDS[d] for d in range(10)] * 4).save(path)


def main(args: PretrainArguments) -> dict:
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    vq_steps, joint_steps = args.vq_steps, args.joint_steps
    if args.max_steps is not None:
        vq_steps, joint_steps = min(vq_steps, args.max_steps), min(joint_steps, args.max_steps)
    assert BACKGROUNDS["white"] == (255, 255, 255), "the augmentation pads with a white background"

    os.makedirs(args.output_dir, exist_ok=True)
    processor = digits_janus_processor(args.output_dir)
    tokenizer = processor.tokenizer
    config = digits_janus_config(len(tokenizer), tokenizer.convert_tokens_to_ids(processor.image_token))
    model = JanusForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        generation_kwargs={"boi_token_id": tokenizer.convert_tokens_to_ids(processor.image_start_token)},
        # How this model draws best (docs/tiny_model.md): image generation reads these when the caller gives none.
        do_sample=True,
        guidance_scale=3.0,
        temperature=0.7,
    )
    interface = JanusInterface(model, processor)
    data = render_training_set(args.world, args.canvas_variants, args.seed)
    logger = Logger(args.log_file)
    start = time.time()
    train_vq(model, data[0], args, vq_steps, generator, logger)
    vq_time = time.time() - start
    train_joint(model, interface, processor, data, args, joint_steps, generator, logger)
    train_time = time.time() - start
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    print(f"Trained in {train_time:.0f} s (VQ {vq_time:.0f} s); saved to {args.output_dir}")

    metrics = {"train_seconds": round(train_time, 1), "vq_steps": vq_steps, "joint_steps": joint_steps}
    if not args.skip_eval:
        measure = evaluate_canvas if args.world == "canvas" else evaluate
        metrics.update(measure(model, processor, seed=args.seed, max_scans=args.eval_scans))
        metrics["world"] = args.world
        with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        print(json.dumps(metrics, indent=2))
    if args.gallery_path:
        draw_gallery(model, processor, args.gallery_path, seed=args.seed)
    return metrics


if __name__ == "__main__":
    (arguments,) = HfArgumentParser(PretrainArguments).parse_args_into_dataclasses()
    main(arguments)
