"""Run under torchrun: trains the example's offline default for a few steps and writes this rank's parameters."""

import os
import sys

import torch


sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from train_janus import main, make_parser, offline_default_arguments  # noqa: E402


if __name__ == "__main__":
    output_dir, extra = sys.argv[1], sys.argv[2:]
    argv = (
        offline_default_arguments(output_dir)
        + [
            "--max_steps",
            "4",
            "--save_steps",
            "2",
            "--picture_steps",
            "0",
            "--per_device_train_batch_size",
            "2",
            "--use_cpu",
            "true",
            "--ddp_backend",
            "gloo",
            "--hardness_quantile",
            "0.0",
            "--disable_tqdm",
            "true",
            "--compare_scans",
            "0",
        ]
        + extra
    )
    trainer = main(*make_parser().parse_args_and_config(args=argv))
    rank = trainer.args.process_index
    state = {n: p.detach().cpu() for n, p in trainer.model.named_parameters() if p.requires_grad}
    state.update({f"perturber.{n}": p.detach().cpu() for n, p in trainer.perturber.named_parameters()})
    torch.save(
        {"params": state, "buffer": [e.hardness for e in trainer.buffer.entries], "world": trainer.args.world_size},
        os.path.join(output_dir, f"rank{rank}.pt"),
    )
    from trl_unigame.testing import close_process_group

    close_process_group()
