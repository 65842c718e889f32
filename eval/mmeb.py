"""MMEB (Massive Multimodal Embedding Benchmark) evaluation: Precision@1 of ranking each query's candidates.

    python -m eval.mmeb --model DIR_OR_NAME --output_dir OUT [--dataset TIGER-Lab/MMEB-eval | --data_dir DIR]
        [--image_dir DIR] [--subsets A B ...] [--batch_size N]

Every distinct query and candidate of a subset is embedded once (candidates repeat across rows), cached on disk,
and scored by cosine similarity; the first candidate of a row is its positive.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from accelerate import PartialState
from transformers import HfArgumentParser

from moca.cli import count_truncated

from .encoding import (
    EvalArguments,
    content_key,
    embedding_cache,
    encode_with_cache,
    file_stamp,
    init_processes,
    load_model,
)
from .metrics import load_metric
from .report import bar_plot, markdown_table, write_results

logger = logging.getLogger(__name__)

# The 36 MMEB-eval subsets, their meta-task and whether the subset was held out of MMEB-train (OOD). Source: the
# MMEB paper (Jiang et al., "VLM2Vec", arXiv 2410.05160, Table 1: 20 in-distribution and 16 out-of-distribution
# sets), the same split as the IND/OOD lists of the benchmark's reference evaluation script.
MMEB_SUBSETS = {
    "ImageNet-1K": ("Classification", "IND"),
    "N24News": ("Classification", "IND"),
    "HatefulMemes": ("Classification", "IND"),
    "VOC2007": ("Classification", "IND"),
    "SUN397": ("Classification", "IND"),
    "Place365": ("Classification", "OOD"),
    "ImageNet-A": ("Classification", "OOD"),
    "ImageNet-R": ("Classification", "OOD"),
    "ObjectNet": ("Classification", "OOD"),
    "Country211": ("Classification", "OOD"),
    "OK-VQA": ("VQA", "IND"),
    "A-OKVQA": ("VQA", "IND"),
    "DocVQA": ("VQA", "IND"),
    "InfographicsVQA": ("VQA", "IND"),
    "ChartQA": ("VQA", "IND"),
    "Visual7W": ("VQA", "IND"),
    "ScienceQA": ("VQA", "OOD"),
    "VizWiz": ("VQA", "OOD"),
    "GQA": ("VQA", "OOD"),
    "TextVQA": ("VQA", "OOD"),
    "VisDial": ("Retrieval", "IND"),
    "CIRR": ("Retrieval", "IND"),
    "VisualNews_t2i": ("Retrieval", "IND"),
    "VisualNews_i2t": ("Retrieval", "IND"),
    "MSCOCO_t2i": ("Retrieval", "IND"),
    "MSCOCO_i2t": ("Retrieval", "IND"),
    "NIGHTS": ("Retrieval", "IND"),
    "WebQA": ("Retrieval", "IND"),
    "FashionIQ": ("Retrieval", "OOD"),
    "Wiki-SS-NQ": ("Retrieval", "OOD"),
    "OVEN": ("Retrieval", "OOD"),
    "EDIS": ("Retrieval", "OOD"),
    "MSCOCO": ("Visual Grounding", "IND"),
    "RefCOCO": ("Visual Grounding", "OOD"),
    "RefCOCO-Matching": ("Visual Grounding", "OOD"),
    "Visual7W-Pointing": ("Visual Grounding", "OOD"),
}
CATEGORIES = ("Classification", "VQA", "Retrieval", "Visual Grounding")
SPLITS = ("IND", "OOD")
DEFAULT_DATASET = "TIGER-Lab/MMEB-eval"
# MMEB texts mark the image with Phi-3-V's token; the MoCa processor takes `<image>`.
MMEB_IMAGE_TOKEN = "<|image_1|>"
IMAGE_PLACEHOLDER = "<image>"


class MMEBDataError(ValueError):
    """A row of an MMEB subset that cannot be evaluated; the message names subset, row and field."""


def subset_metadata(data_dir: str | Path | None) -> dict[str, tuple[str, str]]:
    """The subset table, updated by `subsets.json` of a local data folder ({subset: {"category", "split"}})."""
    table = dict(MMEB_SUBSETS)
    extra_path = Path(data_dir) / "subsets.json" if data_dir is not None else None
    if extra_path is not None and extra_path.is_file():
        for subset, info in json.loads(extra_path.read_text()).items():
            if info.get("category") not in CATEGORIES or info.get("split") not in SPLITS:
                raise MMEBDataError(
                    f"{extra_path}: subset {subset!r} needs a category in {CATEGORIES} and a split in {SPLITS}, got {info}"
                )
            table[subset] = (info["category"], info["split"])
    return table


def local_subsets(data_dir: str | Path) -> list[str]:
    """Subset folders of a local data folder that hold parquet files: the benchmark's in its order, then others."""
    found = {path.parent.name for path in Path(data_dir).glob("*/*.parquet")}
    return [name for name in MMEB_SUBSETS if name in found] + sorted(found - set(MMEB_SUBSETS))


