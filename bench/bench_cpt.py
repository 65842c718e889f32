"""Continual pre-training: (1) peak memory and step time of the fused masked-position MLM loss against the naive
full-vocabulary loss (and the checkpointed chunks it replaced) at a real vocabulary size; (2) padding of token-budget batches against fixed-size batches.

    python bench/bench_cpt.py [--vocab_size 151936] [--hidden_size 2048] [--tokens 2048] [--token_budget 12800]

(1) Each loss path runs forward + backward in its own process (so that one path's peak does not hide the
other's); peak memory is the rise of the process's peak resident memory over what it held before the first
call (inputs, weights and their gradients included in both), or CUDA's peak allocation on a GPU.
(2) One synthetic CPT mix (text-only rows, captions with one image, documents with 1-3 images; image tokens
from the Qwen2.5-VL resize rule) cut into budget batches and into fixed-size batches of the same mean size.
"""

import argparse
import json
import math
import random
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from common import append_results, load_note, markdown_table  # common also puts the repository on sys.path
from moca.training.cpt import IMAGE_TOKEN_COST, BudgetBatchSampler, padding_fraction
from moca.training.cpt import masked_lm_loss
from torch.utils.checkpoint import checkpoint
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize


def naive_mlm_loss(hidden_states, labels, head_weight):
    """Logits for every token over the whole vocabulary, then cross-entropy with ignored positions."""
    logits = F.linear(hidden_states, head_weight).float()
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def checkpointed_mlm_loss(hidden_states, labels, head_weight, chunk_size=1024):
    """The loss `masked_lm_loss` replaced: masked positions in chunks of 1024 under `torch.utils.checkpoint`
    (logits recomputed in the backward, autograd's cross-entropy gradient)."""
    positions = labels.ne(-100)
    hidden, targets = hidden_states[positions], labels[positions]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        chunk = (hidden[start : start + chunk_size], head_weight, targets[start : start + chunk_size])
        total = total + checkpoint(
            lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t, reduction="sum"), *chunk, use_reentrant=False
        )
    return total / hidden.shape[0]


