"""ViDoRe-v2 evaluation on a tiny MoCa model and tiny BEIR-layout data sets written here."""

import io
import json
from pathlib import Path

import datasets
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eval.encoding import EmbeddingCache, model_fingerprint
from eval.metrics import load_metric
from eval.vidore import ViDoReDataError, evaluate_vidore

QUERIES = ["revenue in 2023", "emissions per site", "board diversity", "water use", "a question nobody labelled"]
# (query-id, corpus-id, score): several relevant pages per query, graded; query 4 has no relevant page.
QRELS = [(0, 10, 2), (0, 11, 1), (1, 12, 1), (2, 13, 2), (2, 10, 1), (2, 15, 1), (3, 14, 1)]


def page(i: int) -> Image.Image:
    return Image.new("RGB", (56 + 28 * (i % 2), 84), (40 * i, 200 - 30 * i, 90 + 20 * i))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_vidore_set(folder: Path, with_datasets_features: bool) -> Path:
    """`corpus`, `queries`, `qrels` parquet files; the corpus image as `datasets`' Image type or as a plain struct."""
    for config in ("corpus", "queries", "qrels"):
        (folder / config).mkdir(parents=True)
    corpus = {"corpus-id": list(range(10, 16)), "image": [page(i) for i in range(6)]}
    if with_datasets_features:
        datasets.Dataset.from_dict(corpus).to_parquet(folder / "corpus" / "test-00000-of-00001.parquet")
    else:
        images = [{"bytes": png_bytes(image), "path": None} for image in corpus["image"]]
        pd.DataFrame({"corpus-id": corpus["corpus-id"], "image": images}).to_parquet(
            folder / "corpus" / "test-00000-of-00001.parquet"
        )
    pd.DataFrame({"query-id": range(len(QUERIES)), "query": QUERIES}).to_parquet(
        folder / "queries" / "test-00000-of-00001.parquet"
    )
    pd.DataFrame(QRELS, columns=["query-id", "corpus-id", "score"]).to_parquet(
        folder / "qrels" / "test-00000-of-00001.parquet"
    )
    return folder


class Recorder:
    """The model, counting the queries and pages it encodes."""

    def __init__(self, model):
        self.model, self.encoded = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode(self, inputs, **kwargs):
        self.encoded += len(inputs)
        return self.model.encode(inputs, **kwargs)


@pytest.fixture(scope="module")
def vidore_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("vidore")
    return [write_vidore_set(root / "esg_tiny", True), write_vidore_set(root / "bio_tiny", False)]


