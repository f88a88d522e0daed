# Copyright 2026 The trl-unigame authors. Licensed under the Apache License, Version 2.0.
"""
Does the generation-side adversary (`generation_adversary="reinforce"`) make mining find harder candidates that are
still faithful? On the pretrained tiny digits Janus, the trainer runs a fixed number of steps with U frozen
(learning rate 0, buffer weight 0: every round mines from the same U), mining every step with the digit judge as the
consistency scorer, once per setting (`--settings`: `off`, the option with the `gated` reward, with the `faithful`
one; default `off faithful`), from the same seed on the same rows; `--set KEY=VALUE` changes config fields for every
setting (e.g. the generation budget). Every mined candidate is recorded (through the scorer), and afterwards:

- the mean hardness `H` of the kept candidates (the buffer, which keeps them all), and of the faithful candidates
  over the run and over its second half (`unigame/faithful_hardness`, step by step in the report);
- the share of all mined candidates, and of the kept ones, that are faithful (judge score at least
  `consistency_threshold`) and that U misreads (its greedy answer to "What digit is this?" is not the named digit);
- the diversity of the kept candidates against the training scans: per digit, how far the mean ink centroid of the
  kept candidates lies from that of the training scans (offset, scan pixels), how widely their centroids scatter
  (centroid dispersion: RMS distance from their own mean), and their mean ink spread, beside the same for the scans.

```bash
python benchmarks/generation_adversary.py --output_json generation_adversary.json            # 40 steps per setting
python benchmarks/generation_adversary.py --steps 150 --settings off gated faithful \
    --set perturber_generation_eps_max=0.2 --output_json generation_adversary_20.json       # the docs' 20% runs
python benchmarks/generation_adversary.py --steps 3 --output_json smoke.json                # a smoke run
```
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from effect import COMMON, LORA, UNIGAME  # noqa: E402


# The game scaled to the tiny digits model, as the effect benchmark plays it (docs/benchmarks.md), with U frozen
# (learning rate 0, no buffer loss; a buffer that keeps every candidate, never aged out) and a log every step.
SETTINGS = dict(
    {**COMMON, **UNIGAME},
    learning_rate=0.0,
    logging_steps=1,
    generation_loss_weight=0.0,
    buffer_weight=0.0,
    buffer_capacity=100_000,
    buffer_max_age=None,
)
SETTINGS.pop("max_steps")
SETTINGS_BY_NAME = {
    "off": dict(generation_adversary="none"),
    "gated": dict(generation_adversary="reinforce", generation_adversary_reward="gated"),
    "faithful": dict(generation_adversary="reinforce", generation_adversary_reward="faithful"),
}


class RecordingJudge:
    """The digit judge as the trainer's consistency scorer, keeping every candidate it scores (pixels as uint8,
    prompt, score)."""

    def __init__(self, judge):
        self.judge = judge
        self.pixels, self.texts, self.scores = [], [], []

    def __call__(self, images, texts):
        scores = self.judge(images, texts)
        self.pixels.append((images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu())
        self.texts += list(texts)
        self.scores.append(scores)
        return scores


def named_digit(text: str) -> int:
    from trl_unigame.digits import DIGIT_WORDS

    words = text.lower().split()
    return next(d for d, w in enumerate(DIGIT_WORDS) if w in words)


def misread(interface, model, pixels: torch.Tensor, digits: list[int]) -> np.ndarray:
    """Whether U's greedy answer to the digit question is not the named digit, per image."""
    from trl_unigame.digits import DIGIT_WORDS, SKILL_QUESTIONS

    wrong = []
    for start in range(0, len(pixels), 64):
        chunk = pixels[start : start + 64]
        answers = interface.answer(model, chunk.float() / 255, [SKILL_QUESTIONS["digit"]] * len(chunk), 4)
        wrong += [a.strip().lower() != DIGIT_WORDS[d] for a, d in zip(answers, digits[start : start + 64])]
    return np.asarray(wrong, dtype=bool)


def diversity(kept_scans, kept_digits, train_scans, train_digits) -> dict[str, float]:
    """Per digit present among the kept candidates, then averaged: the offset of their mean ink centroid from the
    training scans', the dispersion of their centroids and of the scans', and their mean ink spread and the scans'."""
    from trl_unigame.digits import ink_statistics

    kept_c, kept_s = ink_statistics(kept_scans)
    train_c, train_s = ink_statistics(train_scans)
    rows = []
    for d in sorted(set(kept_digits.tolist())):
        k, t = kept_digits == d, train_digits == d
        kc, tc = kept_c[k], train_c[t]
        rows.append(
            (
                float(np.linalg.norm(kc.mean(0) - tc.mean(0))),
                float(np.sqrt(((kc - kc.mean(0)) ** 2).sum(1).mean())),
                float(np.sqrt(((tc - tc.mean(0)) ** 2).sum(1).mean())),
                float(kept_s[k].mean()),
                float(train_s[t].mean()),
            )
        )
    if not rows:
        return {}
    names = ("centroid_offset", "centroid_dispersion", "train_centroid_dispersion", "ink_spread", "train_ink_spread")
    return {name: float(np.mean([r[i] for r in rows])) for i, name in enumerate(names)} | {"digits": len(rows)}


