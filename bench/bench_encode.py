"""`encode` throughput on a mixed text / image / interleaved workload: cost-sorted batching (what `encode` does)
against batches in arrival order, and against the achievable rate (measured matmul FLOP/s / model FLOPs per item).

    python bench/bench_encode.py [--items 240] [--batch_size 16] [--hidden_size 512] [--num_layers 8]
"""

import argparse

import torch

from common import (
    append_results,
    build_model,
    load_note,
    markdown_table,
    matmul_flops_per_second,
    mixed_workload,
    parameter_count,
    timed,
    workload_flops,
)


@torch.inference_mode()
def encode_in_arrival_order(model, inputs: list, batch_size: int) -> torch.Tensor:
    """The same preparation and forward as `encode`, with batches taken in the order the inputs came."""
    items = model.processor.parse_inputs(inputs, image_prompt=model.config.image_prompt)
    chunks = [
        model(**model.processor.batch(items[start : start + batch_size])).embeddings
        for start in range(0, len(items), batch_size)
    ]
    return torch.cat(chunks)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=120)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--num_layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    model = build_model(args.hidden_size, args.num_layers)
    inputs = mixed_workload(args.items)
    flops_per_item = workload_flops(model, inputs) / len(inputs)
    model.encode(inputs[: args.batch_size], batch_size=args.batch_size)  # warm-up

    sorted_times, arrival_times, matmul_rates = [], [], []
    for _ in range(args.repeats):  # interleaved, so that all see the same load on a shared machine
        matmul_rates.append(matmul_flops_per_second(torch.float32))
        seconds, sorted_embeddings = timed(model.encode, inputs, batch_size=args.batch_size, show_progress_bar=False)
        sorted_times.append(seconds)
        seconds, arrival_embeddings = timed(encode_in_arrival_order, model, inputs, args.batch_size)
        arrival_times.append(seconds)
    matmul_rate = max(matmul_rates)
    achievable = matmul_rate / flops_per_item
    sorted_rate, arrival_rate = len(inputs) / min(sorted_times), len(inputs) / min(arrival_times)
    difference = (sorted_embeddings - arrival_embeddings.float()).abs().max().item()

    rows = [
        [
            "cost-sorted batches (`encode`)",
            f"{sorted_rate:.1f}",
            f"{sorted_rate * flops_per_item / 1e9:.0f}",
            f"{sorted_rate / achievable:.2f}",
        ],
        [
            "arrival-order batches",
            f"{arrival_rate:.1f}",
            f"{arrival_rate * flops_per_item / 1e9:.0f}",
            f"{arrival_rate / achievable:.2f}",
        ],
        ["achievable (fp32 matmul rate / FLOPs per item)", f"{achievable:.1f}", f"{matmul_rate / 1e9:.0f}", "1.00"],
    ]
    body = (
        f"Model: {parameter_count(model) / 1e6:.1f}M parameters (text hidden {args.hidden_size}, {args.num_layers} layers), "
        f"fp32; {len(inputs)} inputs (a third each text, image, text+image), batch size {args.batch_size}, "
        f"{flops_per_item / 1e9:.2f} GFLOP per input without padding; best of {args.repeats}; {load_note()}.\n\n"
        + markdown_table(["Batching", "Items/s", "Useful GFLOP/s", "Fraction of achievable"], rows)
        + f"\n**Cost-sorted / arrival order: {sorted_rate / arrival_rate:.2f}x.** "
        f"Both orders give the same embeddings (max abs difference {difference:.1e})."
    )
    append_results("encode throughput: cost-sorted vs arrival order vs achievable", body)


if __name__ == "__main__":
    main()
