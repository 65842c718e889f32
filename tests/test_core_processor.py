"""MoCaProcessor and encode inputs: placeholders, truncation, and clear errors for bad input."""

import pytest
import torch
from PIL import Image
from transformers import AutoConfig

from moca import MoCaConfig, MoCaModel


def _image(size=(56, 56), color="red"):
    return Image.new("RGB", size, color)


def _vision_tokens(processor, n):
    return [processor.vision_start_token_id] + [processor.image_token_id] * n + [processor.vision_end_token_id]


def test_every_image_marker_expands_to_the_same_tokens(tiny_moca):
    _, processor = tiny_moca
    image = _image((112, 56))
    outputs = [
        processor(text=[f"look {marker} here"], images=[[image]])
        for marker in ("<image>", "<|image_1|>", "<|vision_start|><|image_pad|><|vision_end|>")
    ]
    for out in outputs[1:]:
        assert torch.equal(out["input_ids"], outputs[0]["input_ids"])
    n_tokens = int(outputs[0]["image_grid_thw"].prod() // processor.merge_size**2)
    ids = outputs[0]["input_ids"][0].tolist()
    start = ids.index(processor.vision_start_token_id)
    assert ids[start : start + n_tokens + 2] == _vision_tokens(processor, n_tokens)
    assert outputs[0]["mm_token_type_ids"][0].sum().item() == n_tokens


def test_image_without_placeholder_goes_first(tiny_moca):
    _, processor = tiny_moca
    implicit = processor(text=["a caption"], images=[[_image()]])
    explicit = processor(text=["<image>a caption"], images=[[_image()]])
    assert torch.equal(implicit["input_ids"], explicit["input_ids"])
    assert implicit["input_ids"][0, 0].item() == processor.vision_start_token_id


def test_flat_image_list_follows_placeholders(tiny_moca):
    _, processor = tiny_moca
    images = [_image((56, 56)), _image((112, 56)), _image((56, 84))]
    flat = processor(text=["<image> one", "none", "<image> and <image>"], images=images)
    nested = processor(text=["<image> one", "none", "<image> and <image>"], images=[images[:1], [], images[1:]])
    for key in ("input_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(flat[key], nested[key])


def test_truncation_never_cuts_through_an_image(tiny_moca):
    _, processor = tiny_moca
    text = "a few words first <image> and more words after the picture"
    full = processor(text=[text], images=[[_image((112, 112))]])
    start = full["input_ids"][0].tolist().index(processor.vision_start_token_id)
    cut_inside = start + 5
    truncated = processor(text=[text], images=[[_image((112, 112))]], truncation=True, max_length=cut_inside)
    assert truncated["input_ids"].shape[1] == start  # the image is dropped whole
    assert processor.image_token_id not in truncated["input_ids"][0].tolist()
    assert "pixel_values" not in truncated
    long_enough = processor(text=[text], images=[[_image((112, 112))]], truncation=True, max_length=full["input_ids"].shape[1] - 2)
    assert torch.equal(long_enough["pixel_values"], full["pixel_values"])
    assert long_enough["input_ids"].shape[1] == full["input_ids"].shape[1] - 2


def test_truncated_batch_keeps_the_images_that_fit(tiny_moca):
    model, processor = tiny_moca
    texts = ["<image> short", "many words before the image so it will not fit " * 3 + "<image>"]
    images = [[_image((56, 56), "red")], [_image((112, 56), "blue")]]
    batch = processor(text=texts, images=images, truncation=True, max_length=24)
    assert batch["image_grid_thw"].shape[0] == 1
    assert batch["pixel_values"].shape[0] == batch["image_grid_thw"].prod(-1).sum()
    with torch.no_grad():
        assert torch.isfinite(model(**batch).embeddings).all()


def test_placeholder_count_mismatch_names_the_sample(tiny_moca):
    _, processor = tiny_moca
    with pytest.raises(ValueError, match=r"Sample 1: the text has 2 image placeholder\(s\) but 1 image"):
        processor(text=["fine", "<image> and <image>"], images=[[], [_image()]])


def test_encode_errors_name_the_input(tiny_moca, tmp_path):
    model, _ = tiny_moca
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"Input 1: cannot read image"):
        model.encode(["ok", {"text": "look", "image": str(broken)}])
    with pytest.raises(ValueError, match=r"Input 2: empty"):
        model.encode(["ok", "fine", ""])
    with pytest.raises(ValueError, match=r"Input 0: empty input"):
        model.encode([{"text": None, "image": None}])
    with pytest.raises(ValueError, match=r"Input 0: unsupported type int"):
        model.encode([3])
    with pytest.raises(ValueError, match=r"Input 0: unknown keys \['caption'\]"):
        model.encode([{"caption": "x"}])
    with pytest.raises(ValueError, match=r"Input 1: the text has 1 image placeholder\(s\) but 2 image"):
        model.encode(["ok", {"text": "<image> two?", "image": [_image(), _image()]}])


def test_image_paths_are_read_lazily(tiny_moca, tmp_path):
    model, _ = tiny_moca
    path = tmp_path / "red.png"
    _image((84, 56)).save(path)
    from_path = model.encode([str(path), path])
    from_image = model.encode([_image((84, 56))])
    torch.testing.assert_close(from_path, from_image.expand(2, -1), atol=1e-6, rtol=0)


def test_unsupported_backbone_is_refused():
    with pytest.raises(ValueError, match=r"Unsupported backbone type 'llama'"):
        MoCaConfig(vlm_config=AutoConfig.for_model("llama"))
    with pytest.raises(ValueError, match="pooling must be one of"):
        MoCaConfig(pooling="cls")


def test_config_does_not_mutate_the_given_backbone_config(tiny_vlm_dir):
    vlm_config = AutoConfig.from_pretrained(tiny_vlm_dir)
    causal = MoCaConfig(vlm_config=vlm_config, bidirectional=False)
    bidirectional = MoCaConfig(vlm_config=vlm_config)
    assert causal.vlm_config.text_config.is_causal is True
    assert bidirectional.vlm_config.text_config.is_causal is False
    assert getattr(vlm_config.text_config, "is_causal", True) is True


def test_encode_needs_a_processor(tiny_moca):
    model, processor = tiny_moca
    bare = MoCaModel(model.config)
    with pytest.raises(ValueError, match="No processor"):
        bare.encode(["text"])
    assert bare.encode(["text"], processor=processor).shape == (1, model.config.hidden_size)


def _mixed_items(processor, tmp_path):
    """Texts (one of tokens that four characters do not make), images under the lower bound (upscaled), above
    the upper bound (downscaled), as a file and as bytes, text + two images, and an image-only input with the
    release's image prompt."""
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (300, 90), "green").save(buffer, format="PNG")
    Image.new("RGB", (28, 28), "red").save(tmp_path / "small.png")
    inputs = [
        "a red circle",
        " ".join(["a"] * 40),  # 80 characters, about 40 tokens
        tmp_path / "small.png",
        {"text": "two pages <image> and <image> side by side", "image": [Image.new("RGB", (600, 400)), buffer.getvalue()]},
        {"text": "no placeholder: the image goes first", "image": Image.new("RGB", (56, 84), "blue")},
        Image.new("RGB", (90, 30), "white"),
    ]
    image_prompt = "<|vision_start|><|image_pad|><|vision_end|>Represent the given image.\n"
    return processor.parse_inputs(inputs, image_prompt=image_prompt)


