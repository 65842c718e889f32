"""Stage 1, modality-aware continual pre-training: the model with its MLM and MAE heads, row validation and
cost, masking, budget batching, and the Trainer.

Rows of every source (`moca.data.load_source`): `{"text": str, "images": [image, ...]}` where a placeholder in the
text (`<image>`, or the backbone's own `<|vision_start|><|image_pad|><|vision_end|>`) marks where each image goes and
an image is encoded bytes, a file path, a `{"bytes", "path"}` dict (the `datasets` image storage) or a
`PIL.Image.Image`. Text-only rows have no (or an empty) `images` list; a row with images but no placeholder gets its
images first (caption style). The release's CPT sets (`moca-embed/dclm_20b`, `moca-embed/pixelprose_*`,
`moca-embed/docmatix`, ...) are in this layout: `text` with the backbone's markers and `images` a list of encoded
image bytes (their cards: `PIL.Image.open(BytesIO(example["images"][0]))`); other columns are dropped on loading.

`MoCaForContinualPretraining` lives here, not in the checkpoint's remote code: what it saves is a plain MoCa
embedding checkpoint (plus `cpt_heads.safetensors`, read back only by this module to resume).
"""

import json
import logging
from collections import Counter
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils import ModelOutput, cached_file

from ..data import absolute_image_paths, load_source, require_columns
from ..modeling_moca import MoCaModel, MoCaPreTrainedModel
# The processor's own placeholder pattern, so that the cost estimate expands images exactly as the collator does.
from ..processing_moca import IMAGE_PLACEHOLDER, MoCaProcessor, count_image_placeholders
from .common import (
    MoCaTrainer,
    MoCaTrainingArguments,
    ModelDataArguments,
    image_problem,
    is_moca_checkpoint,
    text_problem,
    torch_dtype,
    with_image_token_bounds,
)

logger = logging.getLogger(__name__)

# A visual token goes through the vision tower and the language model: the release counts it as 4 text tokens.
IMAGE_TOKEN_COST = 4
# How masked patches are noised: one Gaussian vector for every masked patch of a micro-batch (the release's
# `torch.randn(1176)`), or an independent draw per patch.
MAE_NOISE_MODES = ("shared", "per_patch")
CPT_HEADS_FILE = "cpt_heads.safetensors"
# Where the released scripts and the paper's text differ, the scripts are the default: MAE weight 0.1 (the paper's
# best in its sweep: 0.5) and sequences of 1,280 tokens (the paper's CPT: 2,048).
MAE_LOSS_WEIGHT = 0.1
MAX_LENGTH = 1280

# ---------------------------------------------------------------------------------------------------------------
# The model: masked language modelling + masked patch reconstruction
# ---------------------------------------------------------------------------------------------------------------


# How many rows of logits the MLM loss holds at once: as many as fit in about this many bytes of float32 logits
# (110 rows at Qwen's 151,936-token vocabulary). Smaller chunks hold less; much smaller ones make thin matmuls.
MLM_CHUNK_BYTES = 64 * 2**20


