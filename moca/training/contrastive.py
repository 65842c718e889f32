"""Stage 2, heterogeneous contrastive fine-tuning: pieces each usable and tested on their own, and the Trainer.

- `contrastive_loss`: InfoNCE on cosine similarity, in-batch and hard negatives (each query's own, as the release, or
  all of the batch's), gathered across processes.
- `grad_cache_loss`: GradCache (arXiv 2101.06983) inside the loss, exact in loss and gradients; the Trainer's
  own `training_step` and backward stay stock.
- `TaskBatchSampler`: every global batch from one task; tasks visited in proportion to size or weight.
- `load_tasks`, `MultiTaskDataset`, `drop_rows_without_positive`, `ContrastiveCollator`: rows of several tasks ->
  model inputs (the package's layout, or the release's, read by `moca.data.release_pairs_to_rows`).
- `ContrastiveArguments`, `load_contrastive_model`, `ContrastiveTrainer`: what `train_contrastive.py` puts together.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..data import (
    absolute_image_paths,
    is_release_pairs,
    load_source,
    release_pairs_to_rows,
    subset_source,
)  # fmt: skip
from ..modeling_moca import MoCaModel
from ..processing_moca import format_prompt
from .common import (
    MoCaTrainer,
    MoCaTrainingArguments,
    ModelDataArguments,
    hub_id,
    image_problem,
    is_moca_checkpoint,
    text_problem,
    torch_dtype,
    with_image_token_bounds,
)

logger = logging.getLogger(__name__)

QUERY_FIELDS = ("query_text", "query_image")
POSITIVE_FIELDS = ("pos_text", "pos_image")
NEGATIVE_FIELDS = ("neg_text", "neg_image")


# ---------------------------------------------------------------------------------------------------------------------
# Loss


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate `tensor` (first dimension may differ between ranks) over all processes, keeping gradients.

    Returns the concatenation and the row at which this rank's rows start. `torch.distributed.nn.functional.all_gather`
    sums the incoming gradients in its backward, so every rank's rows receive the gradient of every rank's loss.
    Single-process: returns `tensor` unchanged.
    """
    if not _is_distributed():
        return tensor, 0
    from torch.distributed.nn.functional import all_gather

    # The collective needs equal shapes: pad to the largest rank, then cut each rank's padding out again.
    local_rows = torch.tensor([tensor.shape[0]], device=tensor.device)
    rows_per_rank = [torch.zeros_like(local_rows) for _ in range(dist.get_world_size())]
    dist.all_gather(rows_per_rank, local_rows)
    rows_per_rank = [int(rows) for rows in rows_per_rank]
    padded = F.pad(tensor, (0, 0, 0, max(rows_per_rank) - tensor.shape[0]))
    gathered = all_gather(padded)
    offset = sum(rows_per_rank[: dist.get_rank()])
    return torch.cat([part[:rows] for part, rows in zip(gathered, rows_per_rank)]), offset


