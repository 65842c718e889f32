"""MoCaProcessor: text, images and interleaved text+image inputs -> inputs of a MoCa model."""

import io
import json
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, ProcessorMixin
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize


IMAGE_PLACEHOLDER = "<image>"
# Visual tokens per image in every stage of the original release (`min_pixels=256*28*28`, `max_pixels=1024*28*28`
# for Qwen2-VL/2.5-VL's 28-px merged patches; Qwen3-VL's are 32 px). The published Qwen-VL processor configs
# allow 4 to 16,384 tokens: a scanned page would run at 5-10x the resolution MoCa was trained at.
RELEASE_IMAGE_TOKENS = (256, 1024)
# The Qwen-VL resizing (`smart_resize`) refuses images more elongated than this.
MAX_ASPECT_RATIO = 200
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


# `parse_inputs`' rules as a chat template, saved into every checkpoint's processor: sentence-transformers (and any
# code that applies the processor's chat template) turns each input into messages, the prompt into a system
# message, and gets the text MoCa itself would build: the prompt is a format string with `{text}` or a prefix, an
# input of images alone gets the prompt when it has no `{text}` (else IMAGE_PROMPT), images go where the text has
# `<image>`, `<|image_N|>` or the vision tokens, else first. Written in Jinja because the template is all those
# engines run; `chat_template(image_prompt)` fills in IMAGE_PROMPT.
_CHAT_TEMPLATE = """{%- set ns = namespace(prompt='', text='', images=0) -%}
{%- for message in messages -%}
{%- if message.content is string -%}{%- set parts = [{'type': 'text', 'text': message.content}] -%}{%- else -%}{%- set parts = message.content -%}{%- endif -%}
{%- for part in parts -%}
{%- if part.type == 'text' -%}
{%- if message.role == 'system' -%}{%- set ns.prompt = ns.prompt + part.text -%}{%- else -%}{%- set ns.text = ns.text + part.text -%}{%- endif -%}
{%- elif part.type == 'image' -%}{%- set ns.images = ns.images + 1 -%}
{%- endif -%}
{%- endfor -%}
{%- endfor -%}
{%- if not ns.text and ns.images and ns.prompt and '{text}' not in ns.prompt -%}{%- set text = ns.prompt -%}
{%- elif not ns.text and ns.images and IMAGE_PROMPT -%}{%- set text = IMAGE_PROMPT -%}
{%- elif '{text}' in ns.prompt -%}{%- set text = ns.prompt.replace('{text}', ns.text) -%}
{%- else -%}{%- set text = ns.prompt + ns.text -%}{%- endif -%}
{%- set vision = '<|vision_start|><|image_pad|><|vision_end|>' -%}
{%- set text = text.replace(vision, '<image>') -%}
{%- for i in range(1, ns.images + 1) -%}{%- set text = text.replace('<|image_' ~ i ~ '|>', '<image>') -%}{%- endfor -%}
{%- set placeholders = text.count('<image>') -%}
{%- if placeholders == 0 -%}{%- set text = '<image>' * ns.images + text -%}
{%- elif placeholders != ns.images -%}{{ raise_exception('the text has ' ~ placeholders ~ ' image placeholder(s) but ' ~ ns.images ~ ' image(s) were given') }}
{%- endif -%}
{{- text.replace('<image>', vision) -}}"""


def chat_template(image_prompt: str | None) -> str:
    """The chat template that renders messages as MoCa's input text (see `_CHAT_TEMPLATE`)."""
    return "{%- set IMAGE_PROMPT = " + json.dumps(image_prompt or "") + " -%}\n" + _CHAT_TEMPLATE + "\n"


class InputError(ValueError):
    """A bad input: `index` is its position in what the caller passed (`label` says which kind of position: an
    `Input` of `encode`, a `Sample` of a processor call), `reason` says what is wrong. Callers that know a better
    name for the input re-raise with it (`MoCaProcessor.batch`, the sentence-transformers module)."""

    def __init__(self, index, reason: str, label: str = "Input"):
        super().__init__(f"{label} {index}: {reason}")
        self.index = index
        self.reason = reason