def masked_lm_loss(hidden_states: torch.Tensor, labels: torch.Tensor, head_weight: torch.Tensor,
                   chunk_size: int | None = None) -> torch.Tensor:
    """Mean cross-entropy over the positions where `labels != -100`, never holding full-vocabulary logits for
    every token: the masked positions are gathered first (`(N, hidden)`), then projected `chunk_size` rows at a
    time (default: rows of about `MLM_CHUNK_BYTES` of float32 logits).

    With gradients on, it is a fused linear + cross-entropy (Liger's approach, in plain torch): each chunk's
    gradients (softmax - one-hot, through the head) are computed in the forward right after its loss, and the
    chunk's logits are dropped; the backward only scales them by the incoming gradient. Peak memory: one weight-
    sized gradient buffer (in the weight's dtype) plus one chunk's logits, and one matmul less than recomputing
    the logits in the backward. Written by hand because autograd's own cross-entropy needs the logits alive
    until the backward; the gradients equal autograd's of the naive loss (see tests/test_cpt_loss.py).
    """
    positions = labels.ne(-100)
    hidden = hidden_states[positions]
    targets = labels[positions]
    if hidden.shape[0] == 0:
        return hidden_states.sum() * 0.0  # keeps the graph connected when nothing was masked
    if chunk_size is None:
        chunk_size = max(1, MLM_CHUNK_BYTES // (4 * head_weight.shape[0]))
    if torch.is_grad_enabled() and (hidden.requires_grad or head_weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(hidden, head_weight, targets, chunk_size)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        log_probs = _chunk_log_probs(hidden[start : start + chunk_size], head_weight)
        total = total - log_probs.gather(1, targets[start : start + chunk_size, None]).sum()
    return total / hidden.shape[0]


def _chunk_log_probs(hidden: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax of one chunk's logits (computed in the weights' dtype, as the naive loss does)."""
    return torch.log_softmax(F.linear(hidden, head_weight), dim=-1, dtype=torch.float32)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """`mean_i CE(hidden_i @ W.T, target_i)` with its gradients computed chunk by chunk in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        count = hidden.shape[0]
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for start in range(0, count, chunk_size):
            rows, chunk_targets = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            log_probs = _chunk_log_probs(rows, weight)
            total = total - log_probs.gather(1, chunk_targets[:, None]).sum()
            # d(mean loss) / d(logits) = (softmax - one-hot) / N, in place over the log-probabilities.
            grad_logits = log_probs.exp_()
            grad_logits[torch.arange(len(rows), device=rows.device), chunk_targets] -= 1
            grad_logits = grad_logits.div_(count).to(weight.dtype)
            del log_probs
            # In the weights' dtype even under autocast (whose casts do not reach `out=` and in-place products).
            with torch.autocast(rows.device.type, enabled=False):
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk_size] = grad_logits @ weight
                if grad_weight is not None:
                    grad_weight.addmm_(grad_logits.T, rows.to(weight.dtype))
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        # Scaled in place (by 1 / accumulation steps under the Trainer, say): no second weight-sized buffer.
        return (
            None if grad_hidden is None else grad_hidden.mul_(grad_loss),
            None if grad_weight is None else grad_weight.mul_(grad_loss),
            None,
            None,
        )


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

    def __init__(self, config, moca: MoCaModel | None = None, mae_loss_weight: float = MAE_LOSS_WEIGHT):
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
        return self.moca.model.language_model

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
    def from_backbone(cls, name_or_path: str, mae_loss_weight: float = MAE_LOSS_WEIGHT, dtype=None,
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
    def from_pretrained(cls, pretrained_model_name_or_path, *args, mae_loss_weight: float = MAE_LOSS_WEIGHT, **kwargs):
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
            logger.warning("%s has no lm_head: the MLM head starts as the embeddings.", pretrained_model_name_or_path)
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


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def load_cpt_source(source: str, split: str = "train", image_root: str | None = None) -> datasets.Dataset:
    """One source (see `moca.data.load_source`) with exactly the columns `text` and `images`, relative image paths
    made absolute (so that rows of several sources keep pointing at their images once concatenated)."""
    dataset, root = load_source(source, split=split, image_root=image_root)
    require_columns(dataset, source, required=("text",))
    dataset = dataset.select_columns([c for c in ("text", "images") if c in dataset.column_names])
    if "images" not in dataset.column_names:
        dataset = dataset.add_column("images", [[] for _ in range(len(dataset))])
    dataset = absolute_image_paths(dataset, ["images"], root)
    # One storage for every way an image can be given (path, bytes, PIL): `{"bytes", "path"}`, decoded lazily.
    return dataset.cast_column("images", datasets.List(datasets.Image(decode=False)))


def load_cpt_dataset(sources: list[str], split: str = "train", image_root: str | None = None) -> datasets.Dataset:
    """All sources concatenated, in the order given."""
    if not sources:
        raise ValueError("No dataset given: pass one or more --dataset.")
    parts = [load_cpt_source(source, split=split, image_root=image_root) for source in sources]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


# ---------------------------------------------------------------------------------------------------------------
# Validation and cost
# ---------------------------------------------------------------------------------------------------------------


def inspect_row(row: dict, processor: MoCaProcessor, max_length: int) -> dict:
    """Length (tokens), cost (equivalent tokens) and, for a row that cannot be trained on, why (`skip_reason`,
    the same for every row of the kind, and `skip_detail`).

    Length and cost are those of what the collator keeps: the processor's truncation (`MoCaProcessor._truncate`)
    keeps the tokens before the cut and only the images wholly before it, so the cost is the kept text tokens
    plus 4 x the kept image tokens. Image token counts come from the image sizes; no pixels are processed.
    """
    text = row["text"] or ""
    images = row["images"] or []
    result = {"length": 0, "cost": 0, "skip_reason": "", "skip_detail": ""}
    if not text.strip() and not images:
        result["skip_reason"] = "empty text"
        return result
    problem = text_problem(processor, text, len(images))
    if problem:
        result["skip_reason"], result["skip_detail"] = problem
        return result

    tokens_per_image = []
    for position, image in enumerate(images):
        try:
            width, height = processor.load_image(image).size
        except Exception as error:  # any decoding error makes the row unusable, whatever its kind
            result["skip_reason"] = f"image {position} unreadable"
            result["skip_detail"] = f"{type(error).__name__}: {error}"
            return result
        problem = image_problem(processor, position, width, height)
        if problem:
            result["skip_reason"], result["skip_detail"] = problem
            return result
        tokens_per_image.append(processor.image_tokens(width, height))

    # The processor's own tokenization (images without placeholders go first, as in `MoCaProcessor.__call__`).
    placed = text if count_image_placeholders(text) or not images else IMAGE_PLACEHOLDER * len(images) + text
    ids = processor.token_ids([placed], tokens_per_image)[0]
    (kept,), keep_image = processor._truncate([ids], max_length)
    if not kept:
        # The cut moved before a first image longer than max_length: the sample would be all padding.
        result["skip_reason"] = "first image longer than max_length"
        result["skip_detail"] = f"{tokens_per_image[0]} image tokens, max_length {max_length}"
        return result
    kept_image_tokens = sum(tokens for tokens, keep in zip(tokens_per_image, keep_image) if keep)
    result["length"] = len(kept)
    result["cost"] = len(kept) - kept_image_tokens + IMAGE_TOKEN_COST * kept_image_tokens
    return result


def prepare_cpt_dataset(dataset: datasets.Dataset, processor, max_length: int, num_proc: int | None = None):
    """Validate every row once, before training: returns `(dataset, skipped)` where `dataset` keeps the good
    rows with their `length`, `cost` and original `row_id`, and `skipped` counts the bad rows by reason.

    Bad rows (unreadable image, placeholder/image count mismatch, an image of aspect ratio over 200, empty text, a
    first image longer than `max_length`) are skipped with one warning per reason, so that one broken sample never
    stops a long run. Control tokens written in a text (a literal `<|video_pad|>`) are tokenized as plain text.
    """
    dataset = dataset.add_column("row_id", list(range(len(dataset))))
    dataset = dataset.map(
        inspect_row, fn_kwargs=dict(processor=processor, max_length=max_length), num_proc=num_proc,
        desc="Validating rows",
    )
    reasons = dataset["skip_reason"]
    skipped = Counter(reason for reason in reasons if reason)
    if skipped:
        for reason, count in skipped.most_common():
            first = reasons.index(reason)
            detail = dataset[first]["skip_detail"]
            logger.warning(
                "Skipping %d of %d rows: %s (first: row %d%s)", count, len(dataset), reason, first,
                f", {detail}" if detail else "",
            )
        dataset = dataset.filter(lambda reason: not reason, input_columns="skip_reason", num_proc=num_proc)
    if len(dataset) == 0:
        raise ValueError(f"No usable rows left after validation: {dict(skipped)}")
    return dataset.remove_columns(["skip_reason", "skip_detail"]), skipped


# ---------------------------------------------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------------------------------------------


def never_masked_token_ids(processor) -> list[int]:
    """Special, vision and padding tokens: MLM never hides them (they carry structure, not content)."""
    tokenizer = processor.tokenizer
    ids = set(tokenizer.all_special_ids)
    ids.update(token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special)
    ids.update(
        token_id
        for token_id in tokenizer.convert_tokens_to_ids(
            ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
        )
        if token_id is not None and token_id != tokenizer.unk_token_id
    )
    if tokenizer.pad_token_id is not None:
        ids.add(tokenizer.pad_token_id)
    ids.add(processor.mask_token_id)
    return sorted(ids)


def mask_text_tokens(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    mask_ratio: float,
    mask_token_id: int,
    generators: list[torch.Generator],
    shift_labels: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each maskable token by `mask_token_id` with probability `mask_ratio` (no 80/10/10, as in MoCa).

    Returns `(masked_input_ids, labels)`; labels hold the original token at masked positions and -100
    elsewhere. With `shift_labels`, the label of a token masked at position i sits at position i - 1 (the
    LLM2Vec-style variant described in the paper, where each position predicts the next token); the first
    token of a sequence (right padding assumed) is then never masked, since no position precedes it.
    """
    masked_ids = input_ids.clone()
    labels = torch.full_like(input_ids, -100)
    for row, generator in enumerate(generators):
        candidates = maskable[row].nonzero().squeeze(-1)
        chosen = candidates[torch.rand(len(candidates), generator=generator) < mask_ratio]
        if shift_labels:
            chosen = chosen[chosen > 0]
        labels[row, chosen] = input_ids[row, chosen]
        masked_ids[row, chosen] = mask_token_id
    if shift_labels:
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    return masked_ids, labels


def mask_image_patches(
    pixel_values: torch.Tensor,
    tokens_per_sample: list[int],
    patches_per_token: int,
    mask_ratio: float,
    generators: list[torch.Generator],
    noise_generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each merged visual token with probability `mask_ratio`: its raw patches (`patches_per_token`
    consecutive rows of `pixel_values`, the order of the Qwen-VL image processors) become Gaussian noise.

    `tokens_per_sample[i]` is the number of merged tokens of sample i's images, in `pixel_values` order; sample
    i's mask is drawn from `generators[i]`. With `noise_generator`, one noise vector drawn from it replaces every
    masked patch of the batch (the release); without, each masked patch gets its own draw from its sample's
    generator. Returns `(noisy_pixel_values, token_mask)` with `token_mask` a bool vector over all merged tokens.
    """
    token_masks, noisy_chunks = [], []
    patch_start = 0
    for num_tokens, generator in zip(tokens_per_sample, generators):
        token_mask = torch.rand(num_tokens, generator=generator) < mask_ratio
        patch_mask = token_mask.repeat_interleave(patches_per_token)
        patches = pixel_values[patch_start : patch_start + len(patch_mask)].clone()
        if noise_generator is None:
            noise = torch.randn(int(patch_mask.sum()), patches.shape[1], generator=generator)
            patches[patch_mask] = noise.to(patches.dtype)
        token_masks.append(token_mask)
        noisy_chunks.append(patches)
        patch_start += len(patch_mask)
    if patch_start != len(pixel_values):
        raise ValueError(f"{patch_start} patches expected from the image grids, pixel_values has {len(pixel_values)}.")
    noisy, token_mask = torch.cat(noisy_chunks), torch.cat(token_masks)
    if noise_generator is not None:
        noise = torch.randn(pixel_values.shape[1], generator=noise_generator)
        noisy[token_mask.repeat_interleave(patches_per_token)] = noise.to(noisy.dtype)
    return noisy, token_mask


# Streams of `seeded_generator`: a row's masks and a batch's shared noise never draw from the same seed.
_MASK_STREAM, _NOISE_STREAM = 0, 1


def seeded_generator(*numbers: int) -> torch.Generator:
    """A generator seeded by a hash of the non-negative integers `numbers` (numpy's `SeedSequence`), so that
    neighbouring tuples such as `(seed, epoch, row)` and `(seed, epoch + 1, row)` give unrelated draws."""
    high, low = np.random.SeedSequence(list(numbers)).generate_state(2, dtype=np.uint32).tolist()
    return torch.Generator().manual_seed(high << 32 | low)


class CPTCollator:
    """Turns validated rows into a masked CPT batch for `MoCaForContinualPretraining`.

    Output: the processor's `input_ids` (with `<|mask|>` at masked text positions), `attention_mask`,
    `mm_token_type_ids`, MLM `labels`; when the batch has images, also `pixel_values` (masked patches replaced
    by Gaussian noise), `image_grid_thw`, `pixel_targets` (the clean processor-normalised pixels) and
    `image_token_mask` (which merged visual tokens were masked). A text-only batch carries no image tensors.

    A row's masks are drawn afresh each epoch, from a generator seeded by `(seed, epoch, row_id)`: the same
    whatever the batch the row lands in, the number of dataloader workers or a resumption. Rows carry their
    `epoch` when they come through `EpochRows` (the Trainer's loader); a row without one counts as epoch 0.
    `mae_noise="shared"` (the release) noises every masked patch of a batch with one Gaussian vector, drawn from a
    generator seeded by the seed and the batch's `(epoch, row_id)`s; `"per_patch"` draws each patch's noise apart.
    """

    def __init__(self, processor, text_mask_ratio: float = 0.4, image_mask_ratio: float = 0.5,
                 max_length: int = 2048, shift_labels: bool = False, seed: int = 0, mae_noise: str = "shared"):
        for name, ratio in (("text_mask_ratio", text_mask_ratio), ("image_mask_ratio", image_mask_ratio)):
            if not 0 <= ratio <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {ratio}.")
        if mae_noise not in MAE_NOISE_MODES:
            raise ValueError(f"mae_noise must be one of {MAE_NOISE_MODES}, got {mae_noise!r}.")
        if processor.mask_token_id is None:
            raise ValueError("The processor's tokenizer has no <|mask|> token.")
        self.processor = processor
        self.text_mask_ratio = text_mask_ratio
        self.image_mask_ratio = image_mask_ratio
        self.max_length = max_length
        self.shift_labels = shift_labels
        self.seed = seed
        self.mae_noise = mae_noise
        self.never_masked = torch.tensor(never_masked_token_ids(processor))
        self.patches_per_token = processor.image_processor.merge_size**2

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        texts = [row["text"] or "" for row in rows]
        images = [[self.processor.load_image(image) for image in row["images"] or []] for row in rows]
        # The processor cuts at max_length without splitting an image: an image past the cut is dropped whole.
        batch = self.processor(
            text=texts,
            images=images if any(images) else None,
            padding=True,
            padding_side="right",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        mm_token_type_ids = batch["mm_token_type_ids"]

        keys = [(row.get("epoch", 0), row["row_id"]) for row in rows]
        generators = [seeded_generator(_MASK_STREAM, self.seed, epoch, row_id) for epoch, row_id in keys]
        maskable = attention_mask.bool() & mm_token_type_ids.eq(0) & ~torch.isin(input_ids, self.never_masked)
        masked_ids, labels = mask_text_tokens(
            input_ids, maskable, self.text_mask_ratio, self.processor.mask_token_id, generators, self.shift_labels
        )
        features = {
            "input_ids": masked_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": mm_token_type_ids,
            "labels": labels,
        }
        if "pixel_values" in batch:
            # Merged visual tokens of each sample, in `pixel_values` order: counted after truncation.
            tokens_per_sample = mm_token_type_ids.eq(1).sum(dim=1).tolist()
            noise_generator = None
            if self.mae_noise == "shared":
                noise_generator = seeded_generator(_NOISE_STREAM, self.seed, *(n for key in keys for n in key))
            noisy_pixels, image_token_mask = mask_image_patches(
                batch["pixel_values"], tokens_per_sample, self.patches_per_token, self.image_mask_ratio, generators,
                noise_generator,
            )
            features.update(
                pixel_values=noisy_pixels,
                image_grid_thw=batch["image_grid_thw"],
                pixel_targets=batch["pixel_values"],
                image_token_mask=image_token_mask,
            )
        return features


# ---------------------------------------------------------------------------------------------------------------
# Budget batching
# ---------------------------------------------------------------------------------------------------------------


class BudgetBatchSampler(Sampler[list[int]]):
    """Micro-batches of samples of similar length whose compute stays under a token budget.

    A batch's compute is the sum of its samples' costs (text tokens + 4 x image tokens) plus its padding
    tokens, so a batch never exceeds `token_budget` equivalent tokens unless it is a single sample that does
    alone. Samples are sorted by length (ties in a seeded random order) and packed greedily, so padding stays
    small; the order of the batches is shuffled anew each epoch (`set_epoch`, called by the Trainer). The
    composition of the batches does not depend on the epoch, so the number of batches is known up front.

    Written here because the samplers of transformers fix the number of samples per batch, not their cost.
    Under several processes, accelerate hands out whole batches round-robin and repeats the first ones so that
    every process runs the same number of steps.

    With `tag_epoch`, a batch is a list of `(epoch, index)` pairs rather than indices: the epoch then travels with
    each index to the dataloader workers (see `EpochRows`), which hold copies made whenever they started.
    """

    def __init__(self, lengths: list[int], costs: list[int], token_budget: int, seed: int = 0, shuffle: bool = True,
                 tag_epoch: bool = False):
        # Plain lists: indexing a `datasets` column element by element costs a table lookup each time.
        lengths, costs = list(lengths), list(costs)
        if len(lengths) != len(costs):
            raise ValueError(f"{len(lengths)} lengths but {len(costs)} costs.")
        if token_budget <= 0:
            raise ValueError(f"token_budget must be positive, got {token_budget}.")
        self.token_budget = token_budget
        self.seed = seed
        self.shuffle = shuffle
        self.tag_epoch = tag_epoch
        self.epoch = 0
        self.batches = self._pack(lengths, costs)
        oversized = sum(1 for batch in self.batches if len(batch) == 1 and costs[batch[0]] > token_budget)
        if oversized:
            logger.warning(
                "%d samples cost more than token_budget=%d alone: each is a batch of one.", oversized, token_budget
            )

    def _pack(self, lengths, costs) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        tie_order = torch.randperm(len(lengths), generator=generator).tolist()
        order = sorted(tie_order, key=lambda index: lengths[index])  # stable: ties keep the random order
        batches, batch, batch_cost, batch_tokens = [], [], 0, 0
        for index in order:
            # Sorted ascending, so the new sample is the longest: every sample gets padded to its length.
            padding = (len(batch) + 1) * lengths[index] - (batch_tokens + lengths[index])
            if batch and batch_cost + costs[index] + padding > self.token_budget:
                batches.append(batch)
                batch, batch_cost, batch_tokens = [], 0, 0
            batch.append(index)
            batch_cost += costs[index]
            batch_tokens += lengths[index]
        if batch:
            batches.append(batch)
        return batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        epoch = self.epoch  # read once: the epoch of this pass, whatever set_epoch does meanwhile
        order = range(len(self.batches))
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + 1 + epoch)
            order = torch.randperm(len(self.batches), generator=generator).tolist()
        for position in order:
            batch = self.batches[position]
            yield [(epoch, index) for index in batch] if self.tag_epoch else batch


class EpochRows(Dataset):
    """The rows of `dataset` looked up by the `(epoch, index)` pairs of `batch_sampler` (a `BudgetBatchSampler`
    with `tag_epoch`), each row given its `epoch`, from which the collator seeds its masks.

    `set_epoch` forwards to the sampler: accelerate calls it on the batch sampler or on the dataset depending on
    how it wrapped them (a resumed run of several processes wraps the sampler twice and reaches only the dataset).
    """

    def __init__(self, dataset: datasets.Dataset, batch_sampler: BudgetBatchSampler):
        self.dataset = dataset
        self.batch_sampler = batch_sampler

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        return dict(self.dataset[index], epoch=epoch)

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[dict]:
        # One table lookup for the whole batch (the DataLoader's fetcher prefers this to one __getitem__ per row).
        rows = self.dataset.__getitems__([index for _, index in keys])
        return [dict(row, epoch=epoch) for row, (epoch, _) in zip(rows, keys)]


def padding_fraction(batches: list[list[int]], lengths: list[int]) -> float:
    """Share of padded positions over all positions of the given batches."""
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    real = sum(lengths[i] for batch in batches for i in batch)
    return 1 - real / padded


# ---------------------------------------------------------------------------------------------------------------
# Arguments, model loading and the Trainer
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class CPTArguments(ModelDataArguments):
    model_name_or_path: str = field(metadata={"help": "A causal VLM (Hub name or folder) or a MoCa checkpoint."})
    text_mask_ratio: float = field(default=0.4, metadata={"help": "Share of text tokens replaced by <|mask|>."})
    image_mask_ratio: float = field(default=0.5, metadata={"help": "Share of merged visual tokens masked."})
    mae_loss_weight: float = field(
        default=MAE_LOSS_WEIGHT, metadata={"help": "w in loss = mlm_loss + w * mae_loss (release 0.1, paper 0.5)."}
    )
    max_length: int = field(
        default=MAX_LENGTH, metadata={"help": "Longest sequence in tokens; longer text is cut (release 1280, paper 2048)."}
    )
    shift_labels: bool = field(
        default=False,
        metadata={"help": "Predict a masked token from the position before it (the paper's text); the original "
                          "release does not shift (default)."},
    )
    mae_noise: str = field(
        default="shared",
        metadata={
            "help": "Noise of masked patches: shared (the release: one Gaussian vector for every masked patch of a "
                    "micro-batch) or per_patch (an independent draw per patch).",
            "choices": list(MAE_NOISE_MODES),
        },
    )
    token_budget: int = field(
        default=12800,
        metadata={"help": "Equivalent tokens per micro-batch (an image token counts as 4 text tokens, padding as 1)."},
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes validating rows."})


@dataclass
class CPTTrainingArguments(MoCaTrainingArguments):
    # The paper's settings at 3B scale (warmup 0.1 of training); a tiny model needs a far larger learning rate.
    learning_rate: float = field(default=2e-6, metadata={"help": "Peak learning rate (paper: 2e-6)."})
    warmup_steps: float = field(default=0.1, metadata={"help": "Warmup steps, or a fraction of training if < 1."})


def load_cpt_model(args: CPTArguments) -> MoCaForContinualPretraining:
    """From a causal VLM (heads from its lm_head and middle layer) or a MoCa checkpoint (its saved heads, if any)."""
    kwargs = dict(
        mae_loss_weight=args.mae_loss_weight, dtype=torch_dtype(args.dtype), attn_implementation=args.attn_implementation
    )
    if is_moca_checkpoint(args.model_name_or_path):
        model = MoCaForContinualPretraining.from_pretrained(args.model_name_or_path, **kwargs)
    else:
        model = MoCaForContinualPretraining.from_backbone(args.model_name_or_path, **kwargs)
    with_image_token_bounds(model, args)
    return model


class CPTTrainer(MoCaTrainer):
    """Trainer with token-budget batches, MLM and MAE losses logged apart, and MoCa checkpoints."""

    card_tags = ("continual-pretraining",)
    # The skipped rows are those of the validation before training, which every process runs on the whole data.
    skips_counted_per_process = False

    def __init__(self, *args, token_budget: int, skipped_rows: Counter | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_budget = token_budget
        self.skipped_rows = Counter(skipped_rows or {})
        self._skipped_rows_logged = False
        # Summed loss parts and the number of micro-batches that had them, since the last log.
        self._loss_parts = torch.zeros(4, device=self.args.device)

    def skipped_rows_by_reason(self) -> Counter:
        return Counter(self.skipped_rows)

    def get_train_dataloader(self) -> DataLoader:
        rows = self.train_dataset
        sampler = BudgetBatchSampler(
            rows["length"], rows["cost"], self.token_budget, seed=self.data_seed, tag_epoch=True
        )
        # `batch_sampler_dataloader` loads from `self.train_dataset`: lend it the epoch-tagged view for this call only,
        # so that the Trainer's dataset stays the validated rows (and this method can be called again).
        self.train_dataset = EpochRows(rows, sampler)
        try:
            # No worker seeding: the collator draws its masks from seeded generators, not from global RNG.
            loader = self.batch_sampler_dataloader(sampler, seed_workers=False)
        finally:
            self.train_dataset = rows
        # accelerate gives each process whole micro-batches (round-robin) and the same number of them.
        return self.accelerator.prepare(loader)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if model.training:
            with torch.no_grad():
                for slot, part in enumerate((outputs.mlm_loss, outputs.mae_loss)):
                    if part is not None:
                        self._loss_parts[2 * slot] += part.detach().float()
                        self._loss_parts[2 * slot + 1] += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: every process gets here at the same step
            totals = self.accelerator.reduce(self._loss_parts.clone(), reduction="sum").tolist()
            self._loss_parts.zero_()
            for slot, name in enumerate(("mlm_loss", "mae_loss")):
                if totals[2 * slot + 1]:
                    logs[name] = round(totals[2 * slot] / totals[2 * slot + 1], 4)
            if not self._skipped_rows_logged:
                logs["skipped_rows"] = sum(self.skipped_rows.values())
                self._skipped_rows_logged = True  # logged once: it does not change during training
        super().log(logs, start_time)

    def card_model(self):
        return self.accelerator.unwrap_model(self.model).moca

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # The backbone and the heads are saved apart (see `MoCaForContinualPretraining.save_pretrained`).
        (model or self.model).load_checkpoint(resume_from_checkpoint)
