"""MMEB scoring and caching overhead at the benchmark's scale, without a model: a subset shaped like ImageNet-1K
(1,000 rows, each ranking the same 1,000 labels), random embeddings standing in for the model's.

Compares `eval.mmeb.score_subset` (one matrix product per 256 rows) with gathering each row's candidate
embeddings, and times parsing the rows, writing the embedding cache and reading it back.

    python bench/bench_eval_scoring.py [--rows 1000] [--candidates 1000] [--dim 1536]
"""

import argparse
import tempfile
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from common import append_results, markdown_table, timed  # first: it puts the repository on sys.path
from PIL import Image

from eval.encoding import EmbeddingCache, encode_with_cache
from eval.mmeb import load_subset, parse_subset, score_subset


def score_row_by_row(parsed, embeddings):
    """The direct way: gather each row's candidate embeddings and multiply with its query."""
    embeddings = F.normalize(embeddings.float(), dim=-1)
    return [
        (embeddings[candidates] @ embeddings[query]).tolist()
        for query, candidates in zip(parsed.row_query, parsed.row_candidates)
    ]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=1536)
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="moca-bench-mmeb-"))
    (data_dir / "ImageNet-1K").mkdir()
    (data_dir / "images").mkdir()
    for i in range(args.rows):
        Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(data_dir / "images" / f"{i}.png")
    labels = [f"label {j} of the class list" for j in range(args.candidates)]
    rows = [
        {
            "qry_text": "<|image_1|> Represent the given image for classification",
            "qry_img_path": f"images/{i}.png",
            "tgt_text": labels[i % args.candidates :] + labels[: i % args.candidates],
            "tgt_img_path": [""] * args.candidates,
        }
        for i in range(args.rows)
    ]
    pd.DataFrame(rows).to_parquet(data_dir / "ImageNet-1K" / "test-00000-of-00001.parquet")

    load_seconds, table = timed(load_subset, "ImageNet-1K", data_dir=data_dir)
    parse_seconds, parsed = timed(parse_subset, "ImageNet-1K", table, data_dir)
    generator = torch.Generator().manual_seed(0)

    def random_encoder(share):
        return torch.randn(len(share), args.dim, generator=generator)

    cache = EmbeddingCache(data_dir / "cache")
    write_seconds, embeddings = timed(
        encode_with_cache, parsed.inputs, parsed.keys, random_encoder, cache=cache, namespace="bench"
    )
    read_seconds, cached = timed(
        encode_with_cache, parsed.inputs, parsed.keys, random_encoder, cache=cache, namespace="bench"
    )
    assert torch.equal(cached, embeddings)
    chunked_seconds, (chunked, _) = timed(score_subset, parsed, embeddings)
    row_seconds, by_row = timed(score_row_by_row, parsed, embeddings)
    difference = (torch.tensor(chunked) - torch.tensor(by_row)).abs().max().item()

    body = (
        f"{args.rows} rows x {args.candidates} candidates ({len(parsed.inputs)} distinct inputs), "
        f"embeddings of {args.dim} dimensions.\n\n"
        + markdown_table(
            ["Step", "Seconds"],
            [
                ["load the parquet file (`datasets`)", f"{load_seconds:.2f}"],
                ["check and parse the rows", f"{parse_seconds:.2f}"],
                ["encode (random stand-in) and write the cache", f"{write_seconds:.2f}"],
                ["rerun: read the cache", f"{read_seconds:.2f}"],
                ["score: one product per 256 rows (`score_subset`)", f"{chunked_seconds:.2f}"],
                ["score: gather candidates row by row", f"{row_seconds:.2f}"],
            ],
        )
        + f"\n**Row by row / per 256 rows: {row_seconds / chunked_seconds:.0f}x.** "
        f"Same scores (max abs difference {difference:.1e})."
    )
    append_results("MMEB scoring and embedding-cache overhead, no model", body)


if __name__ == "__main__":
    main()
