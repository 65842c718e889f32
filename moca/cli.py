"""`python -m moca embed` a folder or a `datasets` dataset into an index file; `python -m moca search` it.

    python -m moca embed --model_name_or_path CHECKPOINT --dataset FOLDER_OR_DATASET --output index.safetensors
    python -m moca search --index index.safetensors --query "a red circle" --top_k 5

The flags are named as in the training scripts and the evaluations (`--model` and `--input` are aliases).

An index holds the embeddings and, per item, its id, text and image path: a safetensors file (the item
columns as JSON in its metadata) or a parquet file (one row per item). Embedding runs in chunks saved next to
the output (`OUTPUT.partial/`), so an interrupted run resumes where it stopped.
"""

import argparse
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file

from .data import absolute_image_paths, is_saved_dataset, load_source
from .modeling_moca import DTYPES
from .processing_moca import IMAGE_EXTENSIONS


TEXT_EXTENSIONS = (".txt", ".md")
INDEX_FORMATS = (".safetensors", ".parquet")


@dataclass
class Index:
    embeddings: torch.Tensor  # (N, D) float32
    ids: list[str]
    texts: list[str | None]
    images: list[str | None]
    model: str


# ---------------------------------------------------------------------------------------------- inputs


def folder_items(folder: Path) -> tuple[list[str], list, list[str | None], list[str | None]]:
    """Every image and text file under `folder` (sorted): ids (relative paths), encode inputs, texts, image paths."""
    ids, inputs, texts, images = [], [], [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        suffix = path.suffix.lower()
        if suffix in IMAGE_EXTENSIONS:
            inputs.append(path)
            texts.append(None)
            images.append(str(path.resolve()))
        elif suffix in TEXT_EXTENSIONS:
            text = path.read_text(encoding="utf-8").strip()
            if not text:
                raise ValueError(f"{path}: empty text file.")
            inputs.append(text)
            texts.append(text)
            images.append(None)
        else:
            continue
        ids.append(str(path.relative_to(folder)))
    if not ids:
        raise ValueError(
            f"{folder}: no image ({', '.join(IMAGE_EXTENSIONS)}) or text ({', '.join(TEXT_EXTENSIONS)}) files."
        )
    return ids, inputs, texts, images


class DatasetItems:
    """Encode inputs of a dataset's rows, read lazily so that memory stays flat on large datasets."""

    def __init__(self, rows, text_column: str | None, image_column: str | None):
        self.rows = rows
        self.text_column, self.image_column = text_column, image_column

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, selection: slice) -> list:
        batch = self.rows[selection]
        count = len(next(iter(batch.values())))
        texts = batch[self.text_column] if self.text_column else [None] * count
        images = batch[self.image_column] if self.image_column else [None] * count
        start = selection.start or 0
        for row, (text, image) in enumerate(zip(texts, images), start=start):
            if not text and image is None:
                raise ValueError(f"Row {row}: no text and no image.")
        return [{"text": text, "image": image} for text, image in zip(texts, images)]


def dataset_items(name: str, split: str, text_column: str | None, image_column: str | None, id_column: str | None):
    rows, image_root = load_source(name, split=split)
    columns = rows.column_names
    text_column = text_column or ("text" if "text" in columns else None)
    image_column = image_column or ("image" if "image" in columns else None)
    for label, column in (("text", text_column), ("image", image_column), ("id", id_column)):
        if column is not None and column not in columns:
            raise ValueError(f"{name}: no {label} column {column!r} (columns: {columns}).")
    if text_column is None and image_column is None:
        raise ValueError(
            f"{name}: no 'text' or 'image' column (columns: {columns}); pass --text_column/--image_column."
        )
    if image_column is not None:
        rows = absolute_image_paths(rows, [image_column], image_root)
    ids = [str(i) for i in rows[id_column]] if id_column else [str(i) for i in range(len(rows))]
    texts = rows[text_column] if text_column else [None] * len(rows)
    return ids, DatasetItems(rows, text_column, image_column), texts, [None] * len(rows)


# ---------------------------------------------------------------------------------------------- embed


