"""The chunked masked-position MLM loss equals the naive full-vocabulary loss, value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from moca.modeling_moca import masked_lm_loss, masked_patch_loss


def naive_mlm_loss(hidden_states, labels, head_weight):
    logits = hidden_states @ head_weight.T  # (batch, length, vocab): what the chunked loss avoids
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_chunked_loss_and_gradients_equal_naive(chunk_size):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 17, 32, generator=generator, dtype=torch.float64).float()
    weight = torch.randn(1000, 32, generator=generator) * 0.2
    labels = torch.randint(0, 1000, (3, 17), generator=generator)
    labels[torch.rand(3, 17, generator=generator) > 0.4] = -100
    assert 5 < int(labels.ne(-100).sum()) < 40

    hidden_a, weight_a = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    hidden_b, weight_b = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    chunked = masked_lm_loss(hidden_a, labels, weight_a, chunk_size=chunk_size)
    naive = naive_mlm_loss(hidden_b, labels, weight_b)
    chunked.backward()
    naive.backward()

    # fp32 throughout; the sums run in a different order, hence a tolerance of a few ulps.
    torch.testing.assert_close(chunked, naive, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden_a.grad, hidden_b.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight_a.grad, weight_b.grad, rtol=1e-5, atol=1e-7)
    # Unmasked positions get no gradient.
    assert hidden_a.grad[labels.eq(-100)].abs().max() == 0


def test_nothing_masked_gives_zero_loss_with_a_graph():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    loss = masked_lm_loss(hidden, torch.full((2, 5), -100), weight)
    loss.backward()
    assert loss.item() == 0 and hidden.grad.abs().max() == 0


def test_patch_loss_is_mean_squared_error():
    predictions, targets = torch.randn(6, 4 * 1176), torch.randn(6, 4 * 1176)
    expected = ((predictions - targets) ** 2).mean()
    torch.testing.assert_close(masked_patch_loss(predictions, targets), expected)
