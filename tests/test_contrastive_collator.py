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
        kept, skipped = drop_rows_without_positive(text_task(), "pairs")
    assert kept["query_text"] == ["a red square", "a green star"]
    assert skipped == {"pairs: no pos_text/pos_image": 1, "pairs: no query_text/query_image": 1}
    assert "task 'pairs': skipped 2 of 4 rows" in caplog.text
    assert "row 1: no pos_text/pos_image" in caplog.text
    assert "row 3: no query_text/query_image" in caplog.text


def test_a_task_without_positive_column_is_an_error():
    with pytest.raises(ValueError, match="task 'queries' has no positive column"):
        drop_rows_without_positive(datasets.Dataset.from_list([{"query_text": "q"}]), "queries")


def decoded(processor, chunk):
    return [text.strip() for text in processor.batch_decode(chunk["input_ids"], skip_special_tokens=True)]


def test_collator_builds_queries_positives_and_the_first_hard_negatives(processor):
    tasks = [TaskSpec("pairs", drop_rows_without_positive(text_task(), "pairs")[0], query_prompt="Query: {text}")]
    dataset = MultiTaskDataset(tasks)
    collator = ContrastiveCollator(processor, tasks, num_hard_negatives=2)
    batch = collator([dataset[0], dataset[1]])
    assert batch["num_queries"] == 2 and batch["skipped_rows"] == {}
    (chunk,) = batch["chunks"]
    assert "pixel_values" not in chunk and "image_grid_thw" not in chunk
    # 2 queries, 2 positives, then row 0's first 2 of its 3 negatives (the release's choice); row 1 has none.
    assert decoded(processor, chunk) == ["Query: a red square", "Query: a green star", "red square", "green star",
                                         "blue square", "red circle"]  # fmt: skip
    assert batch["negatives_per_query"] == [2, 0]

    chunked = ContrastiveCollator(processor, tasks, num_hard_negatives=2, chunk_size=4)([dataset[0], dataset[1]])
    assert [c["input_ids"].shape[0] for c in chunked["chunks"]] == [4, 2]


def test_a_short_negative_list_is_padded_with_its_last_as_the_release_does(processor):
    rows = [
        {"query_text": "q0", "pos_text": "p0", "neg_text": ["n00"]},
        {"query_text": "q1", "pos_text": "p1", "neg_text": ["n10", "", "n12"]},  # the empty one is no negative
        {"query_text": "q2", "pos_text": "p2", "neg_text": ["n20", "n21", "n22", "n23"]},
    ]
    tasks = [TaskSpec("pairs", datasets.Dataset.from_list(rows))]
    dataset = MultiTaskDataset(tasks)
    batch = ContrastiveCollator(processor, tasks, num_hard_negatives=3)([dataset[i] for i in range(3)])
    assert decoded(processor, batch["chunks"][0])[6:] == ["n00", "n00", "n00", "n10", "n12", "n12", "n20", "n21", "n22"]
    assert batch["negatives_per_query"] == [3, 3, 3]


def test_random_selection_is_seeded_by_seed_epoch_task_and_row(processor):
    negatives = [f"n{i}" for i in range(8)]
    rows = [{"query_text": f"q{r}", "pos_text": f"p{r}", "neg_text": negatives} for r in range(6)]
    tasks = [TaskSpec("pairs", datasets.Dataset.from_list(rows))]
    dataset = MultiTaskDataset(tasks)

    def drawn(seed, epoch, order=range(6)):
        collator = ContrastiveCollator(processor, tasks, num_hard_negatives=2, negative_selection="random", seed=seed)
        texts = decoded(processor, collator([dataset[(i, epoch)] for i in order])["chunks"][0])[12:]
        pairs = [tuple(texts[2 * k : 2 * k + 2]) for k in range(6)]
        return dict(zip(order, pairs))

    first = drawn(0, 0)
    assert all(len(set(pair)) == 2 and set(pair) <= set(negatives) for pair in first.values())
    assert drawn(0, 0, order=[5, 3, 1, 0, 2, 4]) == first  # a row's draw does not depend on its batch
    assert drawn(0, 1) != first and drawn(1, 0) != first  # another epoch or seed draws again
    assert len(set(first.values())) > 1  # rows draw independently
    # A row with fewer negatives than asked gives all of them, unpadded.
    short = ContrastiveCollator(processor, tasks, num_hard_negatives=20, negative_selection="random")
    assert short([dataset[0]])["negatives_per_query"] == [8]


def test_unreadable_image_row_is_skipped_with_a_counted_warning(processor, caplog):
    tasks = [TaskSpec("images", image_task(), document_prompt="<image>Represent the given image.\n")]
    dataset = MultiTaskDataset(tasks)
    collator = ContrastiveCollator(processor, tasks, num_hard_negatives=2)
    with caplog.at_level(logging.WARNING, logger="moca.contrastive"):
        batch = collator([dataset[i] for i in range(3)])
    assert batch["skipped_rows"] == {"images: unreadable pos_image": 1}
    assert "skipped row 1 of task 'images': unreadable pos_image" in caplog.text
    # Row 0's one image negative, padded to two (the release pads a short list with its last).
    assert batch["num_queries"] == 2 and batch["negatives_per_query"] == [2, 0]
    (chunk,) = batch["chunks"]
    # 2 text queries, 2 image positives, 2 image negatives: four images in the batch.
    assert chunk["input_ids"].shape[0] == 6
    assert chunk["image_grid_thw"].shape[0] == 4
    image_rows = (chunk["input_ids"] == processor.image_token_id).any(dim=1)
    assert image_rows.tolist() == [False, False, True, True, True, True]


def test_a_batch_of_only_bad_rows_is_an_error(processor):
    tasks = [TaskSpec("images", image_task())]
    with pytest.raises(ValueError, match="every row of a batch of 1 rows from \\['images'\\] is unusable"):
        ContrastiveCollator(processor, tasks)([MultiTaskDataset(tasks)[1]])