def info_nce(
    query_embeddings: torch.Tensor,
    document_embeddings: torch.Tensor,
    positive_index: torch.Tensor,
    temperature: float,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over queries of -log softmax(cos(q, d) / temperature)[positive], the softmax over the documents that
    `candidates` (a queries x documents mask) marks for each query, or over all documents."""
    queries = F.normalize(query_embeddings, dim=-1)
    documents = F.normalize(document_embeddings, dim=-1)
    logits = queries @ documents.T / temperature
    # Softmax in at least fp32: bf16 logits at temperature 0.03 lose the differences that matter.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if candidates is not None:
        logits = logits.masked_fill(~candidates, float("-inf"))
    return F.cross_entropy(logits, positive_index, reduction="sum")


NEGATIVE_SCORING = ("own", "batch")


def contrastive_loss(
    query_embeddings: torch.Tensor,
    document_embeddings: torch.Tensor,
    temperature: float = 0.03,
    matryoshka_dims: Sequence[int] | None = None,
    negatives_per_query: Sequence[int] | None = None,
    negatives: str = "own",
) -> torch.Tensor:
    """InfoNCE of the local queries against the positives of every process and hard negatives.

    `document_embeddings` holds this process's positives first (row i is the positive of query i), then its hard
    negatives, grouped by query: `negatives_per_query[i]` of them belong to query i (default: an equal share each).

    - `negatives="own"` (the release, `src/model.py: MMEBModel.forward`): each query is scored against every
      positive of the global batch (its own and the in-batch negatives) and only its own hard negatives. Positives
      are gathered across processes; hard negatives stay on their process, as only their own query sees them.
    - `negatives="batch"`: each query is scored against every document of the global batch, every hard negative
      included; all documents are gathered.

    Across processes the returned value is `world_size / global_queries` times the sum over *local* queries (the
    local mean when ranks hold equal shares). Its backward, through the summing gather, gives each rank
    `world_size` times its share of the global-batch gradient; the data-parallel wrapper (DDP, FSDP, DeepSpeed)
    averages over ranks, so the optimiser sees exactly the single-process gradient of the global batch, and the mean
    of the logged losses over ranks is the global-batch loss, also when ranks hold unequal shares.

    With `matryoshka_dims`, the loss is the mean of the losses at each truncated (and re-normalised) dimension.
    """
    if negatives not in NEGATIVE_SCORING:
        raise ValueError(f"negatives={negatives!r}: use one of {NEGATIVE_SCORING}")
    num_queries = query_embeddings.shape[0]
    num_negatives = document_embeddings.shape[0] - num_queries
    if num_negatives < 0:
        raise ValueError(
            f"{num_queries} queries but only {document_embeddings.shape[0]} documents: every query needs its positive"
        )
    device = query_embeddings.device
    candidates = None
    if negatives == "batch":
        documents, offset = gather_with_grad(document_embeddings)
    else:
        positives, offset = gather_with_grad(document_embeddings[:num_queries])
        documents = torch.cat([positives, document_embeddings[num_queries:]])
        owner = torch.arange(num_queries, device=device).repeat_interleave(
            _negative_counts(negatives_per_query, num_queries, num_negatives, device)
        )
        candidates = torch.cat(
            [
                torch.ones(num_queries, positives.shape[0], dtype=torch.bool, device=device),
                owner[None, :] == torch.arange(num_queries, device=device)[:, None],
            ],
            dim=1,
        )
    positive_index = torch.arange(offset, offset + num_queries, device=device)
    world_size, global_queries = 1, num_queries
    if _is_distributed():
        world_size = dist.get_world_size()
        count = torch.tensor([num_queries], device=device)
        dist.all_reduce(count)
        global_queries = int(count)
    dims = matryoshka_dims or [query_embeddings.shape[-1]]
    losses = [
        info_nce(query_embeddings[:, :dim], documents[:, :dim], positive_index, temperature, candidates) for dim in dims
    ]
    return torch.stack(losses).mean() * world_size / global_queries


def _negative_counts(
    negatives_per_query: Sequence[int] | None, num_queries: int, num_negatives: int, device
) -> torch.Tensor:
    if negatives_per_query is None:
        if num_negatives % num_queries:
            raise ValueError(
                f"{num_negatives} hard negatives do not split evenly over {num_queries} queries: pass negatives_per_query"
            )
        negatives_per_query = [num_negatives // num_queries] * num_queries
    if len(negatives_per_query) != num_queries or sum(negatives_per_query) != num_negatives:
        raise ValueError(
            f"negatives_per_query lists {len(negatives_per_query)} queries and {sum(negatives_per_query)} hard negatives; "
            f"the batch has {num_queries} queries and {num_negatives} hard negatives"
        )
    return torch.tensor(list(negatives_per_query), dtype=torch.long, device=device)


# ---------------------------------------------------------------------------------------------------------------------
# GradCache


class _RandomState:
    """The CPU and accelerator random states at one moment, to replay dropout exactly in the second pass."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.cpu_state = torch.get_rng_state()
        self.cuda_devices = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
        self.cuda_states = [torch.cuda.get_rng_state(device) for device in self.cuda_devices]

    @contextlib.contextmanager
    def restored(self):
        with torch.random.fork_rng(devices=self.cuda_devices):
            torch.set_rng_state(self.cpu_state)
            for device, state in zip(self.cuda_devices, self.cuda_states):
                torch.cuda.set_rng_state(state, device)
            yield


def _tensors(chunk: dict) -> list[torch.Tensor]:
    return [value for value in chunk.values() if isinstance(value, torch.Tensor)]


def grad_cache_loss(
    encode: Callable[[dict], torch.Tensor],
    chunks: Sequence[dict],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """`loss_fn(cat([encode(chunk) for chunk in chunks]))` whose backward fills the parameter gradients one chunk in
    memory at a time.

    Pass 1 (here) encodes every chunk without a graph and back-propagates the loss to the embeddings only. The
    returned loss is a leaf with a backward hook: whatever `backward` the caller runs (the Trainer's, through
    accelerate, with its gradient-accumulation and loss scaling), pass 2 runs inside it, re-encoding each chunk
    with a graph (replaying its random state, so dropout masks match) and back-propagating the cached embedding
    gradients, times the incoming gradient, into the parameters. Memory is bounded by one chunk's activations plus
    the embeddings; loss and gradients equal those of the full-batch computation up to summation order.

    `no_sync` is entered around every chunk's second forward and backward except the last, so that a data-parallel
    wrapper reduces gradients once per step (DDP decides at forward time whether the backward reduces). This is
    the scheme of sentence-transformers' CachedMultipleNegativesRankingLoss; it uses public APIs only.
    """
    embeddings, random_states = [], []
    with torch.no_grad():
        for chunk in chunks:
            random_states.append(_RandomState(_tensors(chunk)))
            embeddings.append(encode(chunk))

    cached = [embedding.detach().requires_grad_() for embedding in embeddings]
    with torch.enable_grad():
        loss = loss_fn(torch.cat(cached))
        loss.backward()
    embedding_grads = [embedding.grad for embedding in cached]

    def replay_chunks(grad_output: torch.Tensor) -> None:
        with torch.enable_grad():
            for index, (chunk, embedding_grad, random_state) in enumerate(zip(chunks, embedding_grads, random_states)):
                with contextlib.nullcontext() if index == len(chunks) - 1 else no_sync():
                    with random_state.restored():
                        embedding = encode(chunk)
                    gradient = (embedding_grad * grad_output).to(embedding.dtype)
                    torch.dot(embedding.flatten(), gradient.flatten()).backward()

    result = loss.detach().requires_grad_()
    result.register_hook(replay_chunks)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Task-aware batching


class TaskBatchSampler(torch.utils.data.Sampler[list[tuple[int, int]]]):
    """Batches of `(index, epoch)` into a concatenation of tasks, every global batch drawn from a single task.

    Each process iterates the same sequence of global batches (the order depends only on `seed` and the epoch) and
    yields its own slice of each, so the global batch (all processes together) is what comes from one task. The
    epoch travels with each index, so that what the collator draws for a row (`--negative_selection random`) can
    depend on it, also in data-loader worker processes, and a resumed run draws what it would have drawn.

    Per epoch, task `t` contributes `ceil(size_t / global_batch_size)` batches (every row visited once, the last batch
    of a task filled up with rows from its start), or, with `weights`, a number of batches proportional to its weight
    out of the same total (rows re-shuffled and repeated when a task is up-sampled). The batches of all tasks are
    then shuffled together. With `task_aware=False` the tasks are pooled and shuffled as one.
    """

    def __init__(
        self,
        task_sizes: Sequence[int],
        global_batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        weights: Sequence[float] | None = None,
        task_aware: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ):
        if global_batch_size % num_replicas:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by {num_replicas} processes")
        if weights is not None and len(weights) != len(task_sizes):
            raise ValueError(f"{len(weights)} weights for {len(task_sizes)} tasks")
        if min(task_sizes, default=0) <= 0:
            raise ValueError(f"every task needs at least one row, got sizes {list(task_sizes)}")
        self.task_sizes = list(task_sizes)
        self.offsets = [sum(self.task_sizes[:t]) for t in range(len(self.task_sizes))]
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // num_replicas
        self.rank = rank
        self.weights = list(weights) if weights is not None else None
        self.task_aware = task_aware
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0
        for task, size in enumerate(self.task_sizes):
            if task_aware and size < global_batch_size:
                logger.warning(
                    f"task {task} has {size} rows, fewer than the global batch size {global_batch_size}: its batches "
                    "repeat rows, which then count as false negatives"
                )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches_per_task(self) -> list[int]:
        rounding = math.floor if self.drop_last else math.ceil
        natural = [max(1, rounding(size / self.global_batch_size)) for size in self.task_sizes]
        if self.weights is None:
            return natural
        total_weight = sum(self.weights)
        return [max(1, round(sum(natural) * weight / total_weight)) if weight > 0 else 0 for weight in self.weights]

    def global_batches(self) -> list[tuple[int, list[int]]]:
        """This epoch's global batches as `(task, indices)`; task is -1 when batches are not task-aware."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if not self.task_aware:
            total = sum(self.task_sizes)
            order = torch.randperm(total, generator=generator).tolist()
            return [(-1, batch) for batch in self._cut(order, self._count(total))]

        batches = []
        for task, count in enumerate(self._batches_per_task()):
            needed = count * self.global_batch_size
            rows = []
            while len(rows) < needed:
                # One pass over the task, its last batch filled from the pass's start: no batch straddles two passes,
                # so no batch holds a row twice (unless the task is smaller than a batch).
                permutation = torch.randperm(self.task_sizes[task], generator=generator).tolist()
                rows += self._fill(permutation, math.ceil(len(permutation) / self.global_batch_size))
            indices = [self.offsets[task] + row for row in rows[:needed]]
            batches += [(task, batch) for batch in self._cut(indices, count)]
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in order]

    def _count(self, rows: int) -> int:
        return rows // self.global_batch_size if self.drop_last else math.ceil(rows / self.global_batch_size)

    def _fill(self, indices: list[int], count: int) -> list[int]:
        """`indices` cut or repeated from their start to exactly `count` global batches."""
        needed = count * self.global_batch_size
        return (indices * math.ceil(needed / len(indices)))[:needed]

    def _cut(self, indices: list[int], count: int) -> list[list[int]]:
        filled = self._fill(indices, count)
        return [filled[i * self.global_batch_size : (i + 1) * self.global_batch_size] for i in range(count)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        start = self.rank * self.local_batch_size
        for _, batch in self.global_batches():
            yield [(index, self.epoch) for index in batch[start : start + self.local_batch_size]]

    def __len__(self) -> int:
        if not self.task_aware:
            return self._count(sum(self.task_sizes))
        return sum(self._batches_per_task())


# ---------------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class TaskSpec:
    """One task: its rows, how its queries and documents are prompted, where it came from (`source`, a Hub id or a
    path) and the rows that loading skipped, by reason."""

    name: str
    dataset: datasets.Dataset
    query_prompt: str | None = None
    document_prompt: str | None = None
    weight: float | None = None
    source: str | None = None
    skipped_rows: Counter = field(default_factory=Counter)


class MultiTaskDataset(torch.utils.data.Dataset):
    """The concatenation of several tasks; each item carries its task, its row (in the task's source, when the
    rows carry a `row_id`) and the epoch, so that problems can name the row and draws can be seeded by it.

    An index is an int or, from `TaskBatchSampler`, an `(index, epoch)` pair.
    """

    def __init__(self, tasks: Sequence[TaskSpec]):
        self.tasks = list(tasks)
        self.task_sizes = [len(task.dataset) for task in self.tasks]
        self.offsets = [sum(self.task_sizes[:t]) for t in range(len(self.tasks))]

    def __len__(self) -> int:
        return sum(self.task_sizes)

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        index, epoch = index if isinstance(index, tuple) else (index, 0)
        task = bisect.bisect_right(self.offsets, index) - 1
        item = self.tasks[task].dataset[index - self.offsets[task]]
        return {**item, "task": task, "row": item.pop("row_id", index - self.offsets[task]), "epoch": epoch}


def _present(value) -> bool:
    if value is None:
        return False
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, dict):  # datasets Image feature, undecoded
        return bool(value.get("bytes")) or bool(value.get("path"))
    if isinstance(value, (list, tuple)):
        return any(_present(item) for item in value)
    return True


def drop_rows_without_positive(dataset: datasets.Dataset, task_name: str) -> tuple[datasets.Dataset, Counter]:
    """Drop the rows that have no query or no positive, logging how many and which (by `row_id` when the rows
    carry one), with the missing field; returns the rows kept and the count of the dropped ones by reason.

    Images are not decoded here (only their presence is checked); unreadable images are caught by the collator.
    """
    columns = [c for c in (*QUERY_FIELDS, *POSITIVE_FIELDS) if c in dataset.column_names]
    if not any(c in columns for c in POSITIVE_FIELDS):
        raise ValueError(f"task {task_name!r} has no positive column: expected one of {POSITIVE_FIELDS}")
    if not any(c in columns for c in QUERY_FIELDS):
        raise ValueError(f"task {task_name!r} has no query column: expected one of {QUERY_FIELDS}")
    table = dataset.select_columns(columns).with_format("arrow")[:]
    values = {c: table.column(c).to_pylist() for c in columns}
    row_ids = dataset["row_id"] if "row_id" in dataset.column_names else range(len(dataset))
    kept, problems, skipped = [], [], Counter()
    for row, row_id in enumerate(row_ids):
        missing = [
            "/".join(fields)
            for fields in (QUERY_FIELDS, POSITIVE_FIELDS)
            if not any(_present(values[f][row]) for f in fields if f in values)
        ]
        if missing:
            problems.append(f"row {row_id}: no {' and no '.join(missing)}")
            skipped[f"{task_name}: no {' and no '.join(missing)}"] += 1
        else:
            kept.append(row)
    if problems:
        shown = "; ".join(problems[:10]) + ("; ..." if len(problems) > 10 else "")
        logger.warning(f"task {task_name!r}: skipped {len(problems)} of {len(dataset)} rows ({shown})")
        dataset = dataset.select(kept)
    return dataset, skipped


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


NEGATIVE_SELECTION = ("first", "random")


class ContrastiveCollator:
    """Rows of a `MultiTaskDataset` -> `{"chunks": [processor batch, ...], "num_queries": int,
    "negatives_per_query": [int, ...], "skipped_rows": Counter}`.

    The inputs are the queries, then their positives (same order), then the hard negatives, grouped by row. Each row
    gives `num_hard_negatives` of its negatives (pairs of `neg_text[i]`, `neg_image[i]`; empty pairs left out):

    - `negative_selection="first"` (the release, `src/dataset.py: filter_hard_negtives`): the first ones of its list,
      a shorter list padded by repeating its last negative; a row without negatives gives none.
    - `negative_selection="random"`: drawn without replacement (all of them when the row has fewer), from a
      generator seeded by `(seed, epoch, task, row)`, so that a resumed run draws what it would have drawn.

    Queries and documents go through the model together, in one forward pass (so a data-parallel wrapper sees one
    graph per step), or in chunks of `chunk_size` inputs for GradCache; each chunk is a separately padded processor
    batch, without pixel tensors when it has no image. A row that cannot be trained on is skipped with a warning
    naming its task, row and field (`query`, `pos`, `neg`): an image that cannot be read, an input that breaks a rule
    of CPT's validation (`rule_problem`: placeholders that do not match its images, an image
    of aspect ratio over 200) and, looked for only when a batch fails, one the processor refuses or cuts to no
    tokens (`processor_problem`).
    `skipped_rows` counts the batch's skipped rows by reason (returned with the batch, as the collator may run in
    data-loader worker processes).
    """

    def __init__(
        self,
        processor,
        tasks: Sequence[TaskSpec],
        num_hard_negatives: int = 2,
        max_length: int | None = None,
        chunk_size: int | None = None,
        negative_selection: str = "first",
        seed: int = 0,
    ):
        if negative_selection not in NEGATIVE_SELECTION:
            raise ValueError(f"negative_selection={negative_selection!r}: use one of {NEGATIVE_SELECTION}")
        self.processor = processor
        self.tasks = list(tasks)
        self.num_hard_negatives = num_hard_negatives
        self.max_length = max_length
        self.chunk_size = chunk_size
        self.negative_selection = negative_selection
        self.seed = seed

    def _side(self, row: dict, text_field: str, image_field: str, prompt: str | None):
        text, images = row.get(text_field), [self.processor.load_image(v) for v in _as_list(row.get(image_field))]
        return format_prompt(prompt, text), images

    def _negatives(self, row: dict) -> list[tuple[str | None, object]]:
        texts, images = _as_list(row.get("neg_text")), _as_list(row.get("neg_image"))
        pairs = [
            (texts[i] if i < len(texts) else None, images[i] if i < len(images) else None)
            for i in range(max(len(texts), len(images)))
        ]
        pairs = [pair for pair in pairs if _present(pair[0]) or _present(pair[1])]
        count = self.num_hard_negatives
        if self.negative_selection == "first":
            return (pairs + pairs[-1:] * count)[:count]
        generator = random.Random(f"{self.seed}/{row.get('epoch', 0)}/{self.tasks[row['task']].name}/{row['row']}")
        return generator.sample(pairs, min(count, len(pairs)))

    def _process(self, inputs: list[tuple[str, list]]):
        texts = [text for text, _ in inputs]
        images = [images for _, images in inputs]
        return self.processor(
            text=texts,
            images=images if any(images) else None,
            padding=True,
            truncation=self.max_length is not None,
            max_length=self.max_length,
            return_tensors="pt",
        )

    def _encode(self, inputs: list[tuple[str, list]]) -> list[dict]:
        """The processor batches of `inputs`, `chunk_size` at a time; the processor's `ValueError` when it rejects an
        input (an image-first input whose image alone is longer than `max_length` included: the model's position
        code would fail on it far from the row)."""
        size = self.chunk_size or len(inputs)
        chunks = []
        for start in range(0, len(inputs), size):
            chunks.append(dict(self._process(inputs[start : start + size])))
        return chunks

    def rule_problem(self, text: str, images: list) -> tuple[str, str] | None:
        """`(reason, detail)` when an input breaks a rule of CPT's validation, else None: checked on every row, as
        cheap as reading the text and the image sizes."""
        problem = text_problem(self.processor, text, len(images))
        for position, image in enumerate(images):
            problem = problem or image_problem(self.processor, position, *image.size)
        return problem

    def processor_problem(self, text: str, images: list) -> tuple[str, str] | None:
        """`(reason, detail)` when the processor refuses an input, else None."""
        try:
            self._process([(text, images)])
        except ValueError as error:
            return "rejected by the processor", str(error)
        return None

    def _load_row(self, row: dict, task: TaskSpec, skipped: Counter) -> list[tuple[str, tuple[str, list]]] | None:
        """The row's inputs as `(side, (text, images))`: query, positive, then its hard negatives; None (counted
        in `skipped` and logged) when one of its images cannot be read."""
        field = "query_image"
        try:
            inputs = [("query", self._side(row, "query_text", "query_image", task.query_prompt))]
            field = "pos_image"
            inputs.append(("pos", self._side(row, "pos_text", "pos_image", task.document_prompt)))
            field = "neg_image"
            inputs += [
                ("neg", (format_prompt(task.document_prompt, text), [self.processor.load_image(v) for v in _as_list(image)]))
                for text, image in self._negatives(row)
            ]
        except (OSError, ValueError) as error:
            skipped[f"{task.name}: unreadable {field}"] += 1
            logger.warning(
                f"skipped row {row['row']} of task {task.name!r}: unreadable {field} ({type(error).__name__}: {error})"
            )
            return None
        return inputs

    def _row_is_usable(self, row: dict, task: TaskSpec, inputs, skipped: Counter, check) -> bool:
        for side, (text, images) in inputs:
            problem = check(text, images)
            if problem:
                reason, detail = problem
                skipped[f"{task.name}: {side}: {reason}"] += 1
                logger.warning(
                    f"skipped row {row['row']} of task {task.name!r}: {side}: {reason}" + (f" ({detail})" if detail else "")
                )
                return False
        return True

    def __call__(self, rows: list[dict]) -> dict:
        skipped = Counter()
        loaded = []
        for row in rows:
            task = self.tasks[row["task"]]
            inputs = self._load_row(row, task, skipped)
            if inputs is not None:
                loaded.append((row, task, inputs))
        loaded = [entry for entry in loaded if self._row_is_usable(*entry, skipped, self.rule_problem)]
        try:
            chunks = self._encode(self._batch_order(loaded)) if loaded else None
        except ValueError:
            # A row the processor cannot take fails the whole batch: find it, input by input, and skip it. Only
            # batches holding such a row pay for this second pass.
            loaded = [entry for entry in loaded if self._row_is_usable(*entry, skipped, self.processor_problem)]
            chunks = self._encode(self._batch_order(loaded)) if loaded else None
        if not loaded:
            names = sorted({self.tasks[row["task"]].name for row in rows})
            raise ValueError(f"every row of a batch of {len(rows)} rows from {names} is unusable (see warnings)")
        return {
            "chunks": chunks,
            "num_queries": len(loaded),
            "negatives_per_query": [len(inputs) - 2 for _, _, inputs in loaded],
            "skipped_rows": skipped,
        }

    @staticmethod
    def _batch_order(loaded) -> list[tuple[str, list]]:
        """The queries, then their positives in the same order, then every row's hard negatives, row by row."""
        queries = [inputs[0][1] for _, _, inputs in loaded]
        positives = [inputs[1][1] for _, _, inputs in loaded]
        negatives = [value for _, _, inputs in loaded for _, value in inputs[2:]]
        return queries + positives + negatives