def test_scores_equal_those_from_model_encode_and_a_rerun_encodes_nothing(tiny_moca, vidore_sets, tmp_path):
    model = tiny_moca[0]
    recorder = Recorder(model)
    names = [str(folder) for folder in vidore_sets]
    results = evaluate_vidore(recorder, tmp_path, datasets=names, batch_size=4)
    # Each data set has a cache folder of its own: both are encoded, 5 queries and 6 pages each.
    assert recorder.encoded == 2 * (len(QUERIES) + 6)

    # By hand, as the release's ViDoRe retriever does: raw query text, and its page prompt spelled in the
    # backbone's own tokens.
    queries = model.encode(QUERIES)
    release_page = "<|vision_start|><|image_pad|><|vision_end|>\nRepresent the given document image."
    pages = model.encode([{"text": release_page, "image": page(i)} for i in range(6)])
    scores = F.normalize(queries, dim=-1) @ F.normalize(pages, dim=-1).T
    relevance = torch.zeros(len(QUERIES), 6, dtype=torch.long)
    for query_id, corpus_id, score in QRELS:
        relevance[query_id, corpus_id - 10] = score
    expected = load_metric("retrieval_scores").compute(
        predictions=scores.tolist(), references=relevance.tolist(), k_values=[1, 5, 10]
    )
    for name in names:
        got = results["datasets"][name]
        assert got["num_queries"] == 4 and got["num_documents"] == 6
        for key in ("ndcg_at_1", "ndcg_at_5", "ndcg_at_10", "recall_at_1", "recall_at_5", "recall_at_10"):
            assert got[key] == pytest.approx(expected[key], abs=1e-6), (name, key)
        cache = EmbeddingCache(tmp_path / "embedding_cache" / model_fingerprint(model))
        cached_queries = torch.stack(list(cache.load(f"vidore/{Path(name).name}/queries").values()))
        torch.testing.assert_close(cached_queries, queries, atol=1e-5, rtol=0)
        cached_pages = torch.stack(list(cache.load(f"vidore/{Path(name).name}/documents").values()))
        torch.testing.assert_close(cached_pages, pages, atol=1e-5, rtol=0)
    assert results["average"]["ndcg_at_5"] == pytest.approx(expected["ndcg_at_5"], abs=1e-6)

    written = json.loads((tmp_path / "vidore_results.json").read_text())
    assert written == results
    assert "| Average |" in (tmp_path / "vidore_results.md").read_text()
    assert (tmp_path / "vidore_results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rerun = Recorder(model)
    assert evaluate_vidore(rerun, tmp_path, datasets=names, batch_size=4) == results
    assert rerun.encoded == 0


def test_a_query_prompt_given_is_applied_and_cached_apart(tiny_moca, vidore_sets, tmp_path):
    model = tiny_moca[0]
    name = str(vidore_sets[0])
    default = evaluate_vidore(model, tmp_path / "a", datasets=[name])
    prompt = "Retrieve the page that answers: {text}\n"
    prompted = evaluate_vidore(model, tmp_path / "b", datasets=[name], query_prompt=prompt)
    fingerprint = model_fingerprint(model)
    stored = EmbeddingCache(tmp_path / "b" / "embedding_cache" / fingerprint).load(f"vidore/{Path(name).name}/queries")
    torch.testing.assert_close(
        torch.stack(list(stored.values())), model.encode(QUERIES, prompt=prompt), atol=1e-5, rtol=0
    )
    assert not torch.allclose(model.encode(QUERIES, prompt=prompt), model.encode(QUERIES), atol=1e-3)
    assert default != prompted
    assert default["datasets"][name]["num_queries"] == prompted["datasets"][name]["num_queries"] == 4


def test_bad_qrels_and_queries_name_dataset_config_row_and_field(tiny_moca, tmp_path):
    folder = write_vidore_set(tmp_path / "bad", True)
    qrels = folder / "qrels" / "test-00000-of-00001.parquet"
    pd.DataFrame([(0, 10, 1), (1, 99, 1)], columns=["query-id", "corpus-id", "score"]).to_parquet(qrels)
    with pytest.raises(ViDoReDataError, match=r"config 'qrels', row 1, field 'corpus-id': 99 is not in the corpus"):
        evaluate_vidore(tiny_moca[0], tmp_path / "out", datasets=[str(folder)])
    pd.DataFrame([(0, 10, 0)], columns=["query-id", "corpus-id", "score"]).to_parquet(qrels)
    with pytest.raises(ViDoReDataError, match=r"config 'qrels': no query has a relevant document"):
        evaluate_vidore(tiny_moca[0], tmp_path / "out", datasets=[str(folder)])
    pd.DataFrame([(7, 10, 1)], columns=["query-id", "corpus-id", "score"]).to_parquet(qrels)
    with pytest.raises(ViDoReDataError, match=r"row 0, field 'query-id': 7 is not in the queries"):
        evaluate_vidore(tiny_moca[0], tmp_path / "out", datasets=[str(folder)])
    pd.DataFrame({"query-id": [0, 1], "query": ["fine", ""]}).to_parquet(
        folder / "queries" / "test-00000-of-00001.parquet"
    )
    with pytest.raises(ViDoReDataError, match=r"config 'queries', row 1, field 'query'"):
        evaluate_vidore(tiny_moca[0], tmp_path / "out", datasets=[str(folder)])
    pd.DataFrame({"query-id": [0, 1, 0], "query": ["a", "b", "c"]}).to_parquet(
        folder / "queries" / "test-00000-of-00001.parquet"
    )
    with pytest.raises(ViDoReDataError, match=r"config 'queries', row 2, field 'query-id': 0 repeats row 0"):
        evaluate_vidore(tiny_moca[0], tmp_path / "out", datasets=[str(folder)])
    pd.DataFrame({"corpus-id": [10]}).to_parquet(folder / "corpus" / "test-00000-of-00001.parquet")
    with pytest.raises(ViDoReDataError, match=r"config 'corpus': column\(s\) \['image'\] missing"):
        evaluate_vidore(tiny_moca[0], tmp_path / "out", datasets=[str(folder)])


def test_the_command_line_loads_a_saved_checkpoint_and_gives_the_same_scores(tiny_moca, vidore_sets, tmp_path):
    from eval.vidore import main

    checkpoint = tmp_path / "checkpoint"
    tiny_moca[0].save_pretrained(checkpoint)
    name = str(vidore_sets[0])
    # float32 as in the process (the default, auto, is bf16 on CPUs with AMX or AVX-512-BF16)
    from_cli = main(["--model_name_or_path", str(checkpoint), "--output_dir", str(tmp_path / "cli"), "--dataset", name,
                     "--dtype", "float32"])  # fmt: skip
    in_process = evaluate_vidore(tiny_moca[0], tmp_path / "in_process", datasets=[name])
    assert from_cli["model"] == str(checkpoint)
    for key, value in in_process["datasets"][name].items():
        assert from_cli["datasets"][name][key] == pytest.approx(value, abs=1e-6), key
