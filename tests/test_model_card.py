"""Model cards: Hub metadata that parses, usage snippets that run, and push_to_hub uploading everything."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard
from transformers import TrainingArguments

from eval.mmeb import summarize, write_mmeb_results
from eval.vidore import write_vidore_results
from moca.model_card import write_model_card


@pytest.fixture(scope="module")
def moca_checkpoint(tiny_moca, tmp_path_factory):
    model, _ = tiny_moca
    folder = tmp_path_factory.mktemp("moca_card") / "checkpoint"
    model.save_pretrained(folder)
    return folder


def _eval_folder(folder: Path, imagenet: float = 0.5, chartqa: float = 0.25, esg_ndcg_at_5: float = 0.6123) -> Path:
    """Result files as eval.mmeb and eval.vidore write them."""
    per_subset = {
        "ImageNet-1K": {
            "precision_at_1": imagenet,
            "num_rows": 4,
            "num_inputs": 8,
            "category": "Classification",
            "split": "IND",
        },
        "ChartQA": {"precision_at_1": chartqa, "num_rows": 4, "num_inputs": 8, "category": "VQA", "split": "OOD"},
    }
    mmeb = {
        "benchmark": "MMEB",
        "model": "tiny",
        "metric": "precision_at_1",
        "subsets": per_subset,
        **summarize(per_subset),
    }
    write_mmeb_results(folder, mmeb)
    scores = {
        "ndcg_at_5": esg_ndcg_at_5,
        "ndcg_at_10": 0.7,
        "recall_at_1": 0.3,
        "recall_at_5": 0.6,
        "recall_at_10": 0.8,
        "num_queries": 5,
    }
    vidore = {
        "benchmark": "ViDoRe-v2",
        "model": "tiny",
        "metric": "ndcg_at_5",
        "datasets": {"vidore/esg_reports_v2": scores},
        "average": {k: v for k, v in scores.items() if k != "num_queries"},
    }
    write_vidore_results(folder, vidore)
    return folder


def _expected_card_numbers(imagenet: float = 0.5, chartqa: float = 0.25, esg_ndcg_at_5: float = 0.6123) -> dict:
    """What the card must show for the inputs of `_eval_folder`, worked out by hand: percentages rounded to
    2 decimals in the model-index and shown with 1 decimal in the tables. One subset per category and split, so
    each category / split mean is that subset's value; the overall MMEB score is the mean of the two subsets."""
    overall = (imagenet + chartqa) / 2
    return {
        "model-index": {
            ("MMEB (overall)", "precision_at_1"): round(100 * overall, 2),
            ("MMEB ImageNet-1K", "precision_at_1"): round(100 * imagenet, 2),
            ("MMEB ChartQA", "precision_at_1"): round(100 * chartqa, 2),
            ("ViDoRe-v2 esg_reports_v2", "ndcg_at_5"): round(100 * esg_ndcg_at_5, 2),
        },
        "MMEB table": {
            "Overall": f"{100 * overall:.1f}",
            "Classification": f"{100 * imagenet:.1f}",
            "VQA": f"{100 * chartqa:.1f}",
            "Retrieval": "-",
            "Visual Grounding": "-",
            "IND": f"{100 * imagenet:.1f}",
            "OOD": f"{100 * chartqa:.1f}",
        },
        "ViDoRe table": {
            "vidore/esg_reports_v2": f"{100 * esg_ndcg_at_5:.1f}",
            "Average": f"{100 * esg_ndcg_at_5:.1f}",
        },
    }


def _table_after(text: str, title: str) -> list[list[str]]:
    """The rows (header first, separator dropped) of the markdown table that follows `title` in `text`."""
    block = text.split(title, 1)[1].lstrip("\n").split("\n\n", 1)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in block.splitlines()]
    assert rows and set(rows[1]) == {"---"}, block
    return [rows[0], *rows[2:]]


