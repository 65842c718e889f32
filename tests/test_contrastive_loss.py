import math

import pytest
import torch
import torch.nn.functional as F

from moca.training.contrastive import contrastive_loss


def hand_info_nce(queries, documents, temperature):
    """InfoNCE written out with Python floats: query i's positive is document i, every document is a candidate."""

    def cosine(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / math.sqrt(sum(x * x for x in a)) / math.sqrt(sum(y * y for y in b))

    losses = []
    for i, query in enumerate(queries):
        scores = [cosine(query, document) / temperature for document in documents]
        losses.append(-scores[i] + math.log(sum(math.exp(s) for s in scores)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("num_hard_negatives", [0, 2])
def test_loss_equals_hand_computed_info_nce(num_hard_negatives):
    torch.manual_seed(0)
    queries = torch.randn(3, 5, dtype=torch.float64)
    documents = torch.randn(3 + 3 * num_hard_negatives, 5, dtype=torch.float64)
    expected = hand_info_nce(queries.tolist(), documents.tolist(), temperature=0.5)
    loss = contrastive_loss(queries, documents, temperature=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def _rotated_pair(phi):
    """Queries e1, e2 and documents (cos phi, sin phi), (sin phi, cos phi): cos(q_i, d_i) = cos phi for the
    positive and cos(q_i, d_j) = sin phi for the other query's positive, exactly."""
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    documents = torch.tensor([[math.cos(phi), math.sin(phi)], [math.sin(phi), math.cos(phi)]], dtype=torch.float64)
    return queries, documents


def _closed_form(s_pos, s_negs, temperature):
    """-log softmax at the positive: log(1 + sum_j exp((s_j - s_pos) / T))."""
    return math.log1p(sum(math.exp((s - s_pos) / temperature) for s in s_negs))


@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_two_queries_with_known_cosines_give_the_closed_form(temperature):
    phi = 0.3
    queries, documents = _rotated_pair(phi)
    # Both queries see one in-batch negative at cos = sin phi: the mean over queries is the per-query value.
    expected = _closed_form(math.cos(phi), [math.sin(phi)], temperature)
    loss = contrastive_loss(queries, documents, temperature=temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_orthonormal_in_batch_negatives_give_log_one_plus_n_minus_one_exp(temperature):
    # q_i = e_i, d_i = 0.6 e_i + 0.8 e_{n+i}: cos(q_i, d_i) = 0.6 and cos(q_i, d_j) = 0 for j != i.
    n = 4
    eye = torch.eye(2 * n, dtype=torch.float64)
    queries, documents = eye[:n], 0.6 * eye[:n] + 0.8 * eye[n:]
    expected = math.log(1 + (n - 1) * math.exp((0.0 - 0.6) / temperature))
    loss = contrastive_loss(queries, documents, temperature=temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_hard_negatives_enter_the_denominator_of_every_query():
    phi, temperature = 0.3, 0.5
    queries, positives = _rotated_pair(phi)
    queries, positives = F.pad(queries, (0, 2)), F.pad(positives, (0, 2))  # 4 dimensions, the same cosines
    r = 1 / math.sqrt(2)
    # Hard negatives after the positives: h1 is at cos r from both queries, h2 at cos r from q1 and 0 from q2.
    hard_negatives = torch.tensor([[r, r, 0.0, 0.0], [r, 0.0, r, 0.0]], dtype=torch.float64)
    expected = (
        _closed_form(math.cos(phi), [math.sin(phi), r, r], temperature)
        + _closed_form(math.cos(phi), [math.sin(phi), r, 0.0], temperature)
    ) / 2
    loss = contrastive_loss(queries, torch.cat([positives, hard_negatives]), temperature=temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-6)
    # What an implementation giving query i only hard negative i, or no hard negatives, would return instead.
    only_own = (
        _closed_form(math.cos(phi), [math.sin(phi), r], temperature)
        + _closed_form(math.cos(phi), [math.sin(phi), 0.0], temperature)
    ) / 2
    without = _closed_form(math.cos(phi), [math.sin(phi)], temperature)
    assert abs(loss.item() - only_own) > 0.1 and abs(loss.item() - without) > 0.1


def test_scaling_the_embeddings_does_not_change_the_loss():
    torch.manual_seed(0)
    queries, documents = torch.randn(3, 8, dtype=torch.float64), torch.randn(7, 8, dtype=torch.float64)
    loss = contrastive_loss(queries, documents, temperature=0.05)
    query_scale = torch.tensor([[0.01], [3.0], [250.0]], dtype=torch.float64)
    document_scale = torch.logspace(-2, 2, 7, dtype=torch.float64)[:, None]
    scaled = contrastive_loss(queries * query_scale, documents * document_scale, temperature=0.05)
    assert scaled.item() == pytest.approx(loss.item(), rel=1e-9)
    # The loss does depend on the directions: a perturbed document changes it.
    moved = documents.clone()
    moved[0] = moved[1]
    assert abs(contrastive_loss(queries, moved, temperature=0.05).item() - loss.item()) > 1e-3


def test_matryoshka_closed_form_uses_renormalised_truncations():
    # At 4 dims |d_i| = sqrt(2): cosines cos(phi) / sqrt(2) and sin(phi) / sqrt(2); truncated to 2 dims and
    # re-normalised: cos(phi) and sin(phi).
    phi, temperature = 0.3, 0.5
    queries, documents = _rotated_pair(phi)
    queries = F.pad(queries, (0, 2))
    documents = torch.cat([documents, torch.eye(2, dtype=torch.float64)], dim=1)
    c, s = math.cos(phi), math.sin(phi)
    at_4 = _closed_form(c / math.sqrt(2), [s / math.sqrt(2)], temperature)
    at_2 = _closed_form(c, [s], temperature)
    loss = contrastive_loss(queries, documents, temperature=temperature, matryoshka_dims=[4, 2])
    assert loss.item() == pytest.approx((at_4 + at_2) / 2, rel=1e-6, abs=1e-6)
    assert contrastive_loss(queries, documents, temperature=temperature).item() == pytest.approx(at_4, rel=1e-6)
    # Truncating without re-normalising would give at_4 at both dims: far from the expected value.
    assert abs((at_4 + at_2) / 2 - at_4) > 0.01


def test_matryoshka_loss_is_the_mean_over_truncated_dimensions():
    torch.manual_seed(0)
    queries, documents = torch.randn(3, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    expected = sum(hand_info_nce(queries[:, :d].tolist(), documents[:, :d].tolist(), 0.03) for d in (8, 4, 2)) / 3
    loss = contrastive_loss(queries, documents, temperature=0.03, matryoshka_dims=[8, 4, 2])
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_fewer_documents_than_queries_is_an_error():
    with pytest.raises(ValueError, match="every query needs its positive"):
        contrastive_loss(torch.randn(3, 4), torch.randn(2, 4))
