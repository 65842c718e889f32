"""CPT data: loading every source format (and the release's layout), skipping bad rows with a count, the cost of a
row as the collator keeps it, budget batching, the epoch of each row."""

import io
import logging
import random

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from accelerate.data_loader import BatchSamplerShard, DataLoaderShard, SkipBatchSampler
from PIL import Image
from torch.utils.data import DataLoader

from cpt_rows import make_rows, write_jsonl
from moca import MoCaProcessor
from moca.training.cpt import (
    IMAGE_TOKEN_COST,
    BudgetBatchSampler,
    CPTCollator,
    EpochRows,
    load_cpt_dataset,
    padding_fraction,
    prepare_cpt_dataset,
)

# The backbone's own image marker: what the release's CPT sets have in their `text`.
MARKER = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def processor(tiny_vlm_dir):
    return MoCaProcessor.from_pretrained(tiny_vlm_dir)


def test_sources_in_every_format_give_the_same_rows(tmp_path):
    rows = make_rows(6, seed=2)
    jsonl = write_jsonl(rows, tmp_path / "json")
    parquet = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))

    loaded = [load_cpt_dataset([str(source)]) for source in (jsonl, parquet, tmp_path / "saved")]
    for dataset in loaded:
        assert dataset.column_names == ["text", "images"] and len(dataset) == 6
        assert dataset["text"] == [row["text"] for row in rows]
        assert [len(images) for images in dataset["images"]] == [len(row["images"]) for row in rows]
    both = load_cpt_dataset([str(jsonl), str(parquet)])
    assert len(both) == 12


def test_bad_rows_are_skipped_and_counted(processor, caplog):
    rows = make_rows(9, seed=3)
    good_image = rows[1]["images"][0]
    bad = [
        {"text": "<image> truncated", "images": [good_image[:60]]},
        {"text": "<image> not an image", "images": [b"plain bytes"]},
        {"text": "<image> <image> two placeholders", "images": [good_image]},
        {"text": "  ", "images": []},
    ]
    dataset = datasets.Dataset.from_list(rows[:4] + bad + rows[4:]).cast_column(
        "images", datasets.List(datasets.Image(decode=False))
    )
    with caplog.at_level(logging.WARNING, logger="moca.cpt"):
        kept, skipped = prepare_cpt_dataset(dataset, processor, max_length=512)
    assert dict(skipped) == {"image 0 unreadable": 2, "2 image placeholders but 1 images": 1, "empty text": 1}
    assert kept["row_id"] == [0, 1, 2, 3] + list(range(8, 13))
    assert "Skipping 2 of 13 rows: image 0 unreadable" in caplog.text
    assert all(length > 0 for length in kept["length"])
    # Cost: an image token counts 4 text tokens.
    image_rows = [i for i, images in enumerate(kept["images"]) if images]
    assert all(kept["cost"][i] > kept["length"][i] for i in image_rows)


def test_long_text_is_counted_at_max_length(processor):
    dataset = datasets.Dataset.from_list([{"text": "red circle " * 400, "images": []}]).cast_column(
        "images", datasets.List(datasets.Image(decode=False))
    )
    kept, _ = prepare_cpt_dataset(dataset, processor, max_length=64)
    assert kept["length"] == [64] and kept["cost"] == [64]


