"""ViDoRe-v2 evaluation: retrieving document page images for text queries, scored by nDCG@5.

    python -m eval.vidore --model DIR_OR_NAME --output_dir OUT [--datasets NAME_OR_DIR ...]

A dataset is in the BEIR layout of the ViDoRe benchmark: configs `corpus` (`corpus-id`, `image`), `queries`
(`query-id`, `query`) and `qrels` (`query-id`, `corpus-id`, `score`), each with a `test` split; a local folder holds
`corpus/`, `queries/` and `qrels/` subfolders of parquet files. As in the release's ViDoRe retriever, queries are
encoded as raw text and pages with the document-page prompt `"<image>\nRepresent the given document image."`
(`--query_prompt` / `--document_prompt` change them); the multilingual sets are scored over all their queries at once.
"""

import functools
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets as hf_datasets
import numpy as np
import torch.nn.functional as F
from accelerate import PartialState
from PIL import Image
from transformers import HfArgumentParser

from moca.cli import count_truncated
from moca.configuration_moca import RELEASE_PROMPTS
from moca.data import load_image

from .encoding import EvalArguments, content_key, embedding_cache, encode_with_cache, init_processes, load_model
from .metrics import load_metric
from .report import bar_plot, markdown_table, write_results

logger = logging.getLogger(__name__)

PAGE_PROMPT = RELEASE_PROMPTS["document_page"]

# The seven ViDoRe-v2 sets of the benchmark's leaderboard (and of the MoCa paper's table): the Hub datasets tagged
# with the ViDoRe-v2 paper (arXiv 2505.17166). The `_eng_` sets hold the English queries, the others the same
# corpora with queries in English, French, German and Spanish; mteb's Vidore2* tasks load the same repositories.
DEFAULT_DATASETS = (
    "vidore/esg_reports_v2",
    "vidore/esg_reports_eng_v2",
    "vidore/esg_reports_human_labeled_v2",
    "vidore/biomedical_lectures_v2",
    "vidore/biomedical_lectures_eng_v2",
    "vidore/economics_reports_v2",
    "vidore/economics_reports_eng_v2",
)
K_VALUES = (1, 5, 10)


class ViDoReDataError(ValueError):
    """A row of a ViDoRe dataset that cannot be evaluated; the message names dataset, config, row and field."""


def display_name(name: str) -> str:
    """A Hub name as it is, a local folder by its own name (cache folders must not depend on where data sits)."""
    return Path(name).name if Path(name).is_dir() else name


def load_config(name: str, config: str) -> hf_datasets.Dataset:
    """One config (`corpus`, `queries`, `qrels`) of a Hub dataset or a local folder, test split."""
    if Path(name).is_dir():
        files = sorted(str(path) for path in (Path(name) / config).glob("*.parquet"))
        if not files:
            raise ViDoReDataError(f"ViDoRe dataset {name!r}: no parquet file in {Path(name) / config}")
        return hf_datasets.load_dataset("parquet", data_files=files, split="train")
    return hf_datasets.load_dataset(name, config, split="test")


def _require_columns(name: str, config: str, table: hf_datasets.Dataset, columns: tuple[str, ...]) -> None:
    absent = [column for column in columns if column not in table.column_names]
    if absent:
        raise ViDoReDataError(
            f"ViDoRe dataset {name!r}, config {config!r}: column(s) {absent} missing (has {table.column_names})"
        )


def _page_bytes(name: str, row: int, image) -> bytes:
    """The encoded image of a corpus row, given as the `datasets` Image struct {bytes, path}."""
    if isinstance(image, dict) and image.get("bytes"):
        return image["bytes"]
    if isinstance(image, dict) and image.get("path") and Path(image["path"]).is_file():
        return Path(image["path"]).read_bytes()
    raise ViDoReDataError(
        f"ViDoRe dataset {name!r}, config 'corpus', row {row}, field 'image': no image bytes or readable path"
    )


def _open_page(name: str, corpus: hf_datasets.Dataset, row: int) -> Image.Image:
    page = corpus[row]
    try:
        return load_image(_page_bytes(name, row, page["image"]))
    except ViDoReDataError:
        raise
    except (ValueError, OSError) as error:  # a truncated or corrupt page, found only when it is decoded
        raise ViDoReDataError(
            f"ViDoRe dataset {name!r}, config 'corpus', row {row} (corpus-id {page['corpus-id']!r}), field 'image': {error}"
        ) from error


