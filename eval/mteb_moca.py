"""A MoCa checkpoint as an `mteb` encoder, so that mteb runs ViDoRe, MIEB and text tasks with it.

    import mteb
    from eval.mteb_moca import register_moca_model

    register_moca_model("path/or/hub-name")   # a ModelMeta with MoCa's loader, in mteb's model registry
    model = mteb.get_model("path/or/hub-name")
    mteb.evaluate(model, mteb.get_tasks(tasks=["Vidore2ESGReportsRetrieval"]))

(or `MoCaMTEBEncoder(name, model=already_loaded_model)`).

Prompts follow the input's modality, as mteb's own MoCa wrapper and the release do (not the task's instruction):
text alone is encoded raw; an image with text gets `image_question` ("Represent the given image with the following
question: {text}"); an image alone gets `document_page` in document tasks (ViDoRe: mteb type
"DocumentUnderstanding") and `image` otherwise. The names are the checkpoint's `config.prompts`.
"""

from typing import Any

import numpy as np
import torch
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType
from PIL import Image

from .encoding import load_model


def batch_to_inputs(batch: dict[str, list]) -> list[dict]:
    """An mteb batch (columns `text` and/or `image`; an image cell may hold a list of images) as MoCa inputs."""
    size = len(batch["text"]) if "text" in batch else len(batch["image"])
    texts = batch.get("text") or [None] * size
    images = batch.get("image") or [None] * size
    inputs = []
    for text, image in zip(texts, images):
        if isinstance(image, Image.Image):
            image = image.convert("RGB")
        elif isinstance(image, list):
            image = [item.convert("RGB") for item in image] or None
        inputs.append({"text": text or None, "image": image})
    return inputs


def moca_model_meta(name: str, revision: str | None = None, config: dict | None = None, **fields: Any) -> ModelMeta:
    """mteb's metadata of a MoCa checkpoint, read from its `config.json` (`config`: that file's content, else read
    from `name`; no weights loaded), with MoCa's loader.

    `fields` fill or override ModelMeta's (`release_date`, `license`, `languages`, `training_datasets`, ...)."""
    from transformers import PretrainedConfig

    from moca.configuration_moca import is_moca_config_dict, nested_config_dict

    if config is None:
        config = PretrainedConfig.get_config_dict(name, revision=revision)[0]
    if not is_moca_config_dict(config):
        raise ValueError(f"{name} is not a MoCa checkpoint (its config.json has no 'moca' settings).")
    backbone = nested_config_dict(config)["vlm_config"]
    text_config = backbone.get("text_config") or backbone
    meta = {
        "loader": MoCaMTEBEncoder,
        "name": name,
        "revision": revision,
        "release_date": None,
        "languages": None,
        "n_parameters": None,
        "memory_usage_mb": None,
        "max_tokens": text_config.get("max_position_embeddings"),
        "embed_dim": text_config["hidden_size"],
        "license": None,
        "open_weights": True,
        "public_training_code": None,
        "public_training_data": None,
        "framework": ["PyTorch", "Transformers", "safetensors"],
        "similarity_fn_name": ScoringFunction.COSINE,
        "use_instructions": True,
        "training_datasets": None,
        "modalities": ["image", "text"],
        "model_type": ["dense"],
    }
    return ModelMeta(**{**meta, **fields})


def register_moca_model(name: str, revision: str | None = None, **fields: Any) -> ModelMeta:
    """Put a MoCa checkpoint into mteb's model registry, so that `mteb.get_model(name)` loads it with MoCa's
    encoder (task-type prompts: `MoCaMTEBEncoder.prompt_names`). mteb has no public registration call; its
    registry is the dict of the ModelMeta objects it ships, which `get_model_meta` reads."""
    from mteb.models.model_implementations import MODEL_REGISTRY

    meta = moca_model_meta(name, revision, **fields)
    MODEL_REGISTRY[name] = meta
    return meta


class MoCaMTEBEncoder(AbsEncoder):
    """mteb's encoder protocol over `MoCaModel.encode` / `encode_queries` / `encode_documents`."""

    def __init__(
        self,
        model_name: str,
        revision: str | None = None,
        *,
        device: str | None = None,
        model=None,
        dtype: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.model = (
            model if model is not None else load_model(model_name, dtype=dtype, device=device, revision=revision)
        )
        self.mteb_model_meta = moca_model_meta(
            model_name, revision, config=self.model.config.to_stock_dict(),
            n_parameters=sum(parameter.numel() for parameter in self.model.parameters()),
        )  # fmt: skip

    def prompt_names(self, task_metadata) -> dict[str, str | None]:
        """The prompt name for each modality of an input of this task."""
        image_only = "document_page" if getattr(task_metadata, "type", None) == "DocumentUnderstanding" else "image"
        return {"text": None, "image": image_only, "image+text": "image_question"}

    def encode(
        self,
        inputs,
        *,
        task_metadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        show_progress_bar: bool = True,
        **kwargs: Any,
    ) -> np.ndarray:
        names = self.prompt_names(task_metadata)
        embeddings = []
        for batch in inputs:
            items = batch_to_inputs(batch)
            # One encode per modality group (each has its prompt); rows go back to their places afterwards.
            groups: dict[str, list[int]] = {}
            for row, item in enumerate(items):
                kind = "text" if item["image"] is None else ("image+text" if item["text"] else "image")
                groups.setdefault(kind, []).append(row)
            batch_embeddings = [None] * len(items)
            for kind, rows in groups.items():
                encoded = self.model.encode(
                    [items[row] for row in rows], prompt_name=names[kind], batch_size=len(rows), show_progress_bar=False
                )
                for row, embedding in zip(rows, encoded):
                    batch_embeddings[row] = embedding
            embeddings.append(torch.stack(batch_embeddings))
        return torch.cat(embeddings).numpy()
