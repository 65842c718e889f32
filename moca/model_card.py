"""Model cards (README.md with Hub metadata) for MoCa checkpoints.

Copied into every checkpoint with the other remote-code files: `MoCaModel.save_pretrained` writes a default
card wherever it runs, and `push_to_hub` writes one for the repository it uploads to.
"""

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .configuration_moca import nested_config_dict


MMEB_DATASET = "TIGER-Lab/MMEB-eval"
CARD_TAGS = [
    "moca",
    "multimodal-embedding",
    "sentence-transformers",
    "feature-extraction",
    "sentence-similarity",
    "vision-language",
    "retrieval",
]
# Always shown when a `TrainingArguments` (or another dataclass) is given; other fields only when changed.
KEY_HYPERPARAMETERS = (
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "warmup_ratio",
    "warmup_steps",
    "lr_scheduler_type",
    "weight_decay",
    "optim",
    "bf16",
    "seed",
)
# Never written into a card: secrets and machine-local paths.
_PRIVATE_WORDS = ("token", "dir", "path", "hub_", "report_to", "logging_", "push_to_hub", "resume")

CITATION = """@article{chen2025moca,
  title   = {MoCa: Modality-aware Continual Pre-training Makes Better Bidirectional Multimodal Embeddings},
  author  = {Chen, Haonan and Liu, Hong and Luo, Yuping and Wang, Liang and Yang, Nan and Wei, Furu and Dou, Zhicheng},
  journal = {arXiv preprint arXiv:2506.23115},
  year    = {2025}
}"""


def write_model_card(
    model_or_dir,
    output_dir=None,
    *,
    model_id: str | None = None,
    base_model: str | None = None,
    datasets: Sequence[str] | None = None,
    training_args=None,
    eval_results=None,
    tags: Sequence[str] | None = None,
    license: str | None = None,
) -> ModelCard:
    """Write `README.md` for a MoCa checkpoint and return the card.

    Args:
        model_or_dir: a `MoCaModel` or the folder of a saved checkpoint.
        output_dir: where README.md goes (default: `model_or_dir` when it is a folder).
        model_id: the name the usage snippets load (a Hub repository id; default: the output folder).
        base_model: Hub id of the backbone (default: the backbone's name when it looks like a Hub id).
        datasets: Hub ids of the training data sets.
        training_args: a dict or a dataclass (e.g. `TrainingArguments`, or a list of them for several stages)
            shown as the training hyperparameters; tokens and local paths are left out.
        eval_results: results of `eval.mmeb` / `eval.vidore` (the dicts of `mmeb_results.json` /
            `vidore_results.json`), a list of them, or a folder holding those files; they become the card's
            `model-index` and a table.
    """
    config = _config_dict(model_or_dir)
    if output_dir is None:
        if not isinstance(model_or_dir, (str, Path)):
            raise ValueError("write_model_card needs output_dir when given a model.")
        output_dir = model_or_dir
    output_dir = Path(output_dir)
    model_id = model_id or str(output_dir)
    vlm_config = config.get("vlm_config") or {}
    base_model = base_model or _hub_id_or_none(vlm_config.get("_name_or_path"))
    results = _load_eval_results(eval_results)
    hyperparameters = _hyperparameter_tables(training_args)

    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="feature-extraction",
        tags=list(dict.fromkeys([*CARD_TAGS, vlm_config.get("model_type", "qwen2_5_vl"), *(tags or [])])),
        base_model=base_model,
        datasets=list(datasets) if datasets else None,
        license=license,
        model_name=Path(model_id).name,
        eval_results=_model_index(results) or None,
    )
    sections = [
        f"# {Path(model_id).name}",
        _description(config, model_or_dir, base_model),
        "## Usage",
        _usage(model_id),
        *(_results_section(results) if results else []),
        *(["## Training hyperparameters", *hyperparameters] if hyperparameters else []),
        "## Citation",
        f"```bibtex\n{CITATION}\n```",
    ]
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
    output_dir.mkdir(parents=True, exist_ok=True)
    card.save(output_dir / "README.md")
    return card


