"""Run under torchrun: a 2-process game whose ranks hold different buffers (rank 1 keeps nothing at first).

Usage: torchrun --nproc_per_node 2 tests/ddp_uneven_worker.py OUTPUT_DIR UPDATE [STACKING]
UPDATE is `mixed` or `separate`; STACKING is `plain` (UniGameTrainer, default) or `sft` (UniGameSFTTrainer).
"""

import os
import sys

import torch
from peft import LoraConfig


def rank_dependent_scorer(rank: int, silent_calls: int = 3):
    """Consistency 1 on rank 0; 0 on rank 1 for its first `silent_calls` mining rounds, then 1: with the paper's rule
    and a threshold of 0.5, rank 1 keeps no candidate for those rounds while rank 0 fills its buffer."""
    calls = []

    def score(images, texts):
        calls.append(1)
        consistent = rank == 0 or len(calls) > silent_calls
        return torch.full((len(texts),), 1.0 if consistent else 0.0)

    return score


def main(output_dir: str, update: str, stacking: str = "plain"):
    from trl_unigame.testing import tiny_janus, tiny_vqa_dataset

    rank = int(os.environ["RANK"])
    model, processor = tiny_janus(seed=0, save_dir=os.path.join(output_dir, f"model-rank{rank}"))
    game = dict(
        output_dir=output_dir,
        use_cpu=True,
        ddp_backend="gloo",
        per_device_train_batch_size=2,
        max_steps=6,
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
        selection="paper",
        understanding_update=update,
        buffer_pop=True,
        seed=0,
        dataloader_num_workers=0,
    )
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0)
    scorer = rank_dependent_scorer(rank)
    if stacking == "sft":
        from trl_unigame import UniGameSFTConfig, UniGameSFTTrainer

        dataset = tiny_vqa_dataset(16, seed=0).map(
            lambda row: {
                "images": [row["image"]],
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]},
                    {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]},
                ],
            },
            remove_columns=["image", "question", "answer"],
        )
        trainer = UniGameSFTTrainer(
            model,
            args=UniGameSFTConfig(bf16=False, gradient_checkpointing=False, max_length=None, **game),
            train_dataset=dataset,
            processing_class=processor,
            peft_config=lora,
            consistency_scorer=scorer,
        )
    else:
        from trl_unigame import UniGameConfig, UniGameTrainer

        trainer = UniGameTrainer(
            model,
            UniGameConfig(**game),
            train_dataset=tiny_vqa_dataset(16, seed=0),
            processing_class=processor,
            peft_config=lora,
            consistency_scorer=scorer,
        )
    own = []  # this process's kept fractions, before the logs reduce them across processes
    add = trainer.game_metrics.add
    trainer.game_metrics.add = lambda key, value: (
        (own.append(value) if key == "unigame/kept_fraction" else None) or add(key, value)
    )
    trainer.train()
    state = {n: p.detach().cpu() for n, p in trainer.model.named_parameters() if p.requires_grad}
    state.update({f"perturber.{n}": p.detach().cpu() for n, p in trainer.perturber.named_parameters()})
    logged = [log.get("unigame/kept_fraction") for log in trainer.state.log_history if "loss" in log]
    torch.save({"params": state, "kept": own, "logged": logged}, os.path.join(output_dir, f"rank{rank}.pt"))
    from trl_unigame.testing import close_process_group

    close_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
