"""Convert a checkpoint of the original MoCa release into a MoCa checkpoint.

The original release saves its models with a subclass of Qwen2.5-VL (`Qwen2_5ForEmbedding`,
`model_type: qwen2_5_vl`, transformers 4.x key names `model.layers.*`, `visual.*`, `lm_head.*`). Its weights
are a plain Qwen2.5-VL backbone, so the conversion loads them as one (transformers maps the legacy key
names), checks that every backbone weight was found, and saves a MoCa checkpoint with remote code and
processor. The released models embed with bidirectional attention and mean pooling, the defaults here, and
resize every image to 256-1,024 visual tokens (set in the release's code, not in its checkpoints' processor
config): the converted checkpoint stores those bounds in its processor config.

    python scripts/convert_original_checkpoint.py --model_name_or_path DIR_OR_HUB_NAME --output_dir DIR
"""

import argparse
import json
from pathlib import Path

from moca import MoCaModel
from moca.processing_moca import RELEASE_IMAGE_TOKENS


def convert(input_path: str, output_dir: str, dtype: str = "auto",
            image_tokens: tuple[int, int] = RELEASE_IMAGE_TOKENS) -> MoCaModel:
    config_file = Path(input_path) / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        if config.get("model_type") not in ("qwen2_5_vl", "qwen2_vl"):
            raise ValueError(
                f"{input_path}: model_type {config.get('model_type')!r} is not a checkpoint of the original MoCa "
                f"release (expected qwen2_5_vl, architectures ['Qwen2_5ForEmbedding'])."
            )
    model = MoCaModel.from_backbone(input_path, dtype=dtype, image_tokens=image_tokens)
    model.config.architectures = ["MoCaModel"]
    model.save_pretrained(output_dir)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model_name_or_path", "--input", dest="model_name_or_path", required=True,
        help="folder or Hub name of an original MoCa checkpoint",
    )  # fmt: skip
    parser.add_argument(
        "--output_dir", "--output", dest="output_dir", required=True, help="folder to write the MoCa checkpoint to"
    )
    parser.add_argument("--dtype", default="auto", help="auto (keep the stored dtype), float32 or bfloat16")
    parser.add_argument("--min_image_tokens", type=int, default=RELEASE_IMAGE_TOKENS[0],
                        help="fewest visual tokens per image (release: 256, i.e. min_pixels 256*28*28)")
    parser.add_argument("--max_image_tokens", type=int, default=RELEASE_IMAGE_TOKENS[1],
                        help="most visual tokens per image (release: 1024, i.e. max_pixels 1024*28*28)")
    args = parser.parse_args()
    convert(args.model_name_or_path, args.output_dir, args.dtype, (args.min_image_tokens, args.max_image_tokens))
    print(f"wrote a MoCa checkpoint to {args.output_dir}")


if __name__ == "__main__":
    main()
