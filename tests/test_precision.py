"""What a GPU run in fp16 does to the game, injected on the CPU: accelerate's `GradScaler` scales the host's backward
(as `fp16=True` does on a GPU), and a forced overflow makes it skip a step."""

import pytest
import torch
from test_trainer import make_trainer, snapshot
from transformers import TrainerCallback


@pytest.fixture
def fp16(monkeypatch):
    """`fp16(trainer, init_scale, autocast)` makes the trainer's accelerator what `fp16=True` makes it on a GPU: native
    AMP in fp16 with a `GradScaler` (here a CPU one), so that `train()` prepares its optimizer with the scaler,
    `accelerator.backward` scales the loss and the clipping unscales first. With `autocast=False` the forward stays in
    float32 (the scaler alone, for exact comparisons); with `autocast=True` it runs under CPU fp16 autocast."""

    def make(trainer, init_scale: float, autocast: bool = False):
        from accelerate.utils import AutocastKwargs

        accelerator = trainer.accelerator
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2000)
        monkeypatch.setattr(accelerator, "scaler", scaler)
        monkeypatch.setattr(accelerator, "native_amp", True)
        monkeypatch.setattr(accelerator, "autocast_handler", AutocastKwargs(enabled=autocast))
        monkeypatch.setattr(accelerator.state, "_mixed_precision", "fp16")  # shared state: restored after the test
        return scaler

    return make


class OverflowAtStep(TrainerCallback):
    """Sets the scale so high before step `step` that the scaled loss overflows (the public `update(new_scale)`), keeps
    the scale the scaler chose after it, then gives it back a usable one; keeps the weights as each step ends."""

    def __init__(self, trainer, scaler, step: int):
        self.trainer, self.scaler, self.step = trainer, scaler, step
        self.ends, self.scale_after = {}, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.scaler.update(new_scale=2.0**127)  # x a loss of ~4: past float32's largest value
        elif state.global_step == self.step:
            self.scale_after = self.scaler.get_scale()
            self.scaler.update(new_scale=2.0**16)  # the halvings down to a usable scale take ~100 steps

    def on_step_end(self, args, state, control, **kwargs):
        self.ends[state.global_step] = (snapshot(self.trainer.model), snapshot(self.trainer.perturber))


@pytest.mark.parametrize("update", ["first_order", "exact"])
@pytest.mark.parametrize("understanding_update", ["mixed", "separate"])
def test_an_fp16_overflow_is_skipped_by_the_grad_scaler_and_training_goes_on(
    tmp_path, vqa, fp16, update, understanding_update
):
    trainer = make_trainer(
        tmp_path,
        vqa,
        max_steps=4,
        perturber_update=update,
        understanding_update=understanding_update,
        max_grad_norm=1.0,
    )
    scaler = fp16(trainer, init_scale=2.0**16)
    watch = OverflowAtStep(trainer, scaler, step=2)
    trainer.add_callback(watch)
    with pytest.warns(UserWarning, match="not finite under fp16 loss scaling"):
        trainer.train()  # before: `AssertionError: No inf checks were recorded prior to update`
    assert trainer.state.global_step == 4
    # the scaler saw the overflow and halved its scale (twice with the separate buffer step's own overflow)
    assert 2.0**125 <= watch.scale_after <= 2.0**126
    (model_1, perturber_1), (model_2, perturber_2) = watch.ends[1], watch.ends[2]
    assert all(torch.equal(model_1[n], p) for n, p in model_2.items())  # the overflowed step was skipped
    if update == "first_order":  # its token gradient overflowed too (the exact step has its own, unscaled pass)
        assert all(torch.equal(perturber_1[n], p) for n, p in perturber_2.items())
    model_4 = watch.ends[4][0]
    assert any(not torch.equal(model_2[n], p) for n, p in model_4.items())  # and training went on
    skipped = sum(log.get("unigame/skipped_understanding_steps", 0) for log in trainer.state.log_history)
    assert skipped >= 1