# ---------------------------------------------------------------------------------------------------------------------
# Arguments, tasks, model and the Trainer

TASKS_FILE = "tasks.json"
IMAGE_FIELDS = ("query_image", "pos_image", "neg_image")
# The language model's attention and MLP projections; the vision tower keeps its weights.
DEFAULT_LORA_TARGET_MODULES = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class ContrastiveArguments(ModelDataArguments):
    dataset: list[str] = field(
        metadata={
            "help": "One or more tasks: Hub names, save_to_disk folders, parquet/jsonl files or folders of them; "
            "a folder with tasks.json stands for all its tasks; with --subsets, a Hub dataset or a folder of subsets."
        }
    )
    subsets: list[str] | None = field(
        default=None,
        metadata={
            "help": "Subsets of --dataset, each one task: Hub configurations (moca-embed/MoCa-CL-Pairs: visrag_ind, "
            "ImageNet_1K, ...) or a local folder's subfolders / data files; DATASET:SUBSET when several --dataset."
        },
    )
    dataset_config: str | None = field(
        default=None,
        metadata={
            "help": "JSON file {task: {query_prompt, document_prompt, weight}} (default: the tasks.json of a "
            "--dataset folder)."
        },
    )
    max_length: int = field(default=1280, metadata={"help": "Longest input in tokens; longer text is cut (release 1280)."})
    temperature: float = field(default=0.03, metadata={"help": "InfoNCE temperature (paper: 0.03)."})
    num_hard_negatives: int = field(default=2, metadata={"help": "Hard negatives per query (paper: 2)."})
    negatives: str = field(
        default="own",
        metadata={
            "help": "Which hard negatives score each query: own (the release: its own, beside every positive of "
            "the global batch) or batch (every hard negative of the global batch).",
            "choices": list(NEGATIVE_SCORING),
        },
    )
    negative_selection: str = field(
        default="first",
        metadata={
            "help": "Which of a row's hard negatives it gives: first (the release: the first ones, a short list "
            "padded with its last) or random (drawn per row and epoch from --data_seed/--seed).",
            "choices": list(NEGATIVE_SELECTION),
        },
    )
    task_aware_batching: bool = field(
        default=True, metadata={"help": "Draw every global batch from one task (--no_task_aware_batching: mix)."}
    )
    grad_cache_chunk_size: int | None = field(
        default=None,
        metadata={"help": "GradCache: encode at most this many inputs at once; memory no longer limits the batch."},
    )
    matryoshka_dims: list[int] | None = field(
        default=None, metadata={"help": "Also train truncated embeddings of these sizes (Matryoshka loss)."}
    )
    lora_r: int | None = field(default=None, metadata={"help": "LoRA rank; full fine-tuning when unset."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names, or one regular expression (default: the language model's projections)."},
    )
    merge_lora: bool = field(default=False, metadata={"help": "Save the final model with LoRA merged into it."})
    bidirectional: bool = field(
        default=True,
        metadata={"help": "Starting from a causal VLM: make it bidirectional (--no_bidirectional: keep it causal)."},
    )
    pooling: str | None = field(
        default=None,
        metadata={"help": "Starting from a causal VLM: mean or last (default: mean when bidirectional, else last)."},
    )


@dataclass
class ContrastiveTrainingArguments(MoCaTrainingArguments):
    # Where the paper (1e-5) and the released scripts (2e-5) differ, the scripts are the default. A tiny model needs
    # a far larger rate.
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate (release 2e-5, paper 1e-5)."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warmup steps, or a fraction of training if < 1."})


