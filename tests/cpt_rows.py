"""Tiny continual pre-training rows for the CPT tests: text-only, caption and interleaved document rows."""

import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw


WORDS = "a the red green blue circle square page chart table figure number image text model shape left right".split()
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


def sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def png(rng: random.Random) -> bytes:
    width, height = rng.choice([56, 84, 112]), rng.choice([56, 84, 112])
    image = Image.new("RGB", (width, height), rng.choice(COLOURS))
    x, y = rng.randrange(width // 2), rng.randrange(height // 2)
    ImageDraw.Draw(image).ellipse([x, y, x + width // 3, y + height // 3], fill=rng.choice(COLOURS))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows in the CPT format, images as PNG bytes; one kind in three of each."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            rows.append({"text": sentence(rng, rng.randint(5, 40)), "images": []})
        elif kind == 1:
            rows.append({"text": f"<image>{sentence(rng, rng.randint(3, 10))}", "images": [png(rng)]})
        else:
            text = f"{sentence(rng, 8)} <image> {sentence(rng, 12)} <image> {sentence(rng, 6)}"
            rows.append({"text": text, "images": [png(rng), png(rng)]})
    return rows


def write_jsonl(rows: list[dict], out_dir: Path, name: str = "rows.jsonl") -> Path:
    """A jsonl file whose images are PNG files next to it, referenced by relative paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(exist_ok=True)
    with open(out_dir / name, "w") as f:
        for i, row in enumerate(rows):
            paths = []
            for j, image in enumerate(row["images"]):
                relative = f"images/{name}-{i}-{j}.png"
                if isinstance(image, bytes):
                    (out_dir / relative).write_bytes(image)
                else:
                    relative = image
                paths.append(relative)
            f.write(json.dumps({"text": row["text"], "images": paths}) + "\n")
    return out_dir / name
