"""mteb runs a MoCa model through `eval.mteb_moca` on tiny local image tasks (no download)."""

import datasets
import mteb
import pytest
import torch
import torch.nn.functional as F
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.mocks.mock_tasks.classification import MockImageClassificationTask
from PIL import Image

from eval.metrics import load_metric
from eval.mteb_moca import MoCaMTEBEncoder, batch_to_inputs
from moca.cli import DTYPES, resolve_dtype

QUERIES = ["quarterly revenue table", "a map of the sites", "board members", "water use per plant"]
PAGES = [Image.new("RGB", (56 + 28 * (i % 2), 84), (45 * i, 210 - 35 * i, 60 + 25 * i)) for i in range(6)]
RELEVANT = {"q0": {"p0": 2, "p3": 1}, "q1": {"p1": 1}, "q2": {"p2": 1, "p4": 2, "p5": 1}, "q3": {"p5": 1}}


class TinyPageRetrieval(AbsTaskRetrieval):
    metadata = TaskMetadata(
        name="TinyPageRetrieval",
        description="Text queries retrieving page images, made up for testing.",
        reference="https://example.org/tiny",
        dataset={"path": "local/tiny-page-retrieval", "revision": "1"},
        type="Any2AnyRetrieval",
        category="t2i",
        modalities=["text", "image"],
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score="ndcg_at_5",
        date=("2025-01-01", "2025-01-02"),
        domains=[],
        task_subtypes=[],
        license="cc-by-4.0",
        annotations_creators="derived",
        dialect=[],
        sample_creation="found",
        bibtex_citation="",
    )

    def load_data(self, **kwargs):
        split = RetrievalSplitData(
            queries=datasets.Dataset.from_dict({"id": [f"q{i}" for i in range(len(QUERIES))], "text": QUERIES}),
            corpus=datasets.Dataset.from_dict({"id": [f"p{i}" for i in range(len(PAGES))], "image": PAGES}),
            relevant_docs=RELEVANT,
            top_ranked=None,
        )
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True


class TinyDocumentRetrieval(TinyPageRetrieval):
    metadata = TinyPageRetrieval.metadata.model_copy(update={"name": "TinyDocumentRetrieval", "type": "DocumentUnderstanding"})


# The release's prompts spelled in the backbone's own tokens: an image document, and a document page (ViDoRe).
RELEASE_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>Represent the given image.\n"
RELEASE_PAGE = "<|vision_start|><|image_pad|><|vision_end|>\nRepresent the given document image."


@pytest.mark.parametrize("task, page_prompt", [(TinyPageRetrieval, RELEASE_IMAGE), (TinyDocumentRetrieval, RELEASE_PAGE)])
def test_mteb_retrieval_scores_equal_raw_queries_against_prompted_pages(tiny_moca, task, page_prompt):
    model = tiny_moca[0]
    results = mteb.evaluate(
        MoCaMTEBEncoder("local/tiny-moca", model=model), task(), cache=None, show_progress_bar=False
    )
    scores = results.task_results[0].scores["test"][0]

    pages = model.encode([{"text": page_prompt, "image": page} for page in PAGES])
    similarity = F.normalize(model.encode(QUERIES), dim=-1) @ F.normalize(pages, dim=-1).T
    relevance = torch.zeros(len(QUERIES), len(PAGES), dtype=torch.long)
    for query, pages in RELEVANT.items():
        for page, grade in pages.items():
            relevance[int(query[1:]), int(page[1:])] = grade
    expected = load_metric("retrieval_scores").compute(
        predictions=similarity.tolist(), references=relevance.tolist(), k_values=[1, 5]
    )
    # mteb rounds its scores to 5 decimals.
    for name in ("ndcg_at_1", "ndcg_at_5", "recall_at_1", "recall_at_5"):
        assert scores[name] == pytest.approx(expected[name], abs=1e-5), name
    assert scores["main_score"] == scores["ndcg_at_5"]


