"""eval.mmeb / eval.vidore under bad input: a folder that holds no requested subset and a corrupt page are errors
that say what was found or which row; inputs are cut at the training length by default, and counted."""

import io

import datasets
import pandas as pd
import pytest
from PIL import Image

from eval.mmeb import MMEBArguments, MMEBDataError, evaluate_mmeb
from eval.vidore import ViDoReArguments, ViDoReDataError, evaluate_vidore
from moca import cli


def text_subset(folder, subset, rows=3):
    (folder / subset).mkdir(parents=True)
    pd.DataFrame(
        [
            {"qry_text": f"question {i} about a red circle", "qry_img_path": "",
             "tgt_text": ["a red circle", "a blue square on a long white page"], "tgt_img_path": ["", ""]}
            for i in range(rows)
        ]
    ).to_parquet(folder / subset / "test.parquet")  # fmt: skip


def flat_folder(path):
    path.mkdir()
    pd.DataFrame({"qry_text": ["q"]}).to_parquet(path / "VOC2007.parquet")


# (how the data folder is made, --subsets, expected error)
DATA_DIRS = [
    ("missing", None, None, r"--data_dir .*missing: no such folder"),
    ("empty", lambda p: p.mkdir(), None, r"subset\(s\) none not found; subset folders found: none"),
    ("flat", flat_folder, None, r"found: none .*parquet files directly in the folder, \['VOC2007.parquet'\]"),
    ("other", lambda p: text_subset(p, "N24News"), ["VOC2007", "N24News"],
     r"subset\(s\) \['VOC2007'\] not found; subset folders found: \['N24News'\]"),
]  # fmt: skip


@pytest.mark.parametrize("name, make, subsets, expected", DATA_DIRS, ids=[row[0] for row in DATA_DIRS])
def test_a_data_dir_without_the_requested_subsets_lists_what_it_holds(tiny_moca, tmp_path, name, make, subsets, expected):
    data_dir = tmp_path / name
    if make is not None:
        make(data_dir)
    with pytest.raises(MMEBDataError, match=expected):
        evaluate_mmeb(tiny_moca[0], tmp_path / "out", data_dir=data_dir, subsets=subsets)
    assert not (tmp_path / "out" / "mmeb_results.json").exists()


def test_mmeb_counts_the_inputs_it_cut(tiny_moca, tmp_path):
    model, processor = tiny_moca
    text_subset(tmp_path / "data", "N24News")
    inputs = [f"question {i} about a red circle" for i in range(3)] + ["a red circle", "a blue square on a long white page"]
    lengths = [processor(text=[text])["input_ids"].shape[1] for text in inputs]
    max_length = min(lengths)
    results = evaluate_mmeb(model, tmp_path / "out", data_dir=tmp_path / "data", max_length=max_length)
    expected = sum(length > max_length for length in lengths)
    assert 0 < expected < len(inputs)
    assert results["num_truncated"] == results["subsets"]["N24News"]["num_truncated"] == expected


@pytest.mark.parametrize("arguments", [MMEBArguments, ViDoReArguments])
def test_eval_cuts_at_the_training_length_unless_told_and_runs_no_checkpoint_code_unless_told(arguments):
    from transformers import HfArgumentParser

    def parse(*flags):
        return HfArgumentParser(arguments).parse_args_into_dataclasses(["--model", "m", "--output_dir", "o", *flags])[0]

    assert parse().max_length == cli.DEFAULT_MAX_LENGTH == 1280 and parse().trust_remote_code is False
    assert parse("--max_length", "0").max_length is None
    assert parse("--trust_remote_code").trust_remote_code is True
    with pytest.raises(ValueError, match="--max_length must be 0 .* or positive, got -2"):
        parse("--max_length", "-2")


def png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (56, 84), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_truncated_page_names_dataset_row_and_corpus_id(tiny_moca, tmp_path):
    folder = tmp_path / "esg_tiny"
    for config in ("corpus", "queries", "qrels"):
        (folder / config).mkdir(parents=True)
    pages = [png("red"), png("blue")[:80], png("green")]  # page 1 cut short: "Truncated File Read" when decoded
    pd.DataFrame({"corpus-id": [10, 11, 12], "image": [{"bytes": b, "path": None} for b in pages]}).to_parquet(
        folder / "corpus" / "test.parquet"
    )
    pd.DataFrame({"query-id": [0], "query": ["revenue"]}).to_parquet(folder / "queries" / "test.parquet")
    pd.DataFrame({"query-id": [0], "corpus-id": [10], "score": [1]}).to_parquet(folder / "qrels" / "test.parquet")
    assert datasets.load_dataset("parquet", data_files=str(folder / "corpus" / "test.parquet"), split="train").num_rows == 3
    with pytest.raises(ViDoReDataError, match=r"esg_tiny.*config 'corpus', row 1 \(corpus-id 11\), field 'image': cannot read"):
        evaluate_vidore(tiny_moca[0], tmp_path / "out", datasets=[str(folder)])