def _card_numbers(text: str) -> dict:
    """The evaluation numbers a card states: its model-index (parsed from the YAML) and its two tables."""
    eval_results = ModelCard(text, ignore_metadata_errors=False).data.eval_results or []
    header, *mmeb_rows = _table_after(text, "MMEB, Precision@1 (%):")
    assert len(mmeb_rows) == 1
    _, *vidore_rows = _table_after(text, "ViDoRe-v2, nDCG@5 (%):")
    return {
        "model-index": {(r.dataset_name, r.metric_type): r.metric_value for r in eval_results},
        "MMEB table": dict(zip(header, mmeb_rows[0], strict=True)),
        "ViDoRe table": {name: value for name, value in vidore_rows},
    }


def _mismatches(found: dict, expected: dict) -> list:
    """(section, key, found, expected) for every number that differs, is missing or is extra (abs tol 1e-9)."""
    wrong = []
    for section, values in expected.items():
        for key in values.keys() | found[section].keys():
            a, b = found[section].get(key), values.get(key)
            same = a == b if not isinstance(b, float) or a is None else abs(a - b) < 1e-9
            if not same:
                wrong.append((section, key, a, b))
    return sorted(wrong, key=str)


def test_card_metadata_parses_with_model_index(moca_checkpoint, tmp_path):
    training_args = TrainingArguments(
        output_dir=str(tmp_path / "run"), learning_rate=2e-5, hub_token="hf_secret", seed=7
    )
    write_model_card(
        moca_checkpoint,
        tmp_path / "card",
        model_id="someone/moca-tiny",
        base_model="Qwen/Qwen2.5-VL-3B-Instruct",
        datasets=["moca-embed/MoCa-CL-Pairs"],
        training_args=training_args,
        eval_results=_eval_folder(tmp_path / "eval"),
    )
    text = (tmp_path / "card" / "README.md").read_text()
    card = ModelCard.load(tmp_path / "card" / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "feature-extraction"
    assert {"moca", "multimodal-embedding", "sentence-transformers"} <= set(data.tags)
    assert data.base_model == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert data.datasets == ["moca-embed/MoCa-CL-Pairs"]
    # Every number of the model-index and of both tables is the input's, and there is no other.
    numbers = _card_numbers(text)
    assert _mismatches(numbers, _expected_card_numbers()) == []
    assert numbers["model-index"][("ViDoRe-v2 esg_reports_v2", "ndcg_at_5")] == 61.23  # spelled out once
    assert numbers["MMEB table"]["Overall"] == "37.5" and numbers["ViDoRe table"]["Average"] == "61.2"
    assert "| `learning_rate` | `2e-05` |" in text and "| `seed` | `7` |" in text
    assert "hf_secret" not in text and str(tmp_path) not in text
    assert "someone/moca-tiny" in text and "@article{chen2025moca" in text


def test_a_wrong_eval_value_in_the_card_is_caught(moca_checkpoint, tmp_path):
    # Cards written from slightly different results do not pass the comparison with the original inputs.
    write_model_card(moca_checkpoint, tmp_path / "card", eval_results=_eval_folder(tmp_path / "eval", chartqa=0.26))
    numbers = _card_numbers((tmp_path / "card" / "README.md").read_text())
    assert _mismatches(numbers, _expected_card_numbers(chartqa=0.26)) == []
    wrong = {(section, key) for section, key, _, _ in _mismatches(numbers, _expected_card_numbers())}
    assert wrong == {
        ("model-index", ("MMEB (overall)", "precision_at_1")),
        ("model-index", ("MMEB ChartQA", "precision_at_1")),
        ("MMEB table", "Overall"),
        ("MMEB table", "VQA"),
        ("MMEB table", "OOD"),
    }
    # A change in the fourth decimal shows in the 2-decimal model-index, not in the 1-decimal table.
    write_model_card(
        moca_checkpoint, tmp_path / "card2", eval_results=_eval_folder(tmp_path / "eval2", esg_ndcg_at_5=0.6124)
    )
    numbers = _card_numbers((tmp_path / "card2" / "README.md").read_text())
    assert _mismatches(numbers, _expected_card_numbers()) == [
        ("model-index", ("ViDoRe-v2 esg_reports_v2", "ndcg_at_5"), 61.24, 61.23)
    ]


def test_save_pretrained_writes_a_card_whose_snippets_run(moca_checkpoint, tiny_moca, tmp_path):
    text = (moca_checkpoint / "README.md").read_text()
    assert ModelCard.load(moca_checkpoint / "README.md").data.library_name == "transformers"
    snippets = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(snippets) == 2 and "AutoModel" in snippets[0] and "SentenceTransformer" in snippets[1]
    # Each snippet runs as written (the checkpoint path is its model id), in one fresh process outside the repo.
    runner = "import sys\nfor path in sys.argv[1:]:\n    exec(compile(open(path).read(), path, 'exec'), {'__name__': '__main__'})\n"
    paths = []
    for number, snippet in enumerate(snippets):
        paths.append(tmp_path / f"snippet_{number}.py")
        paths[-1].write_text(snippet)
    result = subprocess.run(
        [sys.executable, "-c", runner, *map(str, paths)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Each snippet prints the 1 x 3 matrix of cosine similarities of the query with the three documents: the
    # values computed here with the same checkpoint and inputs (torch prints 4 significant decimals: atol 2e-4).
    namespace = {}
    documents_literal = re.search(r"^documents = (\[.*?^\])$", snippets[0], flags=re.S | re.M).group(1)
    exec("from PIL import Image\ndocuments = " + documents_literal, namespace)
    assert 'encode_queries(["a red circle"])' in snippets[0] and 'encode_query(["a red circle"])' in snippets[1]
    model = type(tiny_moca[0]).from_pretrained(moca_checkpoint).eval()
    expected = (model.encode_queries(["a red circle"]) @ model.encode_documents(namespace["documents"]).T)[0]
    assert expected.abs().max() <= 1 + 1e-6 and expected.max() - expected.min() > 1e-3  # cosines, not all equal
    printed = [float(v) for v in re.findall(r"-?\d+\.\d+(?:e[+-]?\d+)?", result.stdout)]
    assert len(printed) == 6, result.stdout
    for row in (printed[:3], printed[3:]):
        assert max(abs(a - b) for a, b in zip(row, expected.tolist())) < 2e-4, (row, expected.tolist())


def test_push_to_hub_uploads_weights_code_processor_card(tiny_moca, monkeypatch):
    model, _ = tiny_moca
    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        from huggingface_hub import RepoUrl

        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, repo_id, folder_path, **kwargs):  # what would go over the network
        for path in Path(folder_path).rglob("*"):
            if path.is_file():
                uploaded[str(path.relative_to(folder_path))] = path.read_bytes()
        uploaded["repo_id"] = repo_id

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model.push_to_hub("someone/moca-tiny", tags=["my-tag"], datasets=["moca-embed/MoCa-CL-Pairs"])

    expected = {
        "model.safetensors",
        "config.json",
        "configuration_moca.py",
        "modeling_moca.py",
        "processing_moca.py",
        "model_card.py",
        "processor_config.json",
        "chat_template.jinja",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
        "2_Normalize/config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "modules.json",
        "config_sentence_transformers.json",
        "README.md",
    }
    assert expected <= set(uploaded), expected - set(uploaded)
    assert uploaded["repo_id"] == "someone/moca-tiny"
    card = uploaded["README.md"].decode()
    assert "my-tag" in ModelCard(card, ignore_metadata_errors=False).data.tags
    assert 'AutoModel.from_pretrained("someone/moca-tiny", trust_remote_code=True)' in card
    assert "my-tag" in card and "moca-embed/MoCa-CL-Pairs" in card
