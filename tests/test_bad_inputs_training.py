"""Bad input to training, one table per rule: each bad row is a counted skip naming its task, row and field (CPT
validates every row before training; the contrastive collator checks every row of a batch before building it),
and each bad argument or file is a one-line error naming it."""

import io
import json
import logging
import shutil

import datasets
import pytest
import torch
from cpt_rows import make_rows, write_jsonl
from PIL import Image

import train_contrastive
import train_cpt
from moca.training.contrastive import ContrastiveCollator, MultiTaskDataset, TaskSpec
from moca.training.cpt import prepare_cpt_dataset

MAX_LENGTH = 12  # shorter than one 112 x 112 image (16 visual tokens): an image-first row is cut to nothing


def png(width=56, height=56) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(buffer, format="PNG")
    return buffer.getvalue()


# (text, images, expected skip reason) for CPT rows `{"text", "images"}`.
CPT_BAD_ROWS = [
    ("<image> and <image>: two places", [png()], "2 image placeholders but 1 images"),
    ("Phi-3-V's <|image_1|> marker, no image", [], "1 image placeholders but 0 images"),
    ("<image> a strip", [png(10000, 20)], "image 0 aspect ratio over 200"),
    ("<image> an image longer than max_length", [png(112, 112)], "first image longer than max_length"),
    ("   ", [], "empty text"),
    ("<image> broken", [b"not an image"], "image 0 unreadable"),
]


@pytest.mark.parametrize("text, images, reason", CPT_BAD_ROWS, ids=[reason for *_, reason in CPT_BAD_ROWS])
def test_cpt_validation_skips_and_counts_a_bad_row(tiny_moca, text, images, reason, caplog):
    _, processor = tiny_moca
    rows = [{"text": "a red circle", "images": []}, {"text": text, "images": [{"bytes": b, "path": None} for b in images]}]
    dataset = datasets.Dataset.from_list(rows, features=datasets.Features(
        {"text": datasets.Value("string"), "images": datasets.List(datasets.Image(decode=False))}
    ))  # fmt: skip
    with caplog.at_level(logging.WARNING):
        kept, skipped = prepare_cpt_dataset(dataset, processor, MAX_LENGTH)
    assert kept["row_id"] == [0] and skipped == {reason: 1}
    assert f"Skipping 1 of 2 rows: {reason} (first: row 1" in caplog.text


# (field, value, expected skip reason) for a contrastive row whose other fields are good.
CONTRASTIVE_BAD_ROWS = [
    ("query_text", "<image> and <image>: which?", "query: 2 image placeholders but 0 images"),
    ("pos_text", "Phi-3-V's <|image_1|> marker, no image", "pos: 1 image placeholders but 0 images"),
    ("query_image", png(10000, 20), "query: image 0 aspect ratio over 200"),
    ("query_image", png(112, 112), "query: rejected by the processor"),  # an image alone longer than max_length
    ("neg_text", ["a fine negative", "REJECTED by the processor"], "neg: rejected by the processor"),
    ("query_image", b"not an image", "unreadable query_image"),
]