class Spy:
    """The model, recording which encode method saw which kinds of input."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode(self, inputs, prompt_name=None, **kwargs):
        kinds = {("text" if item["text"] else "") + ("+image" if item["image"] is not None else "") for item in inputs}
        self.calls.append((prompt_name, tuple(sorted(kinds))))
        return self.model.encode(inputs, prompt_name=prompt_name, **kwargs)


def test_each_modality_gets_its_release_prompt(tiny_moca):
    spy = Spy(tiny_moca[0])
    mteb.evaluate(MoCaMTEBEncoder("local/tiny-moca", model=spy), TinyDocumentRetrieval(), cache=None, show_progress_bar=False)
    assert set(spy.calls) == {(None, ("text",)), ("document_page", ("+image",))}

    spy.calls.clear()
    results = mteb.evaluate(
        MoCaMTEBEncoder("local/tiny-moca", model=spy),
        MockImageClassificationTask(),
        cache=None,
        show_progress_bar=False,
    )
    assert spy.calls and set(spy.calls) == {("image", ("+image",))}
    assert "accuracy" in results.task_results[0].scores["test"][0]


def test_a_mixed_batch_keeps_its_order_and_gives_image_questions_their_prompt(tiny_moca):
    model = tiny_moca[0]
    encoder = MoCaMTEBEncoder("local/tiny-moca", model=model)
    batch = {"text": ["what colour is it?", "a plain query", None], "image": [PAGES[0], None, PAGES[1]]}
    got = torch.from_numpy(encoder.encode([batch], task_metadata=TinyPageRetrieval.metadata, hf_split="test", hf_subset="default"))
    question = "<|vision_start|><|image_pad|><|vision_end|>Represent the given image with the following question: what colour is it?\n"
    expected = torch.cat([
        model.encode([{"text": question, "image": PAGES[0]}]),
        model.encode(["a plain query"]),
        model.encode([{"text": RELEASE_IMAGE, "image": PAGES[1]}]),
    ])  # fmt: skip
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_batches_become_moca_inputs():
    rgba = Image.new("RGBA", (28, 28))
    inputs = batch_to_inputs({"text": ["a", ""], "image": [rgba, [rgba, rgba]]})
    assert inputs[0]["text"] == "a" and inputs[0]["image"].mode == "RGB"
    assert inputs[1]["text"] is None and [image.mode for image in inputs[1]["image"]] == ["RGB", "RGB"]
    assert batch_to_inputs({"text": ["only text"]}) == [{"text": "only text", "image": None}]
    assert batch_to_inputs({"image": [rgba]})[0]["text"] is None


def test_the_encoder_loads_a_checkpoint_by_name(tiny_moca, tmp_path):
    tiny_moca[0].save_pretrained(tmp_path)
    # The default dtype is the hardware's: bfloat16 on a CPU that computes it natively (AMX / AVX512-BF16), float32
    # elsewhere; the numerical comparison below asks for float32, so it holds on either kind of machine.
    auto = MoCaMTEBEncoder(str(tmp_path), device="cpu")
    assert auto.model.dtype == DTYPES[resolve_dtype(None, torch.device("cpu"))]
    encoder = MoCaMTEBEncoder(str(tmp_path), device="cpu", dtype="float32")
    meta = encoder.mteb_model_meta
    assert meta.name == str(tmp_path) and meta.embed_dim == tiny_moca[0].config.hidden_size
    assert meta.modalities == ["image", "text"] and meta.similarity_fn_name == "cosine"
    torch.testing.assert_close(
        encoder.model.encode_documents(PAGES), tiny_moca[0].encode_documents(PAGES), atol=1e-5, rtol=0
    )


@pytest.mark.torchvision  # mteb's loader checks its "image" extra, which needs torchvision
def test_registered_checkpoint_loads_through_mteb_get_model(tiny_moca, tmp_path):
    from eval.mteb_moca import register_moca_model

    model = tiny_moca[0]
    model.save_pretrained(tmp_path / "ckpt")
    name = str(tmp_path / "ckpt")
    meta = register_moca_model(name, license="mit")
    assert mteb.get_model_meta(name) is meta and meta.embed_dim == model.config.hidden_size and meta.license == "mit"
    loaded = mteb.get_model(name, dtype="float32")
    assert isinstance(loaded, MoCaMTEBEncoder) and loaded.model.config.prompts == model.config.prompts
    scores = mteb.evaluate(loaded, TinyDocumentRetrieval(), cache=None, show_progress_bar=False).task_results[0]
    direct = mteb.evaluate(MoCaMTEBEncoder("local/tiny-moca", model=model), TinyDocumentRetrieval(), cache=None,
                           show_progress_bar=False).task_results[0]  # fmt: skip
    assert scores.scores["test"][0]["ndcg_at_5"] == pytest.approx(direct.scores["test"][0]["ndcg_at_5"], abs=1e-5)
    with pytest.raises(ValueError, match="not a MoCa checkpoint"):
        register_moca_model(str(tmp_path / "ckpt" / "1_Pooling"))
