import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, Image, load_from_disk
from PIL import Image as PILImage

from nano_data import COLOURS, HELD_OUT_COMBOS, NUM_HARD_NEGATIVES, PLURALS, make_nano_data

REPO_ROOT = Path(__file__).resolve().parents[1]
SCALE = 0.05
MMEB_CATEGORIES = {"Classification", "VQA", "Retrieval", "Visual Grounding"}
CROP_SUBSETS = {"LabelGrounding", "HeldOutLabelGrounding"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("nano") / "seed0"
    make_nano_data(out, seed=0, scale=SCALE)
    return out


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _undecoded(dataset):
    """The dataset with every image column left as {"bytes", "path"}, to compare images byte for byte."""
    for name, feature in dataset.features.items():
        if isinstance(feature, Image):
            dataset = dataset.cast_column(name, Image(decode=False))
        elif getattr(feature, "feature", None) is not None and isinstance(feature.feature, Image):
            dataset = dataset.cast_column(name, type(feature)(Image(decode=False)))
    return dataset


def _colours_in(image, min_pixels=20):
    """Names of the palette colours that fill at least `min_pixels` pixels (shapes are drawn flat, unblended)."""
    counts = {rgb: n for n, rgb in image.convert("RGB").getcolors(maxcolors=1 << 16)}
    return {name for name, rgb in COLOURS.items() if counts.get(rgb, 0) >= min_pixels}


def _colour_word(text):
    words = re.findall(r"[a-z]+", text.lower())
    found = [w for w in words if w in COLOURS]
    assert len(found) == 1, f"expected one colour word in {text!r}"
    return found[0]


def _mmeb(world, subset):
    return pq.read_table(world / "mmeb" / "data" / subset / "test-00000-of-00001.parquet")


def _mmeb_image(world, relative_path):
    return PILImage.open(world / "mmeb" / "images" / relative_path)


# ---------------------------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_writes_identical_files_in_another_process(world, tmp_path):
    # The command-line tool in a fresh process: nothing may depend on the process (hash seeds, fingerprints, time).
    out = tmp_path / "again"
    subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "examples" / "nano" / "make_data.py"),
            str(out),
            "--seed",
            "0",
            "--scale",
            str(SCALE),
        ],
        check=True,
        capture_output=True,
    )
    first, second = _files(world), _files(out)
    assert sorted(first) == sorted(second)
    changed = [name for name in first if first[name] != second[name]]
    assert not changed, f"files differ between two runs with the same seed: {changed[:5]}"


def test_other_seed_writes_other_data(world, tmp_path):
    make_nano_data(tmp_path / "seed1", seed=1, scale=SCALE)
    other = _files(tmp_path / "seed1")
    first = _files(world)
    for name in (
        "cpt/data-00000-of-00001.arrow",
        "contrastive/vqa/data-00000-of-00001.arrow",
        "mmeb/data/CaptionToImage/test-00000-of-00001.parquet",
        "mmeb/images/ColorVQA/0000_query.png",
        "vidore/nano_reports/queries/test-00000-of-00001.parquet",
    ):
        assert first[name] != other[name], f"{name} did not change with the seed"
    assert json.loads(other["manifest.json"])["seed"] == 1


def test_rejects_non_positive_scale(tmp_path):
    with pytest.raises(ValueError, match="scale"):
        make_nano_data(tmp_path, scale=0)


# ---------------------------------------------------------------------------------------------------------------
# Training data


