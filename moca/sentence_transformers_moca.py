"""The sentence-transformers module of a MoCa checkpoint.

`MoCaModel.save_pretrained` writes a `modules.json` that names `MoCaSentenceTransformer`, and copies this file
into the checkpoint, so `SentenceTransformer(dir, trust_remote_code=True)` loads every MoCa checkpoint, also
where this package is not installed. The module hosts the whole `MoCaModel` (backbone, pooling, normalisation):
its inputs are prepared exactly as `MoCaModel.encode` prepares them, so both give the same embeddings.

A custom module rather than sentence-transformers' generic `Transformer`: MoCa's processor takes
`<image>`-placed interleaved inputs and an image-only prompt, and MoCa's prompts are format strings with
`{text}` (the original release's query prompt has text after the query), which a prefix cannot express.
"""

from typing import Any

from sentence_transformers.base.modules.input_module import InputModule

import torch

from .modeling_moca import NON_FINITE_EMBEDDINGS, MoCaModel
from .processing_moca import InputError, MoCaProcessor


MODEL_INPUT_NAMES = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


class MoCaSentenceTransformer(InputModule):
    """Strings, PIL images, image paths and `{"text", "image"}` dicts -> MoCa embeddings.

    Prompts (`encode_query` / `encode_document` read `query` / `document` from `config_sentence_transformers.json`)
    are MoCa format strings: `{text}` is replaced by the input text; a prompt without it is a prefix.
    """

    config_file_name = "sentence_bert_config.json"
    config_keys = ["max_seq_length"]
    save_in_root = True

    def __init__(self, model: MoCaModel, max_seq_length: int | None = None):
        super().__init__()
        if model.processor is None:
            raise ValueError("The MoCa model has no processor: load it from a checkpoint that has processor files.")
        self.model = model
        self.max_seq_length = max_seq_length

    @property
    def modalities(self) -> list:
        # "message" is how sentence-transformers names a batch that mixes modalities; chat-style message
        # dicts are refused by `MoCaProcessor.parse_inputs` with an error naming the input.
        return ["text", "image", ("image", "text"), "message"]

    @property
    def processor(self) -> MoCaProcessor:
        return self.model.processor

    @property
    def tokenizer(self):
        return self.model.processor.tokenizer

    def get_embedding_dimension(self) -> int:
        return self.model.config.hidden_size

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict[str, Any]:
        inputs = list(inputs)
        try:
            items = self.processor.parse_inputs(inputs, prompt, image_prompt=self.model.config.image_prompt)
            return dict(self.processor.batch(items, max_length=self.max_seq_length))
        except InputError as error:
            # sentence-transformers hands over its inputs sorted by length, batch by batch: a position here is not
            # the caller's index, so the input is named by what it is.
            raise InputError(_preview(inputs[error.index]), error.reason) from error

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        output = self.model(**{name: features[name] for name in MODEL_INPUT_NAMES if name in features})
        if not torch.isfinite(output.embeddings).all():
            # Positions are sentence-transformers' sorted batch order: the input cannot be named by its index.
            raise ValueError(f"The embeddings of a batch of {len(output.embeddings)} inputs are {NON_FINITE_EMBEDDINGS}")
        features["token_embeddings"] = output.last_hidden_state
        features["sentence_embedding"] = output.embeddings
        return features

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.model.save_pretrained(output_path)
        self.save_config(output_path)

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        config_kwargs: dict[str, Any] | None = None,
        backend: str = "torch",
        **kwargs,
    ) -> "MoCaSentenceTransformer":
        if backend != "torch":
            raise ValueError(f"MoCa runs on the torch backend only, not {backend!r}.")
        hub_kwargs = {
            "token": token,
            "cache_dir": cache_folder,
            "revision": revision,
            "local_files_only": local_files_only,
        }
        if subfolder:
            hub_kwargs["subfolder"] = subfolder
        settings = cls.load_config(
            model_name_or_path,
            subfolder=subfolder,
            token=token,
            cache_folder=cache_folder,
            revision=revision,
            local_files_only=local_files_only,
        )
        model = MoCaModel.from_pretrained(
            model_name_or_path, **hub_kwargs, **(config_kwargs or {}), **(model_kwargs or {})
        )
        if processor_kwargs:
            model.processor = MoCaProcessor.from_pretrained(model_name_or_path, **hub_kwargs, **processor_kwargs)
        return cls(model, **settings)


def _preview(item, limit: int = 60) -> str:
    """An input as an error names it: its repr, shortened."""
    text = repr(item)
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["MoCaSentenceTransformer"]
