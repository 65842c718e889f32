"""Evaluation of MoCa embedding models on MMEB and ViDoRe-v2 (`python -m eval.mmeb`, `python -m eval.vidore`)."""

from .encoding import EmbeddingCache, encode_with_cache, load_model, model_fingerprint
from .mmeb import evaluate_mmeb
from .vidore import evaluate_vidore

__all__ = ["EmbeddingCache", "encode_with_cache", "evaluate_mmeb", "evaluate_vidore", "load_model", "model_fingerprint"]
