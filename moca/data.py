"""One data loader for both training stages, the CLI and evaluation.

A *source* is any of: a dataset on the Hub (`datasets.load_dataset(name, split=...)`), a folder written by
`save_to_disk` (a `Dataset`, or a `DatasetDict` from which `split` is taken), a parquet/jsonl file, or a
folder of such files. One rule for relative image paths: they are relative to the source's *image root*,
which is the data file's folder, the data folder or the saved dataset's folder (`image_root=` overrides it,
e.g. for the released mmE5 rows, whose paths are relative to a separate image folder; a Hub dataset has none).
Images stay encoded (bytes or paths) until `load_image` decodes them, one batch at a time, where a bad image
can be named and skipped.
"""

import os
from pathlib import Path

import datasets

from .processing_moca import load_image

DATA_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
# What `save_to_disk` writes: `state.json` (+ `dataset_info.json`) for a Dataset, `dataset_dict.json` for a DatasetDict.
SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")

__all__ = ["DATA_FILE_BUILDERS", "absolute_image_paths", "is_saved_dataset", "load_image", "load_source", "require_columns"]


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


def load_source(source: str, split: str = "train", image_root: str | None = None) -> tuple[datasets.Dataset, str | None]:
    """`(rows, image_root)` of one source; image columns are cast to undecoded storage."""
    path = Path(source)
    if path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(f"Data file {source}: unsupported format {path.suffix!r} (use parquet or jsonl).")
        dataset, root = datasets.load_dataset(builder, data_files=str(path), split="train"), str(path.parent)
    elif is_saved_dataset(path):
        dataset, root = datasets.load_from_disk(str(path)), str(path)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"Saved dataset {source}: no split {split!r} (splits: {sorted(dataset)}).")
            dataset = dataset[split]
    elif path.is_dir():
        builder, files = _data_files(path)
        dataset, root = datasets.load_dataset(builder, data_files=files, split="train"), str(path)
    else:
        dataset, root = datasets.load_dataset(source, split=split), None
    return _keep_images_encoded(dataset), image_root if image_root is not None else root


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
