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
