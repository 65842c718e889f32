"""Contrastive training step on a global batch of 256 text pairs, with and without GradCache: peak memory and time.

    python bench/bench_grad_cache.py [--pairs 256] [--chunk_size 32] [--hidden_size 256] [--num_layers 4] [--steps 2]
        [--threads 1]

Each mode runs in its own process, on the same random model and batch, through the pieces `train_contrastive.py`
uses (`ContrastiveCollator`, `contrastive_loss`, `grad_cache_loss`), with an SGD step after each backward.
Peak memory is the rise of the process's peak resident memory over what it held before the first step
(weights, gradients and the processed batch are held in both modes). Time per step (wall clock, and CPU time of
the process, which other work on a shared machine disturbs less) is the median over `--steps` steps after one
warm-up step. With GradCache each chunk is padded to its own longest input, as the collator does
in training; without it, the whole batch is padded to its longest. A third run encodes the same chunks with one
forward and backward each and no loss: GradCache's time over it is the price of its extra no-grad forward, the
rest of the difference to the plain step is what encoding small chunks costs on the machine.
"""

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time

import datasets
import torch
from common import _WORDS, append_results, build_model, load_note, markdown_table, parameter_count

from moca.training.contrastive import ContrastiveCollator, MultiTaskDataset, TaskSpec, contrastive_loss, grad_cache_loss


def text_pairs(n_pairs: int, seed: int = 0) -> datasets.Dataset:
    rng = random.Random(seed)

    def sentence():
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 40)))

    return datasets.Dataset.from_list([{"query_text": sentence(), "pos_text": sentence()} for _ in range(n_pairs)])


def measure(args) -> dict:
    """Runs in a child process; returns seconds per step and peak extra memory (MiB)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(hidden_size=args.hidden_size, num_layers=args.num_layers).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    tasks = [TaskSpec("pairs", text_pairs(args.pairs), query_prompt="Query: {text}")]
    chunk_size = None if args.mode == "plain" else args.chunk_size
    collator = ContrastiveCollator(model.processor, tasks, num_hard_negatives=0, chunk_size=chunk_size)
    dataset = MultiTaskDataset(tasks)
    batch = collator([dataset[i] for i in range(len(dataset))])

    def loss_fn(embeddings):
        return contrastive_loss(embeddings[: batch["num_queries"]], embeddings[batch["num_queries"] :])

    def step():
        if args.mode == "grad_cache":
            loss = grad_cache_loss(lambda chunk: model(**chunk).embeddings, batch["chunks"], loss_fn)
            loss.backward()
        else:
            loss = loss_fn(torch.cat([model(**chunk).embeddings for chunk in batch["chunks"]]))
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: the same holding in both modes
        return loss.item()

    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, cpu_times, losses = [], [], []
    for _ in range(args.steps + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(step())
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "seconds": statistics.median(times[1:]),
        "cpu_seconds": statistics.median(cpu_times[1:]),
        "peak_mib": (peak - baseline) / 2**20,
        "first_loss": losses[0],
        "parameters": parameter_count(model),
        "chunks": len(batch["chunks"]),
    }


def run_child(args, mode: str) -> dict:
    command = [sys.executable, __file__, "--mode", mode, *(f"--{k}={v}" for k, v in vars(args).items() if k != "mode")]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--chunk_size", type=int, default=32)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    # On a machine shared with other work, several threads spin-wait for each other at every operation: small chunks
    # then pay several times over, differently from run to run. One thread measures the work itself.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", choices=["plain", "grad_cache", "chunks_only"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args)))
        return

    plain, cached, chunks_only = (run_child(args, mode) for mode in ("plain", "grad_cache", "chunks_only"))
    # Same model, same batch: the first loss (before any update) must agree, or the comparison is void.
    if abs(plain["first_loss"] - cached["first_loss"]) > 1e-4 * abs(plain["first_loss"]):
        raise RuntimeError(f"losses differ: plain {plain['first_loss']}, GradCache {cached['first_loss']}")

    def row(name, result):
        return [name, f"{result['seconds']:.2f}", f"{result['cpu_seconds']:.2f}", f"{result['peak_mib']:.0f}"]

    def ratio(name, a, b, memory=True):
        values = [a["seconds"] / b["seconds"], a["cpu_seconds"] / b["cpu_seconds"]]
        values.append(a["peak_mib"] / b["peak_mib"] if memory else None)
        return [name, *(f"{v:.2f}" if v is not None else "" for v in values)]

    table = markdown_table(
        ["mode", "step wall s", "step CPU s", "peak extra memory MiB"],
        [
            row("plain, one forward of the batch", plain),
            row(f"GradCache, {cached['chunks']} chunks of {args.chunk_size}", cached),
            ratio("**ratio GradCache / plain**", cached, plain),
            row(f"for reference: one forward+backward per chunk of {args.chunk_size}, no loss", chunks_only),
            ratio("ratio GradCache / chunks only (the extra no-grad forward)", cached, chunks_only, memory=False),
        ],
    )
    body = (
        f"Global batch {args.pairs} text pairs (queries + positives = {2 * args.pairs} inputs of 8-40 words, in-batch "
        f"negatives), fp32, random MoCa model on a Qwen2.5-VL backbone with text hidden {args.hidden_size}, "
        f"{args.num_layers} layers ({plain['parameters'] / 1e6:.1f}M parameters), {args.threads} thread(s); median of "
        f"{args.steps} steps after "
        f"a warm-up; each mode in its own process. Loss before the first update: {plain['first_loss']:.4f} (both).\n\n"
        f"{table}\n{load_note()}.\n"
    )
    append_results("Contrastive: GradCache against one forward of the global batch", body)


if __name__ == "__main__":
    main()