def resident_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def measure_loss_path(path: str, vocab_size: int, hidden_size: int, tokens: int, mask_ratio: float, repeats: int,
                      dtype_name: str):
    """Runs in a child process; prints a JSON line with seconds per step and peak extra memory (MiB)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(0)
    dtype = getattr(torch, dtype_name)
    hidden = torch.randn(1, tokens, hidden_size, device=device, dtype=dtype, generator=generator).requires_grad_()
    weight = (torch.randn(vocab_size, hidden_size, device=device, dtype=dtype, generator=generator) * 0.02)
    weight.requires_grad_()
    labels = torch.randint(0, vocab_size, (1, tokens), device=device, generator=generator)
    labels[torch.rand(1, tokens, device=device, generator=generator) > mask_ratio] = -100
    # Gradient buffers exist in both paths: allocate them before the baseline.
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
    loss_fn = {"fused": masked_lm_loss, "checkpointed": checkpointed_mlm_loss, "naive": naive_mlm_loss}[path]

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = resident_kib() * 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss_fn(hidden, labels, weight).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": statistics.median(times), "peak_mib": (peak - baseline) / 2**20, "device": device}))


def run_loss_path(path: str, args) -> dict:
    command = [sys.executable, __file__, "--_loss_path", path, "--vocab_size", str(args.vocab_size),
               "--hidden_size", str(args.hidden_size), "--tokens", str(args.tokens),
               "--mask_ratio", str(args.mask_ratio), "--repeats", str(args.repeats), "--dtype", args.dtype]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def synthetic_cpt_mix(n_rows: int, max_length: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """(lengths, costs) of a CPT mix: 40% text-only (log-normal, median 300 tokens), 30% captions (10-60 text
    tokens, one image), 30% documents (200-1500 text tokens, 1-3 images); images of 200-1400 pixels a side,
    resized as Qwen2.5-VL does (28-pixel merged tokens, at most 1024 tokens an image)."""
    rng = random.Random(seed)

    def image_tokens() -> int:
        height, width = smart_resize(rng.randint(200, 1400), rng.randint(200, 1400), 28, 56 * 56, 1024 * 28 * 28)
        return (height // 28) * (width // 28)

    lengths, costs = [], []
    for _ in range(n_rows):
        kind = rng.random()
        if kind < 0.4:
            text, images = int(min(max(rng.lognormvariate(math.log(300), 0.9), 16), 4 * max_length)), []
        elif kind < 0.7:
            text, images = rng.randint(10, 60), [image_tokens()]
        else:
            text, images = rng.randint(200, 1500), [image_tokens() for _ in range(rng.randint(1, 3))]
        text += 2 * len(images)
        length, cost = text + sum(images), text + IMAGE_TOKEN_COST * sum(images)
        if length > max_length:  # what prepare_cpt_dataset counts for a row cut at max_length
            cost, length = math.ceil(cost * max_length / length), max_length
        lengths.append(length)
        costs.append(cost)
    return lengths, costs


def batch_compute(batches, lengths, costs) -> list[int]:
    """Equivalent tokens of each batch, padding included (one per padded position)."""
    return [
        sum(costs[i] for i in batch) + len(batch) * max(lengths[i] for i in batch) - sum(lengths[i] for i in batch)
        for batch in batches
    ]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab_size", type=int, default=151936)
    parser.add_argument("--hidden_size", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens in the micro-batch")
    parser.add_argument("--mask_ratio", type=float, default=0.4)
    parser.add_argument("--repeats", type=int, default=3)
    # bf16 is the goal's setting; CPUs without AMX/AVX-512-BF16 emulate bf16 products at a crawl (0.05 GFLOP/s
    # on an AVX2 EPYC), where float32 is the only measurable one.
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--max_length", type=int, default=4096)
    parser.add_argument("--token_budget", type=int, default=12800)
    parser.add_argument("--_loss_path", choices=["fused", "checkpointed", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._loss_path:
        measure_loss_path(args._loss_path, args.vocab_size, args.hidden_size, args.tokens, args.mask_ratio,
                          args.repeats, args.dtype)
        return

    fused, checkpointed, naive = (run_loss_path(path, args) for path in ("fused", "checkpointed", "naive"))
    loss_table = markdown_table(
        ["MLM loss path", "step (fwd+bwd) s", "peak extra memory MiB", "step / naive", "memory / naive"],
        [
            [name, f"{result['seconds']:.2f}", f"{result['peak_mib']:.0f}", f"{result['seconds'] / naive['seconds']:.2f}",
             f"{result['peak_mib'] / naive['peak_mib']:.2f}"]
            for name, result in (
                ("fused linear + cross-entropy, masked positions (`masked_lm_loss`)", fused),
                ("before: masked positions, checkpointed chunks of 1024", checkpointed),
                ("naive full-vocabulary logits", naive),
            )
        ],
    )  # fmt: skip

    lengths, costs = synthetic_cpt_mix(args.rows, args.max_length)
    budget_batches = list(BudgetBatchSampler(lengths, costs, args.token_budget, seed=0))
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    size = max(1, round(len(lengths) / len(budget_batches)))
    fixed_batches = [order[start : start + size] for start in range(0, len(order), size)]
    rows = []
    for name, batches in (("token budget", budget_batches), (f"fixed size {size}, random order", fixed_batches)):
        compute = batch_compute(batches, lengths, costs)
        rows.append([name, len(batches), f"{padding_fraction(batches, lengths):.3f}", max(compute),
                     f"{max(compute) / statistics.mean(compute):.2f}"])  # fmt: skip
    budget_padding = padding_fraction(budget_batches, lengths)
    fixed_padding = padding_fraction(fixed_batches, lengths)
    rows.append(["ratio budget / fixed", "", f"{budget_padding / fixed_padding:.3f}", "", ""])
    batching_table = markdown_table(
        ["batching", "batches", "padding fraction", "max batch compute", "max / mean compute"], rows
    )

    body = (
        f"MLM loss, {fused['device']}, {args.dtype}: vocabulary {args.vocab_size:,}, hidden {args.hidden_size}, "
        f"{args.tokens} tokens, mask ratio {args.mask_ratio}, median of {args.repeats} steps, each path in its own process; {load_note()}.\n\n{loss_table}\n"
        f"Batching: {args.rows:,} synthetic CPT rows (max_length {args.max_length}), budget {args.token_budget:,} "
        f"equivalent tokens; the fixed-size batches have the budget batches' mean size.\n\n{batching_table}"
    )
    append_results("CPT: masked-position MLM loss and token-budget batching", body)


if __name__ == "__main__":
    main()
