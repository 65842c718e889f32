"""MMEB evaluation on a tiny MoCa model and a tiny MMEB-layout data set written here."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eval.encoding import EmbeddingCache, model_fingerprint
from eval.mmeb import MMEBDataError, evaluate_mmeb, load_subset, parse_subset

REPO_ROOT = Path(__file__).resolve().parents[1]
QUERY_IMAGE_PROMPT = "<|image_1|> Represent the given image for classification"
IMAGE_CANDIDATE = "<|image_1|>\nRepresent the given image."


def write_subset(data_dir: Path, subset: str, rows: list[dict]) -> None:
    (data_dir / subset).mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(data_dir / subset / "test-00000-of-00001.parquet")


def write_mmeb_data(data_dir: Path) -> Path:
    """Three subsets in the MMEB-eval layout: image->label (labels repeat across rows), text->image, and an
    image+question->answer subset that only `subsets.json` describes. Images live under `data_dir/images`."""
    images = data_dir / "images"
    images.mkdir(parents=True)
    for i in range(8):
        size = (28 * (1 + i % 3), 28 * (2 + i % 2))
        Image.new("RGB", size, (30 * i, 255 - 25 * i, (70 * i) % 256)).save(images / f"img{i}.png")
    labels = ["cat", "dog", "car", "bus", "tree"]
    write_subset(
        data_dir,
        "VOC2007",
        [
            {
                "qry_text": QUERY_IMAGE_PROMPT,
                "qry_img_path": f"images/img{i}.png",
                "tgt_text": labels[i % 5 :] + labels[: i % 5],
                "tgt_img_path": [""] * 5,
            }
            for i in range(5)
        ],
    )
    captions = ["a red square", "a green field", "a blue sky at noon", "two dogs", "an empty road"]
    write_subset(
        data_dir,
        "MSCOCO_t2i",
        [
            {
                "qry_text": f"Find me an everyday image that matches the given caption: {captions[i]}",
                "qry_img_path": "",
                "tgt_text": [IMAGE_CANDIDATE] * 3,
                "tgt_img_path": [f"images/img{(i + j) % 8}.png" for j in range(3)],
            }
            for i in range(5)
        ],
    )
    write_subset(
        data_dir,
        "NanoVQA",
        [
            {
                "qry_text": f"<|image_1|> Represent the given image with the following question: what is {i}?",
                "qry_img_path": f"images/img{7 - i}.png",
                "tgt_text": [str(i), str(i + 1), "unknown"],
                "tgt_img_path": ["", "", ""],
            }
            for i in range(4)
        ],
    )
    (data_dir / "subsets.json").write_text(json.dumps({"NanoVQA": {"category": "VQA", "split": "OOD"}}))
    return data_dir


class Recorder:
    """The model, counting the inputs it encodes; optionally interrupted (as by Ctrl-C) after some inputs."""

    def __init__(self, model, interrupt_after: int | None = None):
        self.model, self.interrupt_after, self.encoded = model, interrupt_after, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode(self, inputs, **kwargs):
        if self.interrupt_after is not None and self.encoded >= self.interrupt_after:
            raise KeyboardInterrupt
        self.encoded += len(inputs)
        return self.model.encode(inputs, **kwargs)


def direct_hits(model, data_dir: Path, subset: str) -> list[int]:
    """Each row's Precision@1 from `model.encode` of the row's own inputs, without the pipeline."""
    table = pd.read_parquet(data_dir / subset / "test-00000-of-00001.parquet")

    def as_input(text, path):
        return {"text": text.replace("<|image_1|>", "<image>"), "image": data_dir / path if path else None}

    hits = []
    for row in table.itertuples():
        query = model.encode([as_input(row.qry_text, row.qry_img_path)])
        candidates = model.encode([as_input(t, p) for t, p in zip(row.tgt_text, row.tgt_img_path)])
        scores = F.normalize(candidates, dim=-1) @ F.normalize(query, dim=-1)[0]
        hits.append(int(int(scores.argmax()) == 0))
    return hits


@pytest.fixture(scope="module")
def mmeb_data(tmp_path_factory):
    return write_mmeb_data(tmp_path_factory.mktemp("mmeb"))


@pytest.fixture(scope="module")
def full_run(tiny_moca, mmeb_data, tmp_path_factory):
    model = Recorder(tiny_moca[0])
    output_dir = tmp_path_factory.mktemp("mmeb_out")
    results = evaluate_mmeb(model, output_dir, data_dir=mmeb_data, batch_size=4)
    return results, output_dir, model.encoded


def test_scores_equal_those_from_model_encode(tiny_moca, mmeb_data, full_run):
    model = tiny_moca[0]
    results, output_dir, _ = full_run
    assert list(results["subsets"]) == ["VOC2007", "MSCOCO_t2i", "NanoVQA"]
    for subset in results["subsets"]:
        expected = direct_hits(model, mmeb_data, subset)
        assert results["subsets"][subset]["precision_at_1"] == pytest.approx(sum(expected) / len(expected), abs=1e-12)
        assert results["subsets"][subset]["per_query"] == expected, subset  # row order kept, for paired tests

    # The cached embeddings are those of `model.encode` (fp32, different batches: tolerance 1e-5).
    cache = EmbeddingCache(output_dir / "embedding_cache" / model_fingerprint(model))
    for subset in results["subsets"]:
        parsed = parse_subset(subset, load_subset(subset, data_dir=mmeb_data), mmeb_data)
        stored = cache.load(f"mmeb/{subset}")
        cached = torch.stack([stored[key] for key in parsed.keys])
        torch.testing.assert_close(cached, model.encode(parsed.inputs, batch_size=3), atol=1e-5, rtol=0)

    by_subset = {name: s["precision_at_1"] for name, s in results["subsets"].items()}
    assert results["categories"]["Classification"]["precision_at_1"] == by_subset["VOC2007"]
    assert results["categories"]["Retrieval"]["precision_at_1"] == by_subset["MSCOCO_t2i"]
    assert results["categories"]["VQA"] == {"precision_at_1": by_subset["NanoVQA"], "num_subsets": 1}
    assert results["categories"]["Visual Grounding"] == {"precision_at_1": None, "num_subsets": 0}
    assert results["splits"]["IND"]["precision_at_1"] == pytest.approx(
        (by_subset["VOC2007"] + by_subset["MSCOCO_t2i"]) / 2
    )
    assert results["splits"]["OOD"]["precision_at_1"] == by_subset["NanoVQA"]
    assert results["overall"]["precision_at_1"] == pytest.approx(sum(by_subset.values()) / 3)

    assert json.loads((output_dir / "mmeb_results.json").read_text()) == results
    assert "| VOC2007 | Classification | IND |" in (output_dir / "mmeb_results.md").read_text()
    assert (output_dir / "mmeb_results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_distinct_input_is_encoded_once_and_a_rerun_encodes_nothing(tiny_moca, mmeb_data, full_run):
    results, output_dir, encoded_first = full_run
    # VOC2007: 5 images + 5 labels; MSCOCO_t2i: 5 captions + 7 distinct images; NanoVQA: 4 queries + 6 answers.
    assert encoded_first == (5 + 5) + (5 + 7) + (4 + 6)
    assert [s["num_inputs"] for s in results["subsets"].values()] == [10, 12, 10]
    model = Recorder(tiny_moca[0])
    assert evaluate_mmeb(model, output_dir, data_dir=mmeb_data, batch_size=4) == results
    assert model.encoded == 0


def test_a_moved_data_folder_keeps_its_cache(tiny_moca, mmeb_data, full_run, tmp_path):
    moved = Path(shutil.copytree(mmeb_data, tmp_path / "moved"))  # copy2 keeps the modification times
    model = Recorder(tiny_moca[0])
    results = evaluate_mmeb(model, full_run[1], data_dir=moved, batch_size=4)
    assert model.encoded == 0 and results == full_run[0]


def test_an_interrupted_run_resumes_where_it_stopped(tiny_moca, mmeb_data, full_run, tmp_path):
    # Interrupted inside the second subset: the first subset's embeddings are on disk, the second's are not.
    with pytest.raises(KeyboardInterrupt):
        evaluate_mmeb(Recorder(tiny_moca[0], interrupt_after=10), tmp_path, data_dir=mmeb_data, batch_size=4)
    resumed = Recorder(tiny_moca[0])
    results = evaluate_mmeb(resumed, tmp_path, data_dir=mmeb_data, batch_size=4)
    assert resumed.encoded == 12 + 10
    assert results == full_run[0]


def test_a_missing_image_names_subset_row_and_field(tiny_moca, mmeb_data, tmp_path):
    data_dir = write_mmeb_data(tmp_path / "data")
    (data_dir / "images" / "img3.png").unlink()  # VOC2007 row 3's query image; MSCOCO_t2i candidates too
    with pytest.raises(MMEBDataError, match=r"subset 'VOC2007', row 3, field 'qry_img_path'.*img3\.png not found"):
        evaluate_mmeb(tiny_moca[0], tmp_path / "out", data_dir=data_dir, subsets=["VOC2007"])
    with pytest.raises(MMEBDataError, match=r"subset 'MSCOCO_t2i', row 1, field 'tgt_img_path\[2\]'"):
        evaluate_mmeb(tiny_moca[0], tmp_path / "out", data_dir=data_dir, subsets=["MSCOCO_t2i"])


def test_malformed_rows_name_subset_row_and_field(tiny_moca, tmp_path):
    data_dir = write_mmeb_data(tmp_path / "data")
    good = {"qry_text": "a caption", "qry_img_path": "", "tgt_text": ["x", "y"], "tgt_img_path": ["", ""]}
    cases = {
        "ChartQA": ({**good, "tgt_img_path": [""]}, r"row 1, field 'tgt_img_path': 1 paths for 2 tgt_text"),
        "GQA": ({**good, "tgt_text": []}, r"row 1, field 'tgt_text': expected a non-empty list"),
        "OVEN": ({**good, "tgt_text": ["x", None]}, r"row 1, field 'tgt_text\[1\]': expected a string"),
        "EDIS": ({**good, "qry_text": QUERY_IMAGE_PROMPT}, r"row 1, field 'qry_img_path': qry_text marks an image"),
    }
    for subset, (bad_row, message) in cases.items():
        write_subset(data_dir, subset, [good, bad_row])
        with pytest.raises(MMEBDataError, match=rf"subset '{subset}', {message}"):
            evaluate_mmeb(tiny_moca[0], tmp_path / "out", data_dir=data_dir, subsets=[subset])
    (data_dir / "SUN397").mkdir()
    pd.DataFrame(columns=list(good)).to_parquet(data_dir / "SUN397" / "test-00000-of-00001.parquet")
    with pytest.raises(MMEBDataError, match=r"subset 'SUN397': no rows"):
        evaluate_mmeb(tiny_moca[0], tmp_path / "out", data_dir=data_dir, subsets=["SUN397"])
    write_subset(data_dir, "Unlisted", [good])
    with pytest.raises(MMEBDataError, match=r"\['Unlisted'\] have no category: add them to subsets.json"):
        evaluate_mmeb(tiny_moca[0], tmp_path / "out", data_dir=data_dir, subsets=["Unlisted"])


def test_two_processes_give_the_results_of_one(tiny_moca, mmeb_data, tmp_path):
    """`accelerate launch` with two CPU processes against an in-process run of the same checkpoint."""
    from eval.mmeb import main

    checkpoint = tmp_path / "checkpoint"
    tiny_moca[0].save_pretrained(checkpoint)
    # float32 as in the process (the default, auto, is bf16 on CPUs with AMX or AVX-512-BF16)
    arguments = ["--model", str(checkpoint), "--data_dir", str(mmeb_data), "--batch_size", "2", "--dtype", "float32"]
    one = main([*arguments, "--output_dir", str(tmp_path / "one")])

    # torchrun starts the processes as `accelerate launch` does on GPUs; ACCELERATE_USE_CPU makes them join over gloo.
    # --standalone: the rendezvous store binds port 0 (no port picked beforehand that a parallel test could take).
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            "-m",
            "eval.mmeb",
            *arguments,
            "--output_dir",
            str(tmp_path / "two"),
        ],
        env=environment,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "mmeb/VOC2007: 10 of 10 distinct inputs to encode, on 2 process(es)" in completed.stderr
    two = json.loads((tmp_path / "two" / "mmeb_results.json").read_text())
    assert {k: v for k, v in two.items() if k != "model"} == {k: v for k, v in one.items() if k != "model"}

    fingerprint = next((tmp_path / "one" / "embedding_cache").iterdir()).name
    assert [p.name for p in (tmp_path / "two" / "embedding_cache").iterdir()] == [fingerprint]
    for subset in one["subsets"]:
        single = EmbeddingCache(tmp_path / "one" / "embedding_cache" / fingerprint).load(f"mmeb/{subset}")
        double = EmbeddingCache(tmp_path / "two" / "embedding_cache" / fingerprint).load(f"mmeb/{subset}")
        assert single.keys() == double.keys()
        torch.testing.assert_close(
            torch.stack([double[k] for k in single]), torch.stack(list(single.values())), atol=1e-5, rtol=0
        )
