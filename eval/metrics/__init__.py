"""The evaluation metrics, as `evaluate` modules that load from this folder (no download)."""

from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).parent


def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load `precision_at_1` or `retrieval_scores` from this package."""
    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        raise ValueError(f"no metric {name!r} in {METRICS_DIR}")
    return evaluate.load(str(path))