def run(name: str, args, judge, dataset) -> dict:
    from peft import LoraConfig
    from transformers import PrinterCallback

    from trl_unigame import UniGameConfig, UniGameTrainer
    from trl_unigame.digits import load_digit_scans, split_scan_indices
    from trl_unigame.testing import pretrained_tiny_janus

    model, processor = pretrained_tiny_janus()
    recorder = RecordingJudge(judge)
    with tempfile.TemporaryDirectory() as output_dir:
        config = UniGameConfig(
            output_dir=output_dir,
            max_steps=args.steps,
            seed=args.seed,
            data_seed=args.seed,
            **{
                **SETTINGS,
                "per_device_train_batch_size": args.batch_size,
                "num_candidates": args.num_candidates,
                **SETTINGS_BY_NAME[name],
                **args.set,
            },
        )
        trainer = UniGameTrainer(
            model,
            config,
            train_dataset=dataset,
            processing_class=processor,
            peft_config=LoraConfig(**LORA),
            consistency_scorer=recorder,
        )
        trainer.remove_callback(PrinterCallback)  # the logs are read back below, not printed
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    model = trainer.model.eval()
    interface = trainer.interface
    threshold = config.consistency_threshold
    pixels, scores = torch.cat(recorder.pixels), torch.cat(recorder.scores)
    digits = [named_digit(t) for t in recorder.texts]
    with trainer.perturber.disabled():
        wrong = misread(interface, model, pixels, digits)
    faithful = scores.numpy() >= threshold
    kept = trainer.buffer.entries
    kept_pixels = torch.stack([e.image for e in kept]) if kept else torch.zeros(0, 3, 16, 16, dtype=torch.uint8)
    kept_digits = np.asarray([named_digit(e.row["prompt"]) for e in kept], dtype=np.int64)
    kept_faithful = np.asarray([e.consistency is not None and e.consistency >= threshold for e in kept], dtype=bool)
    with trainer.perturber.disabled():
        kept_wrong = misread(interface, model, kept_pixels, kept_digits.tolist()) if kept else np.zeros(0, bool)
    scans, labels = load_digit_scans()
    train = split_scan_indices("train")
    kept_scans = judge.read(kept_pixels)[0] if kept else np.zeros((0, 8, 8))
    logs = [log for log in trainer.state.log_history if "unigame/mined" in log]
    faithful_h = [log["unigame/faithful_hardness"] for log in logs if "unigame/faithful_hardness" in log]
    return {
        "setting": name,
        "steps": args.steps,
        "seconds": seconds,
        "seconds_per_step": seconds / args.steps,
        "mined": len(digits),
        "kept": len(kept),
        "kept_hardness": float(np.mean([e.hardness for e in kept])) if kept else float("nan"),
        "faithful_fraction": float(faithful.mean()),
        "faithful_and_misread_fraction": float((faithful & wrong).mean()),
        "kept_faithful_and_misread_fraction": float((kept_faithful & kept_wrong).mean()) if kept else float("nan"),
        "diversity": diversity(kept_scans, kept_digits, scans[train], labels[train]) if kept else {},
        "faithful_hardness": float(np.mean(faithful_h)) if faithful_h else float("nan"),
        "faithful_hardness_by_step": faithful_h,
        "faithful_hardness_late": float(np.mean(faithful_h[len(faithful_h) // 2 :])) if faithful_h else float("nan"),
        "generation_eps_last": logs[-1].get("unigame/generation_eps") if logs else None,
        "generation_reward_mean": float(np.mean([log.get("unigame/generation_reward_mean", np.nan) for log in logs]))
        if logs
        else None,
    }


def _parse_setting(item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep:
        raise SystemExit(f"--set takes KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv=None):
    from trl_unigame.digits import digits_vqa_dataset
    from trl_unigame.testing import DigitJudge

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_candidates", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", nargs="+", default=["off", "faithful"], choices=list(SETTINGS_BY_NAME))
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="UniGameConfig fields for every setting, e.g. perturber_generation_eps_max=0.2 (values read as JSON).",
    )
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)
    args.set = dict(_parse_setting(item) for item in args.set)

    judge = DigitJudge()
    dataset = digits_vqa_dataset("train", skills=("digit",), seed=args.seed)
    results = [run(name, args, judge, dataset) for name in args.settings]
    header = (
        f"{'setting':>8} {'s/step':>7} {'mined':>6} {'kept':>5} {'kept H':>7} {'faithful':>8} {'F&misread':>9} "
        f"{'kept F&M':>8} {'F H':>6} {'F H late':>8} {'offset':>7} {'disp':>6} {'(scans)':>7} {'spread':>6} {'(scans)':>7}"
    )
    print(f"{args.steps} steps per setting, batch {args.batch_size}, K {args.num_candidates}, U frozen; CPU")
    print(header)
    for r in results:
        d = r["diversity"]
        print(
            f"{r['setting']:>8} {r['seconds_per_step']:>7.2f} {r['mined']:>6} {r['kept']:>5} "
            f"{r['kept_hardness']:>7.3f} {r['faithful_fraction']:>8.1%} {r['faithful_and_misread_fraction']:>9.1%} "
            f"{r['kept_faithful_and_misread_fraction']:>8.1%} {r['faithful_hardness']:>6.3f} "
            f"{r['faithful_hardness_late']:>8.3f} {d.get('centroid_offset', float('nan')):>7.3f} "
            f"{d.get('centroid_dispersion', float('nan')):>6.3f} {d.get('train_centroid_dispersion', float('nan')):>7.3f} "
            f"{d.get('ink_spread', float('nan')):>6.3f} {d.get('train_ink_spread', float('nan')):>7.3f}"
        )
    report = {"args": vars(args), "settings": SETTINGS, "results": results}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