def _config_dict(model_or_dir) -> dict:
    """The config as `MoCaConfig`'s nested dict (`vlm_config` holds the backbone), of either checkpoint layout."""
    if isinstance(model_or_dir, (str, Path)):
        return nested_config_dict(json.loads((Path(model_or_dir) / "config.json").read_text()))
    config = model_or_dir.config.to_dict()
    config["vlm_config"]["_name_or_path"] = model_or_dir.config.vlm_config._name_or_path
    return config


def _hub_id_or_none(name: str | None) -> str | None:
    """A backbone name is a Hub id when it is `owner/name` and no local folder (the card must not leak paths)."""
    if not name or Path(name).exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        return None
    return name


def _description(config: dict, model_or_dir, base_model: str | None) -> str:
    text_config = (config.get("vlm_config") or {}).get("text_config") or {}
    hidden_size = text_config.get("hidden_size")
    backbone = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a vision-language model"
    size = ""
    if not isinstance(model_or_dir, (str, Path)):
        size = f" ({sum(p.numel() for p in model_or_dir.parameters()) / 1e6:,.1f}M parameters)"
    lines = [
        f"A **MoCa** bidirectional multimodal embedding model{size} built on {backbone}, following "
        "[MoCa: Modality-aware Continual Pre-training Makes Better Bidirectional Multimodal Embeddings]"
        "(https://arxiv.org/abs/2506.23115). It embeds texts, images and interleaved text+image documents into "
        "one vector space for search and retrieval.",
        "",
        f"- Embedding size: {hidden_size}; {config.get('pooling', 'mean')} pooling over all tokens"
        + ("; L2-normalised (cosine similarity = dot product)" if config.get("normalize", True) else ""),
        f"- Attention: {'bidirectional' if config.get('bidirectional', True) else 'causal'}",
        f"- Query prompt: `{json.dumps(config.get('query_prompt'))}`; document prompt: "
        f"`{json.dumps(config.get('document_prompt'))}` (`{{text}}` is replaced by the input; null: none)",
    ]
    if config.get("prompts"):
        lines.append("- Named prompts (`prompt_name=` in `encode` and sentence-transformers; `<image>` marks the image):")
        lines += [f"  - `{name}`: `{json.dumps(prompt)}`" for name, prompt in config["prompts"].items()]
    if config.get("matryoshka_dims"):
        lines.append(f"- Matryoshka dimensions (use `truncate_dim`): {config['matryoshka_dims']}")
    return "\n".join(lines)


def _usage(model_id: str) -> str:
    name = json.dumps(model_id)
    documents = """[
    Image.new("RGB", (448, 448), "red"),                              # an image (a PIL image or a file path)
    "A red circle on a white background.",                            # a text
    {"text": "Page 3 of the report <image>", "image": Image.new("RGB", (448, 448), "white")},  # interleaved
]"""
    return f"""`trust_remote_code=True` loads the model code shipped with this checkpoint (`modeling_moca.py`).

With transformers:

```python
from PIL import Image
from transformers import AutoModel

model = AutoModel.from_pretrained({name}, trust_remote_code=True)
documents = {documents}
document_embeddings = model.encode_documents(documents)
query_embeddings = model.encode_queries(["a red circle"])
scores = query_embeddings @ document_embeddings.T  # cosine similarities
print(scores)
```

With sentence-transformers:

```python
from PIL import Image
from sentence_transformers import SentenceTransformer

model = SentenceTransformer({name}, trust_remote_code=True)
documents = {documents}
document_embeddings = model.encode_document(documents)
query_embeddings = model.encode_query(["a red circle"])
print(model.similarity(query_embeddings, document_embeddings))
```

`<image>` marks where an image goes in a text (an input with images but no placeholder gets them first).
`truncate_dim` shortens the embeddings; `precision="int8"` or `"binary"` quantises them (sentence-transformers)."""


