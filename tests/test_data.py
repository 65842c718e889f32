"""moca.data: one loader for every stage and the CLI (files, folders of files, save_to_disk Dataset and DatasetDict),
one rule for relative image paths, and clear errors."""

import io
import json

import datasets
import pytest
from PIL import Image

from moca.data import absolute_image_paths, is_saved_dataset, load_image, load_source, require_columns
from moca.training.contrastive import load_tasks
from moca.training.cpt import load_cpt_dataset


def png(colour="red", size=(30, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


ROWS = [
    {"query_text": "a red box", "query_image": None, "pos_text": None, "pos_image": "images/red.png"},
    {"query_text": "a blue box", "query_image": None, "pos_text": None, "pos_image": "images/blue.png"},
]


@pytest.fixture
def image_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "red.png").write_bytes(png("red"))
    (tmp_path / "images" / "blue.png").write_bytes(png("blue", (20, 30)))
    return tmp_path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_every_source_kind_loads_the_same_rows(image_folder):
    """A jsonl file, a folder of parquet files, a saved Dataset and a saved DatasetDict: the same rows, and their
    image root is the folder they sit in."""
    table = datasets.Dataset.from_list(ROWS)
    write_jsonl(image_folder / "rows.jsonl", ROWS)
    (image_folder / "parquet").mkdir()
    table.to_parquet(str(image_folder / "parquet" / "part-0.parquet"))
    table.save_to_disk(str(image_folder / "saved"))
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(image_folder / "saved_dict"))

    sources = {
        "rows.jsonl": image_folder,
        "parquet": image_folder / "parquet",
        "saved": image_folder / "saved",
        "saved_dict": image_folder / "saved_dict",
    }
    for name, root in sources.items():
        dataset, image_root = load_source(str(image_folder / name))
        assert dataset["query_text"] == ["a red box", "a blue box"], name
        assert image_root == str(root), name
    assert is_saved_dataset(image_folder / "saved") and is_saved_dataset(image_folder / "saved_dict")
    assert not is_saved_dataset(image_folder / "parquet")
    test_split, _ = load_source(str(image_folder / "saved_dict"), split="test")
    assert test_split["query_text"] == ["a red box"]
    with pytest.raises(ValueError, match=r"no split 'validation' \(splits: \['test', 'train'\]\)"):
        load_source(str(image_folder / "saved_dict"), split="validation")


def test_relative_image_paths_follow_one_rule(image_folder, tmp_path_factory):
    """Relative to the data file's folder by default, to `image_root` when given; absolute paths stay."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    rows = [dict(ROWS[0]), {**ROWS[1], "pos_image": str(image_folder / "images" / "blue.png")}]
    write_jsonl(elsewhere / "rows.jsonl", rows)
    dataset, root = load_source(str(elsewhere / "rows.jsonl"), image_root=str(image_folder))
    resolved = absolute_image_paths(dataset, ["pos_image", "query_image"], root)
    assert resolved["pos_image"] == [str(image_folder / "images" / "red.png"), str(image_folder / "images" / "blue.png")]
    assert resolved["query_image"] == [None, None]
    assert load_image(resolved["pos_image"][1]).size == (20, 30)


def test_contrastive_tasks_from_a_saved_dataset_dict_with_relative_images(image_folder):
    """The contrastive loader used to miss a saved DatasetDict. Images here sit beside the saved folder, not in it:
    `image_root` (`--image_dir`) says where."""
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(image_folder / "task"))
    (task,) = load_tasks([str(image_folder / "task")], image_root=str(image_folder))
    assert len(task.dataset) == 2
    assert [load_image(path).size for path in task.dataset["pos_image"]] == [(30, 20), (20, 30)]
    (task,) = load_tasks([str(image_folder / "task")])
    assert task.dataset["pos_image"][0] == str(image_folder / "task" / "images" / "red.png")


def test_cpt_sources_keep_their_images_when_concatenated(image_folder, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    (other / "images").mkdir()
    (other / "images" / "red.png").write_bytes(png("green", (10, 10)))  # same relative path, another image
    write_jsonl(image_folder / "a.jsonl", [{"text": "<image> red", "images": ["images/red.png"]}])
    write_jsonl(other / "b.jsonl", [{"text": "<image> green", "images": ["images/red.png"]}, {"text": "plain"}])
    dataset = load_cpt_dataset([str(image_folder / "a.jsonl"), str(other / "b.jsonl")])
    assert dataset.column_names == ["text", "images"]
    sizes = [[load_image(image).size for image in row["images"] or []] for row in dataset]
    assert sizes == [[(30, 20)], [(10, 10)], []]


def test_bad_sources_and_images_are_named(tmp_path):
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"rows.csv: unsupported format '.csv'"):
        load_source(str(tmp_path / "rows.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no saved dataset and no parquet/jsonl files"):
        load_source(str(tmp_path / "empty"))
    (tmp_path / "mixed").mkdir()
    write_jsonl(tmp_path / "mixed" / "a.jsonl", [{"text": "x"}])
    datasets.Dataset.from_list([{"text": "y"}]).to_parquet(str(tmp_path / "mixed" / "b.parquet"))
    with pytest.raises(ValueError, match="mixes parquet and jsonl"):
        load_source(str(tmp_path / "mixed"))
    with pytest.raises(ValueError, match=r"Dataset src: no 'text' column \(columns: \['a'\]\)"):
        require_columns(datasets.Dataset.from_list([{"a": 1}]), "src", required=("text",))

    (tmp_path / "broken.png").write_bytes(png()[:40])
    with pytest.raises(ValueError, match=r"cannot read image .*broken.png"):
        load_image(str(tmp_path / "broken.png"))
    with pytest.raises(ValueError, match=r"cannot read image <3 bytes>"):
        load_image(b"abc")
    with pytest.raises(ValueError, match="unsupported image type int"):
        load_image(3)
    assert load_image({"bytes": png(size=(7, 5)), "path": None}).size == (7, 5)
