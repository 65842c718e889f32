"""Shared pieces of the benchmarks: a small model where matrix products dominate, a mixed workload, FLOP
counts, the measured matmul rate of this machine, and appending results to bench/RESULTS.md."""

import datetime
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from moca import MoCaModel  # noqa: E402
from moca.testing import make_tiny_vlm  # noqa: E402


# MOCA_BENCH_RESULTS points a trial run elsewhere.
RESULTS_FILE = Path(os.environ.get("MOCA_BENCH_RESULTS", Path(__file__).resolve().parent / "RESULTS.md"))
_WORDS = "the a red blue circle square page report chart revenue energy lecture table figure shows of and in on".split()


def build_model(
    hidden_size: int = 512, num_layers: int = 8, max_pixels: int = 224 * 224, dtype=torch.float32, seed: int = 0
) -> MoCaModel:
    """A random MoCa model on a small Qwen2.5-VL backbone (tens of millions of parameters at the defaults)."""
    folder = tempfile.mkdtemp(prefix="moca-bench-")
    backbone = make_tiny_vlm(folder, hidden_size=hidden_size, num_layers=num_layers, max_pixels=max_pixels, seed=seed)
    return MoCaModel.from_backbone(backbone, image_tokens=None, dtype=dtype).eval()


def mixed_workload(n_items: int, seed: int = 0, max_words: int = 160, max_side: int = 224) -> list:
    """Texts of 4 to `max_words` words, images of 56 to `max_side` pixels a side, and text+image inputs, shuffled
    as they might arrive (a third of each)."""
    rng = random.Random(seed)

    def text():
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, max_words)))

    def image():
        side = lambda: 28 * rng.randint(2, max_side // 28)  # noqa: E731
        return Image.new("RGB", (side(), side()), tuple(rng.randrange(256) for _ in range(3)))

    items = []
    for i in range(n_items):
        kind = i % 3
        items.append(text() if kind == 0 else image() if kind == 1 else {"text": text() + " <image>", "image": image()})
    rng.shuffle(items)
    return items


def matmul_flops_per_second(dtype=torch.float32, size: int = 2048, seconds: float = 2.0) -> float:
    """Measured rate of a large square matmul: the most this CPU does in the products that dominate the model."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(2):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start)


def model_flops(model: MoCaModel, batch) -> float:
    """Forward FLOPs of the real (non-padding) tokens of a processed batch: 2 x weights touched per token for
    the language model and vision tower, plus attention scores and mixing (4 x length^2 x width per layer)."""
    text_model = model.model.language_model
    text_params = sum(p.numel() for n, p in text_model.named_parameters() if "embed_tokens" not in n)
    vision_params = sum(p.numel() for p in model.model.visual.parameters())
    lengths = batch["attention_mask"].sum(-1).double()
    text_config = model.config.vlm_config.get_text_config()
    flops = (
        2 * text_params * lengths.sum()
        + 4 * text_config.num_hidden_layers * text_config.hidden_size * (lengths**2).sum()
    )
    if "image_grid_thw" in batch:
        patches = batch["image_grid_thw"].prod(-1).double()
        vision_config = model.config.vlm_config.vision_config
        flops += (
            2 * vision_params * patches.sum() + 4 * vision_config.depth * vision_config.hidden_size * (patches**2).sum()
        )
    return float(flops)


def workload_flops(model: MoCaModel, inputs: list, prompt: str | None = None) -> float:
    """FLOPs of embedding `inputs`, each on its own (no padding)."""
    items = model.processor.parse_inputs(inputs, prompt, image_prompt=model.config.image_prompt)
    return sum(model_flops(model, model.processor.batch([item])) for item in items)


def timed(function, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def parameter_count(model: MoCaModel) -> int:
    return sum(p.numel() for p in model.parameters())


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]) + "\n"


def load_note() -> str:
    """The machine is shared: the load average says how much of it the run had."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end"


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def append_results(title: str, body: str) -> None:
    """Append a dated section to bench/RESULTS.md (created with a header when missing)."""
    if not RESULTS_FILE.exists():
        RESULTS_FILE.write_text(
            "# Benchmark results\n\nEach section is appended by a script in `bench/`; ratios are measured side by "
            "side in one run.\n"
        )
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with RESULTS_FILE.open("a") as f:
        f.write(f"\n## {title} ({stamp})\n\n{machine()}\n\n{body}\n")
    print(f"\n## {title}\n\n{body}")
