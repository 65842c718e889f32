"""python -m moca embed / search on a tiny model: results come back in the order cosine scores give."""

import re
import subprocess
import sys

import datasets
import pytest
import torch
from PIL import Image

from moca import cli


# `embed` batches items differently from a direct `encode` call (padding differs): agreement in float32 is ~1e-7.
ATOL = 1e-5


@pytest.fixture(scope="module")
def moca_checkpoint(tiny_moca, tmp_path_factory):
    folder = tmp_path_factory.mktemp("moca_cli") / "checkpoint"
    tiny_moca[0].save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def item_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("items")
    (folder / "pages").mkdir()
    Image.new("RGB", (112, 112), "red").save(folder / "red.png")
    Image.new("RGB", (56, 112), "blue").save(folder / "pages" / "blue.jpg")
    Image.new("RGB", (84, 84), (240, 240, 240)).save(folder / "pages" / "white.webp")
    texts = {
        "a.txt": "A red circle on a white background.",
        "b.txt": "Revenue table of the company report, year by year.",
        "pages/c.md": "A lecture on energy and health science.",
        "d.txt": "What colour is the square?",
    }
    for name, text in texts.items():
        (folder / name).write_text(text)
    (folder / "notes.csv").write_text("ignored,file\n")
    return folder


def test_embed_then_search_returns_cosine_order(moca_checkpoint, item_folder, tiny_moca, tmp_path):
    model, _ = tiny_moca
    output = tmp_path / "index.safetensors"
    cli.main(
        [
            "embed",
            "--model",
            str(moca_checkpoint),
            "--input",
            str(item_folder),
            "--output",
            str(output),
            "--batch_size",
            "3",
            "--dtype",  # the default (auto) is bf16 on CPUs with AMX or AVX-512-BF16: compared here with float32
            "float32",
        ]
    )

    index = cli.read_index(output)
    assert index.ids == ["a.txt", "b.txt", "d.txt", "pages/blue.jpg", "pages/c.md", "pages/white.webp", "red.png"]
    inputs = [text if text is not None else image for text, image in zip(index.texts, index.images)]  # image paths
    torch.testing.assert_close(index.embeddings, model.encode_documents(inputs), atol=ATOL, rtol=0)

    query = "a red circle"
    scores = index.embeddings @ model.encode_queries([query])[0]
    expected_order = [index.ids[i] for i in torch.argsort(scores, descending=True)[:4].tolist()]

    # The search command itself, in a fresh process outside the repository.
    result = subprocess.run(
        [sys.executable, "-m", "moca", "search", "--index", str(output), "--query", query, "--top_k", "4"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = [
        re.match(r"\s*(\d+)\s+(-?\d+\.\d+)\s+(\S+)", line).groups() for line in result.stdout.strip().splitlines()
    ]
    assert [item for _, _, item in printed] == expected_order
    printed_scores = torch.tensor([float(score) for _, score, _ in printed])
    torch.testing.assert_close(printed_scores, scores.sort(descending=True).values[:4], atol=1e-4, rtol=0)


def test_dataset_to_parquet_and_image_query(moca_checkpoint, tiny_moca, tmp_path):
    model, _ = tiny_moca
    images = [Image.new("RGB", (56 + 28 * i, 84), color) for i, color in enumerate(["red", "green", "blue"])]
    rows = datasets.Dataset.from_dict(
        {
            "doc_id": ["r", "g", "b", "t"],
            "text": [None, "Green page <image>", None, "A text only row."],
            "image": [*images, None],
        },
        features=datasets.Features(
            {"doc_id": datasets.Value("string"), "text": datasets.Value("string"), "image": datasets.Image()}
        ),
    )
    rows.save_to_disk(tmp_path / "dataset")
    output = tmp_path / "index.parquet"
    index = cli.embed(
        str(moca_checkpoint),
        str(tmp_path / "dataset"),
        str(output),
        batch_size=2,
        chunk_size=3,
        id_column="doc_id",
        dtype="float32",
        show_progress_bar=False,
    )
    read = cli.read_index(output)
    assert read.ids == ["r", "g", "b", "t"] and read.texts == [None, "Green page <image>", None, "A text only row."]
    torch.testing.assert_close(read.embeddings, index.embeddings)
    expected = model.encode_documents(
        [images[0], {"text": "Green page <image>", "image": images[1]}, images[2], "A text only row."]
    )
    torch.testing.assert_close(read.embeddings, expected, atol=ATOL, rtol=0)

    images[2].save(tmp_path / "query.png")
    results = cli.search(str(output), query_image=str(tmp_path / "query.png"), top_k=4)
    scores = read.embeddings @ model.encode_queries([tmp_path / "query.png"])[0]
    assert [item for _, item in results] == torch.argsort(scores, descending=True).tolist()
    assert read.ids[results[0][1]] == "b" and results[0][0] == pytest.approx(1.0, abs=1e-5)


def test_interrupted_embed_resumes_from_saved_chunks(moca_checkpoint, item_folder, tmp_path, monkeypatch):
    from moca import MoCaModel

    output = tmp_path / "index.safetensors"
    original = MoCaModel.encode_documents
    calls = []

    def fail_on_second_chunk(self, inputs, **kwargs):
        calls.append(len(inputs))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, inputs, **kwargs)

    monkeypatch.setattr(MoCaModel, "encode_documents", fail_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        cli.embed(str(moca_checkpoint), str(item_folder), str(output), chunk_size=4, show_progress_bar=False)
    assert not output.exists() and len(list((tmp_path / "index.safetensors.partial").glob("*.safetensors"))) == 1

    calls.clear()
    monkeypatch.setattr(MoCaModel, "encode_documents", original)
    resumed = cli.embed(str(moca_checkpoint), str(item_folder), str(output), chunk_size=4, show_progress_bar=False)
    fresh = cli.embed(
        str(moca_checkpoint),
        str(item_folder),
        str(tmp_path / "fresh.safetensors"),
        chunk_size=4,
        show_progress_bar=False,
    )
    torch.testing.assert_close(resumed.embeddings, fresh.embeddings)
    assert not (tmp_path / "index.safetensors.partial").exists()


def test_bad_inputs_name_the_problem(moca_checkpoint, tmp_path):
    rows = datasets.Dataset.from_dict({"text": ["fine", None], "image": [None, None]})
    rows.save_to_disk(tmp_path / "dataset")
    with pytest.raises(ValueError, match="Row 1: no text and no image"):
        cli.embed(
            str(moca_checkpoint), str(tmp_path / "dataset"), str(tmp_path / "i.safetensors"), show_progress_bar=False
        )
    with pytest.raises(ValueError, match=r"\.safetensors or \.parquet"):
        cli.embed(str(moca_checkpoint), str(tmp_path / "dataset"), str(tmp_path / "index.npy"))
    with pytest.raises(ValueError, match="exactly one of --query and --query_image"):
        cli.search(str(tmp_path / "i.safetensors"), query="a", query_image="b.png")
