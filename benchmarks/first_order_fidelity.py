# Copyright 2026 The trl-unigame authors. Licensed under the Apache License, Version 2.0.
"""
How good is the first-order perturber step over a real training run? On the pretrained tiny digits Janus, with the
effect benchmark's UniGame settings, the game is trained twice on the same rows, once with
`perturber_update="first_order"` and once with `"exact"`. Every `--probe_every` steps, on that step's batch (model in
eval mode, perturber as it stands), the probe computes:

- the exact perturber gradient (a forward and backward with the perturbation active) and the first-order one
  (`<g, delta(z)>` with `g` the clean loss's gradient at the visual tokens), and their cosine;
- the clean loss, the exact adversarial loss, and the first-order estimate of the gap (`<g, delta(z)>`).

```bash
python benchmarks/first_order_fidelity.py --output_json first_order.json      # about 6 minutes on 2 CPU cores
```

The probe restores the RNG state it used, so each run follows the same trajectory as an unprobed one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from effect import COMMON, LORA, METHODS, TRAIN_SKILLS  # noqa: E402


def make_trainer_class():
    from trl_unigame import UniGameTrainer

    class ProbedTrainer(UniGameTrainer):
        """A `UniGameTrainer` that compares the two perturber gradients on the batch of every `probe_every`-th step."""

        probe_every = 25
        probes: list

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.state.global_step % self.probe_every == 0:
                self.probes.append(self._probe(model, {k: v for k, v in inputs.items() if k != "unigame_rows"}))
            return super().training_step(model, inputs, num_items_in_batch)

        def _probe(self, model, inputs):
            unwrapped = self.accelerator.unwrap_model(model)
            inputs = self._prepare_inputs(inputs)
            rng = torch.get_rng_state()
            was_training = unwrapped.training
            unwrapped.eval()
            captured = []

            def keep(module, args, output):
                if captured:
                    return None
                leaf = output.detach().requires_grad_(True)
                captured.append(leaf)
                return leaf

            params = list(self.perturber.parameters())
            try:
                handle = self.interface.understanding_site.register_forward_hook(keep)
                with self.perturber.disabled():
                    clean = self.interface.understanding_loss(unwrapped, inputs).mean()
                handle.remove()
                tokens = captured[0]
                (g,) = torch.autograd.grad(clean, tokens)
                delta = self.perturber.delta(tokens.detach(), "understanding")
                gain = (g * delta).sum()
                first_order = torch.autograd.grad(gain, params, allow_unused=True)
                with self.perturber.active():
                    adversarial = self.interface.understanding_loss(unwrapped, inputs).mean()
                exact = torch.autograd.grad(adversarial, params, allow_unused=True)
            finally:
                unwrapped.train(was_training)
                torch.set_rng_state(rng)

            def flat(grads):
                return torch.cat(
                    [(gr if gr is not None else torch.zeros_like(p)).flatten() for gr, p in zip(grads, params)]
                )

            a, b = flat(first_order), flat(exact)
            return {
                "step": self.state.global_step,
                "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
                "norm_ratio": float(a.norm() / b.norm().clamp(min=1e-30)),
                "clean_loss": float(clean),
                "adversarial_loss": float(adversarial),
                "estimated_gap": float(gain),
                "delta_norm": float(delta.detach().norm(dim=-1).mean()),
                "token_norm": float(tokens.detach().norm(dim=-1).median()),
            }

    return ProbedTrainer


def run(mode: str, args, train_dataset, judge) -> list[dict]:
    from peft import LoraConfig

    from trl_unigame import UniGameConfig
    from trl_unigame.testing import pretrained_tiny_janus

    model, processor = pretrained_tiny_janus()
    settings = {**COMMON, **METHODS["unigame"], "perturber_update": mode, "max_steps": args.max_steps}
    config = UniGameConfig(
        output_dir=os.path.join(args.output_dir, mode), seed=args.seed, data_seed=args.seed, **settings
    )
    trainer_class = make_trainer_class()
    trainer = trainer_class(
        model,
        config,
        train_dataset=train_dataset,
        processing_class=processor,
        peft_config=LoraConfig(**LORA),
        consistency_scorer=judge,
    )
    trainer.probe_every, trainer.probes = args.probe_every, []
    trainer.train()
    return trainer.probes


def main(argv=None):
    from trl_unigame.testing import DigitJudge, digits_vqa_dataset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_steps", type=int, default=COMMON["max_steps"])
    parser.add_argument("--probe_every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="/tmp/unigame-first-order")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)
    train = digits_vqa_dataset("train", skills=TRAIN_SKILLS, seed=0).shuffle(seed=0)
    judge = DigitJudge()
    results = {mode: run(mode, args, train, judge) for mode in ("first_order", "exact")}
    print(
        f"{'mode':<12} {'step':>5} {'cosine':>7} {'|fo|/|ex|':>9} {'clean':>7} {'adv':>7} {'gap':>8} {'est. gap':>8}"
    )
    for mode, probes in results.items():
        for p in probes:
            print(
                f"{mode:<12} {p['step']:>5} {p['cosine']:>7.3f} {p['norm_ratio']:>9.3f} {p['clean_loss']:>7.3f} "
                f"{p['adversarial_loss']:>7.3f} {p['adversarial_loss'] - p['clean_loss']:>8.4f} "
                f"{p['estimated_gap']:>8.4f}"
            )
    summary = {}
    for mode, probes in results.items():
        trained = probes[1:] or probes  # step 0 is the untrained perturber, the same in both runs
        summary[mode] = {
            "mean_cosine": statistics.mean(p["cosine"] for p in trained),
            "min_cosine": min(p["cosine"] for p in trained),
            "mean_gap": statistics.mean(p["adversarial_loss"] - p["clean_loss"] for p in trained),
            "mean_relative_gap": statistics.mean(
                (p["adversarial_loss"] - p["clean_loss"]) / max(p["clean_loss"], 1e-12) for p in trained
            ),
        }
        s = summary[mode]
        print(
            f"{mode}: cosine mean {s['mean_cosine']:.3f} (min {s['min_cosine']:.3f}); adversarial - clean loss, mean "
            f"{s['mean_gap']:.4f} ({100 * s['mean_relative_gap']:.1f}% of the clean loss)"
        )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"args": vars(args), "probes": results, "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
