"""`python -m moca embed` a folder or a `datasets` dataset into an index file; `python -m moca search` it.

    python -m moca embed --model_name_or_path CHECKPOINT --dataset FOLDER_OR_DATASET --output index.safetensors
    python -m moca search --index index.safetensors --query "a red circle" --top_k 5
    python -m moca export OLD_CHECKPOINT NEW_CHECKPOINT   # an earlier version's checkpoint in the stock layout
    torchrun --nproc_per_node 8 -m moca embed ...            # one process per GPU, one index
    python -m moca embed ... --shard 0/4 --output part-0.safetensors; python -m moca merge-index part-*.safetensors --output index.safetensors

The flags are named as in the training scripts and the evaluations (`--model` and `--input` are aliases).

An index holds the embeddings and, per item, its id, text and image path: a safetensors file (the item
columns as JSON in its metadata) or a parquet file (one row per item), with the fingerprint of the model that
made it (`search` refuses another). Embedding runs in chunks saved next to the output (`OUTPUT.partial/`), so an
interrupted run resumes where it stopped, from the chunks of the same weights and item contents only; `OUTPUT.lock`
keeps a second run off the same output. Unreadable files are skipped and counted (`--strict` stops at the first).
"""

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import safe_open, save_file

from .data import absolute_image_paths, is_saved_dataset, load_source
from .fingerprint import file_stamp, model_fingerprint
from .modeling_moca import DTYPES
from .processing_moca import IMAGE_EXTENSIONS, load_image, parse_input

logger = logging.getLogger(__name__)

TEXT_EXTENSIONS = (".txt", ".md")
INDEX_FORMATS = (".safetensors", ".parquet")
# The release trains at 1,280 tokens; without a cut one 16k-token text takes 2.6 GB (attention is quadratic).
DEFAULT_MAX_LENGTH = 1280


@dataclass
class Index:
    embeddings: torch.Tensor  # (N, D) float32
    ids: list[str]
    texts: list[str | None]
    images: list[str | None]
    model: str
    # Which weights made the embeddings (`moca.fingerprint.model_fingerprint`) and in which dtype: a search
    # with other weights would compare vectors of two different spaces.
    model_fingerprint: str = ""
    dtype: str | None = None
    skipped: list[str] = field(default_factory=list)  # "id: why" of each item that could not be read
    truncated: int = 0  # items longer than max_length tokens, embedded cut
    shard: list[int] | None = None  # [i, N] for shard i of N (`embed --shard i/N`), None for all the items


# ---------------------------------------------------------------------------------------------- checks


