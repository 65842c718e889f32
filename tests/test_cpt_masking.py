"""Masking collator: ratios, what is never masked, alignment of pixel targets, determinism per (seed, epoch, row),
the MAE noise (one shared vector per micro-batch, or one per patch)."""

import numpy as np
import pytest
import torch
from PIL import Image

from cpt_rows import make_rows
from moca import MoCaProcessor
from moca.processing_moca import load_image
from moca.training.cpt import CPTCollator, mask_image_patches, mask_text_tokens, never_masked_token_ids


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
    # No noise generator: each masked patch gets its own noise (the per_patch mode).
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


def test_shared_noise_is_one_vector_drawn_from_the_noise_generator():
    tokens_per_sample = [30, 50]
    pixel_values = torch.randn(4 * 80, 12)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    noisy, token_mask = mask_image_patches(
        pixel_values, tokens_per_sample, 4, 0.5, generators, noise_generator=torch.Generator().manual_seed(9)
    )
    patch_mask = token_mask.repeat_interleave(4)
    assert patch_mask.sum() > 100
    # Every masked patch of both samples is exactly the generator's first draw; the others are untouched.
    expected = torch.randn(12, generator=torch.Generator().manual_seed(9))
    assert torch.equal(noisy[patch_mask], expected.expand(int(patch_mask.sum()), 12))
    assert torch.equal(noisy[~patch_mask], pixel_values[~patch_mask])
    # The token masks are the same draws as in the per-patch mode: only the noise differs.
    _, per_patch_mask = mask_image_patches(
        pixel_values, tokens_per_sample, 4, 0.5, [torch.Generator().manual_seed(i) for i in range(2)]
    )
    assert torch.equal(per_patch_mask, token_mask)


@pytest.mark.parametrize("mae_noise", ["shared", "per_patch"])
def test_collator_noise_modes(processor, rows, mae_noise):
    image_rows = [row for row in rows if row["images"]][:6]
    batch = CPTCollator(processor, image_mask_ratio=0.5, seed=0, mae_noise=mae_noise)(image_rows)
    patch_mask = batch["image_token_mask"].repeat_interleave(4)
    noise = batch["pixel_values"][patch_mask]
    assert len(noise) > 40 and noise.shape[1] == 1176  # 3 channels x 2 frames x 14 x 14: the release's 1176
    distinct = len(torch.unique(noise, dim=0))
    if mae_noise == "shared":
        # One vector of 1,176 standard Gaussian values for every masked patch of the micro-batch.
        assert distinct == 1
        # Mean of 1,176 draws: standard deviation 0.029; the standard deviation's: 0.021. Allow 4 of them.
        assert abs(noise[0].mean().item()) < 0.12 and abs(noise[0].std().item() - 1) < 0.09
    else:
        assert distinct == len(noise)
    # Pixels of unmasked patches stay the clean targets either way.
    assert torch.equal(batch["pixel_values"][~patch_mask], batch["pixel_targets"][~patch_mask])


def test_shared_noise_is_seeded_by_the_batch(processor, rows):
    image_rows = [row for row in rows if row["images"]]

    def noise_vector(batch_rows, seed=0):
        batch = CPTCollator(processor, seed=seed)(batch_rows)
        return batch["pixel_values"][batch["image_token_mask"].repeat_interleave(4)][0]

    first = noise_vector(image_rows[:4])
    assert torch.equal(noise_vector(image_rows[:4]), first)  # same rows, same epoch: same vector (exact resumes)
    assert not torch.equal(noise_vector(image_rows[4:8]), first)
    assert not torch.equal(noise_vector([dict(row, epoch=1) for row in image_rows[:4]]), first)
    assert not torch.equal(noise_vector(image_rows[:4], seed=1), first)


def test_masks_are_drawn_afresh_each_epoch_and_fixed_per_seed_epoch_and_row(processor, rows):
    collator = CPTCollator(processor, text_mask_ratio=0.5, image_mask_ratio=0.5, seed=3)
    epoch1 = [dict(row, epoch=1) for row in rows[:6]]
    first, second = collator(rows[:6]), collator(epoch1)  # rows without an epoch count as epoch 0
    # Every row gets another text mask in epoch 1 (about half of its maskable tokens move), and the images too.
    for row in range(6):
        assert not torch.equal(first["labels"][row], second["labels"][row]), row
    assert not torch.equal(first["image_token_mask"], second["image_token_mask"])
    # The same (seed, epoch, row) gives the same masks whatever the batch: row 2 of epoch 1 alone, and in
    # another company.
    for company in ([epoch1[2]], [dict(rows[9], epoch=1), epoch1[2], dict(rows[11], epoch=1)]):
        batch = collator(company)
        position = company.index(epoch1[2])
        length = int(batch["attention_mask"][position].sum())
        assert torch.equal(batch["labels"][position, :length], second["labels"][2, :length])
    image_mask_of_row = visual_token_slices(second, processor)[2]
    alone = collator([epoch1[2]])
    assert torch.equal(alone["image_token_mask"], second["image_token_mask"][image_mask_of_row])


def visual_token_slices(batch, processor) -> list[slice]:
    """Each sample's range in `image_token_mask` (visual tokens in batch order)."""
    counts = batch["input_ids"].eq(processor.image_token_id).sum(dim=1).tolist()
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [slice(start, start + count) for start, count in zip(starts, counts)]


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