def load_image(image, resized_size=None) -> Image.Image:
    """The one image loader of every stage: a fully decoded image from a `PIL.Image`, encoded bytes, a path, or
    a `{"bytes", "path"}` dict (how `datasets` stores an undecoded image).

    Relative paths of data rows are made absolute when the data loads (`moca.data`). Decoding happens here, so a
    truncated or corrupt file, or a decompression bomb (over twice PIL's `Image.MAX_IMAGE_PIXELS`), fails with a
    `ValueError` that names it, not later inside the image processor. An image over `Image.MAX_IMAGE_PIXELS`
    itself is decoded with PIL's `DecompressionBombWarning`, which here names the image.

    `resized_size` (`(width, height) -> (width, height)` the processor will resize the image to, or `None` when it
    would refuse it; `MoCaProcessor.load_image` passes its own) bounds memory: an image at least twice that size on
    both sides is decoded already shrunk by an integer factor (JPEG: 1/2, 1/4 or 1/8 while decoding, with
    `Image.draft`; other formats: `Image.reduce` right after decoding), the largest that keeps both sides at least
    twice the processor's and leaves the processor's output size unchanged. Without it the image is decoded at
    full size.
    """
    if isinstance(image, Image.Image):
        return image
    source, shown = _image_source(image)
    try:
        with warnings.catch_warnings():
            # PIL's own warning names no image: the one below does.
            warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
            opened = Image.open(source)
        with opened:
            width, height = opened.size
            if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
                warnings.warn(
                    f"image {shown} has {width}x{height} = {width * height} pixels, over PIL's Image.MAX_IMAGE_PIXELS "
                    f"({Image.MAX_IMAGE_PIXELS}): it may be a decompression bomb.",
                    Image.DecompressionBombWarning, stacklevel=2,
                )  # fmt: skip
            target = resized_size(width, height) if resized_size is not None else None
            reduce_by = 1
            if target is not None and opened.format == "JPEG":
                # Decoded at 1/2, 1/4 or 1/8 scale straight from the DCT coefficients: the full image never exists.
                scale = _shrink_factor((width, height), target, resized_size, (8, 4, 2))
                if scale > 1:
                    opened.draft(None, (width // scale, height // scale))
            elif target is not None:
                reduce_by = _shrink_factor((width, height), target, resized_size)
            opened.load()
            decoded = opened if opened.mode in _PROCESSOR_MODES else opened.convert("RGB")
            if reduce_by > 1:
                return decoded.reduce(reduce_by)
            # Closing the file frees the pixels of the opened image: keep a copy (no second one after convert).
            return decoded.copy() if decoded is opened else decoded
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image {shown}: {error}") from error


def _shrink_factor(size: tuple[int, int], target: tuple[int, int], resized_size, factors=None) -> int:
    """The largest of `factors` (default: every integer) that shrinks `size` to at least twice `target` on both
    sides and to a size the processor resizes to `target` as well (so the visual tokens stay the same); 1 if none."""
    width, height = size
    most = min(width // (2 * target[0]), height // (2 * target[1]))
    for factor in factors or range(most, 1, -1):
        shrunk = (-(-width // factor), -(-height // factor))  # PIL's draft and reduce round up
        if factor <= most and shrunk[0] >= 2 * target[0] and shrunk[1] >= 2 * target[1] and resized_size(*shrunk) == target:
            return factor
    return 1


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


def _is_undecoded_image(item) -> bool:
    """Encoded bytes, or the `{"bytes", "path"}` dict that `datasets` keeps for an undecoded image."""
    return isinstance(item, (bytes, bytearray)) or (isinstance(item, dict) and bool(item) and set(item) <= {"bytes", "path"})


def parse_input(item, index: int = 0) -> tuple[str | None, list]:
    """One input of `encode` -> `(text, images)`; a bad input raises an `InputError` naming `index`.

    - A `PIL.Image`, a `pathlib.Path`, encoded image bytes (a `datasets` binary column) or a `{"bytes", "path"}`
      dict (an undecoded `datasets` image) is an image.
    - A `str` is text, except that a string ending in an image extension (`IMAGE_EXTENSIONS`) with no whitespace
      is a path: an image if the file exists, else an error "no such image file" (pass `{"text": ...}` to embed
      such a string as text).
    - A `{"text", "image"}` dict (`"images"` also accepted; the image may be a list) is text with images.
    - Text that is empty or whitespace only, with no image, is an error ("empty text"), as CPT skips it.

    Images stay as given (decoded one batch at a time, by `MoCaProcessor.batch`).
    """
    if isinstance(item, (Image.Image, Path)) or _is_undecoded_image(item):
        return None, [item]
    if isinstance(item, str):
        if item.lower().endswith(IMAGE_EXTENSIONS) and not any(c.isspace() for c in item):
            if not os.path.isfile(item):
                raise InputError(index, f"no such image file {item!r} (pass {{'text': ...}} to embed it as text).")
            return None, [item]
        if not item.strip():
            raise InputError(index, "empty text.")
        return item, []
    if isinstance(item, dict):
        unknown = set(item) - {"text", "image", "images"}
        if unknown:
            raise InputError(index, f"unknown keys {sorted(unknown)}; use 'text' and 'image'.")
        text = item.get("text")
        images = item.get("image", item.get("images"))
        if images is None:
            images = []
        elif isinstance(images, (Image.Image, str, Path, bytes, bytearray, dict)):  # dict: undecoded `datasets` image
            images = [images]
        else:
            images = list(images)
        if text is not None and not isinstance(text, str):
            raise InputError(index, f"'text' must be a string, got {type(text).__name__}.")
        if not images and not text:
            raise InputError(index, "empty input (no text and no image).")
        if not images and not text.strip():
            raise InputError(index, "empty text.")
        return text, images
    raise InputError(index, f"unsupported type {type(item).__name__}; pass a str, PIL image, path, bytes or dict.")


class MoCaProcessor(ProcessorMixin):
    r"""
    Wraps a Qwen-VL image processor and tokenizer into one processor for embedding inputs.

    Unlike the Qwen-VL processors it needs no video processor, so it works with and without torchvision, and
    it returns `mm_token_type_ids`, which the backbone needs for its 3D (M-RoPE) positions.

    Images are placed where the text has a placeholder: `<image>`, MMEB's `<|image_1|>`, or the backbone's
    own `<|vision_start|><|image_pad|><|vision_end|>` (or a lone `<|image_pad|>`); an input with images but no
    placeholder gets its images first. Truncation to `max_length` never cuts through an image: an image that does
    not fit is dropped whole, with its pixels.

    Special tokens written in the text are text: everything between placeholders is tokenized with
    `split_special_tokens=True` and the vision tokens of each image are inserted as ids, so a literal
    `<|video_pad|>`, a lone `<|vision_start|>` / `<|vision_end|>`, `<|endoftext|>` or `<|mask|>` reaches the model
    as the characters it is made of, never as a control token (no user text is lost, and truncation only ever sees
    the vision tokens of real images).

    Bad samples raise an `InputError` (a `ValueError`) naming the sample: an image whose aspect ratio is over 200
    after short sides are stretched (the Qwen-VL resizing refuses it; MoCa does not pad, as the release does not),
    an image that cannot be decoded, empty or whitespace-only text without an image, a placeholder count that
    does not match the images, and a sample whose first image alone is longer than `max_length`.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # `chat_template` named here, as transformers passes a saved processor only the arguments named in the
        # signature: MoCa's template (`chat_template()`), which sentence-transformers applies.
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
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
        # The text between placeholders is tokenized piece by piece and the pieces joined: that is the whole
        # input only for a tokenizer that adds no BOS/EOS of its own, as every Qwen-VL tokenizer.
        if tokenizer("a")["input_ids"] != tokenizer("a", add_special_tokens=False)["input_ids"]:
            raise ValueError("The tokenizer adds special tokens around its input; MoCa supports Qwen-VL tokenizers, which add none.")

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
        # Of the type the image processor keeps (`SizeDict` in transformers 5), which its fast variant reads by attribute.
        self.image_processor.size = type(self.image_processor.size)(**size)

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

    def resized_size(self, width: int, height: int) -> tuple[int, int] | None:
        """(width, height) the image processor resizes a `width` x `height` image to (short sides stretched first,
        as `stretch_small_image` does), or `None` when it refuses the image (aspect ratio over 200)."""
        side = self.token_side
        width, height = max(width, side), max(height, side)
        if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
            return None
        size = self.image_processor.size
        height, width = smart_resize(height, width, side, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
        return width, height

    def load_image(self, image) -> Image.Image:
        """`load_image`, decoding an image far larger than this processor's resolution already shrunk (bounded memory)."""
        return load_image(image, resized_size=self.resized_size)

    def placed_text(self, text: str, n_images: int) -> str:
        """`text` (a `parse_inputs` item's) with each image spelled as the backbone's vision tokens
        (`<|vision_start|><|image_pad|><|vision_end|>`, images first where it has no placeholder): the raw prompt a
        serving engine takes, whose own processor expands each `<|image_pad|>` to the image's tokens. Control tokens
        written in the text stay in it as written (this processor reads them as plain text; an engine may not)."""
        if count_image_placeholders(text) == 0:
            text = IMAGE_PLACEHOLDER * n_images + text
        if count_image_placeholders(text) != n_images:
            raise ValueError(f"the text has {count_image_placeholders(text)} image placeholder(s) but {n_images} image(s).")
        vision = self.vision_start_token + self.image_token + self.vision_end_token
        return _PLACEHOLDER_PATTERN.sub(vision, text)

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

        placed, flat_images = [], []
        for i, (sample_text, sample_images) in enumerate(zip(texts, per_sample_images)):
            if not isinstance(sample_text, str):
                raise InputError(i, f"text must be a string, got {type(sample_text).__name__}.", "Sample")
            n_placeholders = count_image_placeholders(sample_text)
            if n_placeholders == 0 and sample_images:
                sample_text = IMAGE_PLACEHOLDER * len(sample_images) + sample_text
                n_placeholders = len(sample_images)
            if n_placeholders != len(sample_images):
                raise InputError(
                    i, f"the text has {n_placeholders} image placeholder(s) but {len(sample_images)} image(s) were given.",
                    "Sample",
                )  # fmt: skip
            if not sample_text.strip() and not sample_images:
                raise InputError(i, "empty text (no text and no image).", "Sample")
            for j, image in enumerate(sample_images):
                flat_images.append(self._prepared_image(image, i, j))
            placed.append(sample_text)

        image_inputs, tokens_per_image, patches_per_image = {}, [], []
        if flat_images:
            image_inputs = dict(self.image_processor(images=flat_images, return_tensors="pt"))
            tokens_per_image = self.num_image_tokens(image_inputs["image_grid_thw"])
            patches_per_image = image_inputs["image_grid_thw"].prod(-1).tolist()

        encoded = self.token_ids(placed, tokens_per_image)
        keep_image = [True] * len(flat_images)
        if truncation and max_length is not None:
            encoded, keep_image = self._truncate(encoded, max_length)
            for i, ids in enumerate(encoded):
                if not ids:
                    raise InputError(i, f"its first image alone is longer than max_length ({max_length} tokens).", "Sample")

        data = self._pad(encoded, padding, max_length if padding == "max_length" else None, pad_to_multiple_of, padding_side)
        if flat_images and any(keep_image):
            pixel_values = torch.split(image_inputs["pixel_values"], patches_per_image)
            data["pixel_values"] = torch.cat([p for p, keep in zip(pixel_values, keep_image) if keep])
            data["image_grid_thw"] = image_inputs["image_grid_thw"][torch.tensor(keep_image)]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _prepared_image(self, image, sample: int, position: int) -> Image.Image:
        """An image of sample `sample` decoded, short sides stretched, and checked against what the resizing refuses."""
        try:
            decoded = self.load_image(image)
        except ValueError as error:
            raise InputError(sample, str(error), "Sample") from error
        if self.resized_size(*decoded.size) is None:
            raise InputError(
                sample,
                f"image {position} is {decoded.width}x{decoded.height} px: its aspect ratio is over {MAX_ASPECT_RATIO} "
                f"(after stretching short sides to {self.token_side} px), which the Qwen-VL resizing refuses; crop it "
                f"or pad it to a ratio of at most {MAX_ASPECT_RATIO}.",
                "Sample",
            )  # fmt: skip
        return self.stretch_small_image(decoded)

    def token_ids(self, texts: Sequence[str], tokens_per_image: Sequence[int]) -> list[list[int]]:
        """Token ids of texts with one placeholder per image (`tokens_per_image`: visual tokens of each image, in
        text order): each placeholder becomes `<|vision_start|>`, its `<|image_pad|>` tokens and `<|vision_end|>`,
        inserted as ids; the text around them is tokenized with special tokens split, so it can hold none."""
        pieces = [_PLACEHOLDER_PATTERN.split(text) for text in texts]
        piece_ids = iter(
            self.tokenizer([piece for text_pieces in pieces for piece in text_pieces], add_special_tokens=False,
                           split_special_tokens=True)["input_ids"]
        )  # fmt: skip
        image_tokens = iter(tokens_per_image)
        encoded = []
        for text_pieces in pieces:
            ids = list(next(piece_ids))
            for _ in text_pieces[1:]:
                ids += [self.vision_start_token_id] + [self.image_token_id] * next(image_tokens) + [self.vision_end_token_id]
                ids += next(piece_ids)
            encoded.append(ids)
        return encoded

    def _images_per_sample(self, texts: list[str], images) -> list[list]:
        if images is None:
            return [[] for _ in texts]
        if isinstance(images, (Image.Image, str, bytes, bytearray)) or not isinstance(images, Sequence):
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
            spans = self._image_spans(ids)
            for start, end in spans:
                if start < cut <= end:
                    cut = start
            keep_image.extend(end < cut for _, end in spans)
            truncated.append(ids[:cut])
        return truncated, keep_image

    def _image_spans(self, ids: list[int]) -> list[tuple[int, int]]:
        """(start, end) positions of each image: `<|vision_start|>`, one or more `<|image_pad|>`, `<|vision_end|>`.
        `token_ids` makes no other vision tokens; in ids tokenized elsewhere a stray one is not an image, so it
        can neither move the cut nor pair with a real image's end."""
        spans = []
        for start, token in enumerate(ids):
            if token != self.vision_start_token_id:
                continue
            end = start + 1
            while end < len(ids) and ids[end] == self.image_token_id:
                end += 1
            if end > start + 1 and end < len(ids) and ids[end] == self.vision_end_token_id:
                spans.append((start, end))
        return spans

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
        return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids}

    # ------------------------------------------------------------------ what a person has -> model inputs

    def parse_inputs(self, inputs, prompt: str | None = None, image_prompt: str | None = None) -> list[tuple[str, list]]:
        """Inputs of `MoCaModel.encode` -> one `(text with the prompt applied, images)` pair each, validated
        (`parse_input` says what an input may be; a bad one raises an `InputError` naming its index).

        `prompt` is a format string with `{text}` (or a prefix). An input made of images alone gets `prompt` when
        it has no `{text}` to fill (an instruction about the image, such as the document-page prompt) and
        `image_prompt` otherwise. Images stay as given: `batch` decodes them, one batch at a time.
        """
        if isinstance(inputs, (str, dict, Image.Image, Path, bytes, bytearray)):
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
                raise InputError(
                    i, f"the text has {n_placeholders} image placeholder(s) but {len(images)} image(s) were given"
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
        indices = list(indices) if indices is not None else list(range(len(items)))
        batch_images = []
        for index, (_, images) in zip(indices, items):
            try:
                batch_images.append([self.load_image(image) for image in images])
            except ValueError as error:
                raise InputError(index, str(error)) from error
        try:
            return self(
                text=[text for text, _ in items],
                images=batch_images if any(batch_images) else None,
                truncation=max_length is not None,
                max_length=max_length,
            )
        except InputError as error:  # named by its position in this batch: name it by the caller's index
            raise InputError(indices[error.index], error.reason) from error

    def token_counts(self, items: Sequence[tuple[str, list]]) -> list[int]:
        """Tokens each `parse_inputs` item becomes in `batch` before any cut: its text's tokens plus, per image,
        the start and end markers and the visual tokens after the resolution bounds (`min_pixels` upscaling
        included), from the image headers alone (no pixels decoded)."""
        texts, tokens_per_image = [], []
        for text, images in items:
            # As `__call__` places them: images without a placeholder go first.
            texts.append(text if count_image_placeholders(text) or not images else IMAGE_PLACEHOLDER * len(images) + text)
            tokens_per_image.extend(int(self.image_cost(image)) for image in images)
        return [len(ids) for ids in self.token_ids(texts, tokens_per_image)] if texts else []

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
    "MoCaProcessor", "InputError", "chat_template", "format_prompt", "count_image_placeholders", "load_image", "parse_input", "IMAGE_PLACEHOLDER",
    "IMAGE_EXTENSIONS", "MAX_ASPECT_RATIO", "RELEASE_IMAGE_TOKENS",
]  # fmt: skip
