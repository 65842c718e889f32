"""Embed queries and document pages with vLLM and check the vectors against `MoCaModel.encode`.

    python examples/vllm_embed.py --model CKPT [--dtype bfloat16] [--min_cosine 0.999]

A MoCa checkpoint is the backbone's stock checkpoint with `text_config.is_causal: false` (bidirectional attention
in vLLM's Qwen2/Qwen3 layers) and sentence-transformers files that say mean pooling and normalisation, so vLLM
serves it as an embedding model: `runner="pooling"`, `convert="embed"`. Prompts are given raw, exactly as MoCa
builds them (`MoCaProcessor.parse_inputs` applies the named prompt and places the image), with the images as
`multi_modal_data`; the resolution bounds go in as `mm_processor_kwargs`.

Needs vLLM and a GPU (vLLM's CPU build needs a torchvision built for its torch, which no package registry has, so
this does not run on CPU-only machines). In bf16 the vectors agree with `MoCaModel.encode` in bf16 to a cosine of
at least 0.999 for every input (different kernels and accumulation orders); the script exits non-zero below it.
"""

import argparse
import sys

import torch
from PIL import Image

from moca import MoCaModel

VISION = "<|vision_start|><|image_pad|><|vision_end|>"


def demo_inputs() -> tuple[list, list]:
    """Text queries and page images (stand-ins: pass your own pages with --pages)."""
    queries = ["What was the revenue in the third quarter?", "Which sites use the most water?"]
    pages = [Image.new("RGB", (850, 1100), colour) for colour in ("white", (235, 240, 250))]
    return queries, pages


def vllm_prompts(model: MoCaModel, inputs, prompt_name: str | None) -> list[dict]:
    """vLLM's raw prompts for MoCa inputs: the text MoCa itself builds (images as the backbone's vision tokens)."""
    processor = model.processor
    items = processor.parse_inputs(inputs, model.resolve_prompt(prompt_name=prompt_name), model.config.image_prompt)
    prompts = []
    for text, images in items:
        text = processor.placed_text(text, len(images))  # `<image>` / `<|image_N|>` -> the vision tokens
        prompt = {"prompt": text}
        if images:
            prompt["multi_modal_data"] = {"image": [processor.load_image(image) for image in images]}
        prompts.append(prompt)
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="MoCa checkpoint (folder or Hub name).")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--pages", nargs="*", default=None, help="Page image files (default: two blank pages).")
    parser.add_argument("--min_cosine", type=float, default=0.999)
    args = parser.parse_args()

    from vllm import LLM

    model = MoCaModel.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    if torch.cuda.is_available():
        model.to("cuda")
    queries, pages = demo_inputs()
    if args.pages:
        pages = [Image.open(path) for path in args.pages]
    fewest, most = model.processor.image_token_bounds
    side = model.processor.token_side
    llm = LLM(
        model=args.model,
        runner="pooling",
        convert="embed",
        dtype=args.dtype,
        max_model_len=4096,
        limit_mm_per_prompt={"image": 1},
        mm_processor_kwargs={"min_pixels": fewest * side * side, "max_pixels": most * side * side},
        gpu_memory_utilization=0.5,
    )

    worst = 1.0
    for inputs, prompt_name in ((queries, None), (pages, "document_page")):
        expected = model.encode(inputs, prompt_name=prompt_name)
        outputs = llm.embed(vllm_prompts(model, inputs, prompt_name))
        got = torch.tensor([output.outputs.embedding for output in outputs])
        cosine = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
        print(f"{prompt_name or 'raw'}: cosine to MoCaModel.encode min {cosine.min():.5f}, mean {cosine.mean():.5f}")
        worst = min(worst, cosine.min().item())
    if worst < args.min_cosine:
        sys.exit(f"vLLM and MoCaModel.encode disagree: cosine {worst:.5f} < {args.min_cosine}")


if __name__ == "__main__":
    main()
