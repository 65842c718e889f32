"""Loading tasks for train_contrastive.py: files, folders, task configs, relative image paths, bad rows."""

import json
import logging

import pytest
from PIL import Image

from moca.training.contrastive import ContrastiveCollator, MultiTaskDataset
from moca.training.contrastive import load_tasks


class RecordingProcessor:
    """The tiny model's processor, recording what the collator hands it."""

    def __init__(self, processor):
        self.processor = processor
        self.calls = []

    def __call__(self, text, images, **kwargs):
        self.calls.append((text, images))
        return self.processor(text=text, images=images, **kwargs)

    def __getattr__(self, name):
        return getattr(self.processor, name)


@pytest.fixture
def jsonl_task(tmp_path):
    folder = tmp_path / "captions"
    folder.mkdir()
    Image.new("RGB", (28, 28), "red").save(folder / "red.png")
    rows = [
        {"query_text": "a red picture", "pos_image": "red.png", "neg_text": []},
        {"query_text": "a lost picture", "pos_image": "missing.png", "neg_text": []},
        {"query_text": "no positive at all", "pos_image": None, "neg_text": []},
    ]
    (folder / "rows.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return folder / "rows.jsonl"


def test_jsonl_task_with_relative_image_paths_and_bad_rows(jsonl_task, tmp_path, caplog, tiny_moca):
    config = tmp_path / "tasks.json"
    config.write_text(json.dumps({"rows": {"query_prompt": "Find: {text}", "document_prompt": "<image>Look."}}))
    with caplog.at_level(logging.WARNING):
        (task,) = load_tasks([str(jsonl_task)], str(config))
    assert (task.name, len(task.dataset), task.query_prompt) == ("rows", 2, "Find: {text}")
    assert "skipped 1 of 3 rows (row 2: no pos_text/pos_image)" in caplog.text
    assert task.skipped_rows == {"rows: no pos_text/pos_image": 1}

    processor = RecordingProcessor(tiny_moca[1])
    collator = ContrastiveCollator(processor, [task])
    dataset = MultiTaskDataset([task])
    with caplog.at_level(logging.WARNING):
        batch = collator([dataset[0], dataset[1]])
    assert batch["num_queries"] == 1 and batch["skipped_rows"] == {"rows: unreadable pos_image": 1}
    assert "skipped row 1 of task 'rows': unreadable pos_image (ValueError: cannot read image" in caplog.text
    assert "missing.png: [Errno 2] No such file or directory" in caplog.text
    (texts, images) = processor.calls[0]
    assert texts == ["Find: a red picture", "<image>Look."]
    assert images[0] == [] and images[1][0].size == (28, 28)  # the path was read relative to the data file


def test_a_folder_with_tasks_json_stands_for_its_tasks(tmp_path):
    import datasets

    for name in ("a", "b"):
        datasets.Dataset.from_list([{"query_text": "q", "pos_text": "p"}] * 3).save_to_disk(str(tmp_path / name))
    (tmp_path / "tasks.json").write_text(json.dumps({"a": {"weight": 0.25}, "b": {"weight": 0.75}}))
    tasks = load_tasks([str(tmp_path)])
    assert [(t.name, t.weight, len(t.dataset)) for t in tasks] == [("a", 0.25, 3), ("b", 0.75, 3)]


def test_task_config_errors_name_the_problem(tmp_path, jsonl_task):
    config = tmp_path / "tasks.json"
    config.write_text(json.dumps({"rows": {"query_promt": "typo"}}))
    with pytest.raises(ValueError, match="task 'rows' has unknown settings \\['query_promt'\\]"):
        load_tasks([str(jsonl_task)], str(config))
    with pytest.raises(ValueError, match="unsupported format '.csv'"):
        (tmp_path / "rows.csv").write_text("query_text\nq\n")
        load_tasks([str(tmp_path / "rows.csv")])


@pytest.mark.parametrize("key", ["t2i", "t2i.jsonl"])
def test_a_file_task_finds_its_settings_by_stem_or_file_name(tmp_path, key):
    """The task is named `t2i` (the stem); tasks.json may name it `t2i.jsonl`, as the file is listed. Looking the
    settings up by the stem alone dropped the prompts and weights of such tasks."""
    rows = [{"query_text": "a red box", "pos_text": "red box"}]
    for name in ("t2i", "pairs"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(rows[0]) + "\n")
    settings = {key: {"query_prompt": "Find: {text}", "weight": 3.0}, "pairs.jsonl": {"weight": 1.0}}
    (tmp_path / "tasks.json").write_text(json.dumps(settings))
    tasks = load_tasks([str(tmp_path)])
    assert [(t.name, t.query_prompt, t.weight) for t in tasks] == [("t2i", "Find: {text}", 3.0), ("pairs", None, 1.0)]
    # The same file given directly, with the config named explicitly.
    (task,) = load_tasks([str(tmp_path / "t2i.jsonl")], str(tmp_path / "tasks.json"))
    assert (task.query_prompt, task.weight) == ("Find: {text}", 3.0)


def test_task_settings_that_match_no_task_are_named_and_conflicting_spellings_are_an_error(tmp_path, caplog):
    (tmp_path / "t2i.jsonl").write_text(json.dumps({"query_text": "q", "pos_text": "p"}) + "\n")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"t2i": {"weight": 1.0}, "t2l.jsonl": {"weight": 2.0}}))
    with caplog.at_level(logging.WARNING):
        load_tasks([str(tmp_path / "t2i.jsonl")], str(config))
    assert "no task matches the settings of ['t2l.jsonl'] (tasks: ['t2i'])" in caplog.text
    config.write_text(json.dumps({"t2i": {"weight": 1.0}, "t2i.jsonl": {"weight": 2.0}}))
    with pytest.raises(ValueError, match=r"task 't2i' has different settings under \['t2i', 't2i.jsonl'\]"):
        load_tasks([str(tmp_path / "t2i.jsonl")], str(config))