def _task_sources(sources: list[str], subsets: list[str] | None) -> list[tuple[str, str | None]]:
    """`(source, subset)` of every task: a folder with tasks.json stands for its tasks; a dataset with subsets for
    each of them (a bare subset name belongs to the only --dataset, `DATASET:SUBSET` to the one named)."""
    chosen: dict[str, list[str]] = {}
    for entry in subsets or []:
        dataset, separator, subset = entry.rpartition(":")
        if separator and dataset in sources:
            chosen.setdefault(dataset, []).append(subset)
        elif len(sources) == 1:
            chosen.setdefault(sources[0], []).append(entry)
        else:
            raise ValueError(f"--subsets {entry!r}: with several --dataset, name its dataset (DATASET:{entry})")
    expanded = []
    for source in sources:
        tasks_file = Path(source) / TASKS_FILE
        if source in chosen:
            expanded += [(source, subset) for subset in chosen[source]]
        elif tasks_file.is_file():
            # A listed task is a subfolder or data file, named with or without its suffix (`t2i` or `t2i.jsonl`).
            expanded += [(str(subset_source(source, name)), None) for name in json.loads(tasks_file.read_text())]
        else:
            expanded.append((source, None))
    return expanded


def _task_settings(config: dict, name: str, source: str, subset: str | None) -> tuple[str | None, dict]:
    """A task's entry of the task config, `(key, settings)`: a file task may be named by its stem (`t2i`) or its
    file name (`t2i.jsonl`), any task by its source as given, a subset also as `DATASET:SUBSET`."""
    spellings = [name, f"{source}:{subset}"] if subset else [name, Path(source).name, source]
    keys = [key for key in dict.fromkeys(spellings) if key in config]
    if len({json.dumps(config[key], sort_keys=True) for key in keys}) > 1:
        raise ValueError(f"task {name!r} has different settings under {keys}: keep one")
    return (keys[0], config[keys[0]]) if keys else (None, {})


