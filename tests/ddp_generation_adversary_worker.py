"""Run under torchrun: a 2-process game with `generation_adversary="reinforce"` (tiny Janus, mining every step).

Usage: torchrun --nproc_per_node 2 tests/ddp_generation_adversary_worker.py OUTPUT_DIR

Writes `rank{N}.pt`: the perturber's initial and final weights, the generation-side adversary's optimizer state, and,
for each of its steps, this process's own gradient and the averaged one the step used.
"""

import os
import sys

import torch
from peft import LoraConfig


def image_scorer(images, texts):
    """Consistency from the candidate's pixels: 1 for the brighter half of a round's candidates, else 0. With a
    threshold of 0.5, each round has faithful and unfaithful candidates (non-zero advantages), and the processes,
    which mine their own candidates, have their own."""
    brightness = images.float().mean(dim=(1, 2, 3)).cpu()
    return (brightness >= brightness.median()).float()


def main(output_dir: str):
    from trl_unigame import UniGameConfig, UniGameTrainer
    from trl_unigame.testing import tiny_janus, tiny_vqa_dataset

    rank = int(os.environ["RANK"])
    model, processor = tiny_janus(seed=0, save_dir=os.path.join(output_dir, f"model-rank{rank}"))
    args = UniGameConfig(
        output_dir=output_dir,
        use_cpu=True,
        ddp_backend="gloo",
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=5e-3,
        perturber_learning_rate=5e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        num_candidates=2,
        buffer_batch_size=2,
        consistency_model=None,
        consistency_threshold=0.5,
        hardness_quantile=0.0,
        mining_interval=1,
        seed=0,
        dataloader_num_workers=0,
        generation_adversary="reinforce",
        generation_adversary_reward="gated",  # every candidate takes part: each round has non-zero advantages
        generation_adversary_learning_rate=5e-2,
        generation_temperature=0.7,
        generation_guidance_scale=3.0,
    )
    trainer = UniGameTrainer(
        model,
        args,
        train_dataset=tiny_vqa_dataset(16, seed=0),
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0),
        consistency_scorer=image_scorer,
    )
    initial = {n: p.detach().cpu().clone() for n, p in trainer.perturber.named_parameters()}
    exchanged = []  # (this process's gradient, the averaged one), per step of the generation-side adversary

    class RecordingAgreement:
        """The generation-side adversary's collectives, recorded (the understanding-site step keeps its own)."""

        def __init__(self, agreement):
            self.agreement = agreement

        def __getattr__(self, name):  # every other collective, as the agreement has it
            return getattr(self.agreement, name)

        def mean_if_finite(self, tensors, finite):
            averaged = self.agreement.mean_if_finite(tensors, finite)
            own = [t.detach().cpu().clone() for t in tensors]
            exchanged.append((own, None if averaged is None else [t.detach().cpu().clone() for t in averaged]))
            return averaged

    trainer.generation_adversary.agreement = RecordingAgreement(trainer.generation_adversary.agreement)
    trainer.train()
    torch.save(
        {
            "world": trainer.args.world_size,
            "initial": initial,
            "perturber": {n: p.detach().cpu() for n, p in trainer.perturber.named_parameters()},
            "optimizer": trainer.generation_adversary_optimizer.state_dict(),
            "exchanged": exchanged,
            "logged": [
                log.get("unigame/generation_adversary_loss") for log in trainer.state.log_history if "loss" in log
            ],
        },
        os.path.join(output_dir, f"rank{rank}.pt"),
    )
    from trl_unigame.testing import close_process_group

    close_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