def check_model_path(name_or_path: str, flag: str) -> None:
    """A one-line error for a model that is neither a local folder nor a Hub id, before transformers raises
    "Repo id must be in the form ..." about a path that simply does not exist."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(name_or_path).exists():
        return
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise ValueError(f"{flag} {name_or_path}: no such folder, and not a Hub model id (owner/name).") from None


def count_truncated(model, inputs, max_length: int | None, prompt: str | None = None) -> int:
    """How many of `inputs` (as `encode` takes them, with `prompt`) are longer than `max_length` tokens."""
    processor = getattr(model, "processor", None)
    if max_length is None or processor is None or not inputs:
        return 0
    items = processor.parse_inputs(inputs, prompt, image_prompt=model.config.image_prompt)
    return sum(length > max_length for length in processor.token_counts(items))


class OutputLock:
    """`OUTPUT.lock` holding the writer's host and pid: a second run on one output refuses at once, a lock left
    by a killed run (its pid gone, on this host) is taken over."""

    def __init__(self, output: Path):
        self.path = output.with_name(output.name + ".lock")
        self.owner = f"{socket.gethostname()} {os.getpid()}"

    def __enter__(self):
        for _ in range(2):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._holder_alive():
                    raise RuntimeError(
                        f"Another `moca embed` ({self.path.read_text().strip() or 'starting'}) is writing "
                        f"{self.path.with_suffix('')}; its lock file is {self.path} (delete it if that run is gone)."
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: taken over on the next try
                continue
            with os.fdopen(descriptor, "w") as lock_file:
                lock_file.write(self.owner)
            return self
        raise RuntimeError(f"Another `moca embed` took the lock {self.path} at the same time; run again later.")

    def _holder_alive(self) -> bool:
        try:
            host, pid = self.path.read_text().split()
        except (FileNotFoundError, ValueError):
            return True  # being written by its owner right now
        if host != socket.gethostname():
            return True  # a pid of another machine cannot be checked from here
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # alive, another user's
        return True

    def __exit__(self, *exc_info):
        self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- inputs


def folder_items(folder: Path, strict: bool = False):
    """Every image and text file under `folder` (sorted): ids (relative paths), encode inputs, texts, image
    paths, and "path: why" of each text file that cannot be read (skipped; the first raises with `strict`)."""
    ids, inputs, texts, images, skipped = [], [], [], [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        suffix = path.suffix.lower()
        if suffix in IMAGE_EXTENSIONS:
            inputs.append(path)
            texts.append(None)
            images.append(str(path.resolve()))
        elif suffix in TEXT_EXTENSIONS:
            try:
                text = path.read_bytes().decode("utf-8").strip()
                if not text:
                    raise ValueError("empty text file")
            except (UnicodeDecodeError, ValueError) as error:
                problem = f"{path}: {error}"
                if strict:
                    raise ValueError(f"{problem} (--strict stops at the first unreadable file)") from error
                logger.warning("Skipped %s", problem)
                skipped.append(problem)
                continue
            inputs.append(text)
            texts.append(text)
            images.append(None)
        else:
            continue
        ids.append(str(path.relative_to(folder)))
    if not ids and not skipped:
        raise ValueError(
            f"{folder}: no image ({', '.join(IMAGE_EXTENSIONS)}) or text ({', '.join(TEXT_EXTENSIONS)}) files."
        )
    return ids, inputs, texts, images, skipped


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


def _image_content(image) -> bytes:
    if image is None:
        return b""
    if isinstance(image, (list, tuple)):
        return b"".join(_image_content(part) for part in image)
    if isinstance(image, dict):  # an undecoded `datasets` image
        return image.get("bytes") or _image_content(image.get("path"))
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return f"{path}|{file_stamp(path) if path.is_file() else 'missing'}".encode()
    return f"{image.mode}|{image.size}|".encode() + image.tobytes()  # a decoded PIL image


def content_key(ids: list[str], inputs: list) -> str:
    """Hash of items' ids and contents (texts, image bytes, or image files' size and modification time)."""
    digest = hashlib.blake2b(digest_size=16)
    for item_id, item in zip(ids, inputs):
        text, image = (item.get("text"), item.get("image")) if isinstance(item, dict) else (item, None)
        if isinstance(text, os.PathLike):  # a folder's image file
            text, image = None, text
        for part in (item_id.encode(), (text or "").encode(), _image_content(image)):
            digest.update(len(part).to_bytes(8, "little") + part)
    return digest.hexdigest()


def _unreadable_image(item) -> str | None:
    """Why an image of an `encode` input cannot be decoded, or None."""
    for image in parse_input(item)[1]:
        try:
            load_image(image)
        except ValueError as error:
            return str(error)
    return None


def _encode_chunk(model, ids: list[str], inputs: list, strict: bool, **encode_kwargs):
    """Embeddings of a chunk's readable items, which of them were kept, and "id: why" of each skipped one.

    The chunk is encoded in one call; only when that fails are its items encoded one at a time, so that an
    unreadable image is skipped (or, with `strict`, raised) and any other error names its item.
    """
    try:
        return model.encode_documents(inputs, **encode_kwargs), [True] * len(ids), []
    except ValueError:
        pass
    embeddings, kept, skipped = [], [], []
    for item_id, item in zip(ids, inputs):
        try:
            why = _unreadable_image(item)
        except ValueError as error:
            raise ValueError(f"Item {item_id!r}: {error}") from error
        if why is not None:
            if strict:
                raise ValueError(f"Item {item_id!r}: {why} (--strict stops at the first unreadable file)")
            logger.warning("Skipped %s: %s", item_id, why)
            skipped.append(f"{item_id}: {why}")
            kept.append(False)
            continue
        try:
            embeddings.append(model.encode_documents([item], **encode_kwargs))
        except ValueError as error:
            raise ValueError(f"Item {item_id!r}: {error}") from error
        kept.append(True)
    dim = model.config.hidden_size
    return (torch.cat(embeddings) if embeddings else torch.empty(0, dim)), kept, skipped


def bfloat16_is_native(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware: a CUDA GPU that supports it, or a CPU with AMX or
    AVX-512-BF16 (torch's own probes). Elsewhere bf16 products are emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return False


def resolve_dtype(dtype: str | None, device: torch.device, model_path: str | None = None) -> str:
    """The weight dtype a command runs in: `dtype` itself, or for "auto" (and None) bfloat16 where `device`
    computes it natively (on this CPU family: 1.82x float32, cosine >= 0.9999 to it, bench/RESULTS.md), a
    float16 checkpoint's own dtype on a GPU without bf16, and float32 otherwise."""
    if dtype not in (None, "auto"):
        if dtype not in DTYPES:
            raise ValueError(f"--dtype {dtype!r}: use auto or one of {', '.join(DTYPES)}.")
        return dtype
    if bfloat16_is_native(device):
        return "bfloat16"
    if device.type == "cuda" and model_path is not None and checkpoint_dtype(model_path) == "float16":
        return "float16"
    return "float32"