def _count_truncated_pages(model, name: str, corpus: hf_datasets.Dataset, prompt: str, max_length: int | None) -> int:
    """Pages longer than `max_length` tokens with `prompt`, from the image headers (read in slices)."""
    if max_length is None:
        return 0
    return sum(
        count_truncated(
            model,
            [{"image": _page_bytes(name, row, image)} for row, image in enumerate(corpus[start : start + 64]["image"], start)],
            max_length,
            prompt,
        )
        for start in range(0, len(corpus), 64)
    )


@dataclass
class RetrievalData:
    query_texts: list[str]
    corpus: hf_datasets.Dataset  # with undecoded images
    page_keys: list[bytes]
    relevance: np.ndarray  # (num_queries, num_documents) graded relevance


def _index_of_ids(name: str, config: str, field: str, ids: list) -> dict:
    index = {}
    for row, identifier in enumerate(ids):
        if identifier in index:
            raise ViDoReDataError(
                f"ViDoRe dataset {name!r}, config {config!r}, row {row}, field {field!r}: {identifier!r} repeats row {index[identifier]}"
            )
        index[identifier] = row
    return index


def load_retrieval_data(name: str) -> RetrievalData:
    corpus = load_config(name, "corpus")
    queries = load_config(name, "queries")
    qrels = load_config(name, "qrels")
    _require_columns(name, "corpus", corpus, ("corpus-id", "image"))
    _require_columns(name, "queries", queries, ("query-id", "query"))
    _require_columns(name, "qrels", qrels, ("query-id", "corpus-id", "score"))
    if isinstance(corpus.features["image"], hf_datasets.Image):
        corpus = corpus.cast_column("image", hf_datasets.Image(decode=False))

    page_keys = []
    # Page images are identified by their bytes: a model embeds the same page the same way in any dataset. Read
    # in slices so that a corpus of full-resolution pages is never in memory at once.
    for start in range(0, len(corpus), 64):
        for row, image in enumerate(corpus[start : start + 64]["image"], start=start):
            page_keys.append(content_key("vidore-document", hashlib.blake2b(_page_bytes(name, row, image)).digest()))
    document_index = _index_of_ids(name, "corpus", "corpus-id", corpus["corpus-id"])
    query_index = _index_of_ids(name, "queries", "query-id", queries["query-id"])
    query_texts = queries["query"]
    for row, text in enumerate(query_texts):
        if not isinstance(text, str) or not text:
            raise ViDoReDataError(
                f"ViDoRe dataset {name!r}, config 'queries', row {row}, field 'query': expected a non-empty string"
            )

    relevance = np.zeros((len(query_texts), len(document_index)), dtype=np.int64)
    for row, (query_id, document_id, score) in enumerate(zip(qrels["query-id"], qrels["corpus-id"], qrels["score"])):
        where = f"ViDoRe dataset {name!r}, config 'qrels', row {row}"
        if query_id not in query_index:
            raise ViDoReDataError(f"{where}, field 'query-id': {query_id!r} is not in the queries")
        if document_id not in document_index:
            raise ViDoReDataError(f"{where}, field 'corpus-id': {document_id!r} is not in the corpus")
        if not isinstance(score, (int, np.integer)) or score < 0:
            raise ViDoReDataError(f"{where}, field 'score': expected a non-negative integer, got {score!r}")
        relevance[query_index[query_id], document_index[document_id]] = score
    if not (relevance > 0).any():
        raise ViDoReDataError(f"ViDoRe dataset {name!r}, config 'qrels': no query has a relevant document (score > 0)")
    return RetrievalData(query_texts, corpus, page_keys, relevance)


