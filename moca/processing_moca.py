"""MoCaProcessor: text, images and interleaved text+image inputs -> inputs of a MoCa model."""

import io
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, ProcessorMixin


IMAGE_PLACEHOLDER = "<image>"
# Visual tokens per image in every stage of the original release (`min_pixels=256*28*28`, `max_pixels=1024*28*28`
# for Qwen2-VL/2.5-VL's 28-px merged patches; Qwen3-VL's are 32 px). The published Qwen-VL processor configs
# allow 4 to 16,384 tokens: a scanned page would run at 5-10x the resolution MoCa was trained at.
RELEASE_IMAGE_TOKENS = (256, 1024)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Image modes the Qwen-VL image processors convert themselves (RGBA onto white, as the release's processor did).
_PROCESSOR_MODES = ("RGB", "RGBA", "L")
# Accepted image markers: our own placeholder, MMEB's numbered markers, and the backbone's own tokens
# (with or without the vision start/end tokens around them).
_PLACEHOLDER_PATTERN = re.compile(
    r"<\|vision_start\|>(?:<\|image_pad\|>)+<\|vision_end\|>|<\|image_pad\|>|<\|image_\d+\|>|<image>"
)


def format_prompt(prompt: str | None, text: str | None) -> str:
    """Apply an instruction prompt: `{text}` is replaced by the text; a prompt without it is a prefix."""
    text = text or ""
    if prompt is None:
        return text
    if "{text}" in prompt:
        return prompt.replace("{text}", text)
    return prompt + text


def count_image_placeholders(text: str) -> int:
    return len(_PLACEHOLDER_PATTERN.findall(text))


def load_image(image) -> Image.Image:
    """The one image loader of every stage: a fully decoded image from a `PIL.Image`, encoded bytes, a path, or
    a `{"bytes", "path"}` dict (how `datasets` stores an undecoded image).

    Relative paths of data rows are made absolute when the data loads (`moca.data`). Decoding happens here, so a truncated or corrupt file fails with a `ValueError` that names it, not later inside
    the image processor.
    """
    if isinstance(image, Image.Image):
        return image
    source, shown = _image_source(image)
    try:
        with Image.open(source) as opened:
            opened.load()
            return opened.copy() if opened.mode in _PROCESSOR_MODES else opened.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image {shown}: {error}") from error


def _image_source(image) -> tuple:
    """What `Image.open` reads for an encoded image, and how to name it in an error."""
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        return path, path
    if isinstance(image, (bytes, bytearray)):
        return io.BytesIO(image), f"<{len(image)} bytes>"
    raise ValueError(f"unsupported image type {type(image).__name__}: pass a PIL image, bytes or a path")


def parse_input(item, index: int = 0) -> tuple[str | None, list]:
    """One input of `encode` (a str, PIL image, path, or `{"text", "image"}` dict) -> `(text, images)`.

    A string that is the path of an existing image file counts as an image. Images stay as given (decoded
    one batch at a time, by `MoCaProcessor.batch`).
    """
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
        elif isinstance(images, (Image.Image, str, Path, bytes, bytearray, dict)):  # dict: undecoded `datasets` image
            images = [images]
        else:
            images = list(images)
        if text is not None and not isinstance(text, str):
            raise ValueError(f"Input {index}: 'text' must be a string, got {type(text).__name__}.")
        if not text and not images:
            raise ValueError(f"Input {index}: empty input (no text and no image).")
        return text, images
    raise ValueError(f"Input {index}: unsupported type {type(item).__name__}; pass a str, PIL image, path or dict.")


class MoCaProcessor(ProcessorMixin):
    r"""
    Wraps a Qwen-VL image processor and tokenizer into one processor for embedding inputs.

    Unlike the Qwen-VL processors it needs no video processor, so it works with and without torchvision, and
    it returns `mm_token_type_ids`, which the backbone needs for its 3D (M-RoPE) positions.

    Images are placed where the text has a placeholder: `<image>`, MMEB's `<|image_1|>`, or the backbone's
    own `<|vision_start|><|image_pad|><|vision_end|>`; an input with images but no placeholder gets its images
    first. Truncation to `max_length` never cuts through an image: an image that does not fit is dropped
    whole, with its pixels.
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)
        self.image_token = "<|image_pad|>"
        self.vision_start_token = "<|vision_start|>"
        self.vision_end_token = "<|vision_end|>"
        self.video_token = "<|video_pad|>"
        self.mask_token = "<|mask|>"
        vocab = tokenizer.get_vocab()
        missing = [t for t in (self.image_token, self.vision_start_token, self.vision_end_token) if t not in vocab]
        if missing:
            raise ValueError(f"The tokenizer lacks the vision tokens {missing}; is this a Qwen-VL tokenizer?")
        self.image_token_id = vocab[self.image_token]
        self.vision_start_token_id = vocab[self.vision_start_token]
        self.vision_end_token_id = vocab[self.vision_end_token]
        self.video_token_id = vocab.get(self.video_token)
        self.mask_token_id = vocab.get(self.mask_token)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # The parts are stock transformers classes. Loading them through the generic path would follow the
        # remote-code `auto_map` that saving writes next to them and ask again whether to trust it.
        kwargs.pop("trust_remote_code", None)
        image_processor = AutoImageProcessor.from_pretrained(pretrained_model_name_or_path, trust_remote_code=False, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, trust_remote_code=False, **kwargs)
        return [image_processor, tokenizer]

    @property
    def merge_size(self) -> int:
        return self.image_processor.merge_size

    @property
    def token_side(self) -> int:
        """Side in pixels of the square one merged visual token covers (28 for Qwen2/2.5-VL, 32 for Qwen3-VL)."""
        return self.image_processor.patch_size * self.merge_size

    @property
    def image_token_bounds(self) -> tuple[int, int]:
        """(fewest, most) visual tokens an image is resized to, from the image processor's pixel bounds."""
        size = self.image_processor.size
        area = self.token_side**2
        return size["shortest_edge"] // area, size["longest_edge"] // area

    def set_image_token_bounds(self, min_tokens: int | None = None, max_tokens: int | None = None) -> None:
        """Resize every image to between `min_tokens` and `max_tokens` visual tokens (stored in the image
        processor's `size`, so `save_pretrained` writes them into the checkpoint). `None` keeps a bound."""
        current = self.image_token_bounds
        min_tokens = current[0] if min_tokens is None else min_tokens
        max_tokens = current[1] if max_tokens is None else max_tokens
        if not 1 <= min_tokens <= max_tokens:
            raise ValueError(f"image token bounds must satisfy 1 <= min <= max, got min {min_tokens}, max {max_tokens}.")
        area = self.token_side**2
        size = {"shortest_edge": min_tokens * area, "longest_edge": max_tokens * area}
        # transformers 5 reads the bounds from `size` alone (a config's legacy `min_pixels`/`max_pixels` are folded
        # into it on loading).
        self.image_processor.size = size

    def stretch_small_image(self, image: Image.Image) -> Image.Image:
        """A side shorter than one merged patch stretched to it, as the release does before processing (the
        Qwen-VL resizing rounds such a side to zero or refuses extreme aspect ratios)."""
        side = self.token_side
        width, height = image.size
        if width >= side and height >= side:
            return image
        return image.resize((max(width, side), max(height, side)), Image.BICUBIC)

    def image_tokens(self, width: int, height: int) -> int:
        """Visual tokens of a `width` x `height` image: exactly what processing it gives, without the pixels."""
        side = self.token_side
        width, height = max(width, side), max(height, side)
        return self.image_processor.get_number_of_image_patches(height, width, {}) // self.merge_size**2

    def num_image_tokens(self, image_grid_thw: torch.Tensor) -> list[int]:
        return (image_grid_thw.prod(-1) // self.merge_size**2).tolist()

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images=None,
        padding: bool | str = True,
        truncation: bool = False,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """
        Args:
            text: one string or a list of strings, with image placeholders.
            images: `None`, one list of images per text, or a flat list of images in text order (the
                placeholders say which text each belongs to).
        Returns:
            `BatchFeature` with `input_ids`, `attention_mask`, `mm_token_type_ids` and, when any image is
            present, `pixel_values` and `image_grid_thw`.
        """
        if text is None:
            raise ValueError("MoCaProcessor needs `text` (use an empty string or a placeholder for image-only inputs).")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("Empty batch: no text was given.")
        per_sample_images = self._images_per_sample(texts, images)

        expanded, flat_images = [], []
        for i, (sample_text, sample_images) in enumerate(zip(texts, per_sample_images)):
            if not isinstance(sample_text, str):
                raise ValueError(f"Sample {i}: text must be a string, got {type(sample_text).__name__}.")
            n_placeholders = count_image_placeholders(sample_text)
            if n_placeholders == 0 and sample_images:
                sample_text = IMAGE_PLACEHOLDER * len(sample_images) + sample_text
                n_placeholders = len(sample_images)
            if n_placeholders != len(sample_images):
                raise ValueError(
                    f"Sample {i}: the text has {n_placeholders} image placeholder(s) but {len(sample_images)} "
                    f"image(s) were given."
                )
            if not sample_text and not sample_images:
                raise ValueError(f"Sample {i}: empty input (no text and no image).")
            flat_images.extend(sample_images)
            expanded.append(sample_text)

        image_inputs, tokens_per_image, patches_per_image = {}, [], []
        if flat_images:
            flat_images = [self.stretch_small_image(image) if isinstance(image, Image.Image) else image for image in flat_images]
            image_inputs = dict(self.image_processor(images=flat_images, return_tensors="pt"))
            tokens_per_image = self.num_image_tokens(image_inputs["image_grid_thw"])
            patches_per_image = image_inputs["image_grid_thw"].prod(-1).tolist()

        image_index = 0
        for i, sample_text in enumerate(expanded):
            pieces = _PLACEHOLDER_PATTERN.split(sample_text)
            out = pieces[0]
            for piece in pieces[1:]:
                out += self.vision_start_token + self.image_token * tokens_per_image[image_index] + self.vision_end_token + piece
                image_index += 1
            expanded[i] = out

        encoded = self.tokenizer(expanded, add_special_tokens=True)["input_ids"]
        keep_image = [True] * len(flat_images)
        if truncation and max_length is not None:
            encoded, keep_image = self._truncate(encoded, max_length)

        data = self._pad(encoded, padding, max_length if padding == "max_length" else None, pad_to_multiple_of, padding_side)
        if flat_images and any(keep_image):
            pixel_values = torch.split(image_inputs["pixel_values"], patches_per_image)
            data["pixel_values"] = torch.cat([p for p, keep in zip(pixel_values, keep_image) if keep])
            data["image_grid_thw"] = image_inputs["image_grid_thw"][torch.tensor(keep_image)]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _images_per_sample(self, texts: list[str], images) -> list[list]:
        if images is None:
            return [[] for _ in texts]
        if isinstance(images, (Image.Image, str)) or not isinstance(images, Sequence):
            images = [images]
        images = list(images)
        nested = len(images) == len(texts) and all(isinstance(x, (list, tuple)) or x is None for x in images)
        if nested:
            return [list(x) if x is not None else [] for x in images]
        # A flat list: hand out images to texts in order of their placeholders.
        counts = [count_image_placeholders(t) if isinstance(t, str) else 0 for t in texts]
        if sum(counts) == 0 and len(texts) == 1:
            return [images]
        if sum(counts) != len(images):
            raise ValueError(
                f"The texts have {sum(counts)} image placeholder(s) in all but {len(images)} image(s) were given "
                f"as a flat list; pass one list of images per text to attach images without placeholders."
            )
        per_sample, start = [], 0
        for count in counts:
            per_sample.append(images[start : start + count])
            start += count
        return per_sample

    def _truncate(self, encoded: list[list[int]], max_length: int):
        """Cut each sequence to `max_length` tokens, moving the cut before any image it would split."""
        keep_image, truncated = [], []
        for ids in encoded:
            cut = min(len(ids), max_length)
            starts = [j for j, t in enumerate(ids) if t == self.vision_start_token_id]
            ends = [j for j, t in enumerate(ids) if t == self.vision_end_token_id]
            for start, end in zip(starts, ends):
                if start < cut <= end:
                    cut = start
                keep_image.append(end < cut)
            truncated.append(ids[:cut])
        return truncated, keep_image

    def _pad(self, encoded, padding, max_length, pad_to_multiple_of, padding_side) -> dict:
        padding_side = padding_side or self.tokenizer.padding_side
        lengths = [len(ids) for ids in encoded]
        if padding is False or padding == "do_not_pad":
            if len(set(lengths)) > 1:
                raise ValueError("Inputs have different lengths: pass padding=True to batch them.")
        target = max(lengths) if max_length is None else max(max_length, max(lengths))
        if pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((len(encoded), target), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), target), dtype=torch.long)
        for i, ids in enumerate(encoded):
            span = slice(0, len(ids)) if padding_side == "right" else slice(target - len(ids), target)
            input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, span] = 1
        mm_token_type_ids = torch.zeros_like(input_ids)
        mm_token_type_ids[input_ids == self.image_token_id] = 1
        if self.video_token_id is not None:
            mm_token_type_ids[input_ids == self.video_token_id] = 2
        return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids}

    # ------------------------------------------------------------------ what a person has -> model inputs

    def parse_inputs(self, inputs, prompt: str | None = None, image_prompt: str | None = None) -> list[tuple[str, list]]:
        """Inputs of `MoCaModel.encode` -> one `(text with the prompt applied, images)` pair each, validated.

        `prompt` is a format string with `{text}` (or a prefix). An input made of images alone gets `prompt` when
        it has no `{text}` to fill (an instruction about the image, such as the document-page prompt) and
        `image_prompt` otherwise. Images stay as given: `batch` decodes them, one batch at a time.
        """
        if isinstance(inputs, (str, dict, Image.Image, Path)):
            inputs = [inputs]
        # An empty prompt is no prompt (sentence-transformers passes "" for its default `query`/`document` entries).
        prompt = prompt or None
        image_only_prompt = prompt if prompt is not None and "{text}" not in prompt else image_prompt
        items = []
        for i, item in enumerate(inputs):
            text, images = parse_input(item, i)
            if not text and images and image_only_prompt is not None:
                text = image_only_prompt
            else:
                text = format_prompt(prompt, text)
            n_placeholders = count_image_placeholders(text)
            if n_placeholders and n_placeholders != len(images):
                raise ValueError(
                    f"Input {i}: the text has {n_placeholders} image placeholder(s) but {len(images)} image(s) were given"
                    + (" (the prompt holds an image placeholder: use it for inputs with an image)" if
                       count_image_placeholders(prompt or "") else "") + "."
                )  # fmt: skip
            items.append((text, images))
        return items

    def batch(self, items: Sequence[tuple[str, list]], max_length: int | None = None,
              indices: Sequence[int] | None = None) -> BatchFeature:
        """Model inputs for a batch of `parse_inputs` items, images decoded here.

        `indices` are the items' positions in the caller's input, used to name a bad one in errors.
        """
        indices = indices if indices is not None else range(len(items))
        batch_images = []
        for index, (_, images) in zip(indices, items):
            try:
                batch_images.append([load_image(image) for image in images])
            except ValueError as error:
                raise ValueError(f"Input {index}: {error}") from error
        return self(
            text=[text for text, _ in items],
            images=batch_images if any(batch_images) else None,
            truncation=max_length is not None,
            max_length=max_length,
        )

    def image_cost(self, image) -> float:
        """Visual tokens of an image, read from its header only (no decoding); 0 when it cannot be read
        (`batch` raises the error that names it)."""
        try:
            if isinstance(image, Image.Image):
                width, height = image.size
            else:
                with Image.open(_image_source(image)[0]) as opened:
                    width, height = opened.size
            return self.image_tokens(width, height)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            return 0.0

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"]


MoCaProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "MoCaProcessor", "format_prompt", "count_image_placeholders", "load_image", "parse_input", "IMAGE_PLACEHOLDER",
    "IMAGE_EXTENSIONS", "RELEASE_IMAGE_TOKENS",
]  # fmt: skip
