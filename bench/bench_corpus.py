"""Embedding a corpus of 10k items with `python -m moca embed`: time grows linearly with the items done, memory
stays flat (images are decoded one batch at a time, finished chunks go to disk).

    python bench/bench_corpus.py [--items 10000] [--chunk_size 1000] [--hidden_size 128] [--num_layers 2]
"""

import argparse
import io
import random
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import psutil
from PIL import Image

from common import append_results, build_model, load_note, markdown_table, parameter_count

from moca import MoCaModel, cli


def make_corpus(folder: Path, n_items: int, seed: int = 0) -> Path:
    """Half short texts, half small PNG images, as a `datasets` dataset saved to disk (images decoded lazily)."""
    rng = random.Random(seed)
    words = "a the red blue green circle square page report chart revenue energy lecture table figure".split()
    texts, images = [], []
    for i in range(n_items):
        if i % 2 == 0:
            texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 24))))
            images.append(None)
        else:
            buffer = io.BytesIO()
            Image.new("RGB", (56, 56), tuple(rng.randrange(256) for _ in range(3))).save(buffer, format="PNG")
            texts.append(None)
            images.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features({"text": datasets.Value("string"), "image": datasets.Image()})
    datasets.Dataset.from_dict({"text": texts, "image": images}, features=features).save_to_disk(folder / "corpus")
    return folder / "corpus"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--chunk_size", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_layers", type=int, default=2)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="moca-corpus-"))
    model = build_model(args.hidden_size, args.num_layers)
    model.save_pretrained(folder / "model")
    corpus = make_corpus(folder, args.items)

    # One record per finished chunk: time since the start and resident memory of this process.
    process, records, start = psutil.Process(), [], time.perf_counter()
    encode_documents = MoCaModel.encode_documents

    def recorded(self, inputs, **kwargs):
        embeddings = encode_documents(self, inputs, **kwargs)
        records.append((time.perf_counter() - start, process.memory_info().rss))
        return embeddings

    MoCaModel.encode_documents = recorded
    rss_before = process.memory_info().rss
    start = time.perf_counter()
    cli.embed(
        str(folder / "model"),
        str(corpus),
        str(folder / "index.safetensors"),
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        show_progress_bar=False,
    )
    total = time.perf_counter() - start

    done = np.minimum(np.arange(1, len(records) + 1) * args.chunk_size, args.items)
    seconds = np.array([t for t, _ in records])
    rss = np.array([m for _, m in records]) / 2**20
    slope, intercept = np.polyfit(done, seconds, 1)
    r_squared = 1 - ((seconds - (slope * done + intercept)) ** 2).sum() / ((seconds - seconds.mean()) ** 2).sum()
    per_chunk = np.diff(np.concatenate([[0.0], seconds]))
    half = len(per_chunk) // 2
    rows = [[f"{n:,}", f"{t:.1f}", f"{m:.0f}"] for n, t, m in zip(done, seconds, rss)]
    body = (
        f"Model: {parameter_count(model) / 1e6:.1f}M parameters (text hidden {args.hidden_size}, {args.num_layers} "
        f"layers), fp32; {args.items:,} items (half texts of 4-24 words, half 56x56 PNG images) in a `datasets` "
        f"dataset on disk; `embed` with chunks of {args.chunk_size}, batch size {args.batch_size}; {load_note()}.\n\n"
        + markdown_table(["Items done", "Seconds", "Resident memory (MiB)"], rows)
        + f"\n**Time: linear fit R^2 = {r_squared:.4f}; seconds per 1k items, second half / first half = "
        f"{per_chunk[half:].mean() / per_chunk[:half].mean():.2f}. Memory: resident after the last chunk / after "
        f"the first = {rss[-1] / rss[0]:.3f}** ({rss_before / 2**20:.0f} MiB before embedding); {args.items / total:.0f} items/s "
        f"overall, {total:.0f} s in all."
    )
    append_results("Embedding a 10k-item corpus: time and memory", body)


if __name__ == "__main__":
    main()
