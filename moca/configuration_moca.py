"""MoCa configuration: a vision-language backbone turned into a bidirectional embedding model."""

import copy

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


SUPPORTED_BACKBONES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")
# The stock transformers classes of each backbone, written into every checkpoint's `config.json` and processor
# files so that code which never runs ours (transformers' `AutoModel`, sentence-transformers, vLLM) reads a MoCa
# checkpoint as the backbone it is, with `text_config.is_causal: false`.
STOCK_ARCHITECTURES = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}
STOCK_PROCESSORS = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen2_vl": "Qwen2VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}
# The key of `config.json` that holds MoCa's own settings beside the backbone's.
MOCA_KEY = "moca"
MOCA_FIELDS = ("pooling", "normalize", "bidirectional", "matryoshka_dims", "prompts", "query_prompt", "document_prompt",
               "image_prompt")
POOLING_MODES = ("mean", "last")

# Prompts of the original MoCa release, by name (`encode(..., prompt_name=...)`, and sentence-transformers'
# `prompt_name`). `{text}` is replaced by the input text; `<image>` marks where the image goes.
RELEASE_PROMPTS = {
    # an image with a question or instruction (the release's demo and MMEB-style queries)
    "image_question": "<image>Represent the given image with the following question: {text}\n",
    # a caption looking for an image (text-to-image queries)
    "caption": "Find me an everyday image that matches the given caption: {text}\n",
    # an image as a document
    "image": "<image>Represent the given image.\n",
    # a document page image (the release's ViDoRe retriever; its queries are raw text)
    "document_page": "<image>\nRepresent the given document image.",
    # plain text, no prompt
    "text": "{text}",
}
# What an input made of images alone gets when its prompt has no `{text}` to fill: the release's image prompt.
DEFAULT_IMAGE_PROMPT = "Represent the given image.\n"


