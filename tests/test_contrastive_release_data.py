"""The release's contrastive layout (moca-embed/MoCa-CL-Pairs, intfloat/mmE5-synthetic) read as it is stored:
list-literal negatives, Phi-3-V image markers, image paths relative to an image folder, one task per subset."""

import ast
import builtins
import io
import logging
import os
import shutil
from collections import Counter
from types import SimpleNamespace

import datasets
import pytest
from PIL import Image

import train_contrastive
from moca.data import QWEN_IMAGE_MARKER, load_source, parse_list_literal, release_pairs_to_rows
from moca.training.contrastive import ContrastiveCollator, ContrastiveTrainer, MultiTaskDataset, TaskSpec, load_tasks

PHI3V = "<|image_1|>"
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]


def png(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def classification_rows():
    """ImageNet_1K-like: an image query with Phi-3-V's marker, class-name positives and text negatives (no images:
    the image list holds empty paths); lists of 3, 1 and 0 negatives."""
    negatives = ["['cls b', 'cls c', 'cls d']", "['cls z']", "[]", "['cls e', 'cls f']"]
    return [
        {"qry": f"{PHI3V}\nRepresent the given image for classification\n", "qry_image_path": f"images/ImageNet_1K/q{i}.png",
         "pos_text": f"cls {COLOURS[i]}", "pos_image_path": "", "neg_text": negs,
         "neg_image_path": repr([""] * len(ast.literal_eval(negs)))}
        for i, negs in enumerate(negatives)
    ]  # fmt: skip


def document_rows():
    """visrag-like: text queries, page images with an instruction that carries the marker, image negatives whose
    texts are empty (the release fills them with the positive's text) or partly so (filled with the other one)."""
    return [
        {"qry": f"which page shows {c}?", "qry_image_path": "",
         "pos_text": f"{PHI3V}\nRepresent the given document image.", "pos_image_path": f"images/visrag_ind/p{i}.png",
         "neg_text": "['', '']" if i != 3 else "['', 'a page about nothing']",
         "neg_image_path": f"['images/visrag_ind/n{i}a.png', 'images/visrag_ind/n{i}b.png']" if i != 3
         else "['images/visrag_ind/n3a.png', '']"}
        for i, c in enumerate(COLOURS[:4])
    ]  # fmt: skip


def write_images(root, rows):
    for row in rows:
        paths = [row["qry_image_path"], row["pos_image_path"], *ast.literal_eval(row["neg_image_path"])]
        for path in filter(None, paths):
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(png(COLOURS[len(path) % 8]))


@pytest.fixture
def collection(tmp_path):
    """A local folder of release subsets (one saved with save_to_disk, one a parquet file) with its images/ in it."""
    root = tmp_path / "MoCa-CL-Pairs"
    root.mkdir()
    datasets.Dataset.from_list(document_rows()).save_to_disk(str(root / "visrag_ind"))
    datasets.Dataset.from_list(classification_rows()).to_parquet(str(root / "ImageNet_1K.parquet"))
    write_images(root, document_rows() + classification_rows())
    return root


def release_negatives(row: dict, count: int) -> list[tuple[str, str]]:
    """What the release's `TaskBatchDataset.__getitem__` (src/dataset.py) gives as a row's negatives, written out
    from it (with `ast.literal_eval` where it calls `eval`): `(text, image path)` pairs."""

    def filter_hard_negatives(cell):
        negs = ast.literal_eval(cell)
        negs = negs if isinstance(negs, list) else [negs]
        if 0 < len(negs) < count:
            negs += [negs[-1]] * (count - len(negs))
        return negs[:count]

    texts, paths = filter_hard_negatives(row["neg_text"]), filter_hard_negatives(row["neg_image_path"])
    full = ast.literal_eval(row["neg_text"])
    for i, text in enumerate(texts):
        if text == "":
            fillers = [t for t in full if t != ""]
            assert len(set(full)) == 1 or len(fillers) == 1  # the test data leaves the release's random.choice no choice
            texts[i] = row["pos_text"] if len(set(full)) == 1 else fillers[0]
    texts = [text.replace(PHI3V, QWEN_IMAGE_MARKER) for text in texts]
    return [(text.replace(QWEN_IMAGE_MARKER, "") if path == "" else text, path) for text, path in zip(texts, paths)]


def as_release_pairs(picked, image_root):
    """The collator's `(text, image)` negatives in the release's terms: image paths relative to the image folder."""
    return [(text, os.path.relpath(image, image_root) if image else "") for text, image in picked]


def test_list_literals_are_read_without_evaluating_them(tmp_path, monkeypatch):
    assert parse_list_literal("['a', 'b']") == ["a", "b"]
    assert parse_list_literal("'lone'") == ["lone"]  # the release wraps a lone literal in a list
    assert parse_list_literal("") == parse_list_literal("[]") == parse_list_literal(None) == []
    marker = tmp_path / "evaluated"
    for cell in ["__import__('os').system('x')", f"open({str(marker)!r}, 'w')", "[print('x')]", "a red car"]:
        with pytest.raises(ValueError, match="not a Python literal"):
            parse_list_literal(cell)
    with pytest.raises(ValueError, match="lists int items, not only strings"):
        parse_list_literal("[1, 'a']")
    with pytest.raises(ValueError, match="lists dict items"):
        parse_list_literal("{'a': 1}")

    # Through the loader: the malformed rows are counted skips with their reason; nothing reaches eval.
    monkeypatch.setattr(builtins, "eval", lambda *args: pytest.fail(f"eval called on {args}"))
    rows = [dict(classification_rows()[0], neg_text=cell) for cell in
            ["__import__('os').system('x')", f"open({str(marker)!r}, 'w')", "['cls b']"]]  # fmt: skip
    rows.append(dict(classification_rows()[0], neg_image_path="[1, 2]"))
    converted, skipped = release_pairs_to_rows(datasets.Dataset.from_list(rows), "ImageNet_1K")
    assert skipped == {"ImageNet_1K: malformed neg_text list literal": 2, "ImageNet_1K: malformed neg_image_path list literal": 1}
    assert converted["neg_text"] == [["cls b"]]
    assert not marker.exists()


def test_release_rows_become_the_packages_rows(collection, tmp_path):
    tasks = load_tasks([str(collection)], subsets=["visrag_ind", "ImageNet_1K"])
    assert [(t.name, len(t.dataset), t.source, t.skipped_rows) for t in tasks] == [
        ("visrag_ind", 4, str(collection), Counter()), ("ImageNet_1K", 4, str(collection), Counter()),
    ]  # fmt: skip
    visrag, imagenet = tasks[0].dataset[0], tasks[1].dataset[2]
    # Phi-3-V's marker becomes Qwen's where the row has the image, and goes where it has none.
    assert imagenet["query_text"] == f"{QWEN_IMAGE_MARKER}\nRepresent the given image for classification\n"
    assert imagenet["query_image"] == str(collection / "images/ImageNet_1K/q2.png")  # under the collection folder
    assert (imagenet["pos_image"], imagenet["neg_text"], imagenet["neg_image"]) == (None, [], [])
    assert visrag["query_text"] == "which page shows red?" and visrag["query_image"] is None
    assert visrag["pos_text"] == f"{QWEN_IMAGE_MARKER}\nRepresent the given document image."
    # Empty negative texts take the positive's (the image negatives share its instruction).
    assert visrag["neg_text"] == [visrag["pos_text"]] * 2
    assert visrag["neg_image"] == [str(collection / f"images/visrag_ind/n0{s}.png") for s in "ab"]
    # A text-less negative beside a text one takes that text; without its image it loses the marker.
    assert tasks[0].dataset[3]["neg_text"] == ["a page about nothing", "a page about nothing"]

    # --image_dir: the same relative paths under another folder.
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(collection / "images", elsewhere / "images")
    (task,) = load_tasks([str(collection)], subsets=["ImageNet_1K"], image_root=str(elsewhere))
    assert task.dataset[0]["query_image"] == str(elsewhere / "images/ImageNet_1K/q0.png")


@pytest.mark.parametrize("count", [1, 2, 3])
def test_the_collator_picks_the_negatives_the_release_picks(collection, count):
    tasks = load_tasks([str(collection)], subsets=["visrag_ind", "ImageNet_1K"])
    collator = ContrastiveCollator(None, tasks, num_hard_negatives=count)
    dataset = MultiTaskDataset(tasks)
    raw = {"visrag_ind": document_rows(), "ImageNet_1K": classification_rows()}
    for index in range(len(dataset)):
        row = dataset[index]
        name = tasks[row["task"]].name
        picked = as_release_pairs(collator._negatives(row), collection)
        assert picked == release_negatives(raw[name][row["row"]], count), (name, row["row"])


def test_hub_subsets_load_with_their_name_and_need_an_image_folder(monkeypatch, tmp_path):
    """The Hub path (no network here): `datasets.load_dataset(name, subset, split=...)`, one task per subset; the
    release's relative image paths need --image_dir."""
    calls = []

    def load_dataset(name, subset=None, split=None):
        calls.append((name, subset, split))
        return datasets.Dataset.from_list(classification_rows() if subset == "ImageNet_1K" else document_rows())

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    dataset, root = load_source("moca-embed/MoCa-CL-Pairs", "train", subset="visrag_ind")
    assert calls == [("moca-embed/MoCa-CL-Pairs", "visrag_ind", "train")] and root is None
    with pytest.raises(ValueError, match="task 'visrag_ind' .*pass --image_dir"):
        load_tasks(["moca-embed/MoCa-CL-Pairs"], subsets=["visrag_ind"])
    tasks = load_tasks(["moca-embed/MoCa-CL-Pairs", "intfloat/mmE5-synthetic"], split="train[:100]",
                       subsets=["moca-embed/MoCa-CL-Pairs:ImageNet_1K", "intfloat/mmE5-synthetic:Retrieval"],
                       image_root=str(tmp_path))  # fmt: skip
    assert [(t.name, t.source) for t in tasks] == [
        ("ImageNet_1K", "moca-embed/MoCa-CL-Pairs"), ("Retrieval", "intfloat/mmE5-synthetic")
    ]
    assert calls[-2:] == [("moca-embed/MoCa-CL-Pairs", "ImageNet_1K", "train[:100]"),
                          ("intfloat/mmE5-synthetic", "Retrieval", "train[:100]")]  # fmt: skip
    assert tasks[0].dataset[0]["query_image"] == str(tmp_path / "images/ImageNet_1K/q0.png")
    with pytest.raises(ValueError, match="with several --dataset, name its dataset \\(DATASET:Retrieval\\)"):
        load_tasks(["moca-embed/MoCa-CL-Pairs", "intfloat/mmE5-synthetic"], subsets=["Retrieval"])


def test_a_missing_local_subset_names_what_is_there(collection):
    with pytest.raises(ValueError, match=r"no subset 'MSCOCO' .*found \['ImageNet_1K', 'images', 'visrag_ind'\]"):
        load_tasks([str(collection)], subsets=["MSCOCO"])


def run(tiny_vlm_dir, output_dir, *extra):
    argv = [
        "--model_name_or_path", tiny_vlm_dir, "--min_image_tokens", "1", "--max_image_tokens", "16", "--output_dir", str(output_dir), "--per_device_train_batch_size", "4",
        "--learning_rate", "5e-4", "--warmup_steps", "0", "--logging_steps", "1", "--save_strategy", "no",
        "--report_to", "none", "--max_length", "128", "--seed", "0", *extra,
    ]  # fmt: skip
    return train_contrastive.main(argv)


def test_training_on_release_subsets_skips_nothing_and_sees_the_release_negatives(
    tiny_vlm_dir, collection, tmp_path, monkeypatch, caplog
):
    seen = {}

    class RecordingCollator(ContrastiveCollator):
        def _negatives(self, row):
            picked = super()._negatives(row)
            seen[(self.tasks[row["task"]].name, row["row"])] = picked
            return picked

    monkeypatch.setattr(train_contrastive, "ContrastiveCollator", RecordingCollator)
    image_dir = tmp_path / "image_dir"
    shutil.copytree(collection / "images", image_dir / "images")
    with caplog.at_level(logging.WARNING):
        trainer = run(tiny_vlm_dir, tmp_path / "out", "--dataset", str(collection), "--subsets", "visrag_ind",
                      "ImageNet_1K", "--image_dir", str(image_dir))  # fmt: skip
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)  # one epoch: one batch per task of 4 rows
    assert "skipped rows: 0" in caplog.text
    raw = {"visrag_ind": document_rows(), "ImageNet_1K": classification_rows()}
    assert sorted(seen) == sorted((name, row) for name in raw for row in range(4))  # every row, once
    for (name, row), picked in seen.items():
        assert as_release_pairs(picked, image_dir) == release_negatives(raw[name][row], 2), (name, row)


