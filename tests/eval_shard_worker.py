"""Run under torchrun: the evaluator on a 2-process launch, each process answering its shard of the rows.

Usage: torchrun --nproc_per_node 2 tests/eval_shard_worker.py OUTPUT_DIR
Each rank saves what `evaluate` returned on it (metrics and predictions) to OUTPUT_DIR/rank{RANK}.pt.
"""

import os
import sys

import torch


def evaluate(rows):
    """The evaluation both this worker and the test's single process run: clean, a PGD attack, one corruption and
    the round trip with the digit judge, in batches of 4. Returns metrics, predictions and the number of images this
    process answered."""
    from trl_unigame.evaluation import UniGameEvaluator
    from trl_unigame.testing import DigitJudge, pretrained_tiny_janus

    model, processor = pretrained_tiny_janus()
    evaluator = UniGameEvaluator(
        model,
        processor,
        batch_size=4,
        attack_eps=0.05,
        attack_budget="relative",
        corruptions=["noise_3"],
        consistency=True,
        judge=DigitJudge(),
        generation_guidance_scale=3.0,
        show_progress=False,
    )
    answered = []
    answer = evaluator.interface.answer
    evaluator.interface.answer = lambda model, images, *args, **kwargs: (
        answered.append(len(images)) or answer(model, images, *args, **kwargs)
    )
    metrics, predictions = evaluator.evaluate(rows, return_predictions=True)
    return metrics, predictions, sum(answered)


def eval_rows():
    from trl_unigame.testing import digits_vqa_dataset

    # 7 rows: shards of 4 and 3, so each process's batches are the single process's batches
    return digits_vqa_dataset("test", skills=("digit",), max_scans=7)


def main(output_dir: str):
    torch.distributed.init_process_group("gloo")
    metrics, predictions, answered = evaluate(eval_rows())
    torch.save(
        {"metrics": metrics, "predictions": predictions, "answered": answered},
        os.path.join(output_dir, f"rank{torch.distributed.get_rank()}.pt"),
    )
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