class MoCaConfig(PreTrainedConfig):
    r"""
    Configuration of a MoCa embedding model.

    Args:
        vlm_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the vision-language backbone (Qwen2.5-VL, Qwen2-VL or Qwen3-VL). Defaults to Qwen2.5-VL.
        pooling (`str`, *optional*):
            `"mean"` over non-padding tokens or `"last"` (last non-padding token). Defaults to `"mean"` for a
            bidirectional model and `"last"` for a causal one.
        normalize (`bool`, defaults to `True`):
            L2-normalise the pooled embedding, so that dot product equals cosine similarity.
        bidirectional (`bool`, defaults to `True`):
            Every token attends to every other non-padding token. `False` keeps the backbone causal.
        matryoshka_dims (`list[int]`, *optional*):
            Embedding sizes the model was trained to be truncated to (Matryoshka representation learning).
        prompts (`dict[str, str]`, *optional*):
            Named prompts (format strings with `{text}`) for `prompt_name=`; the release's prompts by default
            (`image_question`, `caption`, `image`, `document_page`, `text`), plus what training recorded.
        query_prompt / document_prompt (`str`, *optional*):
            Format strings with `{text}` used by `encode_queries` / `encode_documents` when no prompt is given;
            `None` (the default) leaves the input as it is.
        image_prompt (`str`):
            Text for an input made of images only whose prompt has no `{text}` to fill (or that has no prompt).
    """

    model_type = "moca"
    sub_configs_defaults = {"vlm_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2_5_vl")}

    vlm_config: dict | PreTrainedConfig | None = None
    pooling: str | None = None
    normalize: bool = True
    bidirectional: bool = True
    matryoshka_dims: list[int] | None = None
    prompts: dict[str, str] | None = None
    query_prompt: str | None = None
    document_prompt: str | None = None
    image_prompt: str = DEFAULT_IMAGE_PROMPT

    def __post_init__(self, **kwargs):
        if isinstance(self.vlm_config, PreTrainedConfig):
            # `is_causal` is written into the backbone config below: never mutate the caller's object.
            self.vlm_config = copy.deepcopy(self.vlm_config)
        super().__post_init__(**kwargs)
        self.prompts = {**RELEASE_PROMPTS, **(self.prompts or {})}
        if self.vlm_config.model_type not in SUPPORTED_BACKBONES:
            raise ValueError(
                f"Unsupported backbone type {self.vlm_config.model_type!r}: MoCa supports {', '.join(SUPPORTED_BACKBONES)}."
            )
        if self.pooling is None:
            self.pooling = "mean" if self.bidirectional else "last"
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {self.pooling!r}.")
        if self.matryoshka_dims is not None:
            hidden_size = self.hidden_size
            bad = [d for d in self.matryoshka_dims if not 0 < d <= hidden_size]
            if bad:
                raise ValueError(f"matryoshka_dims {bad} are outside 1..{hidden_size} (the hidden size).")
            self.matryoshka_dims = sorted(set(self.matryoshka_dims), reverse=True)
        # The attention mask builders of transformers read `is_causal` from the text config: False gives a
        # padding-only mask and `is_causal=False` for eager, sdpa and flash attention alike. Setting it on the
        # attention modules alone is silently causal with sdpa when a batch has no padding.
        self.vlm_config.get_text_config().is_causal = not self.bidirectional

    # ------------------------------------------------------------------ the checkpoint layout
    # On disk a MoCa config is the backbone's own config (its `model_type`, a stock `architectures`, the text
    # config's `is_causal: false`) with MoCa's settings under `"moca"`; in memory it nests the backbone as
    # `vlm_config`. Checkpoints of earlier versions (`model_type: "moca"`, `vlm_config`) still load.

    def to_stock_dict(self) -> dict:
        """The `config.json` of a MoCa checkpoint: what stock transformers, sentence-transformers and vLLM read."""
        nested = self.to_dict()
        backbone = nested.pop("vlm_config")
        backbone.pop("_name_or_path", None)
        stock = {
            **backbone,
            "architectures": [STOCK_ARCHITECTURES[backbone["model_type"]]],
            MOCA_KEY: {field: nested[field] for field in MOCA_FIELDS},
            "transformers_version": nested["transformers_version"],
        }
        for key in ("auto_map", "dtype"):
            if nested.get(key) is not None:
                stock[key] = nested[key]
        return stock

    def to_diff_dict(self) -> dict:
        # What `save_pretrained` writes: the whole stock layout (a diff against MoCa's defaults would drop backbone
        # fields that the engines reading the file need).
        return self.to_stock_dict()

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return nested_config_dict(config_dict), kwargs

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        return super().from_dict(nested_config_dict(config_dict), **kwargs)

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """The backbone's text config: what transformers (token-embedding resizing, attention masks), peft,
        sentence-transformers and serving engines look up `vocab_size`, `hidden_size` and `is_causal` in. The
        inherited method would return this config itself, which has none of them."""
        return self.vlm_config.get_text_config(decoder=decoder, encoder=encoder)

    @property
    def hidden_size(self) -> int:
        return self.vlm_config.get_text_config().hidden_size

    @property
    def image_token_id(self) -> int:
        return self.vlm_config.image_token_id

    @property
    def video_token_id(self) -> int:
        return self.vlm_config.video_token_id


def is_moca_config_dict(config_dict: dict) -> bool:
    """A `config.json` (as a dict) of a MoCa checkpoint, of this layout or the earlier one?"""
    return isinstance(config_dict.get(MOCA_KEY), dict) or config_dict.get("model_type") == MoCaConfig.model_type


def nested_config_dict(config_dict: dict) -> dict:
    """A MoCa `config.json` in the stock layout -> `MoCaConfig`'s arguments; any other dict as it is."""
    if not isinstance(config_dict.get(MOCA_KEY), dict):
        return config_dict
    backbone = dict(config_dict)
    settings = backbone.pop(MOCA_KEY)
    nested = {"model_type": MoCaConfig.model_type, **settings, "vlm_config": backbone}
    for key in ("auto_map", "dtype", "transformers_version", "_name_or_path", "_commit_hash", "attn_implementation"):
        if key in backbone:
            nested[key] = backbone.pop(key)
    return nested


MoCaConfig.register_for_auto_class()

__all__ = ["MoCaConfig", "RELEASE_PROMPTS", "STOCK_ARCHITECTURES", "STOCK_PROCESSORS"]
# Known to the Auto classes wherever this module is imported, so that loading a MoCa checkpoint's
# tokenizer or processor does not fall back to a generic config.
AutoConfig.register("moca", MoCaConfig, exist_ok=True)