def checkpoint_dtype(model_path: str) -> str | None:
    """The dtype a checkpoint's config says its weights are stored in (None when it says none)."""
    from transformers import PretrainedConfig

    config = PretrainedConfig.get_config_dict(model_path)[0]
    return config.get("dtype") or config.get("torch_dtype")


def resolve_device(device: str | None = None) -> torch.device:
    """`device` (`cpu`, `cuda`, `cuda:1`, ...), or for "auto" (and None) this process's GPU when there is one:
    `cuda:LOCAL_RANK` under torchrun / accelerate launch, one GPU per process."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device in (None, "auto"):
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: not a device (auto, cpu, cuda, cuda:1, ...).") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this machine has no CUDA GPU (torch sees none).")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank)
    return resolved


def parse_shard(shard: str | None) -> tuple[int, int]:
    """`"i/N"` (shard i of N, counted from 0) as (i, N); None: the whole input, (0, 1)."""
    if shard is None:
        return 0, 1
    try:
        number, count = (int(part) for part in shard.split("/"))
    except ValueError:
        raise ValueError(f"--shard {shard!r}: expected i/N, e.g. 0/4 for the first of 4 shards.") from None
    if not 0 <= number < count:
        raise ValueError(f"--shard {shard}: i must be in 0..N-1 (shards are counted from 0).")
    return number, count


def join_processes(device: torch.device) -> tuple[int, int]:
    """(rank, world size) of this process in a torchrun / accelerate launch job, joined over NCCL on GPUs and
    gloo on CPU; (0, 1) when it runs alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()


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
    dtype: str | None = "auto",
    max_length: int | None = DEFAULT_MAX_LENGTH,
    show_progress_bar: bool = True,
    image_tokens: tuple[int | None, int | None] = (None, None),
    prompt_name: str | None = None,
    strict: bool = False,
    device: str | None = None,
    shard: str | None = None,
) -> Index | None:
    """Embed every item of a folder or dataset as a document and write the index to `output`.

    Items whose text file or image cannot be read are skipped, named in a warning and in `Index.skipped`
    (`strict`: the first raises). Items longer than `max_length` tokens (None: no cut) are cut and counted.
    `dtype`: "auto" (see `resolve_dtype`) or a name of `DTYPES`; `device`: see `resolve_device`.

    `shard="i/N"` embeds only the i-th of N contiguous ranges of the items (for one node of a cluster;
    `merge_indexes` joins the N indexes into the one a single run writes). Under torchrun / accelerate launch,
    each process takes every world-size-th chunk of `chunk_size` items on its own device, all write their chunks
    into `OUTPUT.partial/`, and rank 0 writes the index (and returns it; the other ranks return None). The
    chunks are the same whatever the number of processes, so the index is the one a single process writes.
    """
    from tqdm.auto import tqdm

    from .modeling_moca import MoCaModel

    output = Path(output)
    if output.suffix not in INDEX_FORMATS:
        raise ValueError(f"--output must end with {' or '.join(INDEX_FORMATS)}, got {output.name!r}.")
    if max_length is not None and max_length < 1:
        raise ValueError(f"--max_length must be positive (0 on the command line: no cut), got {max_length}.")
    if chunk_size < 1:
        raise ValueError(f"--chunk_size must be positive, got {chunk_size}.")
    shard_number, shard_count = parse_shard(shard)
    device = resolve_device(device)
    check_model_path(model_path, "--model_name_or_path")
    dtype = resolve_dtype(dtype, device, model_path)
    rank, world_size = join_processes(device)
    # One writer owns the output: rank 0 holds the lock, the others only write their chunks.
    with OutputLock(output) if rank == 0 else contextlib.nullcontext():
        if Path(input_path).is_dir() and not is_saved_dataset(Path(input_path)):
            ids, inputs, texts, images, skipped = folder_items(Path(input_path), strict)
        else:
            ids, inputs, texts, images = dataset_items(input_path, split, text_column, image_column, id_column)
            skipped = []
        # Files the listing could not read belong to no range of items: the first shard reports them.
        skipped = skipped if shard_number == 0 else []
        first, end = len(ids) * shard_number // shard_count, len(ids) * (shard_number + 1) // shard_count
        model = MoCaModel.from_pretrained(model_path, dtype=DTYPES[dtype]).eval()
        fingerprint = model_fingerprint(model)  # of the checkpoint as stored, as `search` loads it
        set_image_tokens(model, image_tokens)
        model.to(device)
        prompt = model.resolve_prompt(None, prompt_name) if prompt_name else model.config.document_prompt

        # Chunks of embeddings go to disk as they are done. A rerun resumes from them only with the same weights
        # and settings (else they are all dropped), and a chunk only if its items' ids and contents are the same.
        partial = output.with_name(output.name + ".partial")
        run_key = json.dumps([fingerprint, dtype, max_length, list(image_tokens), prompt_name, strict])
        if rank == 0:
            if partial.exists() and (
                not (partial / "run").is_file() or (partial / "run").read_text() != run_key
            ):
                shutil.rmtree(partial)
            partial.mkdir(parents=True, exist_ok=True)
            (partial / "run").write_text(run_key)
        _barrier(world_size)

        starts = range(first, end, chunk_size)
        mine = [start for number, start in enumerate(starts) if number % world_size == rank]
        encode_kwargs = {"batch_size": batch_size, "max_length": max_length, "prompt_name": prompt_name,
                         "show_progress_bar": False}  # fmt: skip
        with tqdm(total=sum(min(chunk_size, end - start) for start in mine), desc="Embedding", unit="item",
                  disable=not show_progress_bar or rank != 0) as progress:  # fmt: skip
            for start in mine:
                chunk_ids, chunk_inputs = ids[start : min(start + chunk_size, end)], inputs[start : min(start + chunk_size, end)]
                chunk_file, key = partial / f"{start:09d}.safetensors", content_key(chunk_ids, chunk_inputs)
                if _read_chunk(chunk_file, key) is None:
                    embeddings, chunk_kept, chunk_skipped = _encode_chunk(
                        model, chunk_ids, chunk_inputs, strict, **encode_kwargs
                    )
                    finite = torch.isfinite(embeddings).all(dim=-1)
                    if not finite.all():  # a NaN index would be searched without complaint
                        first_bad = [item for item, keep in zip(chunk_ids, chunk_kept) if keep][int((~finite).nonzero()[0])]
                        raise ValueError(f"Item {first_bad!r}: the model gave a non-finite embedding (NaN or inf weights?).")
                    kept_inputs = [item for item, keep in zip(chunk_inputs, chunk_kept) if keep]
                    truncated = count_truncated(model, kept_inputs, max_length, prompt)
                    _write_chunk(chunk_file, key, embeddings, chunk_kept, chunk_skipped, truncated)
                progress.update(len(chunk_ids))
        _barrier(world_size)
        if rank != 0:
            return None

        chunks, kept, truncated = [], [], 0
        for start in starts:  # each checked against its items above, by the process that owns it
            saved = _read_chunk(partial / f"{start:09d}.safetensors")
            if saved is None:
                raise RuntimeError(f"{partial}: the chunk of items {start}.. is missing (a process of this run failed?).")
            chunks.append(saved[0])
            kept.extend(saved[1])
            skipped.extend(saved[2])
            truncated += saved[3]

        if not any(kept):
            raise ValueError(f"{input_path}: none of the {len(kept) + len(skipped)} items could be read: {skipped[:3]}")
        model_name = str(Path(model_path).resolve()) if Path(model_path).is_dir() else model_path
        keep = [first + i for i, k in enumerate(kept) if k]
        index = Index(
            torch.cat(chunks), [ids[i] for i in keep], [texts[i] for i in keep], [images[i] for i in keep],
            model_name, fingerprint, dtype, skipped, truncated, shard=None if shard is None else [shard_number, shard_count],
        )  # fmt: skip
        write_index(index, output)
        shutil.rmtree(partial)
    return index