def solid_png(width: int, height: int, colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def as_cpt_dataset(rows: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows).cast_column("images", datasets.List(datasets.Image(decode=False)))


def test_length_and_cost_are_what_the_collator_keeps(processor):
    """At max_length 40, with the tiny image processor: 56 x 56 px = 4 visual tokens, 56 x 84 = 6, 112 x 112 = 16
    (each image also brings <|vision_start|> and <|vision_end|>)."""
    words = "red blue green circle square page chart table figure text"
    rows = [
        # Text, a 6-token image, text, then a 16-token image straddling token 40: the cut moves before it.
        {"text": f"{words} <image> red circle <image> {words}", "images": [solid_png(56, 84), solid_png(112, 112)]},
        # Both images before the cut, which falls in the closing text.
        {"text": f"a page <image> <image> {words} {words} {words}", "images": [solid_png(56, 56), solid_png(56, 84)]},
        # The cut falls in the text before the only image: the image is dropped whole.
        {"text": f"{words} {words} {words} {words} <image>", "images": [solid_png(112, 112)]},
        # Caption style (no placeholder: the image goes first), all of it fits.
        {"text": "a red square", "images": [solid_png(56, 56)]},
        # The release's markers; the second image straddles the cut.
        {"text": f"{MARKER} {words} {words} {MARKER} {words}", "images": [solid_png(56, 84), solid_png(112, 112)]},
        {"text": f"{words} {words} {words} {words} {words}", "images": []},
    ]
    kept, skipped = prepare_cpt_dataset(as_cpt_dataset(rows), processor, max_length=40)
    assert not skipped
    batch = CPTCollator(processor, max_length=40, seed=0)(list(kept))
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    image_tokens = batch["mm_token_type_ids"].eq(1).sum(dim=1).tolist()
    # The visual tokens each row keeps: the straddling images and the one past the cut are gone.
    assert image_tokens == [6, 10, 0, 4, 6, 0]
    assert kept["length"] == lengths
    assert kept["cost"] == [length + (IMAGE_TOKEN_COST - 1) * tokens for length, tokens in zip(lengths, image_tokens)]
    assert lengths[1] == lengths[2] == lengths[5] == 40 and lengths[0] < 40 and lengths[3] < 40


def test_a_first_image_longer_than_max_length_is_skipped(processor):
    """The cut would move before the image at position 0, leaving an all-padding sample."""
    rows = [{"text": "<image> a red square", "images": [solid_png(112, 112)]}, {"text": "a red square", "images": []}]
    kept, skipped = prepare_cpt_dataset(as_cpt_dataset(rows), processor, max_length=12)
    assert dict(skipped) == {"first image longer than max_length": 1} and kept["row_id"] == [1]


def test_the_releases_layout_loads_from_parquet_and_saved_folders(processor, tmp_path):
    """The release's CPT sets: `text` with the backbone's markers, `images` a list of encoded image bytes (their
    cards: `PIL.Image.open(BytesIO(example["images"][0]))`), text-only rows with an empty list, and columns of
    their own, which loading drops."""
    images = [[], [solid_png(56, 84), solid_png(112, 112, "blue")], [], [solid_png(56, 56, "green"), solid_png(84, 56)]]
    rows = [
        {"text": "A text only document about energy.", "images": images[0], "id": "a", "source": "dclm"},
        {"text": f"Intro {MARKER} middle text {MARKER} the end.", "images": images[1], "id": "b", "source": "docmatix"},
        {"text": "Another text only row.", "images": images[2], "id": "c", "source": "dclm"},
        {"text": f"{MARKER}{MARKER} two pictures first", "images": images[3], "id": "d", "source": "pixelprose"},
    ]
    features = datasets.Features({
        "text": datasets.Value("string"), "images": datasets.List(datasets.Value("binary")),
        "id": datasets.Value("string"), "source": datasets.Value("string"),
    })  # fmt: skip
    released = datasets.Dataset.from_list(rows, features=features)
    released.to_parquet(str(tmp_path / "interleaved.parquet"))
    datasets.DatasetDict({"train": released}).save_to_disk(str(tmp_path / "saved"))
    # A text-only set written by pyarrow from empty lists: its `images` column is a list of nulls.
    pq.write_table(pa.table({"text": ["Plain text.", "More text."], "images": [[], []]}), tmp_path / "text.parquet")
    assert pq.read_schema(tmp_path / "text.parquet").field("images").type == pa.list_(pa.null())

    image_dir = str(tmp_path / "image_dir")  # --image_dir: paths only; encoded bytes are left as they are
    for source in ("interleaved.parquet", "saved"):
        dataset = load_cpt_dataset([str(tmp_path / source)], image_root=image_dir)
        assert dataset.column_names == ["text", "images"] and dataset["text"] == [row["text"] for row in rows]
        assert [[image["bytes"] for image in row] for row in dataset["images"]] == images
    sources = [str(tmp_path / "text.parquet"), str(tmp_path / "interleaved.parquet")]
    both = load_cpt_dataset(sources, image_root=image_dir)
    assert len(both) == 6 and both["images"][:2] == [[], []]

    kept, skipped = prepare_cpt_dataset(both, processor, max_length=256)
    assert not skipped and len(kept) == 6
    batch = CPTCollator(processor, max_length=256, seed=0)(list(kept))
    # Two images per interleaved row, in row order: 56 x 84 px = 6 tokens, 112 x 112 = 16, 56 x 56 = 4, 84 x 56 = 6.
    assert batch["image_grid_thw"].tolist() == [[1, 6, 4], [1, 8, 8], [1, 4, 4], [1, 4, 6]]
    assert batch["mm_token_type_ids"].eq(1).sum(dim=1).tolist() == [0, 0, 0, 22, 0, 10]


def epochs_and_row_ids(rows: list[dict]) -> list[tuple[int, int]]:
    return [(row["epoch"], row["row_id"]) for row in rows]


def test_the_epoch_reaches_the_rows_through_workers_and_accelerate_wrappers():
    rows = datasets.Dataset.from_dict({"row_id": list(range(20))})
    lengths = [10 + i for i in range(20)]
    sampler = BudgetBatchSampler(lengths, lengths, token_budget=60, seed=0, tag_epoch=True)
    view = EpochRows(rows, sampler)
    # Persistent workers keep the copies of the dataset they made in epoch 0: the epoch travels with the indices.
    loader = DataLoader(
        view, batch_sampler=sampler, collate_fn=epochs_and_row_ids, num_workers=2, persistent_workers=True
    )
    for epoch in (0, 1):
        sampler.set_epoch(epoch)  # what the Trainer does before each epoch
        pairs = [pair for batch in loader for pair in batch]
        assert sorted(row_id for _, row_id in pairs) == list(range(20)) and {e for e, _ in pairs} == {epoch}
    # A resumed run of two processes: accelerate wraps the sampler twice, and its `set_epoch` reaches the dataset only.
    shard = BatchSamplerShard(sampler, num_processes=2, process_index=0)
    resumed = DataLoaderShard(
        view, batch_sampler=SkipBatchSampler(shard, skip_batches=1), collate_fn=epochs_and_row_ids
    )
    resumed.set_epoch(3)
    batches = list(resumed)
    assert len(batches) == len(shard) - 1 and {e for batch in batches for e, _ in batch} == {3}


def random_lengths(n=2000, seed=0):
    rng = random.Random(seed)
    lengths = [rng.randint(8, 600) for _ in range(n)]
    costs = [length + 3 * rng.choice([0, 0, length // 2]) for length in lengths]  # some with image tokens
    return lengths, costs


def test_budget_sampler_covers_every_sample_once_under_budget():
    lengths, costs = random_lengths()
    sampler = BudgetBatchSampler(lengths, costs, token_budget=4000, seed=0)
    batches = list(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert len(batches) == len(sampler)
    for batch in batches:
        padded_compute = sum(costs[i] for i in batch) + len(batch) * max(lengths[i] for i in batch) - sum(
            lengths[i] for i in batch
        )
        assert padded_compute <= 4000 or len(batch) == 1


def test_budget_sampler_is_deterministic_and_reshuffles_per_epoch():
    lengths, costs = random_lengths(500)
    first = BudgetBatchSampler(lengths, costs, 3000, seed=1)
    epoch0 = list(first)
    assert epoch0 == list(BudgetBatchSampler(lengths, costs, 3000, seed=1))
    first.set_epoch(1)
    epoch1 = list(first)
    assert epoch1 != epoch0
    assert sorted(map(tuple, epoch1)) == sorted(map(tuple, epoch0))  # same batches, another order


def test_budget_batches_pad_less_than_fixed_size_batches():
    lengths, costs = random_lengths()
    budget_batches = list(BudgetBatchSampler(lengths, costs, token_budget=4000, seed=0))
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    size = round(len(lengths) / len(budget_batches))
    fixed_batches = [order[i : i + size] for i in range(0, len(order), size)]
    assert padding_fraction(budget_batches, lengths) < 0.1 < padding_fraction(fixed_batches, lengths)
