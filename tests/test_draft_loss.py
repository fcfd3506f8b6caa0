"""The draft's training loss: the chunked sparse soft cross-entropy equals log-softmax + gather, value and gradient,
and the compiled loss equals the eager one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specx.drafttrain import loss as loss_module
from specx.drafttrain.loss import sparse_soft_cross_entropy
from specx.drafttrain.model import FeatureDraftModel
from specx.drafttrain.train import Batch, TrainConfig, _can_compile, label_mass, unroll_loss

VOCAB, TOP = 50, 6


def _reference(logits: torch.Tensor, ids: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    return -(mass * torch.log_softmax(logits.float(), dim=-1).gather(-1, ids)).sum(-1)


def _targets(generator: torch.Generator, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.rand(*shape, VOCAB, generator=generator).argsort(-1)[..., :TOP]  # distinct ids per row
    mass = torch.softmax(torch.randn(*shape, TOP, generator=generator), -1)
    mass[..., -2:] = 0.0  # ids outside the draft vocabulary carry no mass
    return ids, mass


def test_sparse_soft_cross_entropy_matches_log_softmax_in_value_and_gradient(monkeypatch):
    monkeypatch.setattr(loss_module, "ROW_CHUNK", 7)  # several chunks and a ragged last one
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 11, VOCAB, generator=generator)).requires_grad_()
    ids, mass = _targets(generator, (3, 11))
    weights = torch.rand(3, 11, generator=generator)
    ours = sparse_soft_cross_entropy(logits, ids, mass)
    (grad,) = torch.autograd.grad((weights * ours).sum(), logits)
    reference = _reference(logits, ids, mass)
    (expected,) = torch.autograd.grad((weights * reference).sum(), logits)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    assert grad.abs().max() > 0.01  # the gradient is not trivially zero


def test_sparse_soft_cross_entropy_takes_bfloat16_logits():
    generator = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(40, VOCAB, generator=generator)).bfloat16().requires_grad_()
    ids, mass = _targets(generator, (40,))
    ours = sparse_soft_cross_entropy(logits, ids, mass)
    ours.sum().backward()
    assert ours.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours, _reference(logits.detach(), ids, mass), rtol=1e-4, atol=1e-4)


def _tiny_draft_and_batch() -> tuple[FeatureDraftModel, Batch]:
    torch.manual_seed(0)
    hidden, heads, kv_heads, head_dim, positions, batch, seq = 32, 4, 2, 8, 64, 2, 12
    angles = torch.arange(positions)[:, None] * 0.1 ** torch.arange(head_dim // 2)[None]
    draft = FeatureDraftModel(torch.randn(VOCAB, hidden), 2 * hidden, heads, kv_heads, head_dim, 48, VOCAB,
                              torch.cos(angles), torch.sin(angles))
    ids, mass = _targets(torch.Generator().manual_seed(2), (batch, seq))
    real = torch.ones(batch, seq, dtype=torch.bool)
    real[1, -3:] = False  # a padded text
    data = Batch(tokens=torch.randint(0, VOCAB, (batch, seq)), features=torch.randn(batch, seq, 2 * hidden),
                 target_ids=ids, target_probs=mass, target_top=ids[..., 0], real=real, valid=real)
    return draft, data


def test_hard_labels_move_mass_onto_the_argmax_inside_the_draft_vocabulary():
    _, batch = _tiny_draft_and_batch()
    batch.target_ids[0, :4, 0] = -1  # the target's argmax outside the draft vocabulary at four positions
    inside = batch.target_ids >= 0
    soft = label_mass(batch, 0.0)
    torch.testing.assert_close(soft, batch.target_probs * inside)
    hard = label_mass(batch, 0.3)
    torch.testing.assert_close(hard[..., 1:], 0.7 * soft[..., 1:])
    torch.testing.assert_close(hard[..., 0], 0.7 * soft[..., 0] + 0.3 * inside[..., 0])
    assert float(hard[0, :4, 0].abs().max()) == 0.0  # nothing moved onto a token the draft cannot produce
    only = label_mass(batch, 1.0)
    assert torch.equal(only[..., 0], inside[..., 0].float()) and float(only[..., 1:].abs().max()) == 0.0


@pytest.mark.skipif(not _can_compile("cpu"), reason="torch.compile needs a C++ compiler on CPU")
@pytest.mark.parametrize("hard", [0.0, 0.3])
def test_the_compiled_loss_is_the_eager_loss(hard: float):
    draft, batch = _tiny_draft_and_batch()
    config = TrainConfig(hard_label=hard)
    eager = unroll_loss(draft, batch, config)
    eager_grads = torch.autograd.grad(eager, [p for p in draft.parameters()])
    compiled = torch.compile(unroll_loss, dynamic=False)(draft, batch, config)
    compiled_grads = torch.autograd.grad(compiled, [p for p in draft.parameters()])
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    if hard:  # the share reaches the loss
        assert abs(float(eager) - float(unroll_loss(draft, batch, TrainConfig()))) > 1e-3
    for ours, expected in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(ours, expected, rtol=1e-3, atol=1e-5)
    assert np.isfinite(float(eager.detach())) and float(eager.detach()) > 0