def evaluate_vidore(
    model,
    output_dir: str | Path,
    *,
    datasets: list[str] | tuple[str, ...] = DEFAULT_DATASETS,
    batch_size: int = 8,
    max_length: int | None = None,
    cache_dir: str | Path | None = None,
    query_prompt: str | None = None,
    document_prompt: str = PAGE_PROMPT,
    model_name: str | None = None,
) -> dict:
    """Evaluate `model` on ViDoRe datasets (Hub names or local folders); write `vidore_results.{json,md,png}`.

    Queries are encoded raw unless `query_prompt` (a format string with `{text}`) is given, pages with
    `document_prompt`. Returns the results written to the JSON file.
    """
    output_dir = Path(output_dir)
    cache = embedding_cache(model, output_dir, cache_dir, max_length)
    metric = load_metric("retrieval_scores")
    # Cache keys name the prompt: embeddings made under another prompt are never reused.
    query_kind, page_kind = f"vidore-query|{query_prompt}", f"vidore-page|{document_prompt}"

    per_dataset = {}
    for number, name in enumerate(datasets, start=1):
        data = load_retrieval_data(name)
        short_name = display_name(name)
        query_embeddings = encode_with_cache(
            data.query_texts,
            [content_key(query_kind, text) for text in data.query_texts],
            lambda share: model.encode(
                share, prompt=query_prompt, batch_size=batch_size, max_length=max_length, show_progress_bar=False
            ),
            cache=cache,
            namespace=f"vidore/{short_name}/queries",
            description=f"ViDoRe {short_name} queries ({number}/{len(datasets)})",
        )
        document_embeddings = encode_with_cache(
            list(range(len(data.corpus))),
            [content_key(page_kind, key) for key in data.page_keys],
            lambda share: model.encode(
                share, prompt=document_prompt, batch_size=batch_size, max_length=max_length, show_progress_bar=False
            ),
            cache=cache,
            namespace=f"vidore/{short_name}/documents",
            load_fn=functools.partial(_open_page, name, data.corpus),
            shard_size=32,  # decoded pages of a process's share are in memory at once
            description=f"ViDoRe {short_name} pages ({number}/{len(datasets)})",
        )
        scores = F.normalize(query_embeddings, dim=-1) @ F.normalize(document_embeddings, dim=-1).T
        result = metric.compute(
            predictions=scores.tolist(), references=data.relevance.tolist(), k_values=list(K_VALUES)
        )
        result["num_documents"] = len(data.corpus)
        # Inputs longer than max_length tokens, embedded cut.
        result["num_truncated"] = count_truncated(model, data.query_texts, max_length, query_prompt) + (
            _count_truncated_pages(model, name, data.corpus, document_prompt, max_length)
        )
        per_dataset[name] = result
        logger.info("ViDoRe %s: nDCG@5 %.4f", name, result["ndcg_at_5"])

    names = [f"{metric_name}_at_{k}" for k in K_VALUES for metric_name in ("ndcg", "recall")]
    results = {
        "benchmark": "ViDoRe-v2",
        "model": model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__,
        "metric": "ndcg_at_5",
        "max_length": max_length,
        "num_truncated": sum(result["num_truncated"] for result in per_dataset.values()),
        "datasets": per_dataset,
        "average": {n: float(np.mean([r[n] for r in per_dataset.values()])) for n in names},
    }
    if PartialState().is_main_process:
        write_vidore_results(output_dir, results)
    return results


def write_vidore_results(output_dir: Path, results: dict) -> None:
    columns = ["ndcg_at_5", "ndcg_at_10", "recall_at_1", "recall_at_5", "recall_at_10"]
    rows = [(name, *(r[c] for c in columns), r["num_queries"]) for name, r in results["datasets"].items()]
    rows.append(("Average", *(results["average"][c] for c in columns), ""))
    markdown = f"# ViDoRe-v2 (%): {results['model']}\n\n" + markdown_table(
        ["Dataset", "nDCG@5", "nDCG@10", "Recall@1", "Recall@5", "Recall@10", "Queries"], rows
    )
    write_results(output_dir, "vidore_results", results, markdown)
    labels = [display_name(name).split("/")[-1] for name in results["datasets"]] + ["Average"]
    values = [r["ndcg_at_5"] for r in results["datasets"].values()] + [results["average"]["ndcg_at_5"]]
    bar_plot(output_dir / "vidore_results.png", labels, values, f"ViDoRe-v2: {results['model']}", "nDCG@5 (%)")


@dataclass
class ViDoReArguments(EvalArguments):
    dataset: list[str] = field(
        default_factory=lambda: list(DEFAULT_DATASETS),
        metadata={"help": "ViDoRe sets: Hub names or local folders.", "aliases": ["--datasets"]},
    )
    batch_size: int = field(default=8, metadata={"help": "Inputs per forward pass."})
    query_prompt: str | None = field(
        default=None, metadata={"help": "Query prompt with {text}; raw queries (the release) when not given."}
    )
    document_prompt: str = field(
        default=PAGE_PROMPT, metadata={"help": "Page prompt (default: the release's document-page prompt)."}
    )


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(ViDoReArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    init_processes()
    model = load_model(
        args.model_name_or_path,
        dtype=args.dtype,
        image_tokens=(args.min_image_tokens, args.max_image_tokens),
        trust_remote_code=args.trust_remote_code,
    )
    results = evaluate_vidore(
        model,
        args.output_dir,
        datasets=args.dataset,
        batch_size=args.batch_size,
        max_length=args.max_length,
        cache_dir=args.cache_dir,
        query_prompt=args.query_prompt,
        document_prompt=args.document_prompt,
        model_name=args.model_name_or_path,
    )
    if PartialState().is_main_process:
        print((Path(args.output_dir) / "vidore_results.md").read_text())
        print(f"{results['num_truncated']} inputs cut to --max_length {args.max_length}" if args.max_length else "No cut.")
    return results


if __name__ == "__main__":
    main()
