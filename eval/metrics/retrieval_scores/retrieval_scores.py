"""nDCG@k and Recall@k over a scored corpus, with graded relevance and tie-aware ranking."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
nDCG@k (linear gain = relevance grade, discount 1/log2(rank + 1), as trec_eval's ndcg_cut) and Recall@k (share of
the relevant documents, grade > 0, found in the top k). Documents with exactly equal scores are ranked as a tie:
each metric is its expected value over the orders of the tied documents (McSherry & Najork, ECIR 2008), the
convention of scikit-learn's `ndcg_score`. Written here because no library offers tie-aware Recall@k, and nDCG and
Recall must share one ranking convention. Queries without any relevant document are left out of the means.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): score of every corpus document for a query, one list per query.
    references (`list` of `list` of `int`): relevance grade of every corpus document (0 = not relevant), aligned
        with `predictions`.
    k_values (`list` of `int`, defaults to `[1, 5, 10]`): cut-offs.
Returns:
    `ndcg_at_{k}` and `recall_at_{k}` for every k, means over the queries that have a relevant document, and
    `num_queries`, the number of those queries.
Examples:
    >>> metric = evaluate.load("eval/metrics/retrieval_scores")
    >>> metric.compute(predictions=[[0.9, 0.1]], references=[[0, 1]], k_values=[1, 2])
    {'ndcg_at_1': 0.0, 'recall_at_1': 0.0, 'ndcg_at_2': 0.6309..., 'recall_at_2': 1.0, 'num_queries': 1}
"""


def _tie_groups(scores):
    """Yield (start, end, document indices) of each group of equal scores, best group first."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for start, end in zip(starts, ends):
        yield start, end, order[start:end]


def scores_per_query(scores, relevance, k_values):
    scores = np.asarray(scores, dtype=np.float64)
    relevance = np.asarray(relevance, dtype=np.float64)
    if scores.shape != relevance.shape:
        raise ValueError(f"{len(scores)} scores but {len(relevance)} relevance grades")
    num_relevant = int((relevance > 0).sum())
    discounts = 1.0 / np.log2(np.arange(len(scores)) + 2.0)
    ideal_gains = np.sort(relevance)[::-1]
    result = {}
    for k in k_values:
        dcg = found = 0.0
        for start, end, members in _tie_groups(scores):
            if start >= k:
                break
            # Each tied document is equally likely to sit at each position of its group.
            positions_in_top_k = range(start, min(end, k))
            group_size = end - start
            dcg += relevance[members].sum() * discounts[positions_in_top_k].sum() / group_size
            found += (relevance[members] > 0).sum() * len(positions_in_top_k) / group_size
        ideal_dcg = (ideal_gains[:k] * discounts[:k]).sum()
        result[f"ndcg_at_{k}"] = dcg / ideal_dcg
        result[f"recall_at_{k}"] = found / num_relevant
    return result


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalScores(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references, k_values=(1, 5, 10)):
        per_query = [
            scores_per_query(scores, relevance, k_values)
            for scores, relevance in zip(predictions, references)
            if any(grade > 0 for grade in relevance)
        ]
        names = [f"{name}_at_{k}" for k in k_values for name in ("ndcg", "recall")]
        result = {
            name: float(np.mean([query[name] for query in per_query])) if per_query else float("nan") for name in names
        }
        result["num_queries"] = len(per_query)
        return result
