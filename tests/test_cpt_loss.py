"""The CPT losses against independent hand computations: the fused chunked masked-position MLM loss (value and
gradients) and the MAE patch loss (closed-form values)."""

import math

import pytest
import torch
import torch.nn.functional as F

from moca.training.cpt import masked_lm_loss, masked_patch_loss


def reference_mlm_loss(hidden_states, labels, head_weight):
    """Cross-entropy written out: full logits `hidden @ W.T`, log-softmax by hand (max-shifted log-sum-exp),
    the log-probability of each label, mean over the positions whose label is not -100."""
    logits = hidden_states @ head_weight.T  # (batch, length, vocab): what the chunked loss avoids
    shifted = logits - logits.max(dim=-1, keepdim=True).values.detach()
    log_probs = shifted - shifted.exp().sum(dim=-1, keepdim=True).log()
    keep = labels.ne(-100)
    picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum() / keep.sum()


def _mlm_inputs():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 17, 32, generator=generator)
    weight = torch.randn(1000, 32, generator=generator) * 0.2
    labels = torch.randint(0, 1000, (3, 17), generator=generator)
    labels[torch.rand(3, 17, generator=generator) > 0.4] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])  # one row, a size not dividing N, more than N rows
def test_chunked_loss_and_gradients_equal_the_reference(chunk_size):
    hidden, weight, labels = _mlm_inputs()
    num_masked = int(labels.ne(-100).sum())
    assert 5 < num_masked < 40 and num_masked % 3 != 0 and chunk_size != num_masked

    # The implementation in float32 (what it computes in); the reference in float64 on the same values.
    hidden_a, weight_a = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    hidden_b, weight_b = hidden.double().requires_grad_(), weight.double().requires_grad_()
    chunked = masked_lm_loss(hidden_a, labels, weight_a, chunk_size=chunk_size)
    reference = reference_mlm_loss(hidden_b, labels, weight_b)
    chunked.backward()
    reference.backward()

    # float32 against float64: absolute tolerance 1e-5 on the loss (about 7) and on every gradient entry.
    assert chunked.dtype == torch.float32
    assert abs(chunked.item() - reference.item()) < 1e-5
    torch.testing.assert_close(hidden_a.grad.double(), hidden_b.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(weight_a.grad.double(), weight_b.grad, rtol=0, atol=1e-5)
    # The gradients are not trivially small, so the tolerance is meaningful.
    assert hidden_b.grad.abs().max() > 1e-2 and weight_b.grad.abs().max() > 1e-3
    # Unmasked positions get no gradient.
    assert hidden_a.grad[labels.eq(-100)].abs().max() == 0


def test_uniform_logits_give_log_vocab():
    # A zero head makes every logit 0: the cross-entropy is log(vocab) exactly, whatever the labels.
    hidden = torch.randn(2, 9, 16)
    labels = torch.tensor([[5, -100, 0, 49, -100, 7, 7, -100, 1]] * 2)
    for chunk_size in (1, 3, 100):
        loss = masked_lm_loss(hidden, labels, torch.zeros(50, 16), chunk_size=chunk_size)
        assert loss.item() == pytest.approx(math.log(50), abs=1e-6)


def test_nothing_masked_gives_zero_loss_with_a_graph():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    loss = masked_lm_loss(hidden, torch.full((2, 5), -100), weight)
    assert loss.requires_grad and loss.grad_fn is not None
    (loss + (hidden**2).sum() * 0).backward()  # backpropagates without error
    assert loss.item() == 0
    assert hidden.grad is not None and hidden.grad.abs().max() == 0


def _hand_mse(predictions, targets):
    """Sum of squared differences over every value of every patch, divided by the count of values."""
    values = [(p - t) ** 2 for p_row, t_row in zip(predictions.tolist(), targets.tolist()) for p, t in zip(p_row, t_row)]
    return sum(values) / len(values)


@pytest.mark.parametrize("offset", [0.5, -2.0, 3.0])
def test_patch_loss_of_a_constant_offset_is_its_square(offset):
    targets = torch.randn(6, 4 * 1176)
    loss = masked_patch_loss(targets + offset, targets)
    # float32 rounding of `targets + offset` limits agreement to about 1e-6 relative.
    assert loss.item() == pytest.approx(offset**2, rel=1e-5)


def test_patch_loss_equals_hand_computed_mean_of_squared_differences():
    generator = torch.Generator().manual_seed(0)
    predictions, targets = torch.randn(5, 48, generator=generator), torch.randn(5, 48, generator=generator)
    assert masked_patch_loss(predictions, targets).item() == pytest.approx(_hand_mse(predictions, targets), rel=1e-6)
    # Patches with errors 1 and 3 everywhere: the mean over patches is (1 + 9) / 2 = 5, not a sum (10 or 10 * 48).
    targets = torch.zeros(2, 48)
    predictions = torch.stack([torch.full((48,), 1.0), torch.full((48,), -3.0)])
    assert masked_patch_loss(predictions, targets).item() == pytest.approx(5.0, abs=1e-6)


def test_patch_loss_is_a_mean_over_patches():
    generator = torch.Generator().manual_seed(1)
    predictions, targets = torch.randn(3, 4 * 1176, generator=generator), torch.randn(3, 4 * 1176, generator=generator)
    once = masked_patch_loss(predictions, targets)
    twice = masked_patch_loss(torch.cat([predictions, predictions]), torch.cat([targets, targets]))
    assert twice.item() == pytest.approx(once.item(), rel=1e-6)
    assert masked_patch_loss(targets.clone(), targets).item() == 0.0
    # bf16 inputs are compared in float32.
    assert masked_patch_loss(predictions.bfloat16(), targets.bfloat16()).dtype == torch.float32


def naive_mlm_loss(hidden_states, labels, head_weight):
    """The loss autograd differentiates itself: full logits, then cross-entropy with ignored positions."""
    logits = F.linear(hidden_states, head_weight).float()
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def _fused_and_naive(hidden, weight, labels, scale=1.0, **kwargs):
    """(loss, hidden grad, weight grad) of the fused loss and of the naive one, each scaled by `scale` before
    the backward (as the Trainer divides by the accumulation steps)."""
    results = []
    for loss_fn in (lambda h, l, w: masked_lm_loss(h, l, w, **kwargs), naive_mlm_loss):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = loss_fn(h, labels, w)
        (loss * scale).backward()
        results.append((loss.detach(), h.grad, w.grad))
    return results


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 10_000])
def test_fused_loss_and_gradients_equal_autograds_naive_loss(chunk_size):
    hidden, weight, labels = _mlm_inputs()
    (loss, grad_h, grad_w), (naive, naive_h, naive_w) = _fused_and_naive(hidden, weight, labels, 0.25,
                                                                         chunk_size=chunk_size)
    # Same float32 log-softmax as F.cross_entropy: the loss differs only in the order of the final sum.
    torch.testing.assert_close(loss, naive, rtol=1e-6, atol=0)
    # Gradients: 1e-5 relative (of the largest entry), with the 0.25 of the backward's incoming gradient applied.
    for fused, reference in ((grad_h, naive_h), (grad_w, naive_w)):
        assert reference.abs().max() > 1e-3
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