def test_token_counts_are_the_lengths_batch_makes(tiny_moca, tmp_path):
    _, processor = tiny_moca
    bounds = processor.image_token_bounds
    processor.set_image_token_bounds(6, 40)  # the 28x28 image upscales to 6 tokens, the 600x400 one shrinks
    try:
        items = _mixed_items(processor, tmp_path)
        counts = processor.token_counts(items)
        lengths = [int(processor.batch([item])["attention_mask"].sum()) for item in items]
        grid = processor.batch([items[2]])["image_grid_thw"]
    finally:
        processor.set_image_token_bounds(*bounds)
    assert counts == lengths
    # Upscaled from 1 token's worth of pixels to the smallest square of at least 6 tokens: 3 x 3.
    assert int(grid.prod()) // processor.merge_size**2 == 9


def test_encode_batches_items_longest_first_by_their_token_counts(tiny_moca, tmp_path, monkeypatch):
    model, processor = tiny_moca
    items = _mixed_items(processor, tmp_path)
    inputs = [{"text": text, "image": images} if images else text for text, images in items]
    seen = []
    original = type(processor).batch

    def recording_batch(self, batch_items, *args, **kwargs):
        batch = original(self, batch_items, *args, **kwargs)
        seen.extend(batch["attention_mask"].sum(-1).tolist())
        return batch

    monkeypatch.setattr(type(processor), "batch", recording_batch)
    embeddings = model.encode(inputs, batch_size=2)
    assert seen == sorted(processor.token_counts(items), reverse=True)
    monkeypatch.undo()
    # ... and the result keeps the input order.
    torch.testing.assert_close(embeddings[1], model.encode([inputs[1]])[0], atol=1e-5, rtol=0)
