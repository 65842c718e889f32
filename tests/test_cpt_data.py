"""CPT data: loading every source format, skipping bad rows with a count, budget batching."""

import logging
import random

import datasets
import pytest

from cpt_rows import make_rows, write_jsonl
from moca import MoCaProcessor
from moca.training.cpt import BudgetBatchSampler, load_cpt_dataset, padding_fraction, prepare_cpt_dataset


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
