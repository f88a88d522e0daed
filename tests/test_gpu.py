"""The paths a GPU user runs, on a real CUDA device: placement, bf16 autocast, fp16 with accelerate's own
`GradScaler` and an overflow, 4-bit QLoRA through bitsandbytes, and compiled mining replaying CUDA graphs.

They skip without a GPU (the CPU suite injects what they check: tests/test_precision.py); `scripts/gpu_check.sh`
runs them on a GPU machine with `-m gpu`.
"""

import pytest
import torch
from peft import LoraConfig
from test_trainer import make_args, snapshot
from transformers import TrainerCallback

from trl_unigame import UniGameTrainer
from trl_unigame.testing import DigitJudge, digits_vqa_dataset, pretrained_tiny_janus, tiny_janus


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)"),
]


def cuda_trainer(tmp_path, vqa, model=None, processor=None, **overrides):
    if model is None:
        model, processor = tiny_janus(seed=0)
    settings = dict(
        use_cpu=False, max_steps=3, perturber_update="first_order", perturber_inputs="features_and_gradient"
    )
    return UniGameTrainer(
        model,
        make_args(tmp_path, **{**settings, **overrides}),
        train_dataset=vqa,
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05),
    )


def test_the_game_runs_on_the_gpu_with_every_part_on_it(tmp_path, vqa):
    trainer = cuda_trainer(tmp_path, vqa)
    before = snapshot(trainer.model)
    trainer.train()
    assert all(p.device.type == "cuda" for p in trainer.model.parameters())
    assert all(p.device.type == "cuda" for p in trainer.perturber.parameters())
    assert len(trainer.buffer) and all(e.image.device.type == "cpu" for e in trainer.buffer.entries)
    assert any(not torch.equal(before[n], p) for n, p in snapshot(trainer.model).items())


@pytest.mark.parametrize("update", ["first_order", "exact"])
def test_bf16_autocast_trains_and_the_perturbation_reaches_the_model(tmp_path, vqa, update):
    trainer = cuda_trainer(tmp_path, vqa, bf16=True, perturber_update=update, perturber_budget="relative")
    before = snapshot(trainer.perturber)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in logs)
    assert trainer.perturber.rho.dtype == torch.float32  # the perturber stays in float32 under autocast
    assert any(not torch.equal(before[n], p) for n, p in snapshot(trainer.perturber).items())
    if update == "exact":  # measured after the cast to bf16: most of the intended direction got through
        assert all(log["unigame/realized_delta_cosine"] > 0.9 for log in logs)


class OverflowAtStepTwo(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.scale_after, self.ends = trainer, None, {}

    def on_step_begin(self, args, state, control, **kwargs):
        scaler = self.trainer.accelerator.scaler
        if state.global_step == 1:
            scaler.update(new_scale=2.0**127)
        elif state.global_step == 2:
            self.scale_after = scaler.get_scale()
            scaler.update(new_scale=2.0**10)

    def on_step_end(self, args, state, control, **kwargs):
        self.ends[state.global_step] = snapshot(self.trainer.model)


def test_fp16_with_the_real_grad_scaler_skips_an_overflow_and_goes_on(tmp_path, vqa):
    trainer = cuda_trainer(tmp_path, vqa, fp16=True, max_steps=4, mining_interval=0)
    assert trainer.accelerator.scaler is not None and trainer.accelerator.scaler.is_enabled()
    watch = OverflowAtStepTwo(trainer)
    trainer.add_callback(watch)
    trainer.train()
    assert trainer.state.global_step == 4 and watch.scale_after == 2.0**126
    assert all(torch.equal(watch.ends[1][n], p) for n, p in watch.ends[2].items())
    assert any(not torch.equal(watch.ends[2][n], p) for n, p in watch.ends[4].items())
    logs = [log for log in trainer.state.log_history if "loss" in log]
    gains = [log.get("unigame/adversarial_gain_estimate") for log in logs[2:]]  # step 2 overflowed: no gain logged
    assert all(g is not None for g in gains) and max(abs(g) for g in gains) < 10.0  # unscaled: 2**10 would be ~1000x


def test_qlora_4bit_trains_the_game_on_the_shipped_digits_model(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    from trl_unigame.interfaces import quantization_skip_modules_for
    from trl_unigame.testing import pretrained_tiny_janus_path

    path = pretrained_tiny_janus_path()
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=quantization_skip_modules_for(path),
    )
    model, processor = pretrained_tiny_janus(quantization_config=config, device_map={"": 0})
    assert any("4bit" in type(m).__name__ for m in model.modules())
    rows = digits_vqa_dataset("train", skills=("after", "digit"), seed=0).select(range(16))
    trainer = UniGameTrainer(
        model,
        make_args(tmp_path, use_cpu=False, bf16=True, max_steps=2, consistency_threshold=0.5),
        train_dataset=rows,
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        consistency_scorer=DigitJudge(),
    )
    before = snapshot(trainer.model)
    trainer.train()
    moved = [n for n, p in snapshot(trainer.model).items() if not torch.equal(before[n], p)]
    assert moved and all("lora_" in n for n in moved)


def test_compiled_mining_replays_cuda_graphs(tmp_path, vqa, monkeypatch):
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: replays.append(1) or replay(graph))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    trainer = cuda_trainer(tmp_path, vqa, max_steps=2, mining_compile=True)  # inductor, "reduce-overhead"
    trainer.train()
    assert len(trainer.buffer)
    assert len(trainer.interface._compiled_steps) == 1
    assert not torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    # every fed-back token of the second round is a replay of the graphs the first round recorded
    assert len(replays) >= trainer.interface.num_image_tokens - 1