def embed(
    model_path: str,
    input_path: str,
    output: str,
    batch_size: int = 32,
    chunk_size: int = 1024,
    split: str = "train",
    text_column: str | None = None,
    image_column: str | None = None,
    id_column: str | None = None,
    dtype: str | None = None,
    max_length: int | None = None,
    show_progress_bar: bool = True,
    image_tokens: tuple[int | None, int | None] = (None, None),
    prompt_name: str | None = None,
) -> Index:
    """Embed every item of a folder or dataset as a document and write the index to `output`."""
    from tqdm.auto import tqdm

    from .modeling_moca import MoCaModel

    output = Path(output)
    if output.suffix not in INDEX_FORMATS:
        raise ValueError(f"--output must end with {' or '.join(INDEX_FORMATS)}, got {output.name!r}.")
    if Path(input_path).is_dir() and not is_saved_dataset(Path(input_path)):
        ids, inputs, texts, images = folder_items(Path(input_path))
    else:
        ids, inputs, texts, images = dataset_items(input_path, split, text_column, image_column, id_column)
    model = MoCaModel.from_pretrained(model_path, dtype=DTYPES[dtype] if dtype else None).eval()
    _set_image_tokens(model, image_tokens)

    # Chunks of embeddings go to disk as they are done: a rerun with the same model and items resumes.
    partial = output.with_name(output.name + ".partial")
    fingerprint = hashlib.sha256(json.dumps([str(model_path), ids, dtype, max_length, list(image_tokens), prompt_name]).encode()).hexdigest()
    if partial.exists() and (partial / "fingerprint").read_text() != fingerprint:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "fingerprint").write_text(fingerprint)

    chunks = []
    with tqdm(total=len(ids), desc="Embedding", unit="item", disable=not show_progress_bar) as progress:
        for start in range(0, len(ids), chunk_size):
            chunk_file = partial / f"{start:09d}.safetensors"
            if chunk_file.exists():
                chunks.append(load_file(chunk_file)["embeddings"])
            else:
                try:
                    embeddings = model.encode_documents(
                        inputs[start : start + chunk_size], batch_size=batch_size, max_length=max_length,
                        prompt_name=prompt_name, show_progress_bar=False,
                    )  # fmt: skip
                except ValueError as error:  # `encode` counts inputs from the start of the chunk
                    raise ValueError(f"Items {start}.. (first: {ids[start]!r}): {error}") from error
                save_file({"embeddings": embeddings.contiguous()}, chunk_file)
                chunks.append(embeddings)
            progress.update(len(chunks[-1]))

    model_name = str(Path(model_path).resolve()) if Path(model_path).is_dir() else model_path
    index = Index(torch.cat(chunks), ids, list(texts), list(images), model_name)
    write_index(index, output)
    shutil.rmtree(partial)
    return index


def write_index(index: Index, output: Path) -> None:
    tmp = output.with_name(output.name + ".tmp")
    if output.suffix == ".safetensors":
        columns = {"ids": index.ids, "texts": index.texts, "images": index.images, "model": index.model}
        save_file(
            {"embeddings": index.embeddings.float().contiguous()},
            tmp,
            metadata={name: json.dumps(value) for name, value in columns.items()},
        )
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        dim = index.embeddings.shape[1]
        table = pa.table(
            {
                "id": index.ids,
                "text": pa.array(index.texts, pa.string()),
                "image": pa.array(index.images, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(index.embeddings.float().flatten().numpy()), dim
                ),
            }
        ).replace_schema_metadata({"model": index.model})
        pq.write_table(table, tmp)
    os.replace(tmp, output)


def read_index(path: str | Path) -> Index:
    path = Path(path)
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            embeddings = f.get_tensor("embeddings")
        if "ids" not in metadata:
            raise ValueError(f"{path}: not a moca index (no item ids in its metadata).")
        columns = {name: json.loads(metadata[name]) for name in ("ids", "texts", "images", "model")}
        return Index(embeddings, columns["ids"], columns["texts"], columns["images"], columns["model"])
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        missing = {"id", "text", "image", "embedding"} - set(table.column_names)
        if missing:
            raise ValueError(f"{path}: not a moca index (no columns {sorted(missing)}).")
        embeddings = torch.from_numpy(table.column("embedding").combine_chunks().flatten().to_numpy().copy())
        return Index(
            embeddings.reshape(table.num_rows, -1),
            table.column("id").to_pylist(),
            table.column("text").to_pylist(),
            table.column("image").to_pylist(),
            (table.schema.metadata or {}).get(b"model", b"").decode(),
        )
    raise ValueError(f"{path}: an index is a {' or '.join(INDEX_FORMATS)} file.")


# ---------------------------------------------------------------------------------------------- search


def _set_image_tokens(model, image_tokens) -> None:
    if any(bound is not None for bound in image_tokens):
        if model.processor is None:
            raise ValueError("The checkpoint has no processor files: no image resolution to set.")
        model.processor.set_image_token_bounds(*image_tokens)


