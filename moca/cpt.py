"""Modality-aware continual pre-training (stage 1): data loading and validation, masking, budget batching.

The model side (`MoCaForContinualPretraining` and its losses) lives in `modeling_moca.py`, so that it travels
with the remote code of a checkpoint; this module holds what only the training script needs.

Row format of every data source: `{"text": str, "images": [image, ...]}` where `<image>` in the text marks
where each image goes and an image is encoded bytes, a file path, a `{"bytes", "path"}` dict (the `datasets`
image storage) or a `PIL.Image.Image`. Text-only rows have no (or an empty) `images` list; a row with images
but no placeholder gets its images first (caption style).
"""

import io
import logging
import math
import os
from collections import Counter
from pathlib import Path

import datasets
import torch
from PIL import Image
from torch.utils.data import Sampler

from .processing_moca import IMAGE_PLACEHOLDER, count_image_placeholders


logger = logging.getLogger(__name__)

# A visual token goes through the vision tower and the language model: the release counts it as 4 text tokens.
IMAGE_TOKEN_COST = 4
# Tokens the processor adds around each image (<|vision_start|> and <|vision_end|>).
IMAGE_WRAPPER_TOKENS = 2
DATA_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def _absolute_image_paths(dataset: datasets.Dataset, base_dir: Path) -> datasets.Dataset:
    """Make relative image paths of a local data file relative to that file, not to the working directory."""

    def resolve(row):
        row["images"] = [
            str(base_dir / image) if isinstance(image, str) and not os.path.isabs(image) else image
            for image in row["images"] or []
        ]
        return row

    return dataset.map(resolve, desc="Resolving image paths")


def load_cpt_source(source: str, split: str = "train") -> datasets.Dataset:
    """One data source: a parquet/jsonl file, a folder saved by `datasets.save_to_disk`, a local folder of
    data files, or a dataset on the Hub. Returns a dataset with exactly the columns `text` and `images`."""
    path = Path(source)
    if path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(f"Data file {source}: unsupported format {path.suffix!r} (use parquet or jsonl).")
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    elif path.is_dir() and any((path / name).exists() for name in ("state.json", "dataset_dict.json")):
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
    else:
        dataset = datasets.load_dataset(source, split=split)

    if "text" not in dataset.column_names:
        raise ValueError(f"Dataset {source}: no 'text' column (columns: {dataset.column_names}).")
    dataset = dataset.select_columns([c for c in ("text", "images") if c in dataset.column_names])
    if "images" not in dataset.column_names:
        dataset = dataset.add_column("images", [[] for _ in range(len(dataset))])
    elif path.is_file() and dataset.features["images"] == datasets.List(datasets.Value("string")):
        dataset = _absolute_image_paths(dataset, path.parent)
    # One storage for every way an image can be given (path, bytes, PIL): `{"bytes", "path"}`, decoded lazily.
    return dataset.cast_column("images", datasets.List(datasets.Image(decode=False)))


def load_cpt_dataset(sources: list[str], split: str = "train") -> datasets.Dataset:
    """All sources concatenated, in the order given."""
    if not sources:
        raise ValueError("No dataset given: pass one or more --dataset.")
    parts = [load_cpt_source(source, split=split) for source in sources]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def load_image(image, image_root: str | None = None) -> Image.Image:
    """A fully decoded RGB image from bytes, a path, a `{"bytes", "path"}` dict or a PIL image.

    A relative path that does not exist as given is looked up under `image_root` (jsonl rows next to their images).
    """
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    elif isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if image_root is not None and not os.path.isabs(path) and not os.path.exists(path):
            path = os.path.join(image_root, path)
        image = Image.open(path)
    elif not isinstance(image, Image.Image):
        raise TypeError(f"unsupported image type {type(image).__name__}")
    image.load()  # decode now: a truncated file fails here, not in the middle of a training step
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------------------------
# Validation and cost
# ---------------------------------------------------------------------------------------------------------------


def merged_image_tokens(image_processor, height: int, width: int) -> int:
    """Number of language-model tokens of one image, from its size alone (no pixels processed)."""
    num_patches = image_processor.get_number_of_image_patches(height, width, {})
    return num_patches // image_processor.merge_size**2


def inspect_row(row: dict, tokenizer, image_processor, max_length: int) -> dict:
    """Length (tokens), cost (equivalent tokens) and, for a row that cannot be trained on, why (`skip_reason`,
    the same for every row of the kind, and `skip_detail`)."""
    text = row["text"] or ""
    images = row["images"] or []
    result = {"length": 0, "cost": 0, "skip_reason": "", "skip_detail": ""}
    if not text.strip() and not images:
        result["skip_reason"] = "empty text"
        return result
    placeholders = count_image_placeholders(text)
    if placeholders and placeholders != len(images):
        result["skip_reason"] = f"{placeholders} image placeholders but {len(images)} images"
        return result

    image_tokens = 0
    for position, image in enumerate(images):
        try:
            width, height = load_image(image).size
            image_tokens += merged_image_tokens(image_processor, height, width)
        except Exception as error:  # any decoding or size error makes the row unusable, whatever its kind
            result["skip_reason"] = f"image {position} unreadable"
            result["skip_detail"] = f"{type(error).__name__}: {error}"
            return result

    text_tokens = len(tokenizer(text.replace(IMAGE_PLACEHOLDER, ""), add_special_tokens=True)["input_ids"])
    text_tokens += IMAGE_WRAPPER_TOKENS * len(images)
    length = text_tokens + image_tokens
    cost = text_tokens + IMAGE_TOKEN_COST * image_tokens
    if length > max_length:
        # The processor cuts the text (and drops whole any image past the cut): scale the cost alike.
        cost = math.ceil(cost * max_length / length)
        length = max_length
    result["length"] = length
    result["cost"] = cost
    return result


