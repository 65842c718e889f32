"""Two CPU processes (gloo, DDP) against one process on the concatenated global batch."""

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from moca.training.contrastive import contrastive_loss, grad_cache_loss


class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(40, 12)
        self.proj = nn.Linear(12, 12)

    def forward(self, input_ids):
        return self.proj(self.embed(input_ids)).mean(1)


# Global batch: 5 queries, their 5 positives and 0 to 2 hard negatives each (short lists, as with `--negative_selection
# random`); rank 0 holds 3 queries, rank 1 holds 2 (unequal shares, as after a skipped row).
QUERY_SPLIT = [range(3), range(3, 5)]
NEGATIVES_PER_QUERY = [2, 1, 2, 0, 2]
SCORINGS = ("own", "batch")


def global_batch():
    generator = torch.Generator().manual_seed(7)
    queries = torch.randint(0, 40, (5, 4), generator=generator)
    positives = torch.randint(0, 40, (5, 4), generator=generator)
    negatives = torch.randint(0, 40, (sum(NEGATIVES_PER_QUERY), 4), generator=generator)
    return queries, positives, list(negatives.split(NEGATIVES_PER_QUERY))


def loss_fn(q, d, counts, negatives):
    return contrastive_loss(q, d, temperature=0.05, negatives_per_query=counts, negatives=negatives)


def single_process(negatives_scoring):
    model = TinyEncoder()
    queries, positives, negatives = global_batch()
    documents = torch.cat([positives, *negatives])
    loss = loss_fn(model(queries), model(documents), NEGATIVES_PER_QUERY, negatives_scoring)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def worker(rank, world_size, out_dir):
    # A file rendezvous: a TCP port picked beforehand can be taken by a parallel test in the meantime, which
    # leaves both processes waiting forever.
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        model = nn.parallel.DistributedDataParallel(TinyEncoder())
        reductions = []

        def counting_allreduce(process_group, bucket):
            reductions.append(bucket.index())
            return allreduce_hook(process_group, bucket)

        model.register_comm_hook(None, counting_allreduce)
        queries, positives, negatives = global_batch()
        rows = slice(QUERY_SPLIT[rank].start, QUERY_SPLIT[rank].stop)
        local_queries = queries[rows]
        local_documents = torch.cat([positives[rows], *negatives[rows]])
        counts = NEGATIVES_PER_QUERY[rows]
        results = {}
        for scoring in SCORINGS:
            for method in ("plain", "grad_cache"):
                model.zero_grad()
                reductions.clear()
                if method == "grad_cache":
                    num_queries = len(local_queries)
                    loss = grad_cache_loss(
                        lambda c: model(**c),
                        [{"input_ids": rows} for rows in torch.cat([local_queries, local_documents]).split(4)],
                        lambda e, n=num_queries: loss_fn(e[:n], e[n:], counts, scoring),
                        no_sync=model.no_sync,
                    )
                    loss.backward()
                else:
                    loss = loss_fn(model(local_queries), model(local_documents), counts, scoring)
                    loss.backward()
                # The logged loss is the mean over ranks (what the Trainer reports).
                loss = loss.detach().clone()
                dist.all_reduce(loss)
                key = f"{scoring}.{method}"
                results[f"{key}.loss"] = (loss / world_size).reshape(1)
                results[f"{key}.reductions"] = torch.tensor(len(reductions))
                results.update({f"{key}.grad.{n}": p.grad.clone() for n, p in model.module.named_parameters()})
        save_file(results, os.path.join(out_dir, f"rank{rank}.safetensors"))
        # Free DDP's reducer while the group is up and both ranks are here: freed after `destroy_process_group`
        # (at the function's return), it hung one rank in about half the runs.
        del model
        dist.barrier()
    finally:
        dist.destroy_process_group()


# fp32; the computations differ only in summation order.
ATOL, RTOL = 1e-6, 1e-5


def test_two_processes_equal_single_process_on_global_batch(tmp_path):
    """Own and batch scoring, plain and GradCache, DDP over 2 gloo processes with unequal shares of queries and
    hard negatives: loss and every gradient on every rank."""
    processes = mp.spawn(worker, args=(2, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not processes.join(timeout=2):  # a hung collective fails the test instead of stalling the suite
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail("the two gloo processes did not finish within 120 s")
    expected = {scoring: single_process(scoring) for scoring in SCORINGS}
    # The two scorings are different losses here (so that each comparison below tests its own computation).
    assert abs(expected["own"][0] - expected["batch"][0]) > 1e-3
    for rank in range(2):
        result = load_file(tmp_path / f"rank{rank}.safetensors")
        for scoring, (expected_loss, expected_grads) in expected.items():
            # GradCache reduces the gradients once per step, as the plain step does (not once per chunk).
            assert result[f"{scoring}.grad_cache.reductions"] == result[f"{scoring}.plain.reductions"] == 1
            for method in ("plain", "grad_cache"):
                key = f"{scoring}.{method}"
                torch.testing.assert_close(result[f"{key}.loss"][0], expected_loss, atol=ATOL, rtol=RTOL, msg=key)
                for name, grad in expected_grads.items():
                    torch.testing.assert_close(
                        result[f"{key}.grad.{name}"], grad, atol=ATOL, rtol=RTOL, msg=f"{key} {name} rank {rank}"
                    )
