"""Precision@1 for candidate ranking (the MMEB metric), with exact ties scored as an expected value."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Precision@1 of ranking a list of candidates per query: a query scores 1 when its positive candidate has the
highest similarity. When several candidates share the highest score exactly, the query scores 1/t if the positive
is one of those t candidates (the expected Precision@1 of breaking the tie at random). MMEB's reference scorer
takes `argmax`, which breaks every tie toward the first candidate, the positive; a model whose embeddings collapse
would then score 100%.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): similarity of each candidate to the query, one list per query.
    references (`list` of `int`): index of the positive candidate in that query's list.
    per_query (`bool`, default False): also return each query's score (for paired tests between two models).
Returns:
    precision_at_1 (`float`): mean over queries, in [0, 1].
    per_query (`list` of `float`, only with `per_query=True`): each query's score, in [0, 1].
Examples:
    >>> metric = evaluate.load("eval/metrics/precision_at_1")
    >>> metric.compute(predictions=[[0.9, 0.1], [0.2, 0.2]], references=[0, 1])
    {'precision_at_1': 0.75}
"""


def precision_at_1_per_query(scores, positive_index):
    scores = np.asarray(scores, dtype=np.float64)
    if not 0 <= positive_index < len(scores):
        raise ValueError(f"positive index {positive_index} outside a list of {len(scores)} candidates")
    top = scores == scores.max()
    return float(top[positive_index]) / int(top.sum())


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PrecisionAt1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, per_query=False):
        hits = [precision_at_1_per_query(scores, positive) for scores, positive in zip(predictions, references)]
        result = {"precision_at_1": float(np.mean(hits)) if hits else float("nan")}
        if per_query:
            result["per_query"] = hits
        return result