def prepare_cpt_dataset(dataset: datasets.Dataset, processor, max_length: int, num_proc: int | None = None):
    """Validate every row once, before training: returns `(dataset, skipped)` where `dataset` keeps the good
    rows with their `length`, `cost` and original `row_id`, and `skipped` counts the bad rows by reason.

    Bad rows (unreadable image, placeholder/image count mismatch, empty text) are skipped with one warning per
    reason, so that one broken sample never stops a long run.
    """
    dataset = dataset.add_column("row_id", list(range(len(dataset))))
    parts = dict(tokenizer=processor.tokenizer, image_processor=processor.image_processor)
    dataset = dataset.map(
        inspect_row, fn_kwargs=dict(parts, max_length=max_length), num_proc=num_proc, desc="Validating rows"
    )
    reasons = dataset["skip_reason"]
    skipped = Counter(reason for reason in reasons if reason)
    if skipped:
        for reason, count in skipped.most_common():
            logger.warning("Skipping %d of %d rows: %s", count, len(dataset), reason)
        first = next(i for i, reason in enumerate(reasons) if reason)
        logger.warning("First skipped row: index %d, %s %s", first, reasons[first], dataset[first]["skip_detail"])
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each merged visual token with probability `mask_ratio`: its raw patches (`patches_per_token`
    consecutive rows of `pixel_values`, the order of the Qwen-VL image processors) become Gaussian noise.

    `tokens_per_sample[i]` is the number of merged tokens of sample i's images, in `pixel_values` order.
    Returns `(noisy_pixel_values, token_mask)` with `token_mask` a bool vector over all merged tokens.
    """
    token_masks, noisy_chunks = [], []
    patch_start = 0
    for num_tokens, generator in zip(tokens_per_sample, generators):
        token_mask = torch.rand(num_tokens, generator=generator) < mask_ratio
        patch_mask = token_mask.repeat_interleave(patches_per_token)
        patches = pixel_values[patch_start : patch_start + len(patch_mask)].clone()
        noise = torch.randn(int(patch_mask.sum()), patches.shape[1], generator=generator)
        patches[patch_mask] = noise.to(patches.dtype)
        token_masks.append(token_mask)
        noisy_chunks.append(patches)
        patch_start += len(patch_mask)
    if patch_start != len(pixel_values):
        raise ValueError(f"{patch_start} patches expected from the image grids, pixel_values has {len(pixel_values)}.")
    return torch.cat(noisy_chunks), torch.cat(token_masks)


class CPTCollator:
    """Turns validated rows into a masked CPT batch for `MoCaForContinualPretraining`.

    Output: the processor's `input_ids` (with `<|mask|>` at masked text positions), `attention_mask`,
    `mm_token_type_ids`, MLM `labels`; when the batch has images, also `pixel_values` (masked patches replaced
    by Gaussian noise), `image_grid_thw`, `pixel_targets` (the clean processor-normalised pixels) and
    `image_token_mask` (which merged visual tokens were masked). A text-only batch carries no image tensors.

    Masks are drawn from a generator seeded by `(seed, row_id)`, so a sample's mask is the same whatever the
    batch it lands in, the number of dataloader workers or a resumption.
    """

    def __init__(self, processor, text_mask_ratio: float = 0.4, image_mask_ratio: float = 0.5,
                 max_length: int = 2048, shift_labels: bool = False, seed: int = 0):
        for name, ratio in (("text_mask_ratio", text_mask_ratio), ("image_mask_ratio", image_mask_ratio)):
            if not 0 <= ratio <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {ratio}.")
        if processor.mask_token_id is None:
            raise ValueError("The processor's tokenizer has no <|mask|> token.")
        self.processor = processor
        self.text_mask_ratio = text_mask_ratio
        self.image_mask_ratio = image_mask_ratio
        self.max_length = max_length
        self.shift_labels = shift_labels
        self.seed = seed
        self.never_masked = torch.tensor(never_masked_token_ids(processor))
        self.patches_per_token = processor.image_processor.merge_size**2

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        texts = [row["text"] or "" for row in rows]
        images = [[load_image(image) for image in row["images"] or []] for row in rows]
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

        generators = [torch.Generator().manual_seed(self.seed * 1_000_003 + row["row_id"]) for row in rows]
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
            noisy_pixels, image_token_mask = mask_image_patches(
                batch["pixel_values"], tokens_per_sample, self.patches_per_token, self.image_mask_ratio, generators
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
    """

    def __init__(self, lengths: list[int], costs: list[int], token_budget: int, seed: int = 0, shuffle: bool = True):
        # Plain lists: indexing a `datasets` column element by element costs a table lookup each time.
        lengths, costs = list(lengths), list(costs)
        if len(lengths) != len(costs):
            raise ValueError(f"{len(lengths)} lengths but {len(costs)} costs.")
        if token_budget <= 0:
            raise ValueError(f"token_budget must be positive, got {token_budget}.")
        self.token_budget = token_budget
        self.seed = seed
        self.shuffle = shuffle
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
        if not self.shuffle:
            yield from self.batches
            return
        generator = torch.Generator().manual_seed(self.seed + 1 + self.epoch)
        for position in torch.randperm(len(self.batches), generator=generator).tolist():
            yield self.batches[position]


def padding_fraction(batches: list[list[int]], lengths: list[int]) -> float:
    """Share of padded positions over all positions of the given batches."""
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    real = sum(lengths[i] for batch in batches for i in batch)
    return 1 - real / padded
