"""MoCa: a vision-language backbone turned into a bidirectional multimodal embedding model.

The backbone is the stock transformers model of the VLM (`Qwen2_5_VLModel`, `Qwen2VLModel`,
`Qwen3VLModel`), composed here, never copied: attention is made bidirectional through the text config's
`is_causal` (see `MoCaConfig`), and the hidden states are pooled into one vector per input.
"""

import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils import ModelOutput, cached_file

from .configuration_moca import MoCaConfig
from .processing_moca import MoCaProcessor, count_image_placeholders, format_prompt

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
REMOTE_CODE_FILES = (
    "configuration_moca.py", "modeling_moca.py", "processing_moca.py", "model_card.py", "sentence_transformers_moca.py",
)  # fmt: skip
# The sentence-transformers module saved into every checkpoint (a class of `sentence_transformers_moca.py`).
SENTENCE_TRANSFORMERS_MODULE = "sentence_transformers_moca.MoCaSentenceTransformer"
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
        if not kwargs.get("is_main_process", True):
            return  # the main process writes the files beside the weights
        # Remote code: these files let `AutoModel.from_pretrained(dir, trust_remote_code=True)` and
        # `SentenceTransformer(dir, trust_remote_code=True)` work where this package is not installed.
        here = Path(__file__).parent
        for name in REMOTE_CODE_FILES:
            if (here / name).resolve() != (Path(save_directory) / name).resolve():
                shutil.copyfile(here / name, Path(save_directory) / name)
        if self.processor is not None:
            self.processor.save_pretrained(save_directory)
        write_sentence_transformers_files(save_directory, self.config)
        if not (Path(save_directory) / "README.md").exists():
            from .model_card import write_model_card

            write_model_card(self, save_directory)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token: bool | str | None = None, revision: str | None = None, create_pr: bool = False,
                    max_shard_size: int | str | None = "50GB", tags: list[str] | None = None, **card_kwargs):
        """Upload weights, remote code, processor, sentence-transformers files and the model card.

        The stock `push_to_hub` replaces the card `save_pretrained` writes with the repository's (or a blank
        template); here the card is written from this model, with `card_kwargs` (`base_model`, `datasets`,
        `training_args`, `eval_results`, ...) passed to `moca.model_card.write_model_card`.
        """
        import tempfile

        from huggingface_hub import HfApi

        from .model_card import write_model_card

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp_dir:
            self.save_pretrained(tmp_dir, max_shard_size=max_shard_size)
            write_model_card(self, tmp_dir, model_id=repo_id, tags=tags, **card_kwargs)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp_dir,
                commit_message=commit_message or "Upload MoCa model",
                revision=revision,
                create_pr=create_pr,
            )

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
        items = self.prepare_inputs(inputs, prompt)
        if not items:
            return torch.empty(0, truncate_dim or self.config.hidden_size)
        costs = [len(text) / 4 + sum(_image_cost(img, processor) for img in images) for text, images in items]
        order = sorted(range(len(items)), key=lambda i: -costs[i])

        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        chunks = []
        for start in _progress(range(0, len(order), batch_size), show_progress_bar, len(order) > batch_size):
            batch_ids = order[start : start + batch_size]
            batch = self.collate([items[i] for i in batch_ids], processor, max_length, indices=batch_ids)
            chunks.append(self(**batch.to(device)).embeddings.float().cpu())
        self.train(was_training)

        embeddings = torch.empty(len(items), chunks[0].shape[-1])
        embeddings[torch.tensor(order)] = torch.cat(chunks)
        if truncate_dim is not None:
            embeddings = embeddings[:, :truncate_dim]
            if self.config.normalize:
                embeddings = F.normalize(embeddings, dim=-1)
        return embeddings

    def prepare_inputs(self, inputs, prompt: str | None = None) -> list[tuple[str, list]]:
        """`encode`'s inputs -> one `(text with the prompt applied, images)` pair each, validated.

        Images stay as given (paths are opened by `collate`, one batch at a time).
        """
        if isinstance(inputs, (str, dict, Image.Image, Path)):
            inputs = [inputs]
        items = []
        for i, item in enumerate(inputs):
            text, images = _parse_input(item, i)
            text = self._input_text(text, images, prompt)
            n_placeholders = count_image_placeholders(text)
            if n_placeholders and n_placeholders != len(images):
                raise ValueError(
                    f"Input {i}: the text has {n_placeholders} image placeholder(s) but {len(images)} image(s) were given."
                )
            items.append((text, images))
        return items

    def collate(self, items: Sequence[tuple[str, list]], processor: MoCaProcessor | None = None,
                max_length: int | None = None, indices: Sequence[int] | None = None):
        """Processor outputs (a `BatchFeature`) for a batch of `prepare_inputs` items.

        `indices` are the items' positions in the caller's input, used to name a bad one in errors.
        """
        processor = processor or self.processor
        indices = indices if indices is not None else range(len(items))
        batch_images = [[_load_image(img, i) for img in images] for i, (_, images) in zip(indices, items)]
        return processor(
            text=[text for text, _ in items],
            images=batch_images if any(batch_images) else None,
            truncation=max_length is not None,
            max_length=max_length,
        )

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
    if isinstance(item, (Image.Image, Path)):
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