def test_fused_loss_in_bfloat16_matches_the_naive_bfloat16_loss():
    # Both compute logits and gradient products in bf16 (float32 softmax); the fused one also accumulates the
    # head's gradient over chunks in bf16, so the tolerance is bf16's (3 significant digits).
    hidden, weight, labels = _mlm_inputs()
    (loss, grad_h, grad_w), (naive, naive_h, naive_w) = _fused_and_naive(
        hidden.bfloat16(), weight.bfloat16(), labels, chunk_size=4
    )
    assert grad_h.dtype == grad_w.dtype == torch.bfloat16 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, naive, rtol=1e-6, atol=0)
    for fused, reference in ((grad_h, naive_h), (grad_w, naive_w)):
        scale = reference.abs().max().item()
        assert (fused.float() - reference.float()).abs().max() < 2e-2 * scale


def test_fused_loss_with_a_frozen_head_and_without_gradients():
    hidden, weight, labels = _mlm_inputs()
    h = hidden.clone().requires_grad_()
    masked_lm_loss(h, labels, weight, chunk_size=4).backward()  # the head needs no gradient
    h_naive = hidden.clone().requires_grad_()
    naive_mlm_loss(h_naive, labels, weight).backward()
    torch.testing.assert_close(h.grad, h_naive.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        loss = masked_lm_loss(hidden, labels, weight, chunk_size=4)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, naive_mlm_loss(hidden, labels, weight), rtol=1e-6, atol=0)


def test_fused_loss_with_a_head_tied_to_the_input_embeddings():
    # Qwen2.5-VL-3B ties them: the head's gradient adds up with the embedding lookup's, and the hidden states'
    # gradient flows back into the same weight.
    _, weight, labels = _mlm_inputs()
    ids = torch.randint(0, weight.shape[0], labels.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for loss_fn in (lambda h, l, w: masked_lm_loss(h, l, w, chunk_size=4), naive_mlm_loss):
        w = weight.clone().requires_grad_()
        hidden = torch.tanh(F.embedding(ids, w) * 3)
        loss_fn(hidden, labels, w).backward()
        grads.append(w.grad)
    assert grads[1].abs().max() > 1e-3
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5 * grads[1].abs().max().item())


def test_fused_loss_under_autocast_keeps_float32_gradients():
    # Mixed precision (`--bf16` with float32 weights): logits in bf16 as autocast makes them, the gradient
    # products in the weights' float32, gradients of the weights' dtype; close to autograd's under autocast.
    hidden, weight, labels = _mlm_inputs()
    grads = []
    for loss_fn in (lambda h, l, w: masked_lm_loss(h, l, w, chunk_size=4), naive_mlm_loss):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(h, labels, w)
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    (loss, grad_h, grad_w), (naive, naive_h, naive_w) = grads
    assert grad_h.dtype == grad_w.dtype == torch.float32
    torch.testing.assert_close(loss, naive, rtol=1e-6, atol=0)  # the same bf16 logits, the same float32 softmax
    for fused, reference in ((grad_h, naive_h), (grad_w, naive_w)):
        assert (fused - reference).abs().max() < 2e-2 * reference.abs().max()
