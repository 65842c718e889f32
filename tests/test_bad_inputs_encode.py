"""Bad inputs of `MoCaModel.encode`, `MoCaProcessor` and the sentence-transformers module (issue 13): each is a
`ValueError` naming the input and what is wrong; special tokens in text are text; large images decode shrunk."""

import copy
import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError

from moca import MoCaModel
from moca.processing_moca import load_image


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def scene(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour waves with mild noise: an image with structure at every scale, like a photo."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    waves = np.stack([127 + 120 * np.sin(x / 60), 127 + 120 * np.cos(y / 90), 127 + 60 * np.sin((x + y) / 25)], -1)
    noise = np.random.default_rng(seed).normal(0, 8, waves.shape)
    return Image.fromarray(np.clip(waves + noise, 0, 255).astype(np.uint8))


SMALL_PNG = encoded(Image.new("RGB", (40, 30), "red"))
# Over twice the `Image.MAX_IMAGE_PIXELS` the table sets (2,000): PIL refuses it as a decompression bomb.
BOMB_PNG = encoded(Image.new("RGB", (70, 70), "blue"))
# Stretched to 28 px high, 6000 px wide: ratio 214, which the Qwen-VL resizing refuses.
THIN = Image.new("RGB", (6000, 20), "green")


def run(entry: str, tiny_moca, inputs, **kwargs):
    model, processor = tiny_moca
    if entry == "encode":
        return model.encode(inputs, **kwargs)
    if entry == "st":
        from sentence_transformers import SentenceTransformer

        from moca.sentence_transformers_moca import MoCaSentenceTransformer

        return SentenceTransformer(modules=[MoCaSentenceTransformer(model)]).encode(inputs)
    texts, images = inputs
    return processor(text=texts, images=images, **kwargs)


# (entry point, input, keyword arguments, expected error). `encode` rows put the bad input second, so the error
# must name the caller's index 1 (encode sorts inputs by cost); the sentence-transformers module names the input
# by its repr (it sees inputs sorted by length); processor rows name the sample.
ROWS = [
    ("encode", ["a text", "photos/cat.jpg"], {}, r"Input 1: no such image file 'photos/cat.jpg' \(pass \{'text': \.\.\.\}"),
    ("st", ["a text", "photos/cat.jpg"], {}, r"Input 'photos/cat.jpg': no such image file"),
    ("encode", ["a text", " \n\t "], {}, r"Input 1: empty text"),
    ("encode", ["a text", {"text": "   "}], {}, r"Input 1: empty text"),
    ("st", ["a text", "   "], {}, r"Input '   ': empty text"),
    ("processor", (["a text", "  "], None), {}, r"Sample 1: empty text"),
    ("encode", ["a text", THIN], {}, r"Input 1: image 0 is 6000x20 px: its aspect ratio is over 200"),
    ("encode", ["a text", {"text": "<image> and <image>", "image": [SMALL_PNG, THIN]}], {}, r"Input 1: image 1 is 6000x20 px"),
    ("st", ["a text", THIN], {}, r"Input <PIL.Image.Image image mode=RGB size=6000x20.*aspect ratio is over 200"),
    ("processor", (["a", "<image>b"], [[], [THIN]]), {}, r"Sample 1: image 0 is 6000x20 px: its aspect ratio"),
    ("encode", ["a text", {"image": BOMB_PNG}], {}, r"Input 1: cannot read image <\d+ bytes>: Image size \(4900 pixels\) exceeds limit"),
    ("processor", (["a", "<image>b"], [[], [BOMB_PNG]]), {}, r"Sample 1: cannot read image <\d+ bytes>: Image size \(4900"),
    ("encode", ["a text", {"image": b"abc"}], {}, r"Input 1: cannot read image <3 bytes>"),
    ("encode", ["a text", b"abc"], {}, r"Input 1: cannot read image <3 bytes>"),
    ("encode", ["a", SMALL_PNG], {"max_length": 2}, r"Input 1: its first image alone is longer than max_length \(2 tokens\)"),
    ("processor", (["a", "<image>"], [[], [SMALL_PNG]]), {"truncation": True, "max_length": 2}, r"Sample 1: its first image alone"),
    ("encode", ["a text"], {"truncate_dim": 0}, r"truncate_dim must be an integer in 1\.\.128 .*got 0"),
    ("encode", ["a text"], {"truncate_dim": -5}, r"truncate_dim must be an integer in 1\.\.128 .*got -5"),
    ("encode", ["a text"], {"truncate_dim": 129}, r"truncate_dim must be an integer in 1\.\.128"),
    ("encode", ["a text"], {"truncate_dim": 1.5}, r"truncate_dim must be an integer"),
]


@pytest.mark.parametrize("entry,inputs,kwargs,error", ROWS)
def test_bad_input_is_a_value_error_naming_it(tiny_moca, monkeypatch, entry, inputs, kwargs, error):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    with pytest.raises(ValueError, match=error):
        run(entry, tiny_moca, inputs, **kwargs)


def test_image_between_pil_limits_decodes_with_a_warning_naming_it(monkeypatch):
    # PIL warns (names nothing) above MAX_IMAGE_PIXELS and refuses above twice it; the warning here names the image.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    with pytest.warns(Image.DecompressionBombWarning, match=r"image <\d+ bytes> has 50x50 = 2500 pixels"):
        assert load_image(encoded(Image.new("RGB", (50, 50)))).size == (50, 50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(encoded(Image.new("RGB", (40, 40)))).size == (40, 40)


def test_raw_bytes_are_images_at_every_entry_point(tiny_moca):
    model, processor = tiny_moca
    reference = model.encode([Image.open(io.BytesIO(SMALL_PNG))])
    for inputs in ([SMALL_PNG], [{"image": SMALL_PNG}], [{"bytes": SMALL_PNG, "path": None}]):
        torch.testing.assert_close(model.encode(inputs), reference)
    # A bare `bytes` is one image, not a sequence of ints.
    assert processor(text="<image>x", images=SMALL_PNG)["image_grid_thw"].shape == (1, 3)


def test_existing_image_path_and_text_with_an_extension_word(tiny_moca, tmp_path):
    model, _ = tiny_moca
    path = tmp_path / "cat.png"
    path.write_bytes(SMALL_PNG)
    torch.testing.assert_close(model.encode([str(path)]), model.encode([{"image": SMALL_PNG}]))
    # With whitespace it is a sentence, not a path.
    assert model.encode(["see the photo cat.jpg"]).shape == (1, 128)


def control_ids(processor):
    return {processor.vision_start_token_id, processor.vision_end_token_id, processor.image_token_id, processor.video_token_id}


@pytest.mark.parametrize("literal", ["<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>", "<|mask|>"])
def test_literal_special_tokens_are_plain_text(tiny_moca, literal):
    model, processor = tiny_moca
    text = f"red {literal} green"
    ids = processor(text=text)["input_ids"][0].tolist()
    assert ids == processor.tokenizer(text, split_special_tokens=True)["input_ids"]
    assert not control_ids(processor) & set(ids)
    assert processor.tokenizer.convert_tokens_to_ids(literal) not in ids
    embeddings = model.encode([text, {"text": f"{literal} <image> blue", "image": SMALL_PNG}], max_length=64)
    assert embeddings.isfinite().all()


@pytest.mark.parametrize("literal", ["<|vision_start|>", "<|vision_end|>"])
def test_truncation_ignores_literal_vision_tokens(tiny_moca, literal):
    # A literal vision token used to pair with a real image's end or start and move the cut to it.
    _, processor = tiny_moca
    text = f"{literal} red green blue <image> yellow"
    full = processor(text=[text], images=[[SMALL_PNG]])
    kept = processor(text=[text], images=[[SMALL_PNG]], truncation=True, max_length=1000)
    assert torch.equal(kept["input_ids"], full["input_ids"])
    ids = full["input_ids"][0].tolist()
    start = ids.index(processor.vision_start_token_id)
    assert ids.count(processor.vision_start_token_id) == ids.count(processor.vision_end_token_id) == 1
    # A cut inside the image drops it whole and keeps every text token before it.
    cut = processor(text=[text], images=[[SMALL_PNG]], truncation=True, max_length=start + 2)
    assert cut["input_ids"][0].tolist() == ids[:start] and "pixel_values" not in cut


def test_image_markers_are_equivalent_and_tokenize_as_before(tiny_moca):
    _, processor = tiny_moca
    markers = ["<image>", "<|image_1|>", "<|image_pad|>", "<|vision_start|><|image_pad|><|vision_end|>"]
    batches = [processor(text=[f"a {marker} b"], images=[[SMALL_PNG]])["input_ids"] for marker in markers]
    assert all(torch.equal(batch, batches[0]) for batch in batches)
    # For text without literal special tokens the ids are what tokenizing the expanded string gave before.
    tokens = processor(text=["a <image> b"], images=[[SMALL_PNG]])["mm_token_type_ids"].sum().item()
    expanded = "a <|vision_start|>" + "<|image_pad|>" * tokens + "<|vision_end|> b"
    assert batches[0][0].tolist() == processor.tokenizer(expanded)["input_ids"]


def test_non_finite_embeddings_name_the_first_input_of_the_batch(tiny_moca):
    from sentence_transformers import SentenceTransformer

    from moca.sentence_transformers_moca import MoCaSentenceTransformer

    model = copy.deepcopy(tiny_moca[0])
    with torch.no_grad():
        model.model.language_model.norm.weight[0] = float("nan")
    inputs = ["red", "red green blue yellow orange purple black white", "red green"]
    # Sorted by cost, the first batch of two is inputs 1 and 2: the error names input 1, not position 0.
    with pytest.raises(ValueError, match=r"Input 1: the embeddings of its batch \(2 inputs\) are not finite .*weights may hold NaN/inf"):
        model.encode(inputs, batch_size=2)
    with pytest.raises(ValueError, match=r"The embeddings of a batch of 3 inputs are not finite"):
        SentenceTransformer(modules=[MoCaSentenceTransformer(model)]).encode(inputs)


@pytest.mark.parametrize("dim", [1, 64, 128])
def test_truncate_dim_in_range_keeps_the_leading_dimensions(tiny_moca, dim):
    model, _ = tiny_moca
    full = model.encode(["red green", "blue"])
    truncated = model.encode(["red green", "blue"], truncate_dim=dim)
    assert truncated.shape == (2, dim)
    torch.testing.assert_close(truncated, torch.nn.functional.normalize(full[:, :dim], dim=-1))


def test_truncated_weights_file_is_named(tiny_moca, tmp_path):
    model, _ = tiny_moca
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(ValueError, match=f"cannot read the weights {weights}: .*truncated or corrupt") as caught:
        MoCaModel.from_pretrained(tmp_path)
    assert isinstance(caught.value.__cause__, SafetensorError)


@pytest.mark.parametrize("fmt,shrunk_size", [("JPEG", (400, 300)), ("PNG", (229, 172))])
def test_large_image_decodes_shrunk_with_the_same_tokens_and_embedding(tiny_moca, fmt, shrunk_size):
    # The tiny processor resizes to at most 112x112 px (here 112x84): a 1600x1200 image decodes at 1/4 (JPEG's DCT
    # scaling goes by powers of 2) or 1/7 (`reduce` for PNG), the most that stays over twice that size.
    model, processor = tiny_moca
    data = encoded(scene(1600, 1200), fmt)
    full = load_image(data)
    shrunk = processor.load_image(data)
    assert full.size == (1600, 1200) and shrunk.size == shrunk_size
    target = processor.resized_size(*full.size)
    assert shrunk.width >= 2 * target[0] and shrunk.height >= 2 * target[1]
    assert processor.resized_size(*shrunk.size) == target
    assert torch.equal(processor(text="<image>", images=[shrunk])["image_grid_thw"],
                       processor(text="<image>", images=[full])["image_grid_thw"])
    # `encode` of the bytes decodes shrunk; a PIL image given decoded is used as it is (full size).
    cosine = torch.nn.functional.cosine_similarity(model.encode([data]), model.encode([full])).item()
    assert cosine >= 0.999, cosine


def test_image_near_the_processor_size_is_decoded_whole(tiny_moca):
    _, processor = tiny_moca
    data = encoded(scene(300, 200), "JPEG")  # the target is 112x84: half of 300x200 is under twice it
    assert processor.load_image(data).size == (300, 200)