def _has_image_paths(dataset: datasets.Dataset) -> bool:
    columns = [c for c in IMAGE_FIELDS if c in dataset.column_names]
    table = dataset.select_columns(columns).with_format("arrow")[:]
    return any(_present(value) for c in columns for value in table.column(c).to_pylist())


def load_tasks(
    sources: list[str],
    dataset_config: str | None = None,
    split: str = "train",
    image_root: str | None = None,
    subsets: list[str] | None = None,
    seed: int = 0,
) -> list[TaskSpec]:
    """The tasks named by `--dataset` (and `--subsets`), each validated, with its prompts and weight from the task
    config and the rows that loading skipped by reason.

    Rows keep their position in their source as `row_id`. Rows in the release's layout (`qry`, `qry_image_path`,
    ...) are read as the package's (`moca.data.release_pairs_to_rows`; `seed` seeds its one random draw); their
    image paths are relative to the release's image folder, `image_root` (for a local folder of subsets, by
    default that folder).
    """
    if not sources:
        raise ValueError("No dataset given: pass one or more --dataset.")
    if dataset_config is None:
        found = [Path(source) / TASKS_FILE for source in sources if (Path(source) / TASKS_FILE).is_file()]
        dataset_config = str(found[0]) if found else None
    config = json.loads(Path(dataset_config).read_text()) if dataset_config else {}

    tasks, used_keys = [], set()
    for source, subset in _task_sources(sources, subsets):
        name = subset or (Path(source).stem if Path(source).exists() else source)
        key, settings = _task_settings(config, name, source, subset)
        used_keys.add(key)
        unknown = set(settings) - {"query_prompt", "document_prompt", "weight"}
        if unknown:
            raise ValueError(f"{dataset_config}: task {name!r} has unknown settings {sorted(unknown)}")
        if any(task.name == name for task in tasks):
            other = next(task.source for task in tasks if task.name == name)
            raise ValueError(f"two tasks are named {name!r} ({other} and {source}): their settings and counts would mix")
        dataset, root = load_source(source, split, image_root=image_root, subset=subset)
        dataset = dataset.add_column("row_id", list(range(len(dataset))))
        skipped = Counter()
        if is_release_pairs(dataset):
            dataset, skipped = release_pairs_to_rows(dataset, name, seed=seed)
            if root is None and _has_image_paths(dataset):
                raise ValueError(
                    f"task {name!r} ({source}): the release's image paths are relative to its image folder; pass "
                    "--image_dir (the folder that holds images/, as the release's scripts/prepare_images.sh lays it out)"
                )
        dataset = absolute_image_paths(dataset, IMAGE_FIELDS, root)
        dataset, missing = drop_rows_without_positive(dataset, name)
        tasks.append(TaskSpec(name=name, dataset=dataset, source=source, skipped_rows=skipped + missing, **settings))
    unused = sorted(set(config) - used_keys)
    if unused:
        logger.warning(f"{dataset_config}: no task matches the settings of {unused} (tasks: {[t.name for t in tasks]})")
    weights = [task.weight for task in tasks]
    if any(w is not None for w in weights) and any(w is None for w in weights):
        missing = [task.name for task in tasks if task.weight is None]
        raise ValueError(f"Weights are given for some tasks but not for {missing}: give all or none.")
    return tasks


