import math

import pytest
import torch
import torch.nn.functional as F

from moca.training.contrastive import contrastive_loss


def hand_info_nce(queries, documents, temperature, candidates=None):
    """InfoNCE written out with Python floats: query i's positive is document i; `candidates(i)` lists the
    documents query i is scored against (default: every document)."""

    def cosine(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / math.sqrt(sum(x * x for x in a)) / math.sqrt(sum(y * y for y in b))

    losses = []
    for i, query in enumerate(queries):
        scored = candidates(i) if candidates else range(len(documents))
        scores = {j: cosine(query, documents[j]) / temperature for j in scored}
        losses.append(-scores[i] + math.log(sum(math.exp(s) for s in scores.values())))
    return sum(losses) / len(losses)


def own_candidates(num_queries, negatives_per_query):
    """All positives, then only the query's own hard negatives (grouped by query after the positives)."""
    starts = [num_queries + sum(negatives_per_query[:i]) for i in range(num_queries)]
    return lambda i: [*range(num_queries), *range(starts[i], starts[i] + negatives_per_query[i])]


# float64 throughout: the hand computation and the loss agree to rounding (asserted to a relative 1e-10).
@pytest.mark.parametrize("negatives_per_query", [[0, 0, 0], [2, 2, 2], [2, 0, 1]])
def test_own_negatives_loss_equals_hand_computed_info_nce(negatives_per_query):
    torch.manual_seed(0)
    queries = torch.randn(3, 5, dtype=torch.float64)
    documents = torch.randn(3 + sum(negatives_per_query), 5, dtype=torch.float64)
    expected = hand_info_nce(queries.tolist(), documents.tolist(), 0.5, own_candidates(3, negatives_per_query))
    loss = contrastive_loss(queries, documents, temperature=0.5, negatives_per_query=negatives_per_query)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    every = hand_info_nce(queries.tolist(), documents.tolist(), 0.5)
    batch = contrastive_loss(queries, documents, temperature=0.5, negatives_per_query=negatives_per_query,
                             negatives="batch")  # fmt: skip
    assert batch.item() == pytest.approx(every, rel=1e-10)
    if sum(negatives_per_query):
        assert abs(every - expected) > 1e-3  # the two scorings differ as soon as there are hard negatives


@pytest.mark.parametrize("num_hard_negatives", [0, 2])
def test_default_negatives_are_an_equal_share_per_query_in_order(num_hard_negatives):
    torch.manual_seed(1)
    queries = torch.randn(3, 5, dtype=torch.float64)
    documents = torch.randn(3 + 3 * num_hard_negatives, 5, dtype=torch.float64)
    expected = hand_info_nce(queries.tolist(), documents.tolist(), 0.5, own_candidates(3, [num_hard_negatives] * 3))
    assert contrastive_loss(queries, documents, temperature=0.5).item() == pytest.approx(expected, rel=1e-10)


def test_own_negatives_get_gradient_only_from_their_query():
    """Query 1 has no hard negative: query 0's negatives get the same gradient whatever query 1 is; with batch
    scoring, query 1 pushes them too."""
    torch.manual_seed(2)
    documents = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)

    def negatives_grad(queries, negatives):
        loss = contrastive_loss(queries, documents, temperature=0.1, negatives_per_query=[2, 0], negatives=negatives)
        return torch.autograd.grad(loss, documents)[0][2:]

    queries = torch.randn(2, 4, dtype=torch.float64)
    other = torch.cat([queries[:1], torch.randn(1, 4, dtype=torch.float64)])
    own = negatives_grad(queries, "own")
    assert own.abs().max() > 1e-3
    torch.testing.assert_close(negatives_grad(other, "own"), own, rtol=1e-12, atol=1e-12)
    assert (negatives_grad(other, "batch") - negatives_grad(queries, "batch")).abs().max() > 1e-3


def test_negative_counts_must_fit_the_batch():
    queries, documents = torch.randn(2, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="3 hard negatives do not split evenly over 2 queries"):
        contrastive_loss(queries, documents)
    with pytest.raises(ValueError, match="negatives_per_query lists 2 queries and 2 hard negatives; the batch has 2 "
                                         "queries and 3 hard negatives"):  # fmt: skip
        contrastive_loss(queries, documents, negatives_per_query=[1, 1])
    with pytest.raises(ValueError, match="negatives='all': use one of"):
        contrastive_loss(queries, documents, negatives="all")


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


def test_batch_scoring_puts_every_hard_negative_in_every_denominator():
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
    documents = torch.cat([positives, hard_negatives])
    loss = contrastive_loss(queries, documents, temperature=temperature, negatives="batch")
    assert loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-6)
    # Own scoring (the release): query i sees only hard negative i.
    only_own = (
        _closed_form(math.cos(phi), [math.sin(phi), r], temperature)
        + _closed_form(math.cos(phi), [math.sin(phi), 0.0], temperature)
    ) / 2
    assert contrastive_loss(queries, documents, temperature=temperature).item() == pytest.approx(only_own, rel=1e-6)
    without = _closed_form(math.cos(phi), [math.sin(phi)], temperature)
    assert abs(loss.item() - only_own) > 0.1 and abs(loss.item() - without) > 0.1 and abs(only_own - without) > 0.1


def test_scaling_the_embeddings_does_not_change_the_loss():
    torch.manual_seed(0)
    queries, documents = torch.randn(3, 8, dtype=torch.float64), torch.randn(9, 8, dtype=torch.float64)
    loss = contrastive_loss(queries, documents, temperature=0.05)
    query_scale = torch.tensor([[0.01], [3.0], [250.0]], dtype=torch.float64)
    document_scale = torch.logspace(-2, 2, 9, dtype=torch.float64)[:, None]
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
    own = own_candidates(3, [1, 1, 1])
    expected = sum(hand_info_nce(queries[:, :d].tolist(), documents[:, :d].tolist(), 0.03, own) for d in (8, 4, 2)) / 3
    loss = contrastive_loss(queries, documents, temperature=0.03, matryoshka_dims=[8, 4, 2])
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_fewer_documents_than_queries_is_an_error():
    with pytest.raises(ValueError, match="every query needs its positive"):
        contrastive_loss(torch.randn(3, 4), torch.randn(2, 4))
