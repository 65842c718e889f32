"""Images at the resolution MoCa was trained at: 256-1,024 visual tokens, stored in every checkpoint.

The backbone here carries the published Qwen2.5-VL-3B `preprocessor_config.json` bounds (min_pixels 3136,
max_pixels 12845056: 4 to 16,384 tokens), under which a 1700x2200 page would give 4,819 tokens.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from moca import MoCaModel
from moca.processing_moca import RELEASE_IMAGE_TOKENS
from moca.testing import make_tiny_vlm

REPO_ROOT = Path(__file__).resolve().parents[1]
PUBLISHED_QWEN25_VL_3B = {"min_pixels": 3136, "max_pixels": 12845056}
PAGE, PHOTO, SLIVER = (1700, 2200), (300, 200), (12, 900)


@pytest.fixture(scope="module")
def published_backbone(tmp_path_factory) -> str:
    folder = make_tiny_vlm(tmp_path_factory.mktemp("qwen25-published"))
    config_file = Path(folder) / "preprocessor_config.json"
    config = json.loads(config_file.read_text())
    config.update(PUBLISHED_QWEN25_VL_3B)
    config["size"] = {"shortest_edge": 3136, "longest_edge": 12845056}
    config_file.write_text(json.dumps(config))
    return folder


def processed_tokens(processor, size) -> int:
    batch = processor(text=["<image>"], images=[[Image.new("RGB", size, "white")]])
    return int(batch["mm_token_type_ids"].eq(1).sum())


def test_the_published_bounds_would_run_pages_far_above_the_trained_resolution(published_backbone):
    model = MoCaModel.from_backbone(published_backbone, image_tokens=None)
    assert model.processor.image_tokens(*PAGE) == 4819  # the figure the issue measured on the published config
    assert model.processor.image_token_bounds == (4, 16384)


def test_from_backbone_resizes_pages_and_photos_into_the_release_bounds(published_backbone):
    processor = MoCaModel.from_backbone(published_backbone).processor
    assert processor.image_token_bounds == RELEASE_IMAGE_TOKENS == (256, 1024)
    assert processor.image_processor.size == {"shortest_edge": 256 * 28 * 28, "longest_edge": 1024 * 28 * 28}
    for size in (PAGE, PHOTO, SLIVER):
        tokens = processed_tokens(processor, size)
        assert 256 <= tokens <= 1024, (size, tokens)
        assert tokens == processor.image_tokens(*size)  # the header-only count is the processed one
    assert processed_tokens(processor, PAGE) > 900  # a page is shrunk to the top of the range, not below it
    # A photo is enlarged to the bottom of it: 300x200 scaled by sqrt(200704 / 60000), sides rounded up to 28 px
    # multiples, is 560x392 px = 20 x 14 tokens.
    assert processed_tokens(processor, PHOTO) == 280


def test_a_side_under_one_patch_is_stretched_before_resizing(published_backbone):
    processor = MoCaModel.from_backbone(published_backbone, image_tokens=None).processor
    # 2 x 900 would round its short side to 0 px in the Qwen resizing and have an aspect ratio over 200.
    batch = processor(text=["<image>"], images=[[Image.new("RGB", (900, 2), "white")]])
    height, width = (batch["image_grid_thw"][0, 1:] * 14).tolist()
    assert height == 28 and width == 896


def test_the_bounds_survive_saving_loading_and_conversion(published_backbone, tmp_path):
    model = MoCaModel.from_backbone(published_backbone)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "processor_config.json").read_text())["image_processor"]
    assert saved["size"] == {"shortest_edge": 200704, "longest_edge": 802816}
    reloaded = MoCaModel.from_pretrained(tmp_path / "saved").processor
    assert reloaded.image_token_bounds == (256, 1024)
    assert 256 <= processed_tokens(reloaded, PAGE) <= 1024

    subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "convert_original_checkpoint.py"),
         "--model_name_or_path", published_backbone, "--output_dir", str(tmp_path / "converted")],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    converted = MoCaModel.from_pretrained(tmp_path / "converted").processor
    assert converted.image_token_bounds == (256, 1024)
    assert [processed_tokens(converted, size) for size in (PAGE, PHOTO)] == [
        processed_tokens(reloaded, size) for size in (PAGE, PHOTO)
    ]


def test_evaluation_overrides_the_stored_bounds_and_keys_its_cache_on_them(published_backbone, tmp_path):
    from eval.encoding import load_model, model_fingerprint

    MoCaModel.from_backbone(published_backbone).save_pretrained(tmp_path / "ckpt")
    stored = load_model(str(tmp_path / "ckpt"), dtype="float32", device="cpu")
    lowered = load_model(str(tmp_path / "ckpt"), dtype="float32", device="cpu", image_tokens=(64, 128))
    assert stored.processor.image_token_bounds == (256, 1024)
    assert lowered.processor.image_token_bounds == (64, 128)
    assert 64 <= processed_tokens(lowered.processor, PAGE) <= 128
    assert model_fingerprint(stored) != model_fingerprint(lowered)  # no stale embeddings from the other resolution


def test_bad_bounds_are_refused(published_backbone):
    processor = MoCaModel.from_backbone(published_backbone).processor
    with pytest.raises(ValueError, match="1 <= min <= max"):
        processor.set_image_token_bounds(2048, None)  # above the stored maximum of 1024
    with pytest.raises(ValueError, match="1 <= min <= max"):
        processor.set_image_token_bounds(0, 16)


def test_training_flags_set_the_bounds_the_checkpoint_keeps(published_backbone):
    from moca.training.contrastive import ContrastiveArguments, load_contrastive_model

    fresh = load_contrastive_model(ContrastiveArguments(model_name_or_path=published_backbone, dataset=["unused"]))
    assert fresh.processor.image_token_bounds == (256, 1024)
    lowered = load_contrastive_model(
        ContrastiveArguments(model_name_or_path=published_backbone, dataset=["unused"], max_image_tokens=512)
    )
    assert lowered.processor.image_token_bounds == (256, 512)