def check_local_subsets(data_dir: str | Path, subsets: list[str]) -> None:
    """Raise, listing what the folder holds, unless every requested subset is there (none requested: an
    empty results table that looks like a finished run)."""
    found = local_subsets(data_dir)
    missing = [subset for subset in subsets if subset not in found]
    if subsets and not missing:
        return
    if not Path(data_dir).is_dir():
        raise MMEBDataError(f"MMEB --data_dir {data_dir}: no such folder")
    flat = sorted(path.name for path in Path(data_dir).glob("*.parquet"))
    raise MMEBDataError(
        f"MMEB --data_dir {data_dir}: subset(s) {missing or 'none'} not found; subset folders found: {found or 'none'} "
        "(each subset is a folder <subset>/ of parquet files"
        + (f"; parquet files directly in the folder, {flat[:5]}, belong in subset folders)" if flat else ")")
    )


def load_subset(subset: str, dataset: str = DEFAULT_DATASET, data_dir: str | Path | None = None) -> datasets.Dataset:
    if data_dir is not None:
        files = sorted(str(path) for path in (Path(data_dir) / subset).glob("*.parquet"))
        if not files:
            raise MMEBDataError(f"MMEB subset {subset!r}: no parquet file in {Path(data_dir) / subset}")
        if sum(pq.ParquetFile(file).metadata.num_rows for file in files) == 0:
            raise MMEBDataError(f"MMEB subset {subset!r}: no rows")  # `datasets` cannot load an empty parquet file
        return datasets.load_dataset("parquet", data_files=files, split="train")
    return datasets.load_dataset(dataset, subset, split="test")


@dataclass
class ParsedSubset:
    """A subset as model inputs: its distinct inputs, their cache keys, and each row as indices into them."""

    inputs: list[dict]
    keys: list[bytes]
    row_query: list[int]
    row_candidates: list[list[int]]


def parse_subset(subset: str, table: datasets.Dataset, image_dir: Path | None) -> ParsedSubset:
    """Check every row and turn it into model inputs; raise `MMEBDataError` naming subset, row and field."""
    required = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
    absent = [name for name in required if name not in table.column_names]
    if absent:
        raise MMEBDataError(f"MMEB subset {subset!r}: column(s) {absent} missing (has {table.column_names})")
    if len(table) == 0:
        raise MMEBDataError(f"MMEB subset {subset!r}: no rows")
    columns = {name: table[name] for name in required}
    index_of_input: dict[tuple[str, str], int] = {}
    parsed = ParsedSubset(inputs=[], keys=[], row_query=[], row_candidates=[])
    file_stamps: dict[str, str] = {}

    def add_input(row: int, text_field: str, text, image_field: str, image_path) -> int:
        where = f"MMEB subset {subset!r}, row {row}"
        if not isinstance(text, str):
            raise MMEBDataError(f"{where}, field {text_field!r}: expected a string, got {type(text).__name__}")
        if image_path is None:
            image_path = ""
        if not isinstance(image_path, str):
            raise MMEBDataError(
                f"{where}, field {image_field!r}: expected a path string, got {type(image_path).__name__}"
            )
        if (text, image_path) in index_of_input:  # candidates repeat across rows: checked once
            return index_of_input[text, image_path]
        if MMEB_IMAGE_TOKEN in text and not image_path:
            raise MMEBDataError(
                f"{where}, field {image_field!r}: {text_field} marks an image ({MMEB_IMAGE_TOKEN}) but no path is given"
            )
        image = None
        if image_path:
            if image_dir is None:
                raise MMEBDataError(f"{where}, field {image_field!r}: rows have images; pass image_dir (--image_dir)")
            image = image_dir / image_path
            if image_path not in file_stamps:
                if not image.is_file():
                    raise MMEBDataError(f"{where}, field {image_field!r}: image file {image} not found")
                file_stamps[image_path] = file_stamp(image)
        index_of_input[text, image_path] = len(parsed.inputs)
        parsed.inputs.append({"text": text.replace(MMEB_IMAGE_TOKEN, IMAGE_PLACEHOLDER), "image": image})
        # The relative path, not the absolute one: a moved image folder keeps its cache.
        parsed.keys.append(content_key("mmeb", text, image_path, file_stamps.get(image_path, "")))
        return index_of_input[text, image_path]

    for row in range(len(table)):
        parsed.row_query.append(
            add_input(row, "qry_text", columns["qry_text"][row], "qry_img_path", columns["qry_img_path"][row])
        )
        texts, paths = columns["tgt_text"][row], columns["tgt_img_path"][row]
        for name, value in (("tgt_text", texts), ("tgt_img_path", paths)):
            if not isinstance(value, list) or not value:
                raise MMEBDataError(f"MMEB subset {subset!r}, row {row}, field {name!r}: expected a non-empty list")
        if len(texts) != len(paths):
            raise MMEBDataError(
                f"MMEB subset {subset!r}, row {row}, field 'tgt_img_path': {len(paths)} paths for {len(texts)} tgt_text candidates"
            )
        parsed.row_candidates.append(
            [
                add_input(row, f"tgt_text[{i}]", text, f"tgt_img_path[{i}]", path)
                for i, (text, path) in enumerate(zip(texts, paths))
            ]
        )
    return parsed


