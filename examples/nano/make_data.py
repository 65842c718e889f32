"""Write the nano synthetic multimodal world: CPT rows, contrastive tasks, and MMEB- and ViDoRe-style evaluation
sets (see `nano_data.py` for the layouts). The same seed and scale write byte-identical files.

    python examples/nano/make_data.py OUT_DIR --seed 0 --scale 1.0
"""

import argparse
import json
from pathlib import Path

from nano_data import make_nano_data


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every row count")
    args = parser.parse_args()
    paths = make_nano_data(args.out_dir, seed=args.seed, scale=args.scale)
    manifest = json.loads(Path(paths["manifest"]).read_text())
    print(f"wrote the nano world (seed {args.seed}, scale {args.scale}) to {args.out_dir}:")
    print(f"  cpt: {manifest['cpt']['rows']} rows")
    for section in ("contrastive", "mmeb"):
        for name, entry in manifest[section].items():
            print(f"  {section}/{name}: {entry['rows']} rows")
    for name, entry in manifest["vidore"].items():
        print(f"  vidore/{name}: {entry['corpus']} pages, {entry['queries']} queries")


if __name__ == "__main__":
    main()
