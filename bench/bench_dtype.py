"""bf16 against fp32 on this CPU (AMX): matmul rate, `encode` throughput on the mixed workload, and how close the
bf16 embeddings stay to the fp32 ones.

    python bench/bench_dtype.py [--items 72] [--batch_size 16] [--hidden_size 512] [--num_layers 8]
"""

import argparse
import copy

import torch
import torch.nn.functional as F

from common import (
    append_results,
    build_model,
    load_note,
    markdown_table,
    matmul_flops_per_second,
    mixed_workload,
    parameter_count,
    timed,
)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=72)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--num_layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    models = {"fp32": build_model(args.hidden_size, args.num_layers)}
    models["bf16"] = copy.deepcopy(models["fp32"]).to(torch.bfloat16)
    models["bf16"].processor = models["fp32"].processor
    inputs = mixed_workload(args.items, seed=1)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for model in models.values():
        model.encode(inputs[: args.batch_size], batch_size=args.batch_size)  # warm-up

    times = {name: [] for name in models}
    matmul = {name: [] for name in models}
    embeddings = {}
    for _ in range(args.repeats):  # interleaved, so that both see the same load on a shared machine
        for name, model in models.items():
            matmul[name].append(matmul_flops_per_second(dtypes[name]))
            seconds, embeddings[name] = timed(model.encode, inputs, batch_size=args.batch_size, show_progress_bar=False)
            times[name].append(seconds)
    rate = {name: len(inputs) / min(seconds) for name, seconds in times.items()}
    matmul_rate = {name: max(values) for name, values in matmul.items()}
    cosine = F.cosine_similarity(embeddings["fp32"], embeddings["bf16"], dim=-1)

    rows = [[name, f"{matmul_rate[name] / 1e9:.0f}", f"{rate[name]:.2f}"] for name in models]
    rows.append(
        [
            "**bf16 / fp32**",
            f"**{matmul_rate['bf16'] / matmul_rate['fp32']:.2f}x**",
            f"**{rate['bf16'] / rate['fp32']:.2f}x**",
        ]
    )
    body = (
        f"Model: {parameter_count(models['fp32']) / 1e6:.1f}M parameters (text hidden {args.hidden_size}, "
        f"{args.num_layers} layers); {len(inputs)} mixed inputs (text, image, text+image), batch size {args.batch_size}; "
        f"best of {args.repeats}; {load_note()}.\n\n"
        + markdown_table(["dtype", "matmul GFLOP/s (2048x2048)", "encode items/s"], rows)
        + f"\nbf16 embeddings against fp32: cosine similarity min {cosine.min():.4f}, mean {cosine.mean():.4f}."
    )
    append_results("bf16 vs fp32 on this CPU", body)


if __name__ == "__main__":
    main()