def score_subset(
    parsed: ParsedSubset, embeddings: torch.Tensor, rows_per_step: int = 256
) -> tuple[list[list[float]], list[int]]:
    """Cosine similarity of each row's query to its candidates; the positive is candidate 0.

    A step multiplies its rows' queries with every distinct input once and picks each row's candidates from
    that: 70 times faster than gathering candidate embeddings row by row for 1,000 rows of 1,000 candidates
    (ImageNet-1K's shape; bench/bench_eval_scoring.py).
    """
    embeddings = F.normalize(embeddings.float(), dim=-1)
    scores = []
    for start in range(0, len(parsed.row_query), rows_per_step):
        similarity = (embeddings[parsed.row_query[start : start + rows_per_step]] @ embeddings.T).numpy()
        for offset, candidates in enumerate(parsed.row_candidates[start : start + rows_per_step]):
            scores.append(similarity[offset, candidates].tolist())
    return scores, [0] * len(scores)


def summarize(per_subset: dict[str, dict]) -> dict:
    """Macro averages (mean over subsets) per category, per IND/OOD split and overall, as in the MMEB paper."""

    def mean_of(names):
        values = [per_subset[name]["precision_at_1"] for name in names]
        return {"precision_at_1": sum(values) / len(values) if values else None, "num_subsets": len(values)}

    return {
        "categories": {c: mean_of([n for n, s in per_subset.items() if s["category"] == c]) for c in CATEGORIES},
        "splits": {split: mean_of([n for n, s in per_subset.items() if s["split"] == split]) for split in SPLITS},
        "overall": mean_of(list(per_subset)),
    }


