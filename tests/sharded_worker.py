"""Run under torchrun: the game sharded on CPU processes (gloo), through the Trainer's own arguments: FSDP2
(`fsdp`, `fsdp_config`) or DeepSpeed ZeRO-2/ZeRO-3 (`deepspeed`, DeepSpeed's CPU accelerator).

Usage: torchrun --nproc_per_node 2 tests/sharded_worker.py ENGINE OUTPUT_DIR UPDATE CHECKPOINTING [RESUME_FROM]
ENGINE is `fsdp2`, `zero2` or `zero3`; UPDATE is `exact` or `first_order` (the perturber's step); CHECKPOINTING is
`on` or `off` (the training argument `activation_checkpointing`). With `NAN_AT_STEP=N` in the environment, process
1's loss is not finite at step N (0-based), everywhere the game computes it; with `GENERATION_ANCHORS=N`, the
generation loss trains on N anchors (`generation_loss_targets="anchors"`). Trains the tiny Janus with LoRA and the whole game (mining, buffer pass, generation check, pictures,
evaluation with generated answers) for 4 steps, with sharded checkpoints every 2 steps; with RESUME_FROM, resumes
from that checkpoint instead of starting fresh. Writes `rank{N}.pt`: the full trainable weights on that process, the
perturber, whether the parameters were sharded (DTensors) during training, the logs and the buffer.
"""

import os
import sys

import torch
from peft import LoraConfig
from transformers import TrainerCallback

from trl_unigame.testing import full_elements, local_elements


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def full_trainable_weights(model):
    """Every trainable weight whole (a collective under FSDP2 and ZeRO-3: every process calls it), by the name PEFT
    saves it under (without the activation-checkpointing wrappers' names)."""
    from torch.distributed.tensor import DTensor

    params = trainable(model)
    zero3 = [p for _, p in params if hasattr(p, "ds_id")]
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3):
            return {n.replace("_checkpoint_wrapped_module.", ""): p.detach().cpu().clone() for n, p in params}
    return {
        n.replace("_checkpoint_wrapped_module.", ""): (p.full_tensor() if isinstance(p, DTensor) else p)
        .detach()
        .cpu()
        .clone()
        for n, p in params
    }


class RecordSharding(TrainerCallback):
    """Records, at each step's end, how the trainable parameters are held: sharded (DTensor, ZeRO-3 partition) or
    whole, and a checksum of their full values."""

    def __init__(self):
        self.trainer = None
        self.seen = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = self.checksum()

    def checksum(self):
        return float(sum(v.double().abs().sum() for v in full_trainable_weights(self.trainer.model).values()))

    def on_step_end(self, args, state, control, **kwargs):
        from torch.distributed.tensor import DTensor

        params = trainable(self.trainer.model)
        self.seen.append(
            {
                "checksum": self.checksum(),
                "perturber": float(sum(p.detach().double().abs().sum() for p in self.trainer.perturber.parameters())),
                "dtensor": all(isinstance(p, DTensor) for _, p in params),
                # every parameter, frozen ones too (the root's embeddings and tied head): sharded again after the step
                "every_parameter_dtensor": all(isinstance(p, DTensor) for p in self.trainer.model.parameters()),
                "zero3": all(hasattr(p, "ds_id") for _, p in params),
                "local_elements": sum(local_elements(p) for _, p in params),
                "full_elements": sum(full_elements(p) for _, p in params),
                "checkpointed": any(
                    getattr(m, "gradient_checkpointing", False) is True for m in self.trainer.model.modules()
                ),
            }
        )
        return control


def consistent(images, texts):
    return torch.ones(len(texts))


def trainer_class(nan_at_step):
    from trl_unigame import UniGameTrainer

    if nan_at_step is None:
        return UniGameTrainer

    class NonFiniteOnce(UniGameTrainer):
        def _host_loss(self, model, inputs, num_items_in_batch=None, return_outputs=False):
            out = super()._host_loss(model, inputs, num_items_in_batch, return_outputs)
            if self.state.global_step == nan_at_step and self.args.process_index == 1 and self.model.training:
                return (out[0] * float("nan"), out[1]) if return_outputs else out * float("nan")
            return out

    return NonFiniteOnce


def main(engine: str, output_dir: str, update: str, checkpointing: str, resume_from: str | None = None):
    from trl_unigame import UniGameConfig
    from trl_unigame.callbacks import HardSamplePicturesCallback
    from trl_unigame.testing import cpu_sharding_arguments, tiny_janus, tiny_vqa_dataset

    rank = int(os.environ["RANK"])
    nan_at_step = int(os.environ["NAN_AT_STEP"]) if os.environ.get("NAN_AT_STEP") else None
    anchors = int(os.environ.get("GENERATION_ANCHORS") or 0)
    model, processor = tiny_janus(seed=0, save_dir=os.path.join(output_dir, f"model-rank{rank}"))
    args = UniGameConfig(
        output_dir=output_dir,
        **cpu_sharding_arguments(engine),
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
        **(
            dict(generation_loss_weight=1.0, generation_loss_targets="anchors", generation_anchors=anchors)
            if anchors
            else {}
        ),
    )
    recorder = RecordSharding()
    trainer = trainer_class(nan_at_step)(
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
    state = full_trainable_weights(trainer.model)
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
            "deepspeed": trainer.is_deepspeed_enabled,
            "zero_stage": trainer.model_wrapped.zero_optimization_stage() if trainer.is_deepspeed_enabled else None,
            "skipped": [log.get("unigame/skipped_understanding_steps") for log in logs],
            "skipped_perturber": [log.get("unigame/skipped_perturber_steps") for log in logs],
            "world": trainer.args.world_size,
            "anchors": None if trainer.anchors is None else list(trainer.anchors.prompts),
        },
        os.path.join(output_dir, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    if os.environ.get("SHARDED_WORKER_DUMP_AFTER"):  # a hang prints every thread's stack instead of waiting silently
        import faulthandler

        faulthandler.dump_traceback_later(int(os.environ["SHARDED_WORKER_DUMP_AFTER"]), exit=True)
    main(*sys.argv[1:])
