"""MoCa: a vision-language backbone turned into a bidirectional multimodal embedding model.

The backbone is the stock transformers model of the VLM (`Qwen2_5_VLModel`, `Qwen2VLModel`,
`Qwen3VLModel`), composed here, never copied: attention is made bidirectional through the text config's
`is_causal` (see `MoCaConfig`), and the hidden states are pooled into one vector per input.
"""

import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_moca import MoCaConfig
from .processing_moca import MoCaProcessor, count_image_placeholders, format_prompt


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
REMOTE_CODE_FILES = ("configuration_moca.py", "modeling_moca.py", "processing_moca.py")
# Keyword arguments of `from_pretrained` that also say where to find the processor files.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


@dataclass
class MoCaModelOutput(ModelOutput):
    """
    Args:
        embeddings (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            Pooled (and, per config, L2-normalised) embeddings, in float32.
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            Final hidden states of the backbone's language model.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Hidden states of every layer, when `output_hidden_states=True`.
    """

    embeddings: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class MoCaPreTrainedModel(PreTrainedModel):
    config: MoCaConfig
    config_class = MoCaConfig
    base_model_prefix = "moca"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = [
        "Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock", "Qwen2VLDecoderLayer", "Qwen2VLVisionBlock",
        "Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock",
    ]  # fmt: skip


def mm_token_type_ids_from_input_ids(input_ids: torch.Tensor, config: MoCaConfig) -> torch.Tensor:
    """Text 0, image 1, video 2: what the backbone needs to build its 3D positions."""
    token_types = torch.zeros_like(input_ids, dtype=torch.int)
    token_types[input_ids == config.image_token_id] = 1
    token_types[input_ids == config.video_token_id] = 2
    return token_types


def pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Mean over non-padding tokens, or the last non-padding token (for left and right padding alike)."""
    hidden = last_hidden_state.float()
    mask = attention_mask.to(hidden.dtype)
    if mode == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * attention_mask.to(torch.long)).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class MoCaModel(MoCaPreTrainedModel):
    """Bidirectional multimodal embedding model: backbone -> pooling -> normalisation."""

    def __init__(self, config: MoCaConfig, vlm: PreTrainedModel | None = None):
        super().__init__(config)
        self.vlm = vlm if vlm is not None else AutoModel.from_config(config.vlm_config)
        self.processor: MoCaProcessor | None = None
        self.post_init()

    def get_input_embeddings(self):
        return self.vlm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.vlm.set_input_embeddings(value)

    def compute_position_ids(self, input_ids, attention_mask, image_grid_thw=None, video_grid_thw=None,
                             mm_token_type_ids=None) -> torch.Tensor:
        """3D M-RoPE positions, counted over non-padding tokens only (so left padding changes nothing)."""
        if mm_token_type_ids is None:
            mm_token_type_ids = mm_token_type_ids_from_input_ids(input_ids, self.config)
        position_ids, _ = self.vlm.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            attention_mask=attention_mask,
        )
        return position_ids

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> MoCaModelOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = self.compute_position_ids(
                input_ids, attention_mask, image_grid_thw, video_grid_thw, mm_token_type_ids
            )
        outputs = self.vlm(
            input_ids=input_ids if inputs_embeds is None else None,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            use_cache=False,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        embeddings = pool(outputs.last_hidden_state, attention_mask, self.config.pooling)
        if self.config.normalize:
            embeddings = F.normalize(embeddings, dim=-1)
        return MoCaModelOutput(
            embeddings=embeddings,
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
        )

    # ------------------------------------------------------------------ building and saving

    @classmethod
    def from_backbone(cls, name_or_path: str, processor: MoCaProcessor | None = None, dtype=None,
                      attn_implementation: str | None = None, **config_kwargs) -> "MoCaModel":
        """A fresh MoCa model from a causal VLM checkpoint (Hub name or folder), with its processor.

        `config_kwargs` go to `MoCaConfig` (`pooling`, `normalize`, `bidirectional`, prompts, ...).
        """
        vlm_config = AutoConfig.from_pretrained(name_or_path)
        config = MoCaConfig(vlm_config=vlm_config, **config_kwargs)
        load_kwargs = {"config": config.vlm_config}
        if dtype is not None:
            load_kwargs["dtype"] = dtype
        if attn_implementation is not None:
            load_kwargs["attn_implementation"] = attn_implementation
        vlm, info = AutoModel.from_pretrained(name_or_path, output_loading_info=True, **load_kwargs)
        if info["missing_keys"]:
            raise ValueError(f"{name_or_path}: the backbone checkpoint lacks weights {sorted(info['missing_keys'])[:8]}")
        config.vlm_config = vlm.config
        model = cls(config, vlm=vlm)
        model.processor = processor if processor is not None else MoCaProcessor.from_pretrained(name_or_path)
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        try:
            model.processor = MoCaProcessor.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        except (OSError, ValueError, TypeError, KeyError):
            model.processor = None  # a checkpoint without processor files: pass `processor=` to `encode`
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        if int(os.environ.get("RANK", "0")) != 0 and kwargs.get("is_main_process", True) is False:
            return
        # Remote code: these three files let `AutoModel.from_pretrained(dir, trust_remote_code=True)` work
        # where this package is not installed.
        here = Path(__file__).parent
        for name in REMOTE_CODE_FILES:
            if (here / name).resolve() != (Path(save_directory) / name).resolve():
                shutil.copyfile(here / name, Path(save_directory) / name)
        if self.processor is not None:
            self.processor.save_pretrained(save_directory)

    # ------------------------------------------------------------------ encoding what a person has

    @torch.inference_mode()
    def encode(
        self,
        inputs,
        batch_size: int = 32,
        prompt: str | None = None,
        truncate_dim: int | None = None,
        show_progress_bar: bool | None = None,
        processor: MoCaProcessor | None = None,
        max_length: int | None = None,
    ) -> torch.Tensor:
        """Embed texts, images and text+image inputs; returns a float32 CPU tensor `(len(inputs), dim)`.

        An input is a `str` (text; a path to an existing image file counts as an image), a `PIL.Image`, a
        `pathlib.Path` to an image, or a dict `{"text": ..., "image": ...}` whose image may be a list (for
        interleaved inputs, place them with `<image>` in the text). `prompt` is a format string with
        `{text}` (or a prefix). Inputs are sorted by cost so that batches need little padding; the result
        keeps the input order.
        """
        processor = processor or self.processor
        if processor is None:
            raise ValueError("No processor: load the model with from_pretrained/from_backbone or pass `processor=`.")
        if isinstance(inputs, (str, dict, Image.Image, Path)):
            inputs = [inputs]
        items = [_parse_input(x, i) for i, x in enumerate(inputs)]
        if not items:
            return torch.empty(0, truncate_dim or self.config.hidden_size)
        texts = [self._input_text(text, images, prompt) for text, images in items]
        for i, (text, (_, images)) in enumerate(zip(texts, items)):
            n_placeholders = count_image_placeholders(text)
            if n_placeholders and n_placeholders != len(images):
                raise ValueError(
                    f"Input {i}: the text has {n_placeholders} image placeholder(s) but {len(images)} image(s) were given."
                )
        costs = [len(t) / 4 + sum(_image_cost(img, processor) for img in images) for t, (_, images) in zip(texts, items)]
        order = sorted(range(len(items)), key=lambda i: -costs[i])

        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        chunks = []
        for start in _progress(range(0, len(order), batch_size), show_progress_bar, len(order) > batch_size):
            batch_ids = order[start : start + batch_size]
            batch_images = [[_load_image(img, i) for img in items[i][1]] for i in batch_ids]
            batch = processor(
                text=[texts[i] for i in batch_ids],
                images=batch_images if any(batch_images) else None,
                truncation=max_length is not None,
                max_length=max_length,
            ).to(device)
            chunks.append(self(**batch).embeddings.float().cpu())
        self.train(was_training)

        embeddings = torch.empty(len(items), chunks[0].shape[-1])
        embeddings[torch.tensor(order)] = torch.cat(chunks)
        if truncate_dim is not None:
            embeddings = embeddings[:, :truncate_dim]
            if self.config.normalize:
                embeddings = F.normalize(embeddings, dim=-1)
        return embeddings

    def encode_queries(self, inputs, prompt: str | None = None, **kwargs) -> torch.Tensor:
        """`encode` with the config's `query_prompt` (or the given one)."""
        return self.encode(inputs, prompt=prompt if prompt is not None else self.config.query_prompt, **kwargs)

    def encode_documents(self, inputs, prompt: str | None = None, **kwargs) -> torch.Tensor:
        """`encode` with the config's `document_prompt` (or the given one)."""
        return self.encode(inputs, prompt=prompt if prompt is not None else self.config.document_prompt, **kwargs)

    def _input_text(self, text: str | None, images: list, prompt: str | None) -> str:
        if not text and images:
            return self.config.image_prompt
        return format_prompt(prompt, text)


