"""`encode` throughput on a mixed text / image / interleaved workload: cost-sorted batching (what `encode` does)
against batches in arrival order, and against the achievable rate (measured matmul FLOP/s / model FLOPs per item),
then a profile of one `encode` run: where its time goes (image decoding, image processor, tokenizing and padding,
vision tower, language model, the rest), the language model's padding, and the heaviest torch operators.

    python bench/bench_encode.py [--items 240] [--batch_size 16] [--hidden_size 512] [--num_layers 8]
"""

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

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


@torch.inference_mode()
def encode_before(model, inputs: list, batch_size: int) -> torch.Tensor:
    """`encode` as it was before the token-count sort and the prefetch: sorted by `len(text) / 4` plus visual
    tokens, each batch prepared and then run, one after the other."""
    processor = model.processor
    items = processor.parse_inputs(inputs, image_prompt=model.config.image_prompt)
    costs = [len(text) / 4 + sum(processor.image_cost(image) for image in images) for text, images in items]
    order = sorted(range(len(items)), key=lambda i: -costs[i])
    embeddings = torch.empty(len(items), model.config.hidden_size)
    for start in range(0, len(order), batch_size):
        batch_ids = order[start : start + batch_size]
        embeddings[batch_ids] = model(**processor.batch([items[i] for i in batch_ids])).embeddings.float()
    return embeddings


def profile_encode(model, inputs: list, batch_size: int) -> str:
    """One `encode` run under wall-clock hooks on its parts and torch.profiler: a Markdown breakdown."""
    processor = model.processor
    seconds, tokens = defaultdict(float), {"real": 0, "padded": 0}

    def timed_call(name, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - start

        return wrapper

    def timed_module(name, module):
        starts = []
        pre = module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
        post = module.register_forward_hook(lambda *_: seconds.__setitem__(name, seconds[name] + time.perf_counter() - starts.pop()))
        return pre, post

    original_batch = processor.batch

    def counting_batch(*args, **kwargs):
        batch = original_batch(*args, **kwargs)
        tokens["real"] += int(batch["attention_mask"].sum())
        tokens["padded"] += batch["attention_mask"].numel()
        return batch

    processor.batch = timed_call("processor.batch", counting_batch)
    processor.load_image = timed_call("image decoding", processor.load_image)
    # A call goes through the class's __call__ (an instance attribute would not be used): wrapped there.
    image_processor_class = type(processor.image_processor)
    image_processor_call = image_processor_class.__call__
    image_processor_class.__call__ = timed_call("image processor (resize, normalise, patches)", image_processor_call)
    processor.token_counts = timed_call("token counts (sort key)", processor.token_counts)
    handles = [*timed_module("vision tower", model.model.visual), *timed_module("language model", model.model.language_model)]
    try:
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            start = time.perf_counter()
            model.encode(inputs, batch_size=batch_size, show_progress_bar=False)
            total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
        image_processor_class.__call__ = image_processor_call
        for name in ("batch", "load_image", "token_counts"):
            vars(processor).pop(name, None)

    decode, image_processing = seconds["image decoding"], seconds["image processor (resize, normalise, patches)"]
    rows = [
        ["image decoding (`load_image`)", decode],
        ["image processor (resize, normalise, patches)", image_processing],
        ["tokenizing, placing and padding (rest of `processor.batch`)", seconds["processor.batch"] - decode - image_processing],
        ["token counts (sort key)", seconds["token counts (sort key)"]],
        ["vision tower", seconds["vision tower"]],
        ["language model", seconds["language model"]],
    ]
    # The processor's rows run in the prefetch thread, beside the model: only the main thread's add up to the total.
    main_thread = seconds["token counts (sort key)"] + seconds["vision tower"] + seconds["language model"]
    rows.append(["the rest of the main thread (positions, merging, pooling, Python)", total - main_thread])
    table = markdown_table(["part of `encode`", "seconds", "share"],
                           [[name, f"{value:.2f}", f"{value / total:.1%}"] for name, value in rows] + [["total", f"{total:.2f}", "100%"]])  # fmt: skip
    operators = sorted(profiler.key_averages(), key=lambda event: -event.self_cpu_time_total)[:8]
    operator_table = markdown_table(
        ["torch operator", "self CPU s", "share of encode", "calls"],
        [[f"`{event.key}`", f"{event.self_cpu_time_total / 1e6:.2f}", f"{event.self_cpu_time_total / 1e6 / total:.1%}", event.count]
         for event in operators],
    )  # fmt: skip
    padding = 1 - tokens["real"] / tokens["padded"]
    return (
        f"Profile of one `encode` run ({total:.1f} s, wall-clock hooks; operator times from torch.profiler, which "
        f"slows the run a little; the three processor rows ran in the prefetch thread, overlapping the model; the "
        f"workload's images are PIL images already decoded): language-model token slots {tokens['padded']:,} for {tokens['real']:,} real tokens "
        f"(padding {padding:.1%}).\n\n{table}\n{operator_table}"
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=120)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--num_layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    # On a machine shared with other busy processes, two OpenMP threads wait on each other whenever one is
    # descheduled: the same batch then took 0.6 to 5.9 s here. One thread gives stable timings.
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(args.hidden_size, args.num_layers)
    inputs = mixed_workload(args.items)
    flops_per_item = workload_flops(model, inputs) / len(inputs)
    model.encode(inputs[: args.batch_size], batch_size=args.batch_size)  # warm-up

    sorted_times, arrival_times, before_times, matmul_rates = [], [], [], []
    for _ in range(args.repeats):  # interleaved, so that all see the same load on a shared machine
        matmul_rates.append(matmul_flops_per_second(torch.float32))
        seconds, sorted_embeddings = timed(model.encode, inputs, batch_size=args.batch_size, show_progress_bar=False)
        sorted_times.append(seconds)
        seconds, arrival_embeddings = timed(encode_in_arrival_order, model, inputs, args.batch_size)
        arrival_times.append(seconds)
        seconds, before_embeddings = timed(encode_before, model, inputs, args.batch_size)
        before_times.append(seconds)
    matmul_rate = max(matmul_rates)
    achievable = matmul_rate / flops_per_item
    sorted_rate, arrival_rate = len(inputs) / min(sorted_times), len(inputs) / min(arrival_times)
    before_rate = len(inputs) / min(before_times)
    difference = max((sorted_embeddings - other.float()).abs().max().item() for other in (arrival_embeddings, before_embeddings))

    rows = [
        [
            "cost-sorted batches (`encode`)",
            f"{sorted_rate:.1f}",
            f"{sorted_rate * flops_per_item / 1e9:.0f}",
            f"{sorted_rate / achievable:.2f}",
        ],
        [
            "before: `len(text) / 4` sort key, no prefetch",
            f"{before_rate:.1f}",
            f"{before_rate * flops_per_item / 1e9:.0f}",
            f"{before_rate / achievable:.2f}",
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
        + f"\n**Cost-sorted / arrival order: {sorted_rate / arrival_rate:.2f}x; / before: {sorted_rate / before_rate:.2f}x.** "
        f"All three give the same embeddings (max abs difference {difference:.1e})."
    )
    body += "\n\n" + profile_encode(model, inputs, args.batch_size) + f"\n{load_note()}."
    append_results("encode throughput: cost-sorted vs arrival order vs achievable", body)


if __name__ == "__main__":
    main()
