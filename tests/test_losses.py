"""Focal loss against cross-entropy and an independent formula; class-weight modes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from loralab.losses import FocalLoss, class_weights

TIGHT = {"rtol": 1e-6, "atol": 1e-7}


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(32, 3, generator=gen) * 3, torch.randint(0, 3, (32,), generator=gen)


def focal_reference(logits, target, gamma, weight=None):
    """FL_i = w_{t_i} (1 - p_{t_i})^γ (-log p_{t_i}), averaged over Σ w_{t_i}: written out per example."""
    probs = logits.softmax(-1)
    terms, norms = [], []
    for p, t in zip(probs, target.tolist()):
        w = 1.0 if weight is None else weight[t]
        terms.append(w * (1 - p[t].item()) ** gamma * -math.log(p[t].item()))
        norms.append(w)
    return torch.tensor(sum(terms) / sum(norms))


def test_gamma_zero_is_cross_entropy(batch):
    logits, target = batch
    assert_close(FocalLoss(gamma=0)(logits, target), F.cross_entropy(logits, target), **TIGHT)


def test_gamma_zero_with_weights_is_weighted_cross_entropy(batch):
    logits, target = batch
    weight = [0.5, 2.0, 1.25]
    expected = F.cross_entropy(logits, target, weight=torch.tensor(weight))
    assert_close(FocalLoss(gamma=0, class_weights=weight)(logits, target), expected, **TIGHT)


@pytest.mark.parametrize("gamma", [0.5, 1.5, 2.0, 5.0])
@pytest.mark.parametrize("weight", [None, [0.5, 2.0, 1.25]])
def test_focal_matches_the_formula(batch, gamma, weight):
    logits, target = batch
    loss = FocalLoss(gamma=gamma, class_weights=weight)(logits, target)
    assert_close(loss, focal_reference(logits, target, gamma, weight).float(), rtol=1e-5, atol=1e-6)


def test_focal_shrinks_confident_correct_examples():
    target = torch.tensor([0, 1, 2])
    logits = F.one_hot(target, 3).float() * 6.0  # p_t ~ 0.995
    ce, focal = F.cross_entropy(logits, target), FocalLoss(gamma=2.0)(logits, target)
    assert focal < 0.01 * ce


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("margin", [20.0, 200.0])  # p_t rounds to 1; then 1 - p_t underflows to 0 too
def test_focal_gradient_stays_finite_for_certain_examples(gamma, margin):
    logits = torch.tensor([[margin, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    FocalLoss(gamma=gamma)(logits, torch.tensor([0, 1])).backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[1].abs().sum() > 0  # the uncertain example still learns


def test_negative_gamma_rejected():
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss(gamma=-1.0)


def inverse(counts, power=1.0):
    """Inverse frequency (to a power) over the present classes, scaled to mean 1; absent classes get 1."""
    raw = {i: n**-power for i, n in enumerate(counts) if n > 0}
    mean = sum(raw.values()) / len(raw)
    return [raw[i] / mean if i in raw else 1.0 for i in range(len(counts))]


@pytest.mark.parametrize("counts", [[10, 30, 60], [7, 7, 7], [0, 20, 80]])
@pytest.mark.parametrize(("mode", "power"), [("auto", 1.0), ("sqrt_inverse", 0.5)])
def test_inverse_frequency_weights(counts, mode, power):
    weights = class_weights(counts, mode)
    assert weights == pytest.approx(inverse(counts, power))
    present = [w for w, n in zip(weights, counts) if n > 0]
    assert sum(present) / len(present) == pytest.approx(1.0)


def test_auto_weights_balance_the_classes():
    counts = [10, 30, 60]
    weighted = [w * n for w, n in zip(class_weights(counts, "auto"), counts)]
    assert weighted == pytest.approx([weighted[0]] * 3)  # each class contributes equally to the loss


@pytest.mark.parametrize("mode", ["none", None])
def test_no_weights(mode):
    assert class_weights([10, 30, 60], mode) is None


def test_explicit_weights_used_as_given():
    assert class_weights([10, 30, 60], [1, 2.5, 0]) == [1.0, 2.5, 0.0]


@pytest.mark.parametrize("mode", [[1.0, 2.0], "inverse"])
def test_bad_weights_rejected(mode):
    with pytest.raises(ValueError, match="loss.class_weights"):
        class_weights([10, 30, 60], mode)