def load_contrastive_model(args: ContrastiveArguments) -> MoCaModel:
    """A MoCa checkpoint as it is, or a causal VLM made MoCa (bidirectional unless `--no_bidirectional`)."""
    kwargs = {"dtype": torch_dtype(args.dtype), "attn_implementation": args.attn_implementation}
    if is_moca_checkpoint(args.model_name_or_path):
        model = MoCaModel.from_pretrained(args.model_name_or_path, **kwargs)
    else:
        model = MoCaModel.from_backbone(
            args.model_name_or_path, bidirectional=args.bidirectional, pooling=args.pooling, **kwargs
        )
    with_image_token_bounds(model, args)
    if args.matryoshka_dims:
        bad = [dim for dim in args.matryoshka_dims if not 0 < dim <= model.config.hidden_size]
        if bad:
            raise ValueError(f"--matryoshka_dims {bad} are outside 1..{model.config.hidden_size} (the hidden size)")
        model.config.matryoshka_dims = sorted(set(args.matryoshka_dims), reverse=True)
    return model


def record_task_prompts(config, tasks: Sequence[TaskSpec]) -> None:
    """Write the prompts the model is trained with into its config, so that every checkpoint carries them.

    Each task's prompts become named prompts `TASK/query` and `TASK/document` (`encode(..., prompt_name=...)`,
    sentence-transformers' `prompt_name`). When all tasks that have a query (document) prompt share one, it
    becomes the config's `query_prompt` (`document_prompt`), which `encode_queries` (`encode_documents`) apply.
    """
    prompts = dict(config.prompts or {})
    for role in ("query", "document"):
        given = {task.name: getattr(task, f"{role}_prompt") for task in tasks if getattr(task, f"{role}_prompt")}
        prompts.update({f"{name}/{role}": prompt for name, prompt in given.items()})
        if len(set(given.values())) == 1:
            setattr(config, f"{role}_prompt", next(iter(given.values())))
        elif given:
            logger.info(f"tasks have different {role} prompts: pass prompt_name='TASK/{role}' to encode with one")
    config.prompts = prompts