def evaluate_mmeb(
    model,
    output_dir: str | Path,
    *,
    dataset: str = DEFAULT_DATASET,
    data_dir: str | Path | None = None,
    image_dir: str | Path | None = None,
    subsets: list[str] | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    cache_dir: str | Path | None = None,
    model_name: str | None = None,
) -> dict:
    """Evaluate `model` (anything with MoCa's `encode`) on MMEB and write `mmeb_results.{json,md,png}`.

    `data_dir` (a folder of `<subset>/*.parquet`) replaces the Hub `dataset`; image paths are relative to
    `image_dir`, which defaults to `data_dir`. `subsets` defaults to the subset folders of `data_dir`, or the 36
    of the benchmark. Embeddings are cached in `cache_dir` (default `output_dir/embedding_cache`), per model.
    Returns the results written to the JSON file.
    """
    output_dir = Path(output_dir)
    image_dir = Path(image_dir) if image_dir is not None else (Path(data_dir) if data_dir is not None else None)
    table = subset_metadata(data_dir)
    if subsets is None:
        subsets = local_subsets(data_dir) if data_dir is not None else list(MMEB_SUBSETS)
    if data_dir is not None:
        check_local_subsets(data_dir, subsets)
    unknown = [subset for subset in subsets if subset not in table]
    if unknown:
        raise MMEBDataError(
            f"MMEB subsets {unknown} have no category: add them to subsets.json in the data folder "
            f"({{subset: {{'category': one of {CATEGORIES}, 'split': 'IND' or 'OOD'}}}})"
        )
    cache = embedding_cache(model, output_dir, cache_dir, max_length)
    metric = load_metric("precision_at_1")

    per_subset = {}
    for number, subset in enumerate(subsets, start=1):
        parsed = parse_subset(subset, load_subset(subset, dataset, data_dir), image_dir)
        embeddings = encode_with_cache(
            parsed.inputs,
            parsed.keys,
            lambda share: model.encode(share, batch_size=batch_size, max_length=max_length, show_progress_bar=False),
            cache=cache,
            namespace=f"mmeb/{subset}",
            description=f"MMEB {subset} ({number}/{len(subsets)})",
        )
        scores, positives = score_subset(parsed, embeddings)
        truncated = count_truncated(model, parsed.inputs, max_length)
        category, split = table[subset]
        computed = metric.compute(predictions=scores, references=positives, per_query=True)
        per_subset[subset] = {
            "precision_at_1": computed["precision_at_1"],
            # Each row's score, in row order: what a paired comparison of two models needs.
            "per_query": computed["per_query"],
            "num_rows": len(scores),
            "num_inputs": len(parsed.inputs),
            "num_truncated": truncated,  # inputs longer than max_length tokens, embedded cut
            "category": category,
            "split": split,
        }
        logger.info("MMEB %s: Precision@1 %.4f", subset, per_subset[subset]["precision_at_1"])

    results = {
        "benchmark": "MMEB",
        "model": model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__,
        "metric": "precision_at_1",
        "max_length": max_length,
        "num_truncated": sum(subset["num_truncated"] for subset in per_subset.values()),
        "subsets": per_subset,
        **summarize(per_subset),
    }
    if PartialState().is_main_process:
        write_mmeb_results(output_dir, results)
    return results


def write_mmeb_results(output_dir: Path, results: dict) -> None:
    subset_rows = [
        (name, s["category"], s["split"], s["precision_at_1"], s["num_rows"]) for name, s in results["subsets"].items()
    ]
    summary_labels = [*CATEGORIES, *SPLITS, "Overall"]
    summary_values = [
        *(results["categories"][c]["precision_at_1"] for c in CATEGORIES),
        *(results["splits"][s]["precision_at_1"] for s in SPLITS),
        results["overall"]["precision_at_1"],
    ]
    markdown = (
        f"# MMEB Precision@1 (%): {results['model']}\n\n"
        + markdown_table(summary_labels, [["-" if v is None else v for v in summary_values]])
        + "\n"
        + markdown_table(["Subset", "Category", "Split", "Precision@1", "Rows"], subset_rows)
    )
    write_results(output_dir, "mmeb_results", results, markdown)
    present = [(label, value) for label, value in zip(summary_labels, summary_values) if value is not None]
    bar_plot(
        output_dir / "mmeb_results.png",
        [label for label, _ in present],
        [value for _, value in present],
        title=f"MMEB: {results['model']}",
        ylabel="Precision@1 (%)",
    )


@dataclass
class MMEBArguments(EvalArguments):
    dataset: str = field(default=DEFAULT_DATASET, metadata={"help": "Hub dataset with one config per subset."})
    data_dir: str | None = field(
        default=None, metadata={"help": "Local folder of <subset>/*.parquet (replaces --dataset)."}
    )
    image_dir: str | None = field(default=None, metadata={"help": "Folder the image paths are relative to."})
    subsets: list[str] | None = field(
        default=None, metadata={"help": "Subsets to evaluate; all of them when not given."}
    )


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(MMEBArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    init_processes()
    model = load_model(
        args.model_name_or_path,
        dtype=args.dtype,
        image_tokens=(args.min_image_tokens, args.max_image_tokens),
        trust_remote_code=args.trust_remote_code,
    )
    results = evaluate_mmeb(
        model,
        args.output_dir,
        dataset=args.dataset,
        data_dir=args.data_dir,
        image_dir=args.image_dir,
        subsets=args.subsets,
        batch_size=args.batch_size,
        max_length=args.max_length,
        cache_dir=args.cache_dir,
        model_name=args.model_name_or_path,
    )
    if PartialState().is_main_process:
        print((Path(args.output_dir) / "mmeb_results.md").read_text())
        print(f"{results['num_truncated']} inputs cut to --max_length {args.max_length}" if args.max_length else "No cut.")
    return results


if __name__ == "__main__":
    main()