def _write_chunk(path: Path, key: str, embeddings, kept: list[bool], skipped: list[str], truncated: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        {"embeddings": embeddings.float().contiguous(), "kept": torch.tensor(kept, dtype=torch.uint8)},
        tmp,
        metadata={"content": key, "skipped": json.dumps(skipped), "truncated": str(truncated)},
    )
    os.replace(tmp, path)  # a run killed while writing leaves no chunk that looks whole


def _read_chunk(path: Path, key: str | None = None):
    """A saved chunk (embeddings, kept, skipped, truncated) if it holds exactly the items of `key` (any items
    when None), else None."""
    if not path.is_file():
        return None
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        if key is not None and metadata.get("content") != key:
            return None
        return (
            f.get_tensor("embeddings"), [bool(k) for k in f.get_tensor("kept").tolist()],
            json.loads(metadata["skipped"]), int(metadata["truncated"]),
        )  # fmt: skip


def write_index(index: Index, output: Path) -> None:
    tmp = output.with_name(output.name + ".tmp")
    columns = {
        "ids": index.ids, "texts": index.texts, "images": index.images, "model": index.model,
        "model_fingerprint": index.model_fingerprint, "dtype": index.dtype, "skipped": index.skipped,
        "truncated": index.truncated, "shard": index.shard,
    }  # fmt: skip
    if output.suffix == ".safetensors":
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
        ).replace_schema_metadata({"model": index.model, "moca_index": json.dumps(
            {name: columns[name] for name in ("model_fingerprint", "dtype", "skipped", "truncated", "shard")}
        )})  # fmt: skip
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
        columns = {name: json.loads(value) for name, value in metadata.items()}
        return Index(
            embeddings, columns["ids"], columns["texts"], columns["images"], columns["model"],
            columns.get("model_fingerprint", ""), columns.get("dtype"), columns.get("skipped", []),
            columns.get("truncated", 0), columns.get("shard"),
        )  # fmt: skip
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        missing = {"id", "text", "image", "embedding"} - set(table.column_names)
        if missing:
            raise ValueError(f"{path}: not a moca index (no columns {sorted(missing)}).")
        embeddings = torch.from_numpy(table.column("embedding").combine_chunks().flatten().to_numpy().copy())
        metadata = table.schema.metadata or {}
        provenance = json.loads(metadata.get(b"moca_index", b"{}"))
        return Index(
            embeddings.reshape(table.num_rows, -1),
            table.column("id").to_pylist(),
            table.column("text").to_pylist(),
            table.column("image").to_pylist(),
            metadata.get(b"model", b"").decode(),
            provenance.get("model_fingerprint", ""),
            provenance.get("dtype"),
            provenance.get("skipped", []),
            provenance.get("truncated", 0),
            provenance.get("shard"),
        )
    raise ValueError(f"{path}: an index is a {' or '.join(INDEX_FORMATS)} file.")