def add_lora(model: MoCaModel, args: ContrastiveArguments):
    from peft import LoraConfig, get_peft_model

    targets = args.lora_target_modules or DEFAULT_LORA_TARGET_MODULES
    if isinstance(targets, list) and len(targets) == 1:
        targets = targets[0]  # peft reads a single string as a regular expression
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets)  # fmt: skip
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    return model


def keep_rank_slices(prepared: DataLoader, sampler: TaskBatchSampler) -> DataLoader:
    """Undo accelerate's re-sharding of a data loader whose batch sampler is already rank-aware.

    The sampler gives each process its slice of the same global batch; accelerate's `BatchSamplerShard` would
    hand out whole batches round-robin (other tasks on other processes, and a fraction of the batches). Making
    the wrapper a passthrough is what the Trainer itself does for its own rank-aware `BatchRebalanceSampler`
    (`Trainer._get_dataloader`): accelerate has no public switch for it. This is the one place that touches
    accelerate's wrapper; `tests/test_contrastive_sampler.py` fails loudly when its attributes move.
    """
    shard = getattr(prepared, "batch_sampler", None)
    if shard is not None and getattr(shard, "batch_sampler", None) is sampler:
        shard.num_processes, shard.process_index = 1, 0
        # The Trainer sets the epoch through the wrapper, also after `skip_first_batches` wraps it once more on
        # resuming; without this the wrapper would not pass it on and a resumed run would replay epoch 0's order.
        shard.set_epoch = sampler.set_epoch
    return prepared


