"""The paper's ablation table (Table 3) at nano scale: which parts of MoCa matter, over several seeds.

    python examples/nano/run_ablations.py --output_dir out/ablations --seeds 0 1 2
    python examples/nano/run_ablations.py --output_dir out/ablations --preset medium --seeds 0 1 2  # ~4 min a variant

Variants (each one the nano pipeline of examples/nano/run_pipeline.py with one part taken away):
- full: CPT (MLM + MAE) then contrastive training with task-aware batches;
- no MLM: CPT without text masking (MAE alone);
- no MAE: CPT without image masking (MLM alone);
- no CPT: contrastive training straight from the base VLM made bidirectional (the paper's "bidirectional + CL");
- causal + CL: contrastive training straight from the base VLM kept causal, with last-token pooling;
- no task-aware batching: the full CPT checkpoint, contrastive batches mixing tasks.

Each seed writes its own nano world and base VLM, shared by its variants; every stage is skipped when its output
exists, so an interrupted grid resumes where it stopped. Writes OUT/ablations.md (mean and standard deviation over
seeds, the differences from the full variant paired by seed, and the final contrastive losses) and
OUT/ablations.json (every run's scores).
"""

import argparse
import json
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_pipeline import Settings, evaluate, loss_history, make_base_vlm, train_contrastive, train_cpt

VARIANTS = {
    "full": {},
    "no MLM": {"text_mask_ratio": 0.0},
    "no MAE": {"image_mask_ratio": 0.0, "mae_loss_weight": 0.0},
    "no CPT (bidirectional + CL)": {"cpt_steps": 0},
    "causal + CL (no CPT)": {"cpt_steps": 0, "bidirectional": False},
    "no task-aware batching": {"task_aware_batching": False},
}
# Variants whose CPT stage is the full model's: they reuse its checkpoint instead of training an identical one.
SHARES_FULL_CPT = {"no task-aware batching"}

PRESETS = {
    "default": Settings(),
    # Half the default contrastive steps (the default CPT): about four minutes per variant on 2 idle cores.
    "medium": Settings(cl_steps=1200),
    # A quarter of the default contrastive steps: about two minutes per variant on 2 idle cores, 11 per seed.
    "small": Settings(cpt_steps=100, cl_steps=600),
    # The default CPT and an eighth of the default contrastive steps: where a head start from CPT would show most.
    "short-cl": Settings(cl_steps=300),
    # Seconds per variant: the tests' grid.
    "tiny": Settings(data_scale=0.05, causal_steps=2, cpt_steps=2, cpt_token_budget=1024, cl_steps=2, cl_batch_size=4),
}

ROWS = [
    ("MMEB overall", lambda r: r["mmeb"]["overall"]["precision_at_1"]),
    ("MMEB IND", lambda r: r["mmeb"]["splits"]["IND"]["precision_at_1"]),
    ("MMEB OOD", lambda r: r["mmeb"]["splits"]["OOD"]["precision_at_1"]),
]


def summary_scores(results: dict) -> dict[str, float]:
    """The table's columns for one evaluated run, in percent."""
    scores = {name: get(results) for name, get in ROWS}
    scores.update({f"MMEB {c}": v["precision_at_1"] for c, v in results["mmeb"]["categories"].items()})
    scores["ViDoRe nDCG@5"] = results["vidore"]["average"]["ndcg_at_5"]
    return {name: 100 * value for name, value in scores.items()}


def run_dir_of(root: Path, seed: int, name: str) -> Path:
    return root / f"seed{seed}" / name.split(" (")[0].replace(" ", "-").replace("+", "plus").lower()


def final_contrastive_loss(root: Path, seed: int, name: str, last: int = 5) -> float | None:
    """Mean of the last `last` logged contrastive losses of one run (None when it kept no history)."""
    points = loss_history(run_dir_of(root, seed, name) / "final").get("loss", [])
    return statistics.mean(loss for _, loss in points[-last:]) if points else None