def test_a_run_with_bad_rows_ends_with_the_skipped_rows_line(tiny_vlm_dir, collection, tmp_path, caplog):
    rows = classification_rows()
    rows[1] = dict(rows[1], qry_image_path="images/ImageNet_1K/missing.png")  # found unreadable while training
    rows += [
        dict(rows[0], neg_text="__import__('os').system('x')"),
        dict(rows[0], neg_image_path="['', 7]"),
        dict(rows[0], pos_text="", pos_image_path=""),  # no positive
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(collection / "bad.parquet"))
    with caplog.at_level(logging.WARNING):
        trainer = run(tiny_vlm_dir, tmp_path / "out", "--dataset", str(collection), "--subsets", "bad")
    assert "skipped rows: 4" in caplog.text
    for reason in ["bad: malformed neg_text list literal", "bad: malformed neg_image_path list literal",
                   "bad: no pos_text/pos_image", "bad: unreadable query_image"]:  # fmt: skip
        assert f"  1 {reason}" in caplog.text
    assert "skipped 1 of 7 rows with a malformed neg_text list literal (first: row 4, " in caplog.text
    assert "skipped row 1 of task 'bad': unreadable query_image" in caplog.text
    assert trainer.skipped_rows_by_reason() == Counter({reason: 1 for reason in [
        "bad: malformed neg_text list literal", "bad: malformed neg_image_path list literal",
        "bad: no pos_text/pos_image", "bad: unreadable query_image"]})  # fmt: skip


def test_load_time_skips_are_counted_on_one_process_only():
    """Every process loads and validates the same rows; `log_skipped_rows` sums over processes. The collator's
    counts are each process's own; loading's are reported by process 0 alone, so the sum counts them once."""
    task = TaskSpec("t", datasets.Dataset.from_list([{"query_text": "q"}]), skipped_rows=Counter({"t: no positive": 3}))
    per_process = [
        ContrastiveTrainer.skipped_rows_by_reason(SimpleNamespace(
            args=SimpleNamespace(process_index=rank), tasks=[task], training_skipped_rows=Counter({"t: unreadable": 1})
        ))
        for rank in range(4)
    ]  # fmt: skip
    assert sum(per_process, Counter()) == {"t: no positive": 3, "t: unreadable": 4}