class ContrastiveTrainer(MoCaTrainer):
    """Trainer with InfoNCE over the global batch, task-aware batches, GradCache, and MoCa checkpoints with a card.

    GradCache lives in the loss (`grad_cache_loss`), so `training_step` is the Trainer's own."""

    def __init__(self, *args, contrastive_args: ContrastiveArguments, tasks: list[TaskSpec], **kwargs):
        super().__init__(*args, model_name_or_path=contrastive_args.model_name_or_path, **kwargs)
        self.contrastive_args = contrastive_args
        self.tasks = tasks
        # The loss is a mean over the batch's queries, never normalised by a token count.
        self.model_accepts_loss_kwargs = False
        # Rows the collator skipped in this process's training batches, by reason. Counted from the batches, not
        # in the collator: with data-loader workers the collator runs in (and counts in) other processes.
        self.training_skipped_rows = Counter()

    def skipped_rows_by_reason(self) -> Counter:
        """This process's training skips, and on the main process those of loading. Every process loads and
        validates the same rows, and `log_skipped_rows` sums over processes: counted on one process, the
        validation counts are not multiplied by the number of processes."""
        counts = Counter(self.training_skipped_rows)
        if self.args.process_index == 0:
            for task in self.tasks:
                counts.update(task.skipped_rows)
        return counts

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.training_skipped_rows.update(inputs["skipped_rows"])
        return super().training_step(model, inputs, num_items_in_batch)

    def get_train_dataloader(self) -> DataLoader:
        weights = [task.weight for task in self.tasks]
        sampler = TaskBatchSampler(
            self.train_dataset.task_sizes,
            global_batch_size=self.args.per_device_train_batch_size * self.args.world_size,
            num_replicas=self.args.world_size,
            rank=self.args.process_index,
            weights=weights if weights[0] is not None else None,
            task_aware=self.contrastive_args.task_aware_batching,
            drop_last=self.args.dataloader_drop_last,
            seed=self.data_seed,
        )
        return keep_rank_slices(self.accelerator.prepare(self.batch_sampler_dataloader(sampler)), sampler)

    def _loss(self, embeddings: torch.Tensor, inputs: dict) -> torch.Tensor:
        num_queries = inputs["num_queries"]
        return contrastive_loss(
            embeddings[:num_queries],
            embeddings[num_queries:],
            temperature=self.contrastive_args.temperature,
            matryoshka_dims=self.contrastive_args.matryoshka_dims,
            negatives_per_query=inputs["negatives_per_query"],
            negatives=self.contrastive_args.negatives,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        chunks = inputs["chunks"]
        if self.contrastive_args.grad_cache_chunk_size and torch.is_grad_enabled() and not return_outputs:
            return grad_cache_loss(
                lambda chunk: model(**chunk).embeddings,
                chunks,
                lambda embeddings: self._loss(embeddings, inputs),
                no_sync=lambda: self.accelerator.no_sync(model),
            )
        embeddings = torch.cat([model(**chunk).embeddings for chunk in chunks])
        loss = self._loss(embeddings, inputs)
        return (loss, {"embeddings": embeddings}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs["skipped_rows"] = sum(self.training_skipped_rows.values())  # this process's training batches
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        # A LoRA checkpoint holds the adapter alone: no MoCa checkpoint to describe.
        if self.args.should_save and (Path(output_dir) / "config.json").exists():
            self.create_model_card(output_dir=output_dir)

    def card_model(self):
        model = self.accelerator.unwrap_model(self.model)
        return getattr(model, "get_base_model", lambda: model)()

    def card_settings(self) -> list:
        # Data sources and the starting model may be local paths: the card names only Hub ids.
        private = ("dataset", "dataset_config", "model_name_or_path", "image_dir")
        settings = {k: v for k, v in dataclasses.asdict(self.contrastive_args).items() if k not in private}
        return [settings, self.args]

    @property
    def card_tags(self) -> tuple[str, ...]:
        lora = self.card_model() is not self.accelerator.unwrap_model(self.model)
        return ("contrastive", *(("lora",) if lora else ()))

    def card_datasets(self) -> list[str] | None:
        return list(dict.fromkeys(task.source for task in self.tasks if hub_id(task.source))) or None
