from collections import Counter
from itertools import chain

import datasets
import pytest

from moca.training.contrastive import TaskBatchSampler

TASK_SIZES = [40, 24, 12]
OFFSETS = [0, 40, 64]


def task_of(index):
    return max(t for t, offset in enumerate(OFFSETS) if offset <= index)


def global_batches(world_size, epoch=0, **kwargs):
    """The global batches as the processes together see them: rank slices of the same step, concatenated."""
    samplers = [
        TaskBatchSampler(TASK_SIZES, 8, num_replicas=world_size, rank=r, seed=3, **kwargs) for r in range(world_size)
    ]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    per_rank = [list(sampler) for sampler in samplers]
    assert len({len(batches) for batches in per_rank}) == 1 and len(per_rank[0]) == len(samplers[0])
    # Every index comes with the epoch it was drawn for (what the collator seeds per-row draws with).
    assert {e for batches in per_rank for batch in batches for _, e in batch} == {epoch}
    return [[index for index, _ in chain(*step)] for step in zip(*per_rank)]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_global_batch_is_single_task_and_every_row_is_visited(world_size):
    batches = global_batches(world_size)
    assert all(len(batch) == 8 for batch in batches)
    assert all(len({task_of(i) for i in batch}) == 1 for batch in batches)
    assert all(len(set(batch)) == len(batch) for batch in batches)  # no row twice in a batch (tasks >= batch size)
    assert set(chain(*batches)) == set(range(sum(TASK_SIZES)))
    # Proportional to size: ceil(size / 8) batches per task.
    assert Counter(task_of(batch[0]) for batch in batches) == {0: 5, 1: 3, 2: 2}


def test_processes_agree_and_epochs_differ():
    one, two = global_batches(1, epoch=1), global_batches(2, epoch=1)
    assert one == two  # the global batch does not depend on how many processes share it
    assert global_batches(2, epoch=2) != two


def test_weights_set_the_proportions_of_batches():
    batches = global_batches(2, weights=[1, 1, 2])
    counts = Counter(task_of(batch[0]) for batch in batches)
    # 10 batches per epoch (as many as by size), split 1:1:2 (2.5 rounds to 2).
    assert counts == {0: 2, 1: 2, 2: 5}
    assert all(len({task_of(i) for i in batch}) == 1 for batch in batches)
    # The up-sampled task repeats its rows, all of them, and never one twice within a batch.
    task2 = [batch for batch in batches if task_of(batch[0]) == 2]
    assert set(chain(*task2)) == set(range(64, 76))
    assert all(len(set(batch)) == 8 for batch in task2)


def test_without_task_aware_batching_batches_mix_tasks():
    batches = global_batches(2, task_aware=False)
    assert set(chain(*batches)) == set(range(76))
    assert any(len({task_of(i) for i in batch}) > 1 for batch in batches)


def test_global_batch_must_split_evenly():
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        TaskBatchSampler(TASK_SIZES, 8, num_replicas=3)


def test_accelerate_keeps_each_process_slice_and_forwards_set_epoch():
    """What the Trainer gets on rank 1 of 2: accelerate's prepared dataloader around the task sampler."""
    from accelerate.data_loader import prepare_data_loader, skip_first_batches
    from torch.utils.data import DataLoader

    from moca.training.contrastive import MultiTaskDataset, TaskSpec, keep_rank_slices

    sampler = TaskBatchSampler(TASK_SIZES, 8, num_replicas=2, rank=1, seed=3)
    tasks = [TaskSpec(f"t{t}", datasets.Dataset.from_dict({"x": list(range(size))})) for t, size in enumerate(TASK_SIZES)]

    def collate(items):  # the global index and the epoch of every row, as the collator sees them
        return [(OFFSETS[item["task"]] + item["row"], item["epoch"]) for item in items]

    dataloader = DataLoader(MultiTaskDataset(tasks), batch_sampler=sampler, collate_fn=collate)
    prepared = prepare_data_loader(dataloader, num_processes=2, process_index=1, put_on_device=False)
    assert [batch for batch in prepared] != list(sampler)  # re-sharded as accelerate does by default
    prepared = keep_rank_slices(prepared, sampler)
    assert [batch for batch in prepared] == list(sampler)
    assert len(prepared) == len(sampler)

    def with_epoch(batches, epoch):
        return [[(index, epoch) for index in batch[4:]] for batch in batches]

    # The Trainer sets the epoch through the dataloader, and on resuming through `skip_first_batches`' wrapper; the
    # rows reach the collator with that epoch.
    prepared.set_epoch(5)
    assert [batch for batch in prepared] == with_epoch(global_batches(2, epoch=5), 5)
    resumed = skip_first_batches(prepared, 2)
    resumed.batch_sampler.batch_sampler.set_epoch(6)  # what `Trainer._inner_training_loop` does
    assert [batch for batch in resumed] == with_epoch(global_batches(2, epoch=6), 6)[2:]
