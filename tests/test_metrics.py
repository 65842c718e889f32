"""The evaluation metrics against values worked out by hand: ties, several relevant documents, graded relevance."""

import math

import numpy as np
import pytest

from eval.metrics import load_metric


@pytest.fixture(scope="module")
def precision_at_1():
    return load_metric("precision_at_1")


@pytest.fixture(scope="module")
def retrieval_scores():
    return load_metric("retrieval_scores")


def discount(rank):  # rank counted from 1
    return 1 / math.log2(rank + 1)


def test_precision_at_1_counts_a_tie_as_its_expected_value(precision_at_1):
    cases = [
        ([0.9, 0.1, 0.3], 0, 1.0),  # positive ranked first
        ([0.2, 0.8, 0.1], 0, 0.0),  # a negative ranked first
        ([0.5, 0.5, 0.1], 0, 1 / 2),  # positive tied with one negative at the top
        ([0.1, 0.5, 0.5], 0, 0.0),  # tie at the top without the positive
        ([0.7, 0.7, 0.7], 2, 1 / 3),  # three-way tie, positive not first in the list
        ([0.3, 0.9, 0.2, 0.4], 1, 1.0),  # positive at index 1
    ]
    for scores, positive, expected in cases:
        result = precision_at_1.compute(predictions=[scores], references=[positive])
        assert result["precision_at_1"] == pytest.approx(expected, abs=1e-12), scores
    result = precision_at_1.compute(predictions=[c[0] for c in cases], references=[c[1] for c in cases])
    assert result["precision_at_1"] == pytest.approx((1 + 0 + 1 / 2 + 0 + 1 / 3 + 1) / 6, abs=1e-12)
    assert "per_query" not in result
    result = precision_at_1.compute(predictions=[c[0] for c in cases], references=[c[1] for c in cases], per_query=True)
    assert result["per_query"] == pytest.approx([c[2] for c in cases], abs=1e-12)


def test_precision_at_1_rejects_a_positive_outside_the_list(precision_at_1):
    with pytest.raises(ValueError, match="positive index 3"):
        precision_at_1.compute(predictions=[[0.1, 0.2, 0.3]], references=[3])


def test_ndcg_and_recall_single_relevant_document(retrieval_scores):
    result = retrieval_scores.compute(predictions=[[0.9, 0.8, 0.7, 0.1]], references=[[0, 0, 1, 0]], k_values=[1, 2, 5])
    assert result["ndcg_at_1"] == 0.0 and result["ndcg_at_2"] == 0.0
    assert result["ndcg_at_5"] == pytest.approx(discount(3), abs=1e-12)  # found at rank 3, ideal rank 1
    assert (result["recall_at_1"], result["recall_at_2"], result["recall_at_5"]) == (0.0, 0.0, 1.0)


def test_ndcg_graded_relevance_with_several_relevant_documents(retrieval_scores):
    # Ranking: d0 (grade 1), d1 (0), d2 (2), d3 (3). Gain is the grade (trec_eval's ndcg_cut).
    result = retrieval_scores.compute(predictions=[[0.9, 0.8, 0.7, 0.6]], references=[[1, 0, 2, 3]], k_values=[1, 3, 4])
    ideal = [3, 2, 1]
    assert result["ndcg_at_1"] == pytest.approx(1 / 3, abs=1e-12)
    dcg_3 = 1 * discount(1) + 2 * discount(3)
    idcg_3 = sum(g * discount(r) for r, g in enumerate(ideal, start=1))
    assert result["ndcg_at_3"] == pytest.approx(dcg_3 / idcg_3, abs=1e-12)
    assert result["ndcg_at_3"] == pytest.approx(0.420004, abs=1e-6)
    dcg_4 = dcg_3 + 3 * discount(4)
    assert result["ndcg_at_4"] == pytest.approx(dcg_4 / idcg_3, abs=1e-12)
    assert result["recall_at_1"] == pytest.approx(1 / 3) and result["recall_at_3"] == pytest.approx(2 / 3)


def test_ndcg_and_recall_with_tied_scores(retrieval_scores):
    # d1 and d2 tie at ranks 2-3; with k = 2 only rank 2 counts: each of them sits there half the time.
    result = retrieval_scores.compute(predictions=[[0.9, 0.5, 0.5, 0.1]], references=[[0, 1, 0, 2]], k_values=[2, 3])
    idcg_2 = 2 * discount(1) + 1 * discount(2)
    assert result["ndcg_at_2"] == pytest.approx((1 * discount(2) / 2) / idcg_2, abs=1e-12)
    assert result["ndcg_at_2"] == pytest.approx(0.119906, abs=1e-6)
    assert result["recall_at_2"] == pytest.approx(0.5 / 2, abs=1e-12)
    # With k = 3 the whole tied group is inside: the grade-1 document averages ranks 2 and 3.
    assert result["ndcg_at_3"] == pytest.approx(1 * (discount(2) + discount(3)) / 2 / idcg_2, abs=1e-12)
    assert result["recall_at_3"] == pytest.approx(1 / 2, abs=1e-12)
    # Everything tied: the relevant document is first with probability 1/4.
    result = retrieval_scores.compute(predictions=[[0.3] * 4], references=[[1, 0, 0, 0]], k_values=[1])
    assert result["ndcg_at_1"] == pytest.approx(1 / 4) and result["recall_at_1"] == pytest.approx(1 / 4)


def test_queries_without_relevant_documents_are_left_out(retrieval_scores):
    result = retrieval_scores.compute(
        predictions=[[0.9, 0.1], [0.2, 0.8], [0.5, 0.4]], references=[[1, 0], [1, 0], [0, 0]], k_values=[1]
    )
    assert result["num_queries"] == 2
    assert result["ndcg_at_1"] == pytest.approx(0.5) and result["recall_at_1"] == pytest.approx(0.5)


def test_ndcg_agrees_with_scikit_learn_on_random_rankings_with_ties(retrieval_scores):
    from sklearn.metrics import ndcg_score

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=(20, 15)).astype(float) / 5  # few distinct values: many ties
    relevance = rng.integers(0, 4, size=(20, 15)) * (rng.random((20, 15)) < 0.3)
    relevance[:, 0] = np.maximum(relevance[:, 0], 1)  # every query has a relevant document
    for k in (1, 5, 10):
        ours = retrieval_scores.compute(predictions=scores.tolist(), references=relevance.tolist(), k_values=[k])
        reference = np.mean([ndcg_score([r], [s], k=k, ignore_ties=False) for s, r in zip(scores, relevance)])
        assert ours[f"ndcg_at_{k}"] == pytest.approx(reference, abs=1e-6)
