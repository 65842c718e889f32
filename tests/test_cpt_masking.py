"""Masking collator: ratios, what is never masked, alignment of pixel targets, determinism."""

import numpy as np
import pytest
import torch
from PIL import Image

from cpt_rows import make_rows
from moca import MoCaProcessor
from moca.training.cpt import CPTCollator, load_image, mask_image_patches, mask_text_tokens, never_masked_token_ids


@pytest.fixture(scope="module")
def processor(tiny_vlm_dir):
    return MoCaProcessor.from_pretrained(tiny_vlm_dir)


@pytest.fixture(scope="module")
def rows():
    return [dict(row, row_id=i) for i, row in enumerate(make_rows(24, seed=1))]


def unmasked(processor, rows):
    """What the processor alone makes of the rows."""
    images = [[load_image(image) for image in row["images"]] for row in rows]
    return processor(text=[row["text"] for row in rows], images=images, padding_side="right")


def test_text_mask_ratio_holds():
    input_ids = torch.randint(0, 100, (64, 256))
    maskable = torch.ones_like(input_ids, dtype=torch.bool)
    maskable[:, :40] = False
    generators = [torch.Generator().manual_seed(i) for i in range(64)]
    masked, labels = mask_text_tokens(input_ids, maskable, 0.4, 999, generators)
    chosen = labels.ne(-100)
    # 64 x 216 = 13,824 Bernoulli(0.4) draws: standard deviation of the share 0.0042; allow 4 of them.
    assert abs(chosen[maskable].float().mean().item() - 0.4) < 0.017
    assert not chosen[~maskable].any()
    assert torch.equal(masked[chosen], torch.full_like(masked[chosen], 999))
    assert torch.equal(labels[chosen], input_ids[chosen])
    assert torch.equal(masked[~chosen], input_ids[~chosen])


def test_image_mask_ratio_holds_per_merged_token():
    tokens_per_sample = [500] * 40
    pixel_values = torch.randn(4 * sum(tokens_per_sample), 12)
    generators = [torch.Generator().manual_seed(i) for i in range(40)]
    noisy, token_mask = mask_image_patches(pixel_values, tokens_per_sample, 4, 0.5, generators)
    # 20,000 draws: standard deviation 0.0035.
    assert abs(token_mask.float().mean().item() - 0.5) < 0.015
    patch_mask = token_mask.repeat_interleave(4)
    assert torch.equal(noisy[~patch_mask], pixel_values[~patch_mask])
    assert not torch.isclose(noisy[patch_mask], pixel_values[patch_mask]).all(dim=1).any()
    # The noise is standard Gaussian.
    assert abs(noisy[patch_mask].mean().item()) < 0.05 and abs(noisy[patch_mask].std().item() - 1) < 0.05


def test_never_masks_special_vision_or_padding_tokens(processor, rows):
    collator = CPTCollator(processor, text_mask_ratio=0.9, image_mask_ratio=0.5, seed=0)
    batch = collator(rows)
    clean = unmasked(processor, rows)
    protected = torch.isin(clean["input_ids"], torch.tensor(never_masked_token_ids(processor)))
    protected |= clean["attention_mask"].eq(0) | clean["mm_token_type_ids"].ne(0)
    changed = batch["input_ids"].ne(clean["input_ids"])
    masked = batch["labels"].ne(-100)

    assert protected.any() and not masked[protected].any() and not changed[protected].any()
    assert torch.equal(changed, masked)
    assert (batch["input_ids"][masked] == processor.mask_token_id).all()
    assert torch.equal(batch["labels"][masked], clean["input_ids"][masked])
    # With a 0.9 ratio, most of the maskable tokens are masked.
    assert masked.sum() > 0.8 * (~protected).sum()


def test_pixel_targets_line_up_with_masked_patches(processor, rows):
    batch = CPTCollator(processor, seed=0)(rows)
    clean = unmasked(processor, rows)
    num_visual_tokens = int(clean["input_ids"].eq(processor.image_token_id).sum())
    assert batch["image_token_mask"].shape == (num_visual_tokens,)
    assert torch.equal(batch["pixel_targets"], clean["pixel_values"])
    patch_mask = batch["image_token_mask"].repeat_interleave(4)
    assert len(patch_mask) == len(clean["pixel_values"])
    differs = batch["pixel_values"].ne(clean["pixel_values"]).any(dim=1)
    assert torch.equal(differs, patch_mask)
    assert 0.3 < batch["image_token_mask"].float().mean() < 0.7


def test_merged_token_patches_are_consecutive_rows(processor):
    """The image processor writes the 2x2 raw patches of one merged token as 4 consecutive pixel_values rows:
    an image of uniform 28x28 blocks (one merged token each) gives 4 identical rows per block."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 255, size=(3, 2, 3), dtype=np.uint8)  # 3 x 2 blocks of 28 x 28 pixels
    image = Image.fromarray(np.kron(blocks, np.ones((28, 28, 1), dtype=np.uint8)))
    pixel_values = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    groups = pixel_values.view(6, 4, -1)
    assert torch.allclose(groups, groups[:, :1].expand_as(groups))
    assert not torch.allclose(groups[0, 0], groups[1, 0])


def test_deterministic_per_seed_and_row(processor, rows):
    first = CPTCollator(processor, seed=3)(rows[:6])
    again = CPTCollator(processor, seed=3)(rows[:6])
    other = CPTCollator(processor, seed=4)(rows[:6])
    for key in first:
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["labels"], other["labels"])
    # A sample's mask does not depend on its batch companions.
    alone = CPTCollator(processor, seed=3)(rows[:1])
    length = alone["labels"].shape[1]
    assert torch.equal(alone["labels"][0], first["labels"][0, :length])


def test_shifted_labels_point_at_the_next_masked_token(processor, rows):
    plain = CPTCollator(processor, seed=0)(rows[:8])
    shifted = CPTCollator(processor, seed=0, shift_labels=True)(rows[:8])
    positions = shifted["labels"].ne(-100).nonzero()
    assert len(positions) > 0
    for row, column in positions.tolist():
        assert shifted["input_ids"][row, column + 1] == processor.mask_token_id
    # Same draws as the unshifted variant, except that the first token is never masked.
    assert torch.equal(shifted["labels"][:, :-1], plain["labels"][:, 1:])


def test_text_only_batch_has_no_image_tensors(processor, rows):
    text_rows = [row for row in rows if not row["images"]]
    batch = CPTCollator(processor)(text_rows)
    assert set(batch) == {"input_ids", "attention_mask", "mm_token_type_ids", "labels"}