def merge_indexes(paths: list[str], output: str) -> Index:
    """One index from the shards `embed --shard i/N` wrote (in shard order, whatever order `paths` come in),
    the same as one run over all the items would write; indexes without shard numbers join in the given order.

    They must come from the same weights in the same dtype (`model_fingerprint`), and hold no id twice.
    """
    output = Path(output)
    if output.suffix not in INDEX_FORMATS:
        raise ValueError(f"--output must end with {' or '.join(INDEX_FORMATS)}, got {output.name!r}.")
    if not paths:
        raise ValueError("merge-index needs at least one index.")
    indexes = []
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"{path}: no such index file.")
        indexes.append((path, read_index(path)))
    first_path, first = indexes[0]
    for path, index in indexes[1:]:
        for what, mine, theirs in (
            ("model fingerprint", index.model_fingerprint, first.model_fingerprint), ("dtype", index.dtype, first.dtype),
            ("embedding size", index.embeddings.shape[1], first.embeddings.shape[1]),
        ):  # fmt: skip
            if mine != theirs:
                raise ValueError(f"{path} has {what} {mine}, {first_path} {theirs}: indexes of other weights or settings "
                                 "do not merge (their vectors live in different spaces).")  # fmt: skip
    shards = [index.shard for _, index in indexes]
    if any(shards):
        if not all(shards):
            raise ValueError(f"{[p for p, i in indexes if not i.shard]} hold no shard number, the others do: "
                             "merge the shards of one sharded run.")  # fmt: skip
        counts = {count for _, count in shards}
        numbers = sorted(number for number, _ in shards)
        if len(counts) != 1 or numbers != list(range(next(iter(counts)))):
            found = ", ".join(f"{p}: {n}/{c}" for p, (n, c) in zip(paths, shards))
            raise ValueError(f"the shards must be 0/N..N-1/N of one run, each once; got {found}.")
        indexes.sort(key=lambda pair: pair[1].shard[0])
    seen = {}
    for path, index in indexes:
        for item_id in index.ids:
            if item_id in seen:
                raise ValueError(f"item {item_id!r} is in both {seen[item_id]} and {path}: shards of one run hold "
                                 "each item once.")  # fmt: skip
            seen[item_id] = path
    merged = Index(
        torch.cat([index.embeddings for _, index in indexes]),
        [i for _, index in indexes for i in index.ids], [t for _, index in indexes for t in index.texts],
        [m for _, index in indexes for m in index.images], first.model, first.model_fingerprint, first.dtype,
        [s for _, index in indexes for s in index.skipped], sum(index.truncated for _, index in indexes),
    )  # fmt: skip
    write_index(merged, output)
    return merged