def test_the_first_order_step_reads_the_token_gradient_unscaled(tmp_path, vqa, fp16):
    def run(scale):
        trainer = make_trainer(
            tmp_path / str(scale),
            vqa,
            max_steps=2,
            mining_interval=0,
            perturber_update="first_order",
            delta_reg_weight=5.0,
            eps_reg_weight=1.0,
        )
        if scale is not None:
            fp16(trainer, init_scale=scale)
        trainer.train()
        gains = [log["unigame/adversarial_gain_estimate"] for log in trainer.state.log_history if "loss" in log]
        return gains, snapshot(trainer.perturber)

    plain_gains, plain = run(None)
    scaled_gains, scaled = run(2.0**16)
    assert scaled_gains == pytest.approx(plain_gains, rel=1e-3)  # before: 65,536 times larger
    for name, value in plain.items():
        torch.testing.assert_close(scaled[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_the_game_trains_under_cpu_fp16_autocast_with_a_grad_scaler(tmp_path, vqa, fp16):
    # What a GPU fp16 run does: the forward in fp16, the first steps overflowing until the scaler settles.
    trainer = make_trainer(tmp_path, vqa, max_steps=4, perturber_update="first_order", max_grad_norm=1.0)
    scaler = fp16(trainer, init_scale=2.0**16, autocast=True)
    before = snapshot(trainer.model)
    trainer.train()
    assert trainer.state.global_step == 4 and scaler.get_scale() <= 2.0**16
    assert any(not torch.equal(before[n], p) for n, p in snapshot(trainer.model).items())
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(torch.isfinite(p).all() for p in trainer.perturber.parameters())


class HostReads:
    """Counts reads of a tensor's value by the host (`item`, `bool`, `float`, `int`, `tolist`) inside the context: on a
    GPU each one waits for every queued kernel."""

    NAMES = ("item", "__bool__", "__float__", "__int__", "tolist")

    def __enter__(self):
        self.count, self._kept = 0, {name: getattr(torch.Tensor, name) for name in self.NAMES}
        for name, original in self._kept.items():
            setattr(torch.Tensor, name, self._counting(original))
        return self

    def _counting(self, original):
        def read(tensor, *args, **kwargs):
            self.count += 1
            return original(tensor, *args, **kwargs)

        return read

    def __exit__(self, *exc):
        for name, original in self._kept.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("finite", [True, False])
def test_the_finite_check_of_a_step_reads_the_host_once(tmp_path, vqa, finite):
    trainer = make_trainer(tmp_path, vqa, max_steps=1, mining_interval=0)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    assert len(params) > 20
    for p in params:
        p.grad = torch.ones_like(p)
    if not finite:
        params[-1].grad[0] = float("inf")
    with HostReads() as reads:
        dropped = trainer.agreement.step_dropped(trainer.model)
    assert reads.count == 1  # before: one read per gradient
    assert dropped is not finite
    assert all((p.grad is None) is not finite for p in params)


def generation_dtypes(trainer) -> set:
    """Trains `trainer`; the dtypes the generation head's outputs had while mining sampled."""
    dtypes = []
    head = trainer.interface.base_model.model.generation_head
    handle = head.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    try:
        trainer.train()
    finally:
        handle.remove()
    assert dtypes, "mining did not run"
    return set(dtypes)


def test_mining_runs_under_the_runs_mixed_precision(tmp_path, vqa):
    # bf16=True on a float32-loaded model: the host's forward runs under autocast, and so must mining's generation.
    trainer = make_trainer(tmp_path, vqa, max_steps=1, bf16=True)
    assert trainer.accelerator.mixed_precision == "bf16"
    assert generation_dtypes(trainer) == {torch.bfloat16}  # before: float32
    assert len(trainer.buffer)


def test_mining_stays_out_of_fp16_autocast(tmp_path, vqa, fp16):
    # fp16 generation would run the whole residual stream in fp16 and overflow where training's float32 one does not.
    trainer = make_trainer(tmp_path, vqa, max_steps=1)
    fp16(trainer, init_scale=2.0**8, autocast=True)
    assert generation_dtypes(trainer) == {torch.float32}
