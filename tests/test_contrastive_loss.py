import math

import pytest
import torch

from moca.contrastive import contrastive_loss


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


def test_hard_negatives_raise_the_loss_and_temperature_matters():
    torch.manual_seed(0)
    queries, positives = torch.randn(4, 8), torch.randn(4, 8)
    hard_negatives = queries + 0.01 * torch.randn(8, 8).view(2, 4, 8).mean(0)  # near copies of the queries
    without = contrastive_loss(queries, positives)
    with_negatives = contrastive_loss(queries, torch.cat([positives, hard_negatives]))
    assert with_negatives > without
    assert contrastive_loss(queries, positives, temperature=1.0) != pytest.approx(without.item())


def test_matryoshka_loss_is_the_mean_over_truncated_dimensions():
    torch.manual_seed(0)
    queries, documents = torch.randn(3, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    expected = sum(hand_info_nce(queries[:, :d].tolist(), documents[:, :d].tolist(), 0.03) for d in (8, 4, 2)) / 3
    loss = contrastive_loss(queries, documents, temperature=0.03, matryoshka_dims=[8, 4, 2])
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_fewer_documents_than_queries_is_an_error():
    with pytest.raises(ValueError, match="every query needs its positive"):
        contrastive_loss(torch.randn(3, 4), torch.randn(2, 4))
