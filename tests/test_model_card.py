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


def _eval_folder(folder: Path) -> Path:
    """Result files as eval.mmeb and eval.vidore write them."""
    per_subset = {
        "ImageNet-1K": {
            "precision_at_1": 0.5,
            "num_rows": 4,
            "num_inputs": 8,
            "category": "Classification",
            "split": "IND",
        },
        "ChartQA": {"precision_at_1": 0.25, "num_rows": 4, "num_inputs": 8, "category": "VQA", "split": "OOD"},
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
        "ndcg_at_5": 0.6123,
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
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in data.eval_results}
    assert results[("MMEB (overall)", "precision_at_1")] == 37.5
    assert results[("MMEB ChartQA", "precision_at_1")] == 25.0
    assert results[("ViDoRe-v2 esg_reports_v2", "ndcg_at_5")] == 61.23
    assert "| `learning_rate` | `2e-05` |" in text and "| `seed` | `7` |" in text
    assert "hf_secret" not in text and str(tmp_path) not in text
    assert "someone/moca-tiny" in text and "@article{chen2025moca" in text


def test_save_pretrained_writes_a_card_whose_snippets_run(moca_checkpoint, tmp_path):
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
    printed = re.findall(r"-?\d+\.\d+", result.stdout)
    assert len(printed) >= 6  # a 1 x 3 score matrix from each snippet


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
        "sentence_transformers_moca.py",
        "processor_config.json",
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
