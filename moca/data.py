"""One data loader for both training stages, the CLI and evaluation.

A *source* is any of: a dataset on the Hub (`datasets.load_dataset(name, split=...)`), a folder written by
`save_to_disk` (a `Dataset`, or a `DatasetDict` from which `split` is taken), a parquet/jsonl file, or a
folder of such files. One rule for relative image paths: they are relative to the source's *image root*,
which is the data file's folder, the data folder or the saved dataset's folder (`image_root=` overrides it,
e.g. for the released mmE5 rows, whose paths are relative to a separate image folder; a Hub dataset has none).
Images stay encoded (bytes or paths) until `load_image` decodes them, one batch at a time, where a bad image
can be named and skipped.

A source may hold *subsets* (`subset=`): a Hub dataset's configurations (`datasets.load_dataset(name, subset)`), or
in a local folder one subfolder (saved dataset or folder of files) or one data file per subset. The image root of a
local subset is that folder (the release keeps every subset's images under one image folder).

`release_pairs_to_rows` reads the original release's contrastive layout (`moca-embed/MoCa-CL-Pairs`,
`intfloat/mmE5-synthetic`, VLM2Vec's MMEB-train) as it is stored, without a conversion step.
"""

import ast
import json
import logging
import os
import random
from collections import Counter
from pathlib import Path

import datasets

from .processing_moca import load_image

logger = logging.getLogger(__name__)

DATA_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
# What `save_to_disk` writes: `state.json` (+ `dataset_info.json`) for a Dataset, `dataset_dict.json` for a DatasetDict.
SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")

__all__ = [
    "DATA_FILE_BUILDERS", "absolute_image_paths", "is_release_pairs", "is_saved_dataset", "load_image", "load_source",
    "parse_list_literal", "release_pairs_to_rows", "require_columns", "subset_source",
]  # fmt: skip


def is_saved_dataset(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in SAVED_DATASET_MARKERS)


def _data_files(folder: Path) -> tuple[str, list[str]]:
    files = sorted(str(f) for f in folder.iterdir() if f.suffix in DATA_FILE_BUILDERS)
    if not files:
        raise ValueError(f"Data folder {folder}: no saved dataset and no parquet/jsonl files.")
    builders = {DATA_FILE_BUILDERS[Path(f).suffix] for f in files}
    if len(builders) > 1:
        raise ValueError(f"Data folder {folder}: mixes parquet and jsonl files; keep one format per folder.")
    return builders.pop(), files


def subset_source(folder: str | os.PathLike, subset: str) -> Path:
    """Where a local folder keeps one subset (or one task its tasks.json lists): `folder/subset` (a saved dataset,
    a folder of data files or a data file named with its suffix) or `folder/subset.parquet` / `.jsonl` / `.json`."""
    folder = Path(folder)
    candidates = [folder / subset, *(folder / f"{subset}{suffix}" for suffix in DATA_FILE_BUILDERS)]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    available = sorted(f.stem if f.is_file() else f.name for f in folder.iterdir() if f.is_dir() or f.suffix in DATA_FILE_BUILDERS)
    raise ValueError(f"Data folder {folder}: no subset {subset!r} (a subfolder or data file named so; found {available}).")


def load_source(
    source: str, split: str = "train", image_root: str | None = None, subset: str | None = None
) -> tuple[datasets.Dataset, str | None]:
    """`(rows, image_root)` of one source, or of one subset of it; image columns are cast to undecoded storage."""
    path = Path(source)
    if subset is not None and path.exists():
        if not path.is_dir() or is_saved_dataset(path):
            raise ValueError(f"{source}: a subset ({subset!r}) needs a folder holding one subfolder or data file per subset.")
        dataset, _ = load_source(str(subset_source(path, subset)), split)
        return dataset, image_root if image_root is not None else str(path)
    if path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(f"Data file {source}: unsupported format {path.suffix!r} (use parquet or jsonl).")
        dataset, root = _load_data_files(builder, [str(path)]), str(path.parent)
    elif is_saved_dataset(path):
        dataset, root = datasets.load_from_disk(str(path)), str(path)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"Saved dataset {source}: no split {split!r} (splits: {sorted(dataset)}).")
            dataset = dataset[split]
    elif path.is_dir():
        builder, files = _data_files(path)
        dataset, root = _load_data_files(builder, files), str(path)
    else:
        dataset, root = datasets.load_dataset(source, subset, split=split), None
    return _keep_images_encoded(dataset), image_root if image_root is not None else root