def search(
    index_path: str,
    query: str | None = None,
    query_image: str | None = None,
    model_path: str | None = None,
    top_k: int = 5,
    image_tokens: tuple[int | None, int | None] = (None, None),
    prompt_name: str | None = None,
) -> list[tuple[float, int]]:
    """Cosine scores of the query against the index: the `top_k` best as (score, item number), best first."""
    from .modeling_moca import MoCaModel

    if (query is None) == (query_image is None):
        raise ValueError("Pass exactly one of --query and --query_image.")
    index = read_index(index_path)
    model_path = model_path or index.model
    if not model_path:
        raise ValueError(f"{index_path} does not name its model: pass --model.")
    model = MoCaModel.from_pretrained(model_path).eval()
    _set_image_tokens(model, image_tokens)
    if query_image is not None and not Path(query_image).is_file():
        raise ValueError(f"--query_image {query_image}: no such file.")
    query_embedding = model.encode_queries(
        [query if query is not None else Path(query_image)], prompt_name=prompt_name, show_progress_bar=False
    )
    scores = F.normalize(index.embeddings.float(), dim=-1) @ F.normalize(query_embedding, dim=-1)[0]
    best = torch.topk(scores, min(top_k, len(scores)))
    return [(score, item) for score, item in zip(best.values.tolist(), best.indices.tolist())]


def print_results(index_path: str, results: list[tuple[float, int]]) -> None:
    index = read_index(index_path)
    for rank, (score, item) in enumerate(results, start=1):
        shown = index.images[item] or (index.texts[item] or "").replace("\n", " ")[:100]
        print(f"{rank:>3}  {score:.4f}  {index.ids[item]}  {shown}")


# ---------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m moca", description="Embed and search with a MoCa model.")
    commands = parser.add_subparsers(dest="command", required=True)

    embed_parser = commands.add_parser("embed", help="Embed a folder or a datasets dataset into an index file.")
    embed_parser.add_argument(
        "--model_name_or_path", "--model", dest="model_name_or_path", required=True,
        help="MoCa checkpoint: a folder or a Hub name.",
    )  # fmt: skip
    embed_parser.add_argument(
        "--dataset", "--input", dest="dataset", required=True,
        help="A folder of images and .txt files, or a dataset (Hub name, save_to_disk folder, data file).",
    )  # fmt: skip
    embed_parser.add_argument("--output", required=True, help="Index file: .safetensors or .parquet.")
    embed_parser.add_argument("--batch_size", type=int, default=32)
    embed_parser.add_argument("--split", default="train", help="Dataset split.")
    embed_parser.add_argument("--text_column", default=None, help="Dataset text column (default: 'text' if present).")
    embed_parser.add_argument(
        "--image_column", default=None, help="Dataset image column (default: 'image' if present)."
    )
    embed_parser.add_argument("--id_column", default=None, help="Dataset id column (default: the row number).")
    embed_parser.add_argument("--dtype", default=None, choices=list(DTYPES))
    embed_parser.add_argument("--max_length", type=int, default=None, help="Longest input in tokens (default: no cut).")

    search_parser = commands.add_parser("search", help="Print the items of an index closest to a query.")
    search_parser.add_argument("--index", required=True, help="Index file written by `embed`.")
    search_parser.add_argument(
        "--model_name_or_path", "--model", dest="model_name_or_path", default=None,
        help="MoCa checkpoint (default: the one that built the index).",
    )  # fmt: skip
    search_parser.add_argument("--query", default=None, help="Text query.")
    search_parser.add_argument("--query_image", default=None, help="Image query (a file).")
    search_parser.add_argument("--top_k", type=int, default=5)
    embed_parser.add_argument("--prompt_name", default=None,
                              help="Named prompt of the checkpoint for the items (default: its document prompt).")
    search_parser.add_argument("--prompt_name", default=None,
                               help="Named prompt of the checkpoint for the query, e.g. caption (default: its query prompt).")
    for command_parser in (embed_parser, search_parser):
        command_parser.add_argument("--min_image_tokens", type=int, default=None,
                                    help="Fewest visual tokens per image (default: the checkpoint's bound).")
        command_parser.add_argument("--max_image_tokens", type=int, default=None,
                                    help="Most visual tokens per image (default: the checkpoint's bound).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "embed":
        index = embed(
            args.model_name_or_path,
            args.dataset,
            args.output,
            batch_size=args.batch_size,
            split=args.split,
            text_column=args.text_column,
            image_column=args.image_column,
            id_column=args.id_column,
            dtype=args.dtype,
            max_length=args.max_length,
            image_tokens=(args.min_image_tokens, args.max_image_tokens),
            prompt_name=args.prompt_name,
        )
        print(f"{len(index.ids)} items, {index.embeddings.shape[1]} dimensions -> {args.output}")
    else:
        results = search(
            args.index, query=args.query, query_image=args.query_image, model_path=args.model_name_or_path,
            top_k=args.top_k, image_tokens=(args.min_image_tokens, args.max_image_tokens), prompt_name=args.prompt_name,
        )
        print_results(args.index, results)


if __name__ == "__main__":
    main()