# ---------------------------------------------------------------------------------------------- search


def set_image_tokens(model, image_tokens, name: str = "The checkpoint") -> None:
    """`(fewest, most)` visual tokens per image over the checkpoint's own bounds (`None` keeps a bound)."""
    if any(bound is not None for bound in image_tokens):
        if model.processor is None:
            raise ValueError(f"{name} has no processor files: no image resolution to set.")
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
    if top_k < 1:
        raise ValueError(f"--top_k must be at least 1, got {top_k}.")
    index = read_index(index_path)
    model_path = model_path or index.model
    if not model_path:
        raise ValueError(f"{index_path} does not name its model: pass --model.")
    check_model_path(model_path, "--model_name_or_path")
    # In the index's dtype: the same weights then have the same fingerprint, and queries the index's precision.
    model = MoCaModel.from_pretrained(model_path, dtype=DTYPES[index.dtype] if index.dtype else None).eval()
    fingerprint = model_fingerprint(model)
    set_image_tokens(model, image_tokens)
    if query_image is not None and not Path(query_image).is_file():
        raise ValueError(f"--query_image {query_image}: no such file.")
    query_embedding = model.encode_queries(
        [query if query is not None else Path(query_image)], prompt_name=prompt_name, show_progress_bar=False
    )
    if query_embedding.shape[1] != index.embeddings.shape[1]:
        raise ValueError(
            f"{index_path} holds {index.embeddings.shape[1]}-dimensional embeddings (model {index.model}), but "
            f"--model {model_path} gives {query_embedding.shape[1]} dimensions: search with the model that built it."
        )
    if index.model_fingerprint and fingerprint != index.model_fingerprint:
        raise ValueError(
            f"{index_path} was built by model {index.model} with fingerprint {index.model_fingerprint}; --model "
            f"{model_path} has fingerprint {fingerprint} (other weights or settings): its scores against the index "
            "would mean nothing. Search with the model that built the index, or embed the items again."
        )
    scores = F.normalize(index.embeddings.float(), dim=-1) @ F.normalize(query_embedding, dim=-1)[0]
    best = torch.topk(scores, min(top_k, len(scores)))
    return [(score, item) for score, item in zip(best.values.tolist(), best.indices.tolist())]


def print_results(index_path: str, results: list[tuple[float, int]]) -> None:
    index = read_index(index_path)
    for rank, (score, item) in enumerate(results, start=1):
        shown = index.images[item] or (index.texts[item] or "").replace("\n", " ")[:100]
        print(f"{rank:>3}  {score:.4f}  {index.ids[item]}  {shown}")