def _parse_input(item, index: int) -> tuple[str | None, list]:
    """-> (text, images) of one input of `encode`, with a clear error for what it cannot use."""
    if isinstance(item, Image.Image) or isinstance(item, Path):
        return None, [item]
    if isinstance(item, str):
        if item.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(item):
            return None, [item]
        if not item:
            raise ValueError(f"Input {index}: empty text.")
        return item, []
    if isinstance(item, dict):
        unknown = set(item) - {"text", "image", "images"}
        if unknown:
            raise ValueError(f"Input {index}: unknown keys {sorted(unknown)}; use 'text' and 'image'.")
        text = item.get("text")
        images = item.get("image", item.get("images"))
        if images is None:
            images = []
        elif isinstance(images, (Image.Image, str, Path)):
            images = [images]
        else:
            images = list(images)
        if text is not None and not isinstance(text, str):
            raise ValueError(f"Input {index}: 'text' must be a string, got {type(text).__name__}.")
        if not text and not images:
            raise ValueError(f"Input {index}: empty input (no text and no image).")
        return text, images
    raise ValueError(f"Input {index}: unsupported type {type(item).__name__}; pass a str, PIL image, path or dict.")


def _load_image(image, index: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (bytes, bytearray)):
        import io

        image = io.BytesIO(image)
    try:
        with Image.open(image) as opened:
            opened.load()
            return opened.convert("RGB") if opened.mode not in ("RGB", "RGBA", "L") else opened.copy()
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"Input {index}: cannot read image {image!r}: {error}") from error


def _image_cost(image, processor: MoCaProcessor) -> float:
    """Approximate number of visual tokens, read from the image header only (no decoding)."""
    try:
        if isinstance(image, Image.Image):
            width, height = image.size
        else:
            with Image.open(image) as opened:
                width, height = opened.size
    except (OSError, UnidentifiedImageError, TypeError):
        return 0.0  # unreadable: `_load_image` raises the error that names the input
    pixel_limit = getattr(processor.image_processor, "max_pixels", None) or processor.image_processor.size.get("longest_edge")
    pixels = min(width * height, pixel_limit) if pixel_limit else width * height
    patch = processor.image_processor.patch_size * processor.merge_size
    return pixels / (patch * patch)


def _progress(iterable: Iterable, show: bool | None, default: bool):
    if show is None:
        show = default
    if not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc="Encoding", unit="batch")


MoCaModel.register_for_auto_class("AutoModel")
AutoModel.register(MoCaConfig, MoCaModel, exist_ok=True)

__all__ = ["MoCaModel", "MoCaModelOutput", "MoCaPreTrainedModel", "pool"]
