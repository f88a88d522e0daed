"""`compose_loss` on numbers: the weights, the cap and the accumulation window."""

import pytest
import torch

from trl_unigame.game.loss import LossParts, compose_loss


def t(value):
    return torch.tensor(value, requires_grad=True)


def test_parts_add_with_their_weights():
    parts = LossParts(clean=t(2.0), buffer=t(4.0), buffer_weight=0.5, perturbed=t(3.0), generation=t(1.0))
    out = compose_loss(parts, perturbed_weight=0.2, generation_weight=0.7)
    assert float(out.loss) == pytest.approx(2.0 + 0.5 * 4.0 + 0.2 * 3.0 + 0.7 * 1.0)
    assert out.clean == pytest.approx(2.0) and out.buffer_weight == 0.5
    assert out.buffer_share == pytest.approx(2.0 / 4.0)  # of the clean + buffer objective, the part the cap bounds


def test_a_host_normalised_over_the_window_gets_batch_means_divided_by_it():
    # The host divided clean (and perturbed) by the window of 4 already; the Trainer will not divide the sum.
    parts = LossParts(clean=t(0.5), buffer=t(4.0), buffer_weight=0.5, perturbed=t(0.75), generation=t(1.0))
    out = compose_loss(parts, perturbed_weight=1.0, generation_weight=2.0, window=4, normalised_over_window=True)
    assert float(out.loss) == pytest.approx(0.5 + 0.5 * 4.0 / 4 + 0.75 + 2.0 * 1.0 / 4)
    assert out.clean == pytest.approx(2.0)  # the clean loss as a mean over the micro-batch
    # A host that is not normalised is divided by the Trainer as a whole: nothing is divided here.
    plain = compose_loss(parts, perturbed_weight=1.0, generation_weight=2.0, window=4)
    assert float(plain.loss) == pytest.approx(0.5 + 0.5 * 4.0 + 0.75 + 2.0)


@pytest.mark.parametrize("normalised", [False, True])
def test_the_cap_bounds_the_buffer_against_the_clean_mean(normalised):
    window = 2 if normalised else 1
    clean_mean, buffer = 1.0, 4.0
    parts = LossParts(clean=t(clean_mean / window), buffer=t(buffer), buffer_weight=0.5)
    out = compose_loss(parts, max_buffer_ratio=0.25, window=window, normalised_over_window=normalised)
    assert out.buffer_weight == pytest.approx(0.25 * clean_mean / buffer)  # beta * 4 <= 0.25 * 1
    assert out.buffer_share == pytest.approx(0.25 / 1.25)  # r / (1 + r)
    loose = compose_loss(parts, max_buffer_ratio=10.0, window=window, normalised_over_window=normalised)
    assert loose.buffer_weight == 0.5  # a cap that does not bind leaves beta


def test_the_cap_is_a_constant_of_the_step():
    clean, buffer = t(1.0), t(4.0)
    compose_loss(LossParts(clean=clean, buffer=buffer, buffer_weight=0.5), max_buffer_ratio=0.25).loss.backward()
    assert float(clean.grad) == 1.0 and float(buffer.grad) == pytest.approx(0.25 / 4.0)


def test_a_stand_in_batch_adds_nothing_but_keeps_its_graph():
    buffer = t(4.0)
    out = compose_loss(LossParts(clean=t(1.0), buffer=buffer, buffer_weight=0.0), max_buffer_ratio=0.25)
    assert float(out.loss) == 1.0 and out.buffer_weight is None and out.buffer_share is None
    out.loss.backward()
    assert float(buffer.grad) == 0.0  # it took part in the backward (DDP needs every process's passes)
