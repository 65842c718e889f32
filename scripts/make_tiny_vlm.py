"""Write a tiny random causal vision-language checkpoint (the stand-in for a real base VLM).

    python scripts/make_tiny_vlm.py OUT_DIR --arch qwen2_5_vl --seed 0
"""

import argparse

from moca.testing import ARCHS, make_tiny_vlm


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=ARCHS, default="qwen2_5_vl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_layers", type=int, default=2)
    args = parser.parse_args()
    path = make_tiny_vlm(args.out_dir, arch=args.arch, seed=args.seed, hidden_size=args.hidden_size, num_layers=args.num_layers)
    print(f"wrote a tiny {args.arch} checkpoint to {path}")


if __name__ == "__main__":
    main()
