# Copyright 2026 The trl-unigame authors. Licensed under the Apache License, Version 2.0.
"""
Mining on a smaller token grid (`mining_image_size`): what it saves and what it costs in the candidates' quality.
On the pretrained tiny digits Janus (4 x 4 image tokens, 16 px), every caption of the digits task ("a red seven")
is drawn at each grid size with the mining settings of the effect benchmark (guidance 3, temperature 0.7, perturber
off), timed, and read back by the independent digit judge.

```bash
python benchmarks/mining_grid.py --output_json mining_grid.json     # about a minute on 2 CPU cores
```

Prints, per image size: tokens per image, seconds per image, speed-up over the model's own size, and the share of
images the judge reads as the captioned digit and as the captioned colour (both, and the mean consistency score).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv=None):
    from trl_unigame import get_interface
    from trl_unigame.digits import DIGIT_WORDS, INK_COLORS, caption
    from trl_unigame.testing import DigitJudge, pretrained_tiny_janus

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images_per_caption", type=int, default=6)
    parser.add_argument("--sizes", nargs="+", type=int, default=None, help="Image sides in pixels (default: all).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)

    model, processor = pretrained_tiny_janus()
    model.eval()
    interface = get_interface(model, processor)
    judge = DigitJudge()
    native = interface.generation_grid()
    factor = interface.image_size // native
    sizes = args.sizes or [grid * factor for grid in range(native, 1, -1)]
    captions = [caption(d, c) for d in range(len(DIGIT_WORDS)) for c in INK_COLORS]
    texts = [c for c in captions for _ in range(args.images_per_caption)]
    rows = []
    for size in sizes:
        generator = torch.Generator().manual_seed(args.seed)
        interface.generate_images(captions[:2], guidance_scale=3.0, temperature=0.7, image_size=size)  # warm-up
        start = time.perf_counter()
        with torch.no_grad():
            pixels = interface.generate_images(
                captions,
                num_images=args.images_per_caption,
                guidance_scale=3.0,
                temperature=0.7,
                generator=generator,
                image_size=size,
            )
        seconds = (time.perf_counter() - start) / len(texts)
        digits, colors = judge.predict(pixels)
        digit_ok = [DIGIT_WORDS[d] in t.split() for d, t in zip(digits, texts)]
        color_ok = [c in t.split() for c, t in zip(colors, texts)]
        rows.append(
            {
                "image_size": size,
                "tokens": interface.generation_grid(size) ** 2,
                "seconds_per_image": seconds,
                "digit_judged_right": sum(digit_ok) / len(texts),
                "color_judged_right": sum(color_ok) / len(texts),
                "both_right": sum(a and b for a, b in zip(digit_ok, color_ok)) / len(texts),
                "mean_consistency": float(judge(pixels, texts).mean()),
                "output_shape": list(pixels.shape[1:]),
            }
        )
    base = rows[0]["seconds_per_image"]
    print(f"{len(texts)} images per size ({len(captions)} captions x {args.images_per_caption}); CPU")
    print(
        f"{'size (px)':>9} {'tokens':>6} {'ms/image':>9} {'speed-up':>8} {'digit':>6} {'colour':>6} {'both':>6} {'score':>6}"
    )
    for r in rows:
        print(
            f"{r['image_size']:>9} {r['tokens']:>6} {1e3 * r['seconds_per_image']:>9.2f} "
            f"{base / r['seconds_per_image']:>7.2f}x {100 * r['digit_judged_right']:>5.1f}% "
            f"{100 * r['color_judged_right']:>5.1f}% {100 * r['both_right']:>5.1f}% {r['mean_consistency']:>6.3f}"
        )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