def export(checkpoint: str, output: str) -> None:
    """A MoCa checkpoint written again by this version: the stock layout (`MoCaConfig.to_stock_dict`), its weights
    unchanged (in their stored dtype), the processor, the sentence-transformers files, remote code and card."""
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{output} exists and is not empty: pick a new folder.")
    from .modeling_moca import MoCaModel

    model = MoCaModel.from_pretrained(checkpoint, dtype="auto")
    if model.processor is None:
        raise ValueError(f"{checkpoint} has no processor files: a checkpoint without them cannot be served.")
    model.save_pretrained(out)


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
    embed_parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                              help="Weights dtype (default auto: bfloat16 where the device computes it natively, "
                                   "GPUs and CPUs with AMX/AVX-512-BF16; float32 elsewhere); float32 for full precision.")
    embed_parser.add_argument("--device", default="auto",
                              help="cpu, cuda, cuda:1, ... (default auto: this process's GPU if any, cuda:LOCAL_RANK "
                                   "under torchrun, else the CPU).")
    embed_parser.add_argument("--shard", default=None,
                              help="i/N: embed only the i-th of N contiguous ranges of the items (counted from 0), "
                                   "e.g. one per node; join the N indexes with `moca merge-index`.")
    embed_parser.add_argument("--chunk_size", type=int, default=1024,
                              help="Items per saved chunk: the unit of resuming and of the work of each process.")
    embed_parser.add_argument("--max_length", type=int, default=DEFAULT_MAX_LENGTH,
                              help=f"Longest input in tokens, longer ones are cut (default: {DEFAULT_MAX_LENGTH}, the "
                                   "training length); 0: no cut.")
    embed_parser.add_argument("--strict", action="store_true",
                              help="Stop at the first file that cannot be read (default: skip it with a warning).")

    merge_parser = commands.add_parser("merge-index", help="Join the indexes of `embed --shard i/N` runs into one.")
    merge_parser.add_argument("indexes", nargs="+", help="The shards' index files (any order).")
    merge_parser.add_argument("--output", required=True, help="Merged index file: .safetensors or .parquet.")

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
    export_parser = commands.add_parser(
        "export", help="Write a checkpoint (of any earlier version) again, in the stock layout that transformers, "
                       "sentence-transformers and vLLM read.",
    )  # fmt: skip
    export_parser.add_argument("checkpoint", help="MoCa checkpoint: a folder or a Hub name.")
    export_parser.add_argument("output", help="Folder to write (must not exist, or be empty).")
    for command_parser in (embed_parser, search_parser):
        command_parser.add_argument("--min_image_tokens", type=int, default=None,
                                    help="Fewest visual tokens per image (default: the checkpoint's bound).")
        command_parser.add_argument("--max_image_tokens", type=int, default=None,
                                    help="Most visual tokens per image (default: the checkpoint's bound).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        run(args)
    except (ValueError, RuntimeError) as error:  # bad input or a busy output: one line, no traceback
        raise SystemExit(f"moca {args.command}: error: {error}") from error
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # joined by `embed`
            torch.distributed.destroy_process_group()


def run(args: argparse.Namespace) -> None:
    if args.command == "embed":
        if args.max_length < 0:
            raise ValueError(f"--max_length must be 0 (no cut) or positive, got {args.max_length}.")
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
            max_length=args.max_length or None,
            image_tokens=(args.min_image_tokens, args.max_image_tokens),
            prompt_name=args.prompt_name,
            strict=args.strict,
            device=args.device,
            shard=args.shard,
            chunk_size=args.chunk_size,
        )
        if index is None:
            return  # not rank 0 of a torchrun job: rank 0 writes the index and reports
        cut = f"{index.truncated} cut to --max_length {args.max_length}" if args.max_length else "none cut"
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        print(
            f"{len(index.ids)} items, {index.embeddings.shape[1]} dimensions -> {args.output} "
            f"({len(index.skipped)} skipped as unreadable, {cut})" + (f" on {processes} processes" if processes > 1 else "")
        )
    elif args.command == "export":
        export(args.checkpoint, args.output)
        print(f"{args.checkpoint} -> {args.output}")
    elif args.command == "merge-index":
        index = merge_indexes(args.indexes, args.output)
        print(f"{len(index.ids)} items from {len(args.indexes)} indexes -> {args.output} ({len(index.skipped)} skipped)")
    else:
        results = search(
            args.index, query=args.query, query_image=args.query_image, model_path=args.model_name_or_path,
            top_k=args.top_k, image_tokens=(args.min_image_tokens, args.max_image_tokens), prompt_name=args.prompt_name,
        )
        print_results(args.index, results)


if __name__ == "__main__":
    main()