class StrictProcessor:
    """The tiny processor, refusing texts that say REJECTED as the processor refuses what it cannot take (with a
    `ValueError` naming the input): whatever the processor refuses is a skip, whichever rule it follows."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, text, **kwargs):
        for position, sample in enumerate(text):
            if "REJECTED" in sample:
                raise ValueError(f"Sample {position}: refused")
        return self.processor(text=text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.processor, name)


def contrastive_task(bad_field, bad_value) -> TaskSpec:
    good = {"query_text": "a red circle", "query_image": None, "pos_text": "red and round", "pos_image": None,
            "neg_text": ["a blue square"], "neg_image": [None]}  # fmt: skip
    bad = dict(good, **{bad_field: {"bytes": bad_value, "path": None} if isinstance(bad_value, bytes) else bad_value})
    if bad_field == "query_image":
        bad["query_text"] = ""  # image first: with a long image, the cut leaves nothing
    return TaskSpec(name="t", dataset=datasets.Dataset.from_list([good, bad]).add_column("row_id", [0, 1]))


@pytest.mark.parametrize("field, value, reason", CONTRASTIVE_BAD_ROWS, ids=[reason for *_, reason in CONTRASTIVE_BAD_ROWS])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_contrastive_collator_skips_and_counts_a_bad_row(tiny_moca, field, value, reason, chunk_size, caplog):
    task = contrastive_task(field, value)
    collator = ContrastiveCollator(StrictProcessor(tiny_moca[1]), [task], num_hard_negatives=2, max_length=MAX_LENGTH,
                                   chunk_size=chunk_size)  # fmt: skip
    dataset = MultiTaskDataset([task])
    with caplog.at_level(logging.WARNING):
        batch = collator([dataset[0], dataset[1]])
    # The good row trains: its query, positive and two negatives (its one negative padded), nothing of the bad row.
    assert batch["num_queries"] == 1 and batch["negatives_per_query"] == [2]
    assert sum(len(chunk["input_ids"]) for chunk in batch["chunks"]) == 4
    assert batch["skipped_rows"] == {f"t: {reason}": 1}
    assert f"skipped row 1 of task 't': {reason}" in caplog.text


def test_contrastive_training_runs_through_every_bad_row(tiny_vlm_dir, tmp_path):
    """End to end: one task holding a row of each kind trains, and the run counts each."""
    good = [{"query_text": f"a {c} circle", "pos_text": f"round and {c}"} for c in ("red", "green", "blue", "black")]
    bad = [
        {"query_text": "<image> and <image>: which?", "query_image": "images/red.png", "pos_text": "red"},
        {"query_text": "<|image_1|> with no image", "pos_text": "nothing"},
        {"query_text": "a strip", "query_image": "images/strip.png", "pos_text": "a long strip"},
        {"query_image": "images/large.png", "pos_text": "a large image"},
    ]
    (tmp_path / "data" / "images").mkdir(parents=True)
    for name, size in (("red", (56, 56)), ("strip", (10000, 20)), ("large", (112, 112))):
        Image.new("RGB", size, "red").save(tmp_path / "data" / "images" / f"{name}.png")
    data = tmp_path / "data" / "t.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in good + bad))
    trainer = train_contrastive.main([
        "--model_name_or_path", tiny_vlm_dir, "--min_image_tokens", "1", "--max_image_tokens", "16",
        "--dataset", str(data), "--output_dir", str(tmp_path / "run"), "--per_device_train_batch_size", "8",
        "--max_steps", "1", "--save_strategy", "no", "--report_to", "none", "--max_length", str(MAX_LENGTH),
        "--disable_tqdm", "true",
    ])  # fmt: skip
    assert trainer.state.global_step == 1 and sum(trainer.training_skipped_rows.values()) == len(bad)
    expected = {
        "t: query: 2 image placeholders but 1 images": 1,
        "t: query: 1 image placeholders but 0 images": 1, "t: query: image 0 aspect ratio over 200": 1,
    }  # fmt: skip
    assert expected.items() <= trainer.training_skipped_rows.items()
    # The image alone longer than max_length: the processor refuses it, naming it.
    assert trainer.training_skipped_rows.keys() - expected.keys() == {"t: query: rejected by the processor"}


# ---------------------------------------------------------------------------------------------------------------
# Bad arguments and files: one-line errors naming them


@pytest.mark.parametrize("stage", ["cpt", "contrastive"])
def test_a_malformed_jsonl_line_names_its_file_and_line(stage, tmp_path):
    from moca.training.contrastive import load_tasks
    from moca.training.cpt import load_cpt_dataset

    data = tmp_path / "rows.jsonl"
    row = {"text": "a red circle", "query_text": "a red circle", "pos_text": "round"}
    data.write_text(json.dumps(row) + "\n\n" + '{"text": "cut short' + "\n" + json.dumps(row) + "\n")
    load = (lambda: load_cpt_dataset([str(data)])) if stage == "cpt" else (lambda: load_tasks([str(data)]))
    with pytest.raises(ValueError, match=rf"Data file {data}, line 3: not valid JSON \(Unterminated string"):
        load()


@pytest.mark.parametrize("given, expected", [("fp16", "float16"), ("bf16", "bfloat16"), ("fp32", "float32"),
                                             ("bfloat16", "bfloat16")])  # fmt: skip
def test_dtype_aliases_are_read_as_their_names(tiny_vlm_dir, tmp_path, given, expected):
    from moca.training.common import parse_arguments
    from moca.training.cpt import CPTArguments, CPTTrainingArguments

    # Mixed precision, as half-precision weights need (the refusal without it is tested in test_cpt_train.py).
    args, _ = parse_arguments((CPTArguments, CPTTrainingArguments), [
        "--model_name_or_path", tiny_vlm_dir, "--dataset", "rows.jsonl", "--output_dir", str(tmp_path),
        "--dtype", given, *(["--bf16", "--use_cpu"] if expected != "float32" else []),
    ])  # fmt: skip
    assert args.dtype == expected


def test_an_unknown_dtype_is_one_line_listing_the_names(tiny_vlm_dir, tmp_path):
    with pytest.raises(ValueError, match=r"^--dtype fp8: use one of float32, bfloat16, float16 \(or fp32, bf16, fp16\)\.$"):
        train_cpt.main(["--model_name_or_path", tiny_vlm_dir, "--dataset", "rows.jsonl", "--output_dir", str(tmp_path),
                        "--dtype", "fp8"])  # fmt: skip


@pytest.mark.parametrize("stage", ["cpt", "contrastive"])
def test_a_checkpoint_without_processor_files_is_a_clear_error(tiny_moca, tmp_path, stage):
    from moca.training.contrastive import ContrastiveArguments, load_contrastive_model
    from moca.training.cpt import CPTArguments, load_cpt_model

    model, _ = tiny_moca
    model.save_pretrained(tmp_path / "moca")
    for path in (tmp_path / "moca").iterdir():
        if path.name not in ("config.json", "model.safetensors") and path.suffix != ".py":
            path.unlink() if path.is_file() else shutil.rmtree(path)
    arguments, load = (CPTArguments, load_cpt_model) if stage == "cpt" else (ContrastiveArguments, load_contrastive_model)
    with pytest.raises(ValueError, match="has no processor files: training needs its tokenizer and image processor"):
        load(arguments(model_name_or_path=str(tmp_path / "moca"), dataset=["rows.jsonl"]))


def test_cpt_training_runs_through_bad_rows(tiny_vlm_dir, tmp_path):
    """End to end: the rows of the table are counted skips, and the run trains on the rest."""
    rows = make_rows(6, seed=3) + [{"text": text, "images": images} for text, images, _ in CPT_BAD_ROWS]
    data = write_jsonl(rows, tmp_path / "data")
    trainer = train_cpt.main([
        "--model_name_or_path", tiny_vlm_dir, "--min_image_tokens", "1", "--max_image_tokens", "16",
        "--dataset", str(data), "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--save_strategy", "no",
        "--token_budget", "700", "--max_length", "64", "--report_to", "none", "--disable_tqdm", "true",
    ])  # fmt: skip
    skipped = trainer.skipped_rows_by_reason()
    # At max_length 64 the 16-token image fits: that row trains.
    assert skipped == {reason: 1 for *_, reason in CPT_BAD_ROWS if reason != "first image longer than max_length"}


def test_a_literal_control_token_trains_as_plain_text(tiny_moca):
    """One rule with `encode`: `<|video_pad|>` written in a text is text, in CPT rows and contrastive rows alike."""
    _, processor = tiny_moca
    dataset = datasets.Dataset.from_list([{"text": "a literal <|video_pad|> token", "images": []}], features=datasets.Features(
        {"text": datasets.Value("string"), "images": datasets.List(datasets.Image(decode=False))}
    ))  # fmt: skip
    kept, skipped = prepare_cpt_dataset(dataset, processor, 64)
    assert len(kept) == 1 and not skipped
    task = contrastive_task("pos_text", "a literal <|video_pad|> token")
    batch = ContrastiveCollator(processor, [task], num_hard_negatives=1, max_length=64)(
        [MultiTaskDataset([task])[i] for i in range(2)]
    )
    assert batch["num_queries"] == 2 and not batch["skipped_rows"]
    ids = torch.cat([chunk["input_ids"].flatten() for chunk in batch["chunks"]])
    assert not (ids == processor.video_token_id).any()
    assert kept[0]["length"] == len(processor(text=["a literal <|video_pad|> token"])["input_ids"][0])