def _load_eval_results(eval_results) -> list[dict]:
    if eval_results is None:
        return []
    if isinstance(eval_results, (str, Path)):
        folder = Path(eval_results)
        files = [folder / name for name in ("mmeb_results.json", "vidore_results.json") if (folder / name).is_file()]
        if not files:
            raise ValueError(f"{folder}: no mmeb_results.json or vidore_results.json.")
        return [json.loads(f.read_text()) for f in files]
    results = [eval_results] if isinstance(eval_results, Mapping) else list(eval_results)
    for result in results:
        if result.get("benchmark") not in ("MMEB", "ViDoRe-v2"):
            raise ValueError(
                f"Unknown evaluation results (benchmark {result.get('benchmark')!r}); expected MMEB or ViDoRe-v2."
            )
    return results


def _percent(value: float) -> float:
    return round(100 * value, 2)


def _model_index(results: list[dict]) -> list[EvalResult]:
    entries = []
    for result in results:
        if result["benchmark"] == "MMEB":
            dataset = result.get("dataset", MMEB_DATASET)
            common = dict(
                task_type="feature-extraction",
                task_name="Multimodal embedding",
                dataset_type=dataset,
                metric_type="precision_at_1",
                metric_name="Precision@1",
                dataset_split="test",
            )
            entries.append(
                EvalResult(
                    dataset_name="MMEB (overall)", metric_value=_percent(result["overall"]["precision_at_1"]), **common
                )
            )
            for subset, scores in result["subsets"].items():
                entries.append(
                    EvalResult(
                        dataset_name=f"MMEB {subset}",
                        dataset_config=subset,
                        metric_value=_percent(scores["precision_at_1"]),
                        **common,
                    )
                )
        else:
            for name, scores in result["datasets"].items():
                entries.append(
                    EvalResult(
                        task_type="visual-document-retrieval",
                        task_name="Visual document retrieval",
                        dataset_type=name,
                        dataset_name=f"ViDoRe-v2 {name.split('/')[-1]}",
                        dataset_split="test",
                        metric_type="ndcg_at_5",
                        metric_name="nDCG@5",
                        metric_value=_percent(scores["ndcg_at_5"]),
                    )
                )
    return entries


def _results_section(results: list[dict]) -> list[str]:
    sections = ["## Evaluation"]
    for result in results:
        if result["benchmark"] == "MMEB":
            header = ["Overall", *result["categories"], *result["splits"]]
            values = [result["overall"], *result["categories"].values(), *result["splits"].values()]
            sections.append(
                "MMEB, Precision@1 (%):\n\n" + _markdown_table(header, [[v["precision_at_1"] for v in values]])
            )
        else:
            rows = [[name, scores["ndcg_at_5"]] for name, scores in result["datasets"].items()]
            rows.append(["Average", result["average"]["ndcg_at_5"]])
            sections.append("ViDoRe-v2, nDCG@5 (%):\n\n" + _markdown_table(["Dataset", "nDCG@5"], rows))
    return sections


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(value):
        if value is None:
            return "-"
        return f"{_percent(value):.1f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def _hyperparameter_tables(training_args) -> list[str]:
    if training_args is None:
        return []
    stages = training_args if isinstance(training_args, (list, tuple)) else [training_args]
    tables = []
    for stage in stages:
        values = _public_hyperparameters(stage)
        rows = "\n".join(f"| `{key}` | `{json.dumps(value, default=str)}` |" for key, value in values.items())
        tables.append(f"| Hyperparameter | Value |\n| --- | --- |\n{rows}")
    return tables


def _public_hyperparameters(args) -> dict:
    if dataclasses.is_dataclass(args):
        values = {}
        for field in dataclasses.fields(args):
            value = getattr(args, field.name)
            default = field.default if field.default is not dataclasses.MISSING else None
            if field.name in KEY_HYPERPARAMETERS or value != default:
                values[field.name] = value
    elif isinstance(args, Mapping):
        values = dict(args)
    else:
        raise ValueError(f"training_args must be a dict or a dataclass, got {type(args).__name__}.")
    public = {}
    for key, value in values.items():
        value = getattr(value, "value", value)  # enums such as `SchedulerType`
        if not any(word in key for word in _PRIVATE_WORDS) and isinstance(value, (int, float, str, bool, list)):
            public[key] = value
    return public


__all__ = ["write_model_card", "CITATION"]