def test_manifest_matches_what_was_written(world):
    manifest = json.loads((world / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["scale"] == SCALE
    assert len(load_from_disk(str(world / manifest["cpt"]["path"]))) == manifest["cpt"]["rows"]
    for task, entry in manifest["contrastive"].items():
        assert len(load_from_disk(str(world / entry["path"]))) == entry["rows"], task
    for subset, entry in manifest["mmeb"].items():
        assert pq.read_table(world / entry["path"]).num_rows == entry["rows"], subset
    for name, entry in manifest["vidore"].items():
        for part in ("corpus", "queries", "qrels"):
            table = pq.read_table(world / entry["path"] / part / "test-00000-of-00001.parquet")
            assert table.num_rows == entry[part], (name, part)


def test_cpt_rows_interleave_text_and_images(world):
    cpt = load_from_disk(str(world / "cpt"))
    assert set(cpt.column_names) == {"text", "images"}
    images_per_row = []
    for i, row in enumerate(cpt):
        assert row["text"].count("<image>") == len(row["images"]), f"cpt row {i}: {row['text']!r}"
        for image in row["images"]:
            assert image.width % 28 == 0 and image.height % 28 == 0 and 56 <= min(image.size) <= max(image.size) <= 140
        images_per_row.append(len(row["images"]))
    assert {0, 1, 2} <= set(images_per_row), "text-only, single-image and two-image rows are all expected"
    assert any(text.strip().startswith("<image>") for text in cpt["text"])
    assert any(text.strip().endswith("<image>") for text in cpt["text"])


def test_contrastive_rows_match_their_task_prompts(world):
    tasks = json.loads((world / "contrastive" / "tasks.json").read_text())
    assert set(tasks) >= {"text_pairs", "image_to_caption", "caption_to_image", "vqa", "document_retrieval"}
    assert sum(task["weight"] for task in tasks.values()) == pytest.approx(1.0, abs=1e-5)
    for name, task in tasks.items():
        dataset = load_from_disk(str(world / "contrastive" / name))
        assert dataset.column_names == ["query_text", "query_image", "pos_text", "pos_image", "neg_text", "neg_image"]
        for i, row in enumerate(dataset):
            where = f"task {name}, row {i}"
            assert task["query_prompt"].count("<image>") == (row["query_image"] is not None), where
            assert ("{text}" in task["query_prompt"]) == (row["query_text"] is not None), where
            assert task["document_prompt"].count("<image>") == (row["pos_image"] is not None), where
            assert ("{text}" in task["document_prompt"]) == (row["pos_text"] is not None), where
            # Negatives have the positive's modality: K entries on the positive's side, none on the other.
            assert len(row["neg_text"]) == (NUM_HARD_NEGATIVES if row["pos_text"] is not None else 0), where
            assert len(row["neg_image"]) == (NUM_HARD_NEGATIVES if row["pos_image"] is not None else 0), where


def test_contrastive_hard_negatives_differ_from_the_positive(world):
    tasks = json.loads((world / "contrastive" / "tasks.json").read_text())
    for name in tasks:
        dataset = _undecoded(load_from_disk(str(world / "contrastive" / name)))
        for i, row in enumerate(dataset):
            if row["pos_text"] is not None:
                assert row["pos_text"] not in row["neg_text"], (name, i)
            if row["pos_image"] is not None:
                negatives = {image["bytes"] for image in row["neg_image"]}
                assert row["pos_image"]["bytes"] not in negatives and len(negatives) == NUM_HARD_NEGATIVES, (name, i)


def test_held_out_combinations_never_appear_in_training_text(world):
    texts = list(load_from_disk(str(world / "cpt"))["text"])
    for name in json.loads((world / "contrastive" / "tasks.json").read_text()):
        dataset = load_from_disk(str(world / "contrastive" / name)).select_columns(
            ["query_text", "pos_text", "neg_text"]
        )
        for row in dataset:
            texts += [row["query_text"] or "", row["pos_text"] or "", *row["neg_text"]]
    corpus = "\n".join(texts).lower()
    for shape, colour in HELD_OUT_COMBOS:
        for words in (f"{colour} {shape}", f"{colour} {PLURALS[shape]}"):
            assert not re.search(rf"\b{words}\b", corpus), f"held-out {words!r} occurs in training text"


# ---------------------------------------------------------------------------------------------------------------
# MMEB layout


def test_mmeb_subsets_cover_every_category_in_and_out_of_domain(world):
    subsets = json.loads((world / "mmeb" / "subsets.json").read_text())
    assert {entry["category"] for entry in subsets.values()} == MMEB_CATEGORIES
    assert {entry["split"] for entry in subsets.values()} == {"IND", "OOD"}
    assert sorted(p.name for p in (world / "mmeb" / "data").iterdir() if p.is_dir()) == sorted(subsets)
    assert json.loads((world / "mmeb" / "data" / "subsets.json").read_text()) == subsets
    for subset, entry in subsets.items():
        table = _mmeb(world, subset).to_pylist()
        chance = sum(1 / len(row["tgt_text"]) for row in table) / len(table)
        assert entry["chance"] == pytest.approx(chance, abs=1e-6), subset


def test_mmeb_parquet_columns_and_image_paths(world):
    expected = pa.schema(
        [
            ("qry_text", pa.string()),
            ("qry_img_path", pa.string()),
            ("tgt_text", pa.list_(pa.string())),
            ("tgt_img_path", pa.list_(pa.string())),
        ]
    )
    for subset in json.loads((world / "mmeb" / "subsets.json").read_text()):
        table = _mmeb(world, subset)
        assert table.schema.equals(expected), subset
        for i, row in enumerate(table.to_pylist()):
            where = f"{subset} row {i}"
            assert row["qry_text"].count("<|image_1|>") == (row["qry_img_path"] != ""), where
            assert len(row["tgt_text"]) == len(row["tgt_img_path"]) >= 4, where
            paths = [row["qry_img_path"]] + row["tgt_img_path"]
            for text, path in zip(row["tgt_text"], row["tgt_img_path"]):
                assert text.count("<|image_1|>") == (path != ""), where
            for path in filter(None, paths):
                with _mmeb_image(world, path) as image:
                    image.load()
                    assert image.width % 28 == 0 and image.height % 28 == 0, (where, path)
            candidates = [
                (world / "mmeb" / "images" / path).read_bytes() if path else text
                for text, path in zip(row["tgt_text"], row["tgt_img_path"])
            ]
            assert len(set(candidates)) == len(candidates), f"{where}: candidates repeat"


def test_mmeb_positive_is_first(world):
    """The colour named by (or shown in) the first candidate is the query's: positives come first."""
    checked = 0
    for subset in ("ObjectClassification", "HeldOutObjectClassification", "ColorVQA", "ImageToCaption"):
        for row in _mmeb(world, subset).to_pylist():
            with _mmeb_image(world, row["qry_img_path"]) as image:
                assert _colours_in(image) == {_colour_word(row["tgt_text"][0])}, (subset, row["tgt_text"][0])
            checked += 1
    for subset in ("CaptionToImage", "HeldOutCaptionToImage", "TextToPage", "LabelGrounding"):
        for row in _mmeb(world, subset).to_pylist():
            query = row["qry_text"].split(":", 1)[-1]
            with _mmeb_image(world, row["tgt_img_path"][0]) as image:
                assert _colour_word(query) in _colours_in(image), (subset, query)
            checked += 1
    assert checked >= 8 * 4


def test_mmeb_held_out_subsets_use_held_out_combinations(world):
    for row in _mmeb(world, "HeldOutObjectClassification").to_pylist():
        colour, shape = row["tgt_text"][0].split()
        assert (shape, colour) in HELD_OUT_COMBOS
    for subset in ("HeldOutCaptionToImage", "HeldOutLabelGrounding", "HeldOutVQA"):
        rows = _mmeb(world, subset).to_pylist()
        assert rows, subset
        for row in rows:
            if subset != "HeldOutVQA":  # the query names a held-out object
                assert any(f"{c} {s}" in row["qry_text"] for s, c in HELD_OUT_COMBOS), (subset, row["qry_text"])
                continue
            # Each colour is held out with one shape: the scene's colour says which shape any question may name.
            with _mmeb_image(world, row["qry_img_path"]) as image:
                (colour,) = _colours_in(image)
            held_out_shape = next(s for s, c in HELD_OUT_COMBOS if c == colour)
            named = [s for s in PLURALS if re.search(rf"\b{s}", row["qry_text"].split(":", 1)[-1])]
            assert set(named) <= {held_out_shape}, (row["qry_text"], colour)


def test_vqa_training_and_evaluation_ask_where_objects_are(world):
    """Position questions are trained (VQA) and evaluated (PositionVQA), answered with the captions' phrases."""
    phrases = {"on the left", "on the right", "at the top", "at the bottom", "in the middle"}
    trained = load_from_disk(world / "contrastive" / "vqa")
    asked = [row["pos_text"] for row in trained.select_columns(["query_text", "pos_text"]) if "Where" in row["query_text"]]
    assert asked and set(asked) <= phrases
    for row in _mmeb(world, "PositionVQA").to_pylist():
        assert row["tgt_text"][0] in phrases and sorted(row["tgt_text"]) == sorted(phrases)


def test_classification_training_has_object_and_colour_labels(world):
    labels = load_from_disk(world / "contrastive" / "classification")["pos_text"]
    assert {len(text.split()) for text in labels} == {1, 2}  # "red" and "red circle"


# ---------------------------------------------------------------------------------------------------------------
# ViDoRe layout


def test_vidore_beir_layout_and_qrels(world, tmp_path):
    sets = sorted(p.name for p in (world / "vidore").iterdir())
    assert sets
    for name in sets:
        root = world / "vidore" / name
        corpus = pq.read_table(root / "corpus" / "test-00000-of-00001.parquet")
        queries = pq.read_table(root / "queries" / "test-00000-of-00001.parquet")
        qrels = pq.read_table(root / "qrels" / "test-00000-of-00001.parquet")
        assert corpus.schema.field("corpus-id").type == pa.int64()
        assert corpus.schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        assert queries.schema.field("query-id").type == pa.int64()
        assert queries.schema.field("query").type == pa.string()
        for column in ("query-id", "corpus-id", "score"):
            assert qrels.schema.field(column).type == pa.int64()
        corpus_ids = set(corpus["corpus-id"].to_pylist())
        query_text = dict(zip(queries["query-id"].to_pylist(), queries["query"].to_pylist()))
        assert len(corpus_ids) == corpus.num_rows and len(query_text) == queries.num_rows
        pages = Dataset.from_parquet(str(root / "corpus" / "test-00000-of-00001.parquet"), cache_dir=str(tmp_path))
        assert isinstance(pages.features["image"], Image)
        page_of = dict(zip(pages["corpus-id"], pages["image"]))
        best = {}
        for query_id, corpus_id, score in zip(*(qrels[c].to_pylist() for c in ("query-id", "corpus-id", "score"))):
            assert query_id in query_text and corpus_id in corpus_ids and score in (1, 2), (name, query_id)
            if score == 2:
                assert query_id not in best, f"{name}: query {query_id} has two fully relevant pages"
                best[query_id] = corpus_id
        assert set(best) == set(query_text)
        for query_id, corpus_id in best.items():
            assert _colour_word(query_text[query_id]) in _colours_in(page_of[corpus_id]), (name, query_id)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation apart from training


def test_no_evaluation_image_is_a_training_image(world):
    def digest(data):
        return hashlib.sha256(data).hexdigest()

    training = {
        digest(image["bytes"]) for image in _undecoded(load_from_disk(str(world / "cpt")))["images"] for image in image
    }
    for name in json.loads((world / "contrastive" / "tasks.json").read_text()):
        for row in _undecoded(load_from_disk(str(world / "contrastive" / name))):
            images = [row["query_image"], row["pos_image"], *row["neg_image"]]
            training |= {digest(image["bytes"]) for image in images if image is not None}
    # Object crops are left out: a crop shows one flat shape on a flat background, so the same crop can come from
    # two different scenes.
    evaluation = [
        path
        for subset in json.loads((world / "mmeb" / "subsets.json").read_text())
        for path in (world / "mmeb" / "images" / subset).iterdir()
        if subset not in CROP_SUBSETS or path.name.endswith("_query.png")
    ]
    shared = [str(path.relative_to(world)) for path in evaluation if digest(path.read_bytes()) in training]
    for name in (p.name for p in (world / "vidore").iterdir()):
        corpus = pq.read_table(world / "vidore" / name / "corpus" / "test-00000-of-00001.parquet")
        shared += [
            f"vidore/{name}/{i}"
            for i, image in enumerate(corpus["image"].to_pylist())
            if digest(image["bytes"]) in training
        ]
    assert len(evaluation) > 100
    assert not shared, f"evaluation images that are also training images: {shared[:5]}"


# ---------------------------------------------------------------------------------------------------------------
# With the real processor


def test_processor_accepts_cpt_rows_and_task_prompts(world, tiny_vlm_dir):
    from moca import MoCaProcessor, format_prompt

    processor = MoCaProcessor.from_pretrained(tiny_vlm_dir)
    cpt = load_from_disk(str(world / "cpt"))
    for text in cpt["text"]:
        n_tokens = len(processor.tokenizer(text.replace("<image>", ""))["input_ids"])
        assert n_tokens < 64, f"cpt row has {n_tokens} text tokens: {text!r}"

    sample = cpt.select(range(16))
    batch = processor(text=sample["text"], images=sample["images"])
    n_images = sum(len(images) for images in sample["images"])
    assert batch["image_grid_thw"].shape[0] == n_images
    expected_image_tokens = sum(processor.num_image_tokens(batch["image_grid_thw"]))
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == expected_image_tokens

    tasks = json.loads((world / "contrastive" / "tasks.json").read_text())
    for name, task in tasks.items():
        row = load_from_disk(str(world / "contrastive" / name))[0]
        query = processor(
            text=[format_prompt(task["query_prompt"], row["query_text"])],
            images=[[row["query_image"]] if row["query_image"] is not None else []],
        )
        document = processor(
            text=[format_prompt(task["document_prompt"], row["pos_text"])],
            images=[[row["pos_image"]] if row["pos_image"] is not None else []],
        )
        assert ("image_grid_thw" in query) == (row["query_image"] is not None), name
        assert ("image_grid_thw" in document) == (row["pos_image"] is not None), name