def write_sentence_transformers_files(save_directory, config: MoCaConfig) -> None:
    """`modules.json` and `config_sentence_transformers.json`: every MoCa checkpoint is a sentence-transformers model.

    Written by hand rather than by `SentenceTransformer.save` so that saving needs no sentence-transformers.
    The prompts are MoCa's format strings: the module applies `{text}` (sentence-transformers would only prefix).
    """
    import json

    modules = [{"idx": 0, "name": "0", "path": "", "type": SENTENCE_TRANSFORMERS_MODULE}]
    settings = {
        "model_type": "SentenceTransformer",
        "prompts": {"query": config.query_prompt or "", "document": config.document_prompt or ""},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }
    for name, content in (("modules.json", modules), ("config_sentence_transformers.json", settings)):
        with open(Path(save_directory) / name, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
            f.write("\n")


MoCaModel.register_for_auto_class("AutoModel")
AutoModel.register(MoCaConfig, MoCaModel, exist_ok=True)

__all__ = [
    "MoCaModel", "MoCaModelOutput", "MoCaPreTrainedModel", "pool",
    "MoCaForContinualPretraining", "MoCaContinualPretrainingOutput", "masked_lm_loss", "masked_patch_loss",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Continual pre-training (stage 1): masked language modelling + masked patch reconstruction
# ---------------------------------------------------------------------------------------------------------------

_logger = logging.getLogger(__name__)

CPT_HEADS_FILE = "cpt_heads.safetensors"


def masked_lm_loss(hidden_states: torch.Tensor, labels: torch.Tensor, head_weight: torch.Tensor,
                   chunk_size: int = 1024) -> torch.Tensor:
    """Mean cross-entropy over the positions where `labels != -100`, never holding full-vocabulary logits for
    every token: the masked positions are gathered first (`(N, hidden)`), then projected `chunk_size` rows at a
    time. Each chunk runs under `torch.utils.checkpoint`, so its `(chunk_size, vocab)` logits are freed after
    the forward and recomputed in the backward: peak memory holds one chunk's logits in both passes, while
    autograd's own cross-entropy gradient keeps the result exact (a hand-written autograd function would save
    nothing more and have to re-derive that gradient). At a 151,936-token vocabulary, a chunk of 1024 rows holds
    0.6 GB of float32 logits, against 7.8 GB for the 12,800 tokens of a full micro-batch.
    """
    positions = labels.ne(-100)
    hidden = hidden_states[positions]
    targets = labels[positions]
    if hidden.shape[0] == 0:
        return hidden_states.sum() * 0.0  # keeps the graph connected when nothing was masked
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        chunk = (hidden[start : start + chunk_size], head_weight, targets[start : start + chunk_size])
        if torch.is_grad_enabled():
            total = total + checkpoint(_summed_cross_entropy, *chunk, use_reentrant=False)
        else:
            total = total + _summed_cross_entropy(*chunk)
    return total / hidden.shape[0]


def _summed_cross_entropy(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, head_weight).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def masked_patch_loss(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked patches (every patch has the same number of values)."""
    return F.mse_loss(predictions.float(), targets.float())


@dataclass
class MoCaContinualPretrainingOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor`): `mlm_loss + mae_loss_weight * mae_loss` (terms that are absent count 0).
        mlm_loss (`torch.FloatTensor`, *optional*): cross-entropy at masked text positions.
        mae_loss (`torch.FloatTensor`, *optional*): mean squared error of the masked patches; `None` when the
            batch has no masked visual token.
        last_hidden_state (`torch.FloatTensor`): the backbone's final hidden states.
    """

    loss: torch.FloatTensor | None = None
    mlm_loss: torch.FloatTensor | None = None
    mae_loss: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


class MoCaForContinualPretraining(MoCaPreTrainedModel):
    """A bidirectional MoCa backbone with the heads of modality-aware continual pre-training.

    - MLM head: the VLM's `lm_head` (the input embeddings when the VLM ties them, as Qwen2.5-VL-3B does);
      cross-entropy at masked text positions only, see `masked_lm_loss`.
    - MAE decoder: one bidirectional decoder layer, initialised from the backbone's middle layer, over the
      whole sequence, then `Linear(hidden, merge**2 * patch_dim)` predicting the normalised pixels of each
      masked merged visual token; mean squared error over the masked patches.

    `save_pretrained` writes a plain MoCa embedding checkpoint (loadable with `AutoModel` and remote code) plus
    `cpt_heads.safetensors`, which `from_pretrained` reads back to resume training.
    """

    def __init__(self, config, moca: MoCaModel | None = None, mae_loss_weight: float = 0.5):
        super().__init__(config)
        if not config.bidirectional:
            raise ValueError("Continual pre-training reconstructs masked inputs from both sides: bidirectional=True.")
        self.moca = moca if moca is not None else MoCaModel(config)
        self.mae_loss_weight = mae_loss_weight
        text_config = self.text_model.config
        vision_config = config.vlm_config.vision_config
        tied = config.vlm_config.tie_word_embeddings
        # A tied VLM predicts tokens with its input embeddings: keep it so rather than fork a separate head.
        self.mlm_head = None if tied else nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        layers = self.text_model.layers
        self.mae_decoder_source_layer = len(layers) // 2
        self.mae_decoder = type(layers[0])(text_config, layer_idx=self.mae_decoder_source_layer)
        patch_dim = vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size**2
        self.patches_per_token = vision_config.spatial_merge_size**2
        self.mae_head = nn.Linear(text_config.hidden_size, self.patches_per_token * patch_dim)
        self.to(self.moca.dtype)
        self.post_init()

    @property
    def text_model(self) -> nn.Module:
        return self.moca.vlm.language_model

    @property
    def processor(self) -> MoCaProcessor | None:
        return self.moca.processor

    def mlm_head_weight(self) -> torch.Tensor:
        return self.moca.get_input_embeddings().weight if self.mlm_head is None else self.mlm_head.weight

    def add_mask_token(self) -> MoCaProcessor:
        """Make sure `<|mask|>` is in the tokenizer and has an embedding row (the Qwen tokenizers lack it).
        Returns the processor."""
        processor = self.processor
        if processor.mask_token_id is None:
            processor.tokenizer.add_tokens([processor.mask_token], special_tokens=True)
            processor.mask_token_id = processor.tokenizer.convert_tokens_to_ids(processor.mask_token)
        num_rows = self.moca.get_input_embeddings().num_embeddings
        if processor.mask_token_id >= num_rows:
            new_rows = len(processor.tokenizer)
            self.moca.resize_token_embeddings(new_rows)
            if self.mlm_head is not None:
                head = nn.Linear(self.mlm_head.in_features, new_rows, bias=False).to(self.mlm_head.weight)
                with torch.no_grad():
                    head.weight[:num_rows] = self.mlm_head.weight
                    head.weight[num_rows:] = self.mlm_head.weight.mean(0)
                self.mlm_head = head
        return processor

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_targets: torch.Tensor | None = None,
        image_token_mask: torch.BoolTensor | None = None,
    ) -> MoCaContinualPretrainingOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Original token ids at masked text positions, -100 elsewhere.
        pixel_targets (`torch.FloatTensor` of shape `(num_patches, patch_dim)`, *optional*):
            Clean processor-normalised pixels, in `pixel_values` order (which holds the noisy ones).
        image_token_mask (`torch.BoolTensor` of shape `(num_visual_tokens,)`, *optional*):
            Which merged visual tokens were masked, in the order of the `<|image_pad|>` tokens.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = self.moca.compute_position_ids(
            input_ids, attention_mask, image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids
        )
        hidden_states = self.moca(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            position_ids=position_ids,
        ).last_hidden_state

        loss = hidden_states.sum() * 0.0
        mlm_loss = mae_loss = None
        if labels is not None:
            mlm_loss = masked_lm_loss(hidden_states, labels, self.mlm_head_weight())
            loss = loss + mlm_loss
        if image_token_mask is not None and image_token_mask.any():
            mae_loss = self._masked_patch_loss(
                hidden_states, input_ids, attention_mask, position_ids, pixel_targets, image_token_mask
            )
            loss = loss + self.mae_loss_weight * mae_loss
        return MoCaContinualPretrainingOutput(
            loss=loss, mlm_loss=mlm_loss, mae_loss=mae_loss, last_hidden_state=hidden_states
        )

    def mae_decode(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                   position_ids: torch.Tensor) -> torch.Tensor:
        """The MAE decoder layer over the whole sequence, with the inputs the backbone's own layers get: the
        same rotary positions and a padding-only mask. `is_causal=False` matters for sdpa, which is causal by
        default when the mask is elided (no padding)."""
        position_embeddings = self.text_model.rotary_emb(hidden_states, position_ids)
        mask = create_bidirectional_mask(
            config=self.text_model.config, inputs_embeds=hidden_states, attention_mask=attention_mask
        )
        return self.mae_decoder(
            hidden_states, attention_mask=mask, position_embeddings=position_embeddings, is_causal=False
        )

    def _masked_patch_loss(self, hidden_states, input_ids, attention_mask, position_ids, pixel_targets,
                           image_token_mask) -> torch.Tensor:
        decoded = self.mae_decode(hidden_states, attention_mask, position_ids)
        # Visual tokens in (batch, position) order are the merged tokens in `pixel_values` order.
        visual = decoded[input_ids == self.config.image_token_id]
        if visual.shape[0] != image_token_mask.shape[0]:
            raise ValueError(
                f"image_token_mask covers {image_token_mask.shape[0]} visual tokens, the input has {visual.shape[0]}."
            )
        predictions = self.mae_head(visual[image_token_mask])
        targets = pixel_targets.reshape(image_token_mask.shape[0], -1)[image_token_mask]
        return masked_patch_loss(predictions, targets)

    # ------------------------------------------------------------------ building, saving, loading

    @classmethod
    def from_backbone(cls, name_or_path: str, mae_loss_weight: float = 0.5, dtype=None,
                      attn_implementation: str | None = None, **config_kwargs) -> "MoCaForContinualPretraining":
        """Fresh CPT model from a causal VLM checkpoint: MLM head from its `lm_head`, MAE decoder from its
        middle layer, MAE projection random."""
        moca = MoCaModel.from_backbone(
            name_or_path, dtype=dtype, attn_implementation=attn_implementation, **config_kwargs
        )
        model = cls(moca.config, moca=moca, mae_loss_weight=mae_loss_weight)
        lm_head = None if model.mlm_head is None else _read_tensor(name_or_path, "lm_head.weight")
        model.init_heads(lm_head_weight=lm_head)
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, mae_loss_weight: float = 0.5, **kwargs):
        """From a MoCa checkpoint: its CPT heads when it has them (resuming), fresh heads otherwise."""
        moca = MoCaModel.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = cls(moca.config, moca=moca, mae_loss_weight=mae_loss_weight)
        heads_file = cached_file(
            pretrained_model_name_or_path, CPT_HEADS_FILE, _raise_exceptions_for_missing_entries=False
        )
        if heads_file is not None:
            model.load_heads(heads_file)
            return model
        lm_head = None
        if model.mlm_head is not None:
            # An embedding checkpoint keeps no lm_head: the input embeddings are the closest start.
            _logger.warning("%s has no lm_head: the MLM head starts as the embeddings.", pretrained_model_name_or_path)
            lm_head = model.moca.get_input_embeddings().weight
        model.init_heads(lm_head_weight=lm_head)
        return model

    @torch.no_grad()
    def init_heads(self, lm_head_weight: torch.Tensor | None = None) -> None:
        source = self.text_model.layers[self.mae_decoder_source_layer]
        self.mae_decoder.load_state_dict(source.state_dict())
        std = getattr(self.text_model.config, "initializer_range", 0.02)
        self.mae_head.weight.normal_(0.0, std)
        self.mae_head.bias.zero_()
        if self.mlm_head is not None:
            self.mlm_head.weight.copy_(lm_head_weight)

    def load_heads(self, heads_file: str) -> None:
        missing, unexpected = self.load_state_dict(load_file(heads_file), strict=False)
        missing = [name for name in missing if not name.startswith("moca.")]
        if missing or unexpected:
            raise ValueError(f"{heads_file}: missing {missing}, unexpected {unexpected} CPT head weights.")

    def save_pretrained(self, save_directory, is_main_process: bool = True, state_dict=None, **kwargs):
        """A plain MoCa embedding checkpoint plus `cpt_heads.safetensors` (the heads, to resume).

        `state_dict` (what a sharded run gathers, e.g. under FSDP or DeepSpeed) replaces the module's own."""
        state_dict = state_dict if state_dict is not None else self.state_dict()
        backbone, heads = {}, {}
        for name, tensor in state_dict.items():
            if name.startswith("moca."):
                backbone[name.removeprefix("moca.")] = tensor
            else:
                heads[name] = tensor.detach().contiguous().cpu()
        self.moca.save_pretrained(save_directory, is_main_process=is_main_process, state_dict=backbone, **kwargs)
        if is_main_process:
            save_file(heads, f"{save_directory}/{CPT_HEADS_FILE}", metadata={"format": "pt"})

    @torch.no_grad()
    def load_checkpoint(self, checkpoint_dir: str) -> None:
        """Load the weights of a checkpoint written by `save_pretrained` into this model (resuming)."""
        saved = MoCaModel.from_pretrained(checkpoint_dir, dtype=self.moca.dtype)
        self.moca.load_state_dict(saved.state_dict())
        self.load_heads(f"{checkpoint_dir}/{CPT_HEADS_FILE}")


def _read_tensor(name_or_path: str, key: str) -> torch.Tensor:
    """One tensor of a (possibly sharded) safetensors checkpoint, without loading the rest."""
    index_file = cached_file(
        name_or_path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False
    )
    if index_file is not None:
        with open(index_file) as f:
            shard = json.load(f)["weight_map"].get(key)
        if shard is None:
            raise ValueError(f"{name_or_path}: no {key} in the checkpoint.")
        weights_file = cached_file(name_or_path, shard)
    else:
        weights_file = cached_file(name_or_path, "model.safetensors")
    with safe_open(weights_file, framework="pt") as f:
        if key not in f.keys():
            raise ValueError(f"{name_or_path}: no {key} in the checkpoint.")
        return f.get_tensor(key)
