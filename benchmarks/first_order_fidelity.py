# Copyright 2026 The trl-unigame authors. Licensed under the Apache License, Version 2.0.
"""
How good is the first-order perturber step over a real training run? On the pretrained tiny digits Janus, with the
effect benchmark's UniGame settings, the game is trained twice on the same rows, once with
`perturber_update="first_order"` and once with `"exact"`. Every `--probe_every` steps the probe records the gradient
the trainer's own step gives the perturber (read just before the perturber's optimizer applies it), and compares it
with the exact step's gradient on the same batch, model state and random state, computed by the trainer's own exact
step (`_exact_perturber_step`). In the exact run the two are the same computation (cosine 1: a check of the probe); in
the first-order run the cosine measures the first-order step as the trainer runs it (train mode, one-pass batches,
LoRA dropout). It also records the clean loss, the exact adversarial loss and the first-order estimate of the gap the
trainer logs (`unigame/adversarial_gain_estimate`).

```bash
python benchmarks/first_order_fidelity.py --output_json first_order.json      # about 6 minutes on 2 CPU cores
```

The probe restores the gradients and the RNG state it used, so each run follows the same trajectory as an unprobed
one.
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
    from trl_unigame.data import ROWS_KEY
    from trl_unigame.game.context import StepContext
    from trl_unigame.game.metrics import GameMetrics
    from trl_unigame.game.understanding import host_normalises_over_window

    class ProbedTrainer(UniGameTrainer):
        """A `UniGameTrainer` that compares, every `probe_every` steps, the gradient its step gives the perturber with
        the exact step's gradient on the same batch."""

        probe_every = 25
        probes: list

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.state.global_step % self.probe_every or not self.accelerator.sync_gradients:
                return super().training_step(model, inputs, num_items_in_batch)
            reference = self._exact_reference(model, inputs, num_items_in_batch)
            recorded, logged = {}, {}

            def keep(optimizer, args, kwargs):
                recorded["grads"] = [p.grad.detach().clone() for p in self.perturber.parameters()]

            handle = self.perturber_optimizer.register_step_pre_hook(keep)
            add = self.game_metrics.add
            self.game_metrics.add = lambda key, value: logged.setdefault(key, value) or add(key, value)
            try:
                loss = super().training_step(model, inputs, num_items_in_batch)
            finally:
                handle.remove()
                self.game_metrics.add = add
            a, b = torch.cat([g.flatten() for g in recorded["grads"]]), reference.pop("exact")
            self.probes.append(
                {
                    "step": self.state.global_step,
                    "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
                    "norm_ratio": float(a.norm() / b.norm().clamp(min=1e-30)),
                    "estimated_gap": logged.get("unigame/adversarial_gain_estimate"),
                    **reference,
                }
            )
            return loss

        def _exact_reference(self, model, inputs, num_items_in_batch) -> dict:
            """The exact step's gradient and losses on this batch, leaving gradients and RNG state as they were."""
            unwrapped = self.accelerator.unwrap_model(model)
            unwrapped.train()  # as the step runs it: the same dropout masks from the same RNG state
            prepared = self._prepare_inputs({k: v for k, v in inputs.items() if k != ROWS_KEY})
            params = list(self.perturber.parameters())
            saved_grads = [p.grad for p in params]
            saved_metrics, self.adversary.metrics = self.adversary.metrics, GameMetrics()
            rng = torch.get_rng_state()
            try:
                for p in params:
                    p.grad = None
                ctx = StepContext(
                    inputs=prepared,
                    rows=None,
                    step=self.state.global_step,
                    window=self.current_gradient_accumulation_steps,
                    last_micro_batch=False,
                    normalised_over_window=host_normalises_over_window(self, num_items_in_batch),
                    num_items_in_batch=num_items_in_batch,
                )
                self._exact_perturber_step(unwrapped, ctx)
                exact = torch.cat([p.grad.flatten() for p in params])
                adversarial = self.adversary.metrics.reduce()["unigame/adversarial_loss"]
                torch.set_rng_state(rng)
                with torch.no_grad(), self.perturber.disabled():
                    clean = float(self._host_loss(unwrapped, prepared))
            finally:
                for p, g in zip(params, saved_grads):
                    p.grad = g
                self.adversary.metrics = saved_metrics
                torch.set_rng_state(rng)
            return {"exact": exact, "clean_loss": clean, "adversarial_loss": adversarial}

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
                f"{'-' if p['estimated_gap'] is None else format(p['estimated_gap'], '.4f'):>8}"
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
