"""Evaluation of MoCa embedding models on MMEB and ViDoRe-v2 (`python -m eval.mmeb`, `python -m eval.vidore`)."""

import importlib

_EXPORTS = {
    "evaluate_mmeb": "mmeb",
    "evaluate_vidore": "vidore",
    "load_model": "encoding",
    "EmbeddingCache": "encoding",
    "encode_with_cache": "encoding",
    "model_fingerprint": "encoding",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    # Imported on first use: `python -m eval.mmeb` must not find `eval.mmeb` already imported by the package.
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