def _load_data_files(builder: str, files: list[str]) -> datasets.Dataset:
    """The rows of parquet/jsonl files; a line of a jsonl file that is not JSON is an error naming file and line
    (the `datasets` json builder reports it deep in a traceback, without the line)."""
    try:
        return datasets.load_dataset(builder, data_files=files, split="train")
    except Exception:
        for file in files:
            if file.endswith(".jsonl"):
                _raise_on_malformed_line(file)
        raise


def _raise_on_malformed_line(file: str) -> None:
    with open(file, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as error:
                shown = line if len(line) <= 80 else line[:77] + "..."
                raise ValueError(
                    f"Data file {file}, line {number}: not valid JSON ({error.msg}, column {error.colno}): {shown}"
                ) from None


def _keep_images_encoded(dataset: datasets.Dataset) -> datasets.Dataset:
    """Image features stay bytes/paths until `load_image` decodes them (where a bad image is caught and named)."""
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, datasets.List) and isinstance(feature.feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return dataset


def _absolute(value, root: str):
    if isinstance(value, str) and value and not os.path.isabs(value):
        return os.path.join(root, value)
    if isinstance(value, list):
        return [_absolute(item, root) for item in value]
    return value


def absolute_image_paths(dataset: datasets.Dataset, columns, image_root: str | None) -> datasets.Dataset:
    """Relative image paths (strings, or lists of them) in `columns` made absolute against `image_root`, so that
    rows keep pointing at their images once sources are concatenated."""
    columns = [
        name for name in columns
        if name in dataset.column_names and _holds_strings(dataset.features[name])
    ]  # fmt: skip
    if image_root is None or not columns:
        return dataset

    def resolve(batch):
        return {name: [_absolute(value, image_root) for value in batch[name]] for name in columns}

    return dataset.map(resolve, batched=True, desc="Resolving image paths")


def _holds_strings(feature) -> bool:
    while isinstance(feature, (datasets.List, datasets.Sequence, list)):
        feature = feature[0] if isinstance(feature, list) else feature.feature
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def require_columns(dataset: datasets.Dataset, source: str, required=()) -> None:
    """A clear error naming the source and its columns when a column the stage needs is absent."""
    columns = dataset.column_names
    missing = [name for name in required if name not in columns]
    if missing:
        raise ValueError(f"Dataset {source}: no {' / '.join(map(repr, missing))} column (columns: {columns}).")


# ---------------------------------------------------------------------------------------------------------------------
# The original release's contrastive layout

# Its columns and the package's own; `neg_*` cells are strings holding a Python list literal.
RELEASE_PAIR_COLUMNS = {
    "qry": "query_text", "qry_image_path": "query_image", "pos_text": "pos_text", "pos_image_path": "pos_image",
    "neg_text": "neg_text", "neg_image_path": "neg_image",
}  # fmt: skip
# Phi-3-V's image marker, which the release data carries, and Qwen2.5-VL's, which the release puts in its place
# (`src/model_utils.py: vlm_image_tokens`).
PHI3V_IMAGE_MARKER = "<|image_1|>"
QWEN_IMAGE_MARKER = "<|vision_start|><|image_pad|><|vision_end|>"
_PAIR_FEATURES = {
    "query_text": datasets.Value("string"), "query_image": datasets.Value("string"),
    "pos_text": datasets.Value("string"), "pos_image": datasets.Value("string"),
    "neg_text": datasets.List(datasets.Value("string")), "neg_image": datasets.List(datasets.Value("string")),
    "skip_reason": datasets.Value("string"), "skip_detail": datasets.Value("string"),
}  # fmt: skip


def is_release_pairs(dataset: datasets.Dataset) -> bool:
    return "qry" in dataset.column_names


def parse_list_literal(value) -> list[str]:
    """The strings a release `neg_text` / `neg_image_path` cell lists.

    The release reads these cells with `eval` (`src/dataset.py: filter_hard_negtives`); here `ast.literal_eval`
    reads literals only (never a call, name or attribute), and anything but a list of strings is a `ValueError`.
    As in the release, a lone string literal is a list of one. An empty cell (VLM2Vec's MMEB-train rows without
    negatives; the release would fail on it) lists nothing.
    """
    if value is None or isinstance(value, list):
        items = value or []
    elif not isinstance(value, str):
        raise ValueError(f"a {type(value).__name__}, not a string holding a list literal")
    elif not value.strip():
        items = []
    else:
        try:
            items = ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as error:
            raise ValueError(f"not a Python literal ({type(error).__name__}: {error})") from None
        items = items if isinstance(items, list) else [items]
    bad = [type(item).__name__ for item in items if not isinstance(item, str)]
    if bad:
        raise ValueError(f"lists {', '.join(sorted(set(bad)))} items, not only strings")
    return items


def _release_text(text: str | None, image_path: str | None) -> str:
    """The release's text handling (`src/dataset.py: TaskBatchDataset.__getitem__`): Phi-3-V's marker becomes
    Qwen2.5-VL's, and the marker is removed where the row has no image."""
    text = (text or "").replace(PHI3V_IMAGE_MARKER, QWEN_IMAGE_MARKER)
    return text if image_path else text.replace(QWEN_IMAGE_MARKER, "")


def _release_row(row: dict, row_index: int, task_name: str, seed: int) -> dict:
    converted = {"skip_reason": None, "skip_detail": None}
    negatives = {}
    for column in ("neg_text", "neg_image_path"):
        try:
            negatives[column] = parse_list_literal(row.get(column))
        except ValueError as error:
            shown = repr(row.get(column))
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            return {**converted, "skip_reason": f"malformed {column} list literal", "skip_detail": f"{shown}: {error}"}
    texts, paths = negatives["neg_text"], negatives["neg_image_path"]
    if "" in texts:
        # The release fills an empty negative text with the positive's text when the whole list is one value
        # (an image negative shares the positive's instruction), else with another of the row's texts, drawn at
        # random; here from a generator of its own per row, so that every run draws the same. The release draws
        # after padding a short list, once per padded copy; here a listed empty text is filled once, and its
        # padded copies repeat that draw.
        fillers = [text for text in texts if text != ""]
        rng = random.Random(f"release-negative-text/{seed}/{task_name}/{row_index}")
        texts = [text if text != "" else (row["pos_text"] if len(set(texts)) == 1 else rng.choice(fillers)) for text in texts]
    query_image, pos_image = row.get("qry_image_path") or None, row.get("pos_image_path") or None
    return {
        **converted,
        "query_text": _release_text(row.get("qry"), query_image),
        "query_image": query_image,
        "pos_text": _release_text(row.get("pos_text"), pos_image),
        "pos_image": pos_image,
        # Text and image negatives pair up by position (the release zips its two lists).
        "neg_text": [_release_text(text, paths[i] if i < len(paths) else None) for i, text in enumerate(texts)],
        "neg_image": [path or None for path in paths],
    }


def release_pairs_to_rows(
    dataset: datasets.Dataset, task_name: str, seed: int = 0
) -> tuple[datasets.Dataset, Counter]:
    """Rows in the release's layout (`qry, qry_image_path, pos_text, pos_image_path, neg_text, neg_image_path`)
    -> the package's (`query_text, query_image, pos_text, pos_image, neg_text, neg_image`), and the rows skipped
    by reason (a `neg_*` cell that is no list literal of strings), each reason logged with its first row.

    Image paths stay relative (to the release's image folder, `--image_dir`); `absolute_image_paths` resolves them.
    Columns other than the release's (such as a `row_id`) are kept.
    """
    missing = [c for c in ("qry", "qry_image_path", "pos_text", "pos_image_path") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"task {task_name!r}: release layout without the columns {missing} (columns: {dataset.column_names})")
    kept = [c for c in dataset.column_names if c not in RELEASE_PAIR_COLUMNS]
    features = datasets.Features({**{c: dataset.features[c] for c in kept}, **_PAIR_FEATURES})

    def convert(batch, indices):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        out = [_release_row(row, index, task_name, seed) for row, index in zip(rows, indices)]
        columns = {name: [row.get(name) for row in out] for name in _PAIR_FEATURES}
        return {**{c: batch[c] for c in kept}, **columns}

    dataset = dataset.map(
        convert, batched=True, with_indices=True, remove_columns=dataset.column_names, features=features,
        desc=f"Reading the release layout of {task_name}",
    )  # fmt: skip
    reasons = dataset["skip_reason"]
    skipped = Counter(f"{task_name}: {reason}" for reason in reasons if reason)
    if skipped:
        details = dataset["skip_detail"]
        for reason in sorted({r for r in reasons if r}):
            rows = [i for i, r in enumerate(reasons) if r == reason]
            logger.warning(
                f"task {task_name!r}: skipped {len(rows)} of {len(dataset)} rows with a {reason} (first: row "
                f"{rows[0]}, {details[rows[0]]})"
            )
        dataset = dataset.select([i for i, reason in enumerate(reasons) if not reason])
    return dataset.remove_columns(["skip_reason", "skip_detail"]), skipped
