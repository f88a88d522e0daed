"""Run under torchrun: the game under FSDP2 on CPU (gloo), through the Trainer's own FSDP arguments.

Usage: torchrun --nproc_per_node 2 tests/fsdp_worker.py OUTPUT_DIR UPDATE CHECKPOINTING [RESUME_FROM]
UPDATE is `exact` or `first_order` (the perturber's step); CHECKPOINTING is `on` or `off` (the training argument
`activation_checkpointing`). Trains the tiny Janus with LoRA and the whole game (mining, buffer pass, generation check, pictures,
evaluation with generated answers) for 4 steps, with sharded checkpoints every 2 steps; with RESUME_FROM, resumes
from that checkpoint instead of starting fresh. Writes `rank{N}.pt`: the full trainable weights on that process, the
perturber, whether the parameters were sharded (DTensors) during training, the logs and the buffer.
"""

import os
import sys

import torch
from peft import LoraConfig
from transformers import TrainerCallback


class RecordSharding(TrainerCallback):
    """Records, at each step's end, how the trainable parameters are held: DTensor (sharded) or plain."""

    def __init__(self):
        self.trainer = None
        self.seen = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = self.checksum()

    def checksum(self):
        from torch.distributed.tensor import DTensor

        params = [p for p in self.trainer.model.parameters() if p.requires_grad]
        return float(
            sum((p.full_tensor() if isinstance(p, DTensor) else p).detach().double().abs().sum() for p in params)
        )

    def on_step_end(self, args, state, control, **kwargs):
        from torch.distributed.tensor import DTensor

        params = [(n, p) for n, p in self.trainer.model.named_parameters() if p.requires_grad]
        self.seen.append(
            {
                "checksum": self.checksum(),
                "perturber": float(sum(p.detach().double().abs().sum() for p in self.trainer.perturber.parameters())),
                "dtensor": all(isinstance(p, DTensor) for _, p in params),
                "local_elements": sum(
                    p.to_local().numel() if isinstance(p, DTensor) else p.numel() for _, p in params
                ),
                "full_elements": sum(p.numel() for _, p in params),
                "checkpointed": any(
                    getattr(m, "gradient_checkpointing", False) is True for m in self.trainer.model.modules()
                ),
            }
        )
        return control


def consistent(images, texts):
    return torch.ones(len(texts))


def main(output_dir: str, update: str, checkpointing: str, resume_from: str | None = None):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from trl_unigame import UniGameConfig, UniGameTrainer
    from trl_unigame.callbacks import HardSamplePicturesCallback
    from trl_unigame.testing import tiny_janus, tiny_vqa_dataset

    rank = int(os.environ["RANK"])
    model, processor = tiny_janus(seed=0, save_dir=os.path.join(output_dir, f"model-rank{rank}"))
    args = UniGameConfig(
        output_dir=output_dir,
        use_cpu=True,
        ddp_backend="gloo",
        fsdp="full_shard",
        fsdp_config={
            "version": 2,
            "state_dict_type": "SHARDED_STATE_DICT",
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        },
        # the model's own activation checkpointing (FSDP's would rename the layers under PEFT: refused)
        activation_checkpointing=checkpointing == "on",
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=4,
        save_steps=2,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        perturber_learning_rate=5e-2,
        perturber_update=update,
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        num_candidates=2,
        buffer_batch_size=2,
        consistency_model=None,
        consistency_threshold=0.5,
        hardness_quantile=0.0,
        # clean, perturbed and buffer passes as three forwards before one backward
        one_pass_update=False,
        perturbed_weight=0.5,
        generation_check_interval=2,
        predict_with_generate=True,
        eval_attack_eps=0.02,
        seed=0,
        dataloader_num_workers=0,
    )
    recorder = RecordSharding()
    trainer = UniGameTrainer(
        model,
        args,
        train_dataset=tiny_vqa_dataset(16, seed=0),
        eval_dataset=tiny_vqa_dataset(3, seed=1),  # 2 rows on one process, 1 on the other
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0),
        consistency_scorer=consistent,
        callbacks=[recorder, HardSamplePicturesCallback(every_n_steps=2)],
    )
    recorder.trainer = trainer
    trainer.train(resume_from_checkpoint=resume_from)
    metrics = trainer.evaluate()
    final = os.path.join(output_dir, "final")
    trainer.save_model(final)
    full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    # the state dict's names leave out the activation-checkpointing wrappers that the parameters' names include
    trainable = {
        n.replace("_checkpoint_wrapped_module.", "") for n, p in trainer.model.named_parameters() if p.requires_grad
    }
    state = {n: v.detach().cpu().clone() for n, v in full.items() if n in trainable}
    perturber = {n: p.detach().cpu().clone() for n, p in trainer.perturber.named_parameters()}
    logs = [log for log in trainer.state.log_history if "loss" in log]
    torch.save(
        {
            "params": state,
            "perturber": perturber,
            "seen": recorder.seen,
            "begin": recorder.begin,
            "mined": [log.get("unigame/mined") for log in logs],
            "logged": [{k: v for k, v in log.items() if k != "epoch"} for log in logs],
            "buffer": len(trainer.buffer),
            "metrics": metrics,
            "fsdp": trainer.is_fsdp_enabled,
            "world": trainer.args.world_size,
        },
        os.path.join(output_dir, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    if os.environ.get("FSDP_WORKER_DUMP_AFTER"):  # a hang prints every thread's stack instead of waiting silently
        import faulthandler

        faulthandler.dump_traceback_later(int(os.environ["FSDP_WORKER_DUMP_AFTER"]), exit=True)
    main(*sys.argv[1:])
