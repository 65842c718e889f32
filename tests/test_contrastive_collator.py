import io
import logging

import datasets
import pytest
from PIL import Image

from moca import MoCaProcessor
from moca.training.contrastive import ContrastiveCollator, MultiTaskDataset, TaskSpec, drop_rows_without_positive


def png(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), colour).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE_FEATURES = datasets.Features(
    {
        "query_text": datasets.Value("string"),
        "pos_image": datasets.Image(decode=False),
        "neg_image": datasets.List(datasets.Image(decode=False)),
    }
)


@pytest.fixture(scope="module")
def processor(tiny_vlm_dir):
    return MoCaProcessor.from_pretrained(tiny_vlm_dir)


def text_task():
    rows = [
        {"query_text": "a red square", "pos_text": "red square", "neg_text": ["blue square", "red circle", "green"]},
        {"query_text": "a blue circle", "pos_text": None, "neg_text": ["x"]},  # no positive
        {"query_text": "a green star", "pos_text": "green star", "neg_text": []},
        {"query_text": "", "pos_text": "orphan", "neg_text": []},  # no query
    ]
    return datasets.Dataset.from_list(rows)


def image_task():
    rows = [
        {"query_text": "red", "pos_image": {"bytes": png("red"), "path": None},
         "neg_image": [{"bytes": png("blue"), "path": None}]},
        {"query_text": "broken", "pos_image": {"bytes": b"not an image", "path": None}, "neg_image": []},
        {"query_text": "green", "pos_image": {"bytes": png("green"), "path": None}, "neg_image": []},
    ]  # fmt: skip
    return datasets.Dataset.from_list(rows, features=IMAGE_FEATURES)


def test_rows_without_query_or_positive_are_dropped_with_a_counted_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="moca.contrastive"):
        kept = drop_rows_without_positive(text_task(), "pairs")
    assert kept["query_text"] == ["a red square", "a green star"]
    assert "task 'pairs': skipped 2 of 4 rows" in caplog.text
    assert "row 1: no pos_text/pos_image" in caplog.text
    assert "row 3: no query_text/query_image" in caplog.text


def test_a_task_without_positive_column_is_an_error():
    with pytest.raises(ValueError, match="task 'queries' has no positive column"):
        drop_rows_without_positive(datasets.Dataset.from_list([{"query_text": "q"}]), "queries")


def test_collator_builds_queries_positives_and_hard_negatives(processor):
    tasks = [TaskSpec("pairs", drop_rows_without_positive(text_task(), "pairs"), query_prompt="Query: {text}")]
    dataset = MultiTaskDataset(tasks)
    collator = ContrastiveCollator(processor, tasks, num_hard_negatives=2)
    batch = collator([dataset[0], dataset[1]])
    assert batch["num_queries"] == 2
    (chunk,) = batch["chunks"]
    # 2 queries + 2 positives + 2 hard negatives (row 0 has 3, capped at 2; row 1 has none).
    assert chunk["input_ids"].shape[0] == 6
    assert "pixel_values" not in chunk and "image_grid_thw" not in chunk
    texts = processor.batch_decode(chunk["input_ids"], skip_special_tokens=True)
    assert texts[0].strip() == "Query: a red square" and texts[2].strip() == "red square"
    assert all(text.strip() in {"blue square", "red circle", "green"} for text in texts[4:])

    chunked = ContrastiveCollator(processor, tasks, num_hard_negatives=2, chunk_size=4)([dataset[0], dataset[1]])
    assert [c["input_ids"].shape[0] for c in chunked["chunks"]] == [4, 2]


def test_unreadable_image_row_is_skipped_with_a_counted_warning(processor, caplog):
    tasks = [TaskSpec("images", image_task(), document_prompt="<image>Represent the given image.\n")]
    dataset = MultiTaskDataset(tasks)
    collator = ContrastiveCollator(processor, tasks, num_hard_negatives=2)
    with caplog.at_level(logging.WARNING, logger="moca.contrastive"):
        batch = collator([dataset[i] for i in range(3)])
    assert collator.skipped_rows == {"images": 1}
    assert "skipped row 1 of task 'images': unreadable pos_image" in caplog.text
    assert batch["num_queries"] == 2
    (chunk,) = batch["chunks"]
    # 2 text queries, 2 image positives, 1 image negative: three images in the batch.
    assert chunk["input_ids"].shape[0] == 5
    assert chunk["image_grid_thw"].shape[0] == 3
    image_rows = (chunk["input_ids"] == processor.image_token_id).any(dim=1)
    assert image_rows.tolist() == [False, False, True, True, True]


def test_a_batch_of_only_bad_rows_is_an_error(processor):
    tasks = [TaskSpec("images", image_task())]
    with pytest.raises(ValueError, match="every row of a batch of 1 rows from \\['images'\\] is unusable"):
        ContrastiveCollator(processor, tasks)([MultiTaskDataset(tasks)[1]])
