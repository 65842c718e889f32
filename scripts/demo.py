"""Build a tiny MoCa model from a tiny random VLM and rank a few inputs: the smallest end-to-end run.

    python scripts/demo.py --output_dir out/demo
"""

import argparse
from pathlib import Path

from PIL import Image, ImageDraw
from transformers import AutoModel

from moca import MoCaModel
from moca.testing import make_tiny_vlm


def shape_image(color: str, shape: str) -> Image.Image:
    image = Image.new("RGB", (112, 112), "white")
    draw = ImageDraw.Draw(image)
    box = (20, 20, 92, 92)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(56, 16), (96, 96), (16, 96)], fill=color)
    return image


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="out/demo")
    args = parser.parse_args()
    out = Path(args.output_dir)

    backbone = make_tiny_vlm(out / "tiny-vlm", arch="qwen2_5_vl")
    MoCaModel.from_backbone(backbone).save_pretrained(out / "tiny-moca")
    model = AutoModel.from_pretrained(out / "tiny-moca", trust_remote_code=True)

    documents = [shape_image(c, s) for c, s in [("red", "circle"), ("blue", "square"), ("green", "triangle")]]
    documents += ["A red circle on a white background.", "Two blue squares and a yellow line."]
    queries = ["a red circle", "a blue square"]
    scores = model.encode_queries(queries) @ model.encode_documents(documents).T
    names = ["image: red circle", "image: blue square", "image: green triangle", "text: red circle", "text: blue squares"]
    print("Untrained tiny MoCa (random weights): cosine scores, best first")
    for query, row in zip(queries, scores):
        ranked = sorted(zip(row.tolist(), names), reverse=True)
        print(f"  {query!r}: " + ", ".join(f"{name} {score:+.3f}" for score, name in ranked))


if __name__ == "__main__":
    main()