def run_variant(root: Path, seed: int, name: str, settings: Settings) -> dict:
    """One variant at one seed: its CPT (unless shared or skipped), contrastive training and evaluation."""
    seed_dir = root / f"seed{seed}"
    run_dir = run_dir_of(root, seed, name)
    data = seed_dir / "data"
    base = make_base_vlm(seed_dir, settings, seed)
    start = base
    if settings.cpt_steps:
        cpt_owner = seed_dir / "full" if name in SHARES_FULL_CPT else run_dir
        start = train_cpt(base, cpt_owner, settings, seed, data)
    final = train_contrastive(start, run_dir, settings, seed, data)
    return evaluate(final, run_dir / "eval", data, settings)


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for a single seed)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def ablation_table(runs: dict[str, list[dict[str, float]]], reference: list[dict[str, float]] | None = None) -> str:
    """Markdown table of mean ± standard deviation over seeds; `runs` maps a variant to its per-seed scores."""
    columns = list(next(iter(runs.values()))[0])
    lines = ["| variant | seeds | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    rows = ({"base VLM (no training)": reference} if reference else {}) | runs
    for variant, per_seed in rows.items():
        cells = []
        for column in columns:
            mean, spread = mean_and_spread([scores[column] for scores in per_seed])
            cells.append(f"{mean:.1f} ± {spread:.1f}")
        lines.append(f"| {variant} | {len(per_seed)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_difference_table(runs: dict[str, list[dict[str, float]]], against: str = "full") -> str:
    """Each variant minus `against`, seed by seed (a seed's variants share its world and base VLM, so most of the
    seed-to-seed spread cancels), as mean ± standard deviation over seeds and the number of seeds it was ahead."""
    columns = list(runs[against][0])
    lines = ["| variant − " + against + " | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for variant, per_seed in runs.items():
        if variant == against:
            continue
        cells = []
        for column in columns:
            differences = [mine[column] - theirs[column] for mine, theirs in zip(per_seed, runs[against])]
            mean, spread = mean_and_spread(differences)
            ahead = sum(d > 0 for d in differences)
            cells.append(f"{mean:+.1f} ± {spread:.1f} ({ahead}/{len(differences)})")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="out/ablations")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    root = Path(args.output_dir)
    preset = PRESETS[args.preset]

    runs: dict[str, list[dict[str, float]]] = {}
    reference, raw = [], {}
    for seed in args.seeds:
        for name in args.variants:
            print(f"\n=== seed {seed}: {name} ===", flush=True)
            results = run_variant(root, seed, name, replace(preset, **VARIANTS[name]))
            runs.setdefault(name, []).append(summary_scores(results))
            raw.setdefault(name, {})[seed] = results
        seed_dir = root / f"seed{seed}"
        reference.append(
            summary_scores(evaluate(seed_dir / "base-vlm", seed_dir / "eval-base", seed_dir / "data", preset))
        )

    table = ablation_table(runs, reference)
    losses = {name: [final_contrastive_loss(root, seed, name) for seed in args.seeds] for name in runs}
    loss_lines = ["| variant | final contrastive loss |", "|---|---:|"] + [
        "| {} | {:.3f} ± {:.3f} |".format(name, *mean_and_spread(values))
        for name, values in losses.items() if None not in values
    ]  # fmt: skip
    paired = []
    if "full" in runs:
        paired = ["Differences from the full variant, paired by seed: mean ± standard deviation (seeds where the "
                  "variant was ahead).", "", paired_difference_table(runs), ""]  # fmt: skip
    text = [
        "# Nano ablations (the paper's Table 3 at nano scale)", "",
        f"Preset `{args.preset}`, seeds {args.seeds}. Mean ± standard deviation over seeds; MMEB-layout Precision@1 "
        + "and ViDoRe-layout nDCG@5, in percent.", "", table, "",
        *paired,
        "Mean of the last five logged contrastive losses per run, mean ± standard deviation over seeds:", "",
        *loss_lines, "",
        "## Settings of the full variant", "", "```json", json.dumps(asdict(preset), indent=2), "```", "",
    ]  # fmt: skip
    (root / "ablations.md").write_text("\n".join(text))
    (root / "ablations.json").write_text(json.dumps({"preset": asdict(preset), "seeds": args.seeds, "scores": runs,
                                                     "base_vlm": reference, "final_contrastive_loss": losses,
                                                     "results": raw}, indent=2))  # fmt: skip
    print("\n" + "\n".join(text))


if __name__ == "__main__":
    main()
