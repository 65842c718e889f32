"""The paper's ablations on the nano world in the paper's proportions (examples/nano/paper_world.py), with the
hypotheses, statistics and verdicts stated in docs/nano_ablations.md before the grid ran.

    python scripts/run_nano_ablations.py --preset paper                 # the whole grid, 5 seeds, 2 jobs
    python scripts/run_nano_ablations.py --preset paper --seeds 0 1 2 3 4 5 6   # extend it
    python scripts/run_nano_ablations.py --preset paper --report_only   # table + plot from the results so far
    python scripts/run_nano_ablations.py --preset paper-long            # the second grid: 1,200 contrastive steps

Per seed: one world and one causally warmed-up base VLM, shared by every variant of that seed. Each (variant,
seed) run writes one small JSON (`--results_dir`, default docs/nano_ablations/results/<preset>/), keyed on its
settings: a rerun skips the runs whose JSON holds the same settings and redoes the others. Intermediate stages
(worlds, checkpoints) go to `--output_dir` and are reused through the nano pipeline's stage records. Units run
as subprocesses, `--jobs` at a time, one thread each. The report (paired differences, 95% t intervals, verdicts,
plot) replaces the preset's generated part of `--doc` (between its own results markers) and writes the plot next
to it (`<doc>-<preset>.png`).
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "examples" / "nano"))

from paper_world import MMEB_GROUPS, WorldSizes, cpt_dir  # noqa: E402



def results_markers(preset: str) -> tuple[str, str]:
    """The comments around a preset's generated part of the doc: each preset's grid has its own section, so a
    second grid's report leaves the first one's results as they are."""
    return f"<!-- results:{preset}:start -->", f"<!-- results:{preset}:end -->"


@dataclass(frozen=True)
class GridSettings:
    """One run's settings (a variant changes some of them). The world's sizes are part of them."""

    world: WorldSizes = field(default_factory=WorldSizes)
    hidden_size: int = 128
    num_layers: int = 2
    warmup_steps: int = 500
    warmup_lr: float = 2e-3
    warmup_batch_size: int = 16
    cpt_scale: float = 1.0  # 0: no CPT
    cpt_epochs: float = 1.0  # the paper's single pass; more data is then more steps, as in the paper
    cpt_lr: float = 5e-4
    cpt_token_budget: int = 2048
    text_mask_ratio: float = 0.4
    image_mask_ratio: float = 0.5
    mae_loss_weight: float = 0.5
    cl_steps: int = 200
    cl_lr: float = 5e-4
    cl_batch_size: int = 8
    temperature: float = 0.05
    num_hard_negatives: int = 2
    task_aware_batching: bool = True
    bidirectional: bool = True
    eval_batch_size: int = 32


PRESETS = {
    "paper": GridSettings(),
    # The second grid (docs/nano_ablations.md, "The second grid"): the first one sat at the untrained base's level,
    # so contrastive training runs long enough to leave it (1,200 steps of 16, as calibrated on seed 5, outside
    # the grid's seeds) and the CPT corpus is 2.5 times larger (2,000 rows at 1x, one pass).
    "paper-long": GridSettings(world=WorldSizes(cpt_rows=2000), cl_steps=1200, cl_batch_size=16),
    # The tests' grid: seconds a stage.
    "smoke": GridSettings(world=WorldSizes(warmup_rows=24, cpt_rows=16, contrastive_rows=8, mmeb_rows=4, vidore_topics=2),
                          warmup_steps=2, cpt_token_budget=1024, cl_steps=2, cl_batch_size=4),
}  # fmt: skip

VARIANTS = {
    "full": {},
    "no CPT (bidirectional + CL)": {"cpt_scale": 0.0},
    "causal + CL": {"cpt_scale": 0.0, "bidirectional": False},
    "no MLM": {"text_mask_ratio": 0.0},
    "no MAE": {"image_mask_ratio": 0.0, "mae_loss_weight": 0.0},
    "CPT data 0.25x": {"cpt_scale": 0.25},
    "CPT data 4x": {"cpt_scale": 4.0},
    "mixed batches": {"task_aware_batching": False},
}
# The base VLM made bidirectional, with no MoCa training: the floor every variant is read against.
BASE = "base VLM (no training)"
# Variants whose CPT is the full variant's: they reuse its checkpoint (and wait for it).
SHARES_FULL_CPT = {"mixed batches"}


def slug(name: str) -> str:
    """A folder name for a variant: "causal + CL" -> "causal-plus-cl", "CPT data 0.25x" -> "cpt-data-0.25x"."""
    words = name.split(" (")[0].lower().replace("+", "plus").split()
    return "-".join("".join(ch for ch in word if ch.isalnum() or ch == ".") for word in words)


def run_settings(preset: GridSettings, variant: str) -> GridSettings:
    return replace(preset, **VARIANTS.get(variant, {}))


def run_key(preset: GridSettings, variant: str, seed: int) -> dict:
    """What a run's result depends on: its settings and seed (not the code: committed results stay valid across
    refactors; change a setting, or delete the JSON, to redo a run)."""
    settings = asdict(run_settings(preset, variant)) if variant != BASE else asdict(preset)
    return {"variant": variant, "seed": seed, "settings": settings}


def result_path(results_dir: Path, variant: str, seed: int) -> Path:
    return results_dir / slug(variant) / f"seed{seed}.json"


def load_result(results_dir: Path, preset: GridSettings, variant: str, seed: int) -> dict | None:
    """The stored result of this run made with these settings, or None (missing, or made with others)."""
    path = result_path(results_dir, variant, seed)
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result.get("key") == json.loads(json.dumps(run_key(preset, variant, seed))) else None


def write_result(results_dir: Path, preset: GridSettings, variant: str, seed: int, result: dict) -> Path:
    path = result_path(results_dir, variant, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps({"key": run_key(preset, variant, seed), **result}, indent=1, sort_keys=True) + "\n")
    partial.replace(path)  # a run cut short leaves no result
    return path


# ----------------------------------------------------------------------------------------------------------------
# One unit of the grid: a seed's world and base VLM, or one (variant, seed) run.


def summary(results: dict) -> dict[str, float]:
    """The scores a result keeps, in percent: MMEB overall, per split, per group, per category, per subset, and
    ViDoRe's average."""
    mmeb = results["mmeb"]
    subsets = {name: 100 * s["precision_at_1"] for name, s in mmeb["subsets"].items()}
    scores = {"MMEB overall": 100 * mmeb["overall"]["precision_at_1"]}
    for split, value in mmeb["splits"].items():
        scores[f"MMEB {split}"] = 100 * value["precision_at_1"]
    for group in dict.fromkeys(MMEB_GROUPS.values()):
        members = [subsets[n] for n, g in MMEB_GROUPS.items() if g == group and n in subsets]
        if members:
            scores[f"MMEB {group}"] = statistics.mean(members)
    for category, value in mmeb["categories"].items():
        if value.get("precision_at_1") is not None:
            scores[f"MMEB {category}"] = 100 * value["precision_at_1"]
    scores["ViDoRe nDCG@5"] = 100 * results["vidore"]["average"]["ndcg_at_5"]
    scores.update({f"subset {name}": value for name, value in subsets.items()})
    return scores


def prepare_seed(out: Path, preset: GridSettings, seed: int) -> tuple[Path, Path]:
    """The seed's world and its base VLM, warmed up causally on the warm-up corpus (not the CPT corpus)."""
    import shutil

    from paper_world import make_paper_world
    from run_pipeline import is_current, mark_current, run, stage_key, trainer_flags

    from moca.testing import make_tiny_vlm

    seed_dir = out / f"seed{seed}"
    world = seed_dir / "world"
    key = stage_key("paper-world", {"seed": seed, "sizes": asdict(preset.world)})
    if not is_current(world, key):
        make_paper_world(world, seed=seed, sizes=preset.world)
        mark_current(world, key)
    base, random_vlm = seed_dir / "base-vlm", seed_dir / "random-vlm"
    command = [sys.executable, "examples/nano/train_causal_vlm.py", "--model_name_or_path", str(random_vlm),
               "--dataset", str(world / "warmup"), "--per_device_train_batch_size", str(preset.warmup_batch_size),
               *trainer_flags(base, preset.warmup_steps, preset.warmup_lr, seed)]  # fmt: skip
    key = stage_key("base-vlm", {"command": command[1:], "hidden_size": preset.hidden_size,
                                 "num_layers": preset.num_layers, "seed": seed}, [world])  # fmt: skip
    if not is_current(base, key):
        shutil.rmtree(random_vlm, ignore_errors=True)
        make_tiny_vlm(random_vlm, seed=seed, hidden_size=preset.hidden_size, num_layers=preset.num_layers)
        run(command, seed_dir / "logs" / "causal.log")
        mark_current(base, key)
    return world, base


def last_losses(run_dir: Path, last: int = 5) -> dict[str, float]:
    from run_pipeline import loss_history

    return {k: statistics.mean(v for _, v in points[-last:]) for k, points in loss_history(run_dir).items() if points}


def train_in_process(name: str, target: Path, script: str, argv: list[str], inputs: list[Path]) -> Path:
    """A training stage run in this process (`script`'s main(argv)), unless `target` already holds its output made
    so (the nano pipeline's stage record). In-process, a unit pays for one interpreter start, not three."""
    import importlib

    from run_pipeline import is_current, mark_current, stage_key

    key = stage_key(name, [script, *argv], inputs)
    if not is_current(target, key):
        print(f"\n$ python {script} {' '.join(argv)}", flush=True)
        importlib.import_module(script.removesuffix(".py")).main(argv)
        mark_current(target, key)
    return target


def claim(lock: Path) -> bool:
    """True when this process may run the unit: no other live process holds its lock (two grid processes
    sharing an output folder must not train into the same folders)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    if lock.is_file():
        try:
            pid = int(lock.read_text())
            if pid != os.getpid():
                os.kill(pid, 0)
                return False
        except (ValueError, ProcessLookupError):
            pass  # a stale lock: its process is gone
    lock.write_text(str(os.getpid()))
    return True


def run_unit(out: Path, results_dir: Path, preset: GridSettings, variant: str, seed: int) -> dict:
    """One (variant, seed) run from the seed's base VLM to its evaluation; writes and returns its result."""
    from run_pipeline import NANO_IMAGE_TOKENS, evaluate, trainer_flags

    start = time.time()
    existing = load_result(results_dir, preset, variant, seed)
    if existing:  # finished by another grid process since this one was scheduled
        return existing
    if not claim(out / "locks" / f"{slug(variant)}-seed{seed}.pid"):
        print(f"{variant}, seed {seed}: another process is running it", flush=True)
        return {}
    world, base = prepare_seed(out, preset, seed)
    seed_dir = out / f"seed{seed}"
    settings = run_settings(preset, variant)
    if variant == BASE:
        results = evaluate(base, seed_dir / "eval-base", world, settings)
        result = {"scores": summary(results), "warmup_loss": loss_curve(base),
                  "minutes": round((time.time() - start) / 60, 2)}  # fmt: skip
        write_result(results_dir, preset, variant, seed, result)
        return result
    run_dir = seed_dir / slug(variant)
    checkpoint, losses = base, {}
    if settings.cpt_scale:
        cpt_owner = seed_dir / slug("full") if variant in SHARES_FULL_CPT else run_dir
        target = cpt_owner / "cpt"
        argv = ["--model_name_or_path", str(base), "--dataset", str(cpt_dir(world, settings.cpt_scale)),
                "--token_budget", str(settings.cpt_token_budget), "--max_length", "256",
                "--text_mask_ratio", str(settings.text_mask_ratio), "--image_mask_ratio", str(settings.image_mask_ratio),
                "--mae_loss_weight", str(settings.mae_loss_weight), *NANO_IMAGE_TOKENS,
                *trainer_flags(target, -1, settings.cpt_lr, seed),
                "--num_train_epochs", str(settings.cpt_epochs), "--logging_steps", "5"]  # fmt: skip
        checkpoint = train_in_process("cpt", target, "train_cpt.py", argv, [base, world])
        losses["cpt"] = last_losses(checkpoint)
    target = run_dir / "final"
    argv = ["--model_name_or_path", str(checkpoint), "--dataset", str(world / "contrastive"),
            "--per_device_train_batch_size", str(settings.cl_batch_size), "--max_length", "256",
            "--temperature", str(settings.temperature), "--num_hard_negatives", str(settings.num_hard_negatives),
            *NANO_IMAGE_TOKENS,
            *([] if settings.task_aware_batching else ["--no_task_aware_batching"]),
            *([] if settings.bidirectional else ["--no_bidirectional"]),
            *trainer_flags(target, settings.cl_steps, settings.cl_lr, seed), "--logging_steps", "10"]  # fmt: skip
    final = train_in_process("contrastive", target, "train_contrastive.py", argv, [checkpoint, world])
    losses["contrastive"] = last_losses(final)
    results = evaluate(final, run_dir / "eval", world, settings)
    result = {"scores": summary(results), "final_losses": losses,
              "cpt_steps": cpt_steps(checkpoint) if settings.cpt_scale else 0,
              "contrastive_loss": loss_curve(final), "minutes": round((time.time() - start) / 60, 2)}  # fmt: skip
    write_result(results_dir, preset, variant, seed, result)
    return result


def loss_curve(run_dir: Path) -> list[tuple[int, float]]:
    from run_pipeline import loss_history

    return loss_history(run_dir).get("loss", [])


def cpt_steps(checkpoint: Path) -> int:
    state = checkpoint / "trainer_state.json"
    return json.loads(state.read_text())["global_step"] if state.is_file() else 0


# ----------------------------------------------------------------------------------------------------------------
# The grid: units as subprocesses, a few at a time, in an order that respects what they share.


def grid_units(seeds: list[int], variants: list[str]) -> list[tuple[str, int]]:
    """Seed by seed (a grid cut short has every variant on its first seeds), the base VLM's evaluation first."""
    return [(variant, seed) for seed in seeds for variant in [BASE, *variants]]


def depends_on(variant: str, seed: int) -> list[tuple[str, int]]:
    """Units that must have finished first: the full variant's CPT for those that reuse it; the seed's base (its
    world and warm-up) for all others, so that two jobs never build the same seed's world."""
    if variant == BASE:
        return []
    return [("full", seed)] if variant in SHARES_FULL_CPT else [(BASE, seed)]


def run_grid(args, preset: GridSettings, units: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Runs every unit that has no stored result; returns the units that failed."""
    done = {unit for unit in units if load_result(args.results_dir, preset, *unit)}
    pending = [unit for unit in units if unit not in done]
    running: dict[tuple[str, int], subprocess.Popen] = {}
    failed: list[tuple[str, int]] = []
    print(f"{len(done)} of {len(units)} runs already done; {len(pending)} to run, {args.jobs} at a time", flush=True)
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                        "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO_ROOT)}  # fmt: skip
    while pending or running:
        for unit, process in list(running.items()):
            if process.poll() is not None:
                del running[unit]
                (done.add if process.returncode == 0 else failed.append)(unit)
                print(f"{time.strftime('%H:%M:%S')} {'done' if process.returncode == 0 else 'FAILED'}: {unit}", flush=True)
        blocked = {unit for unit in pending if any(d in failed for d in depends_on(*unit))}
        failed += sorted(blocked)
        pending = [unit for unit in pending if unit not in blocked]
        ready = [unit for unit in pending if all(d in done for d in depends_on(*unit))]
        while ready and len(running) < args.jobs:
            unit = ready.pop(0)
            pending.remove(unit)
            log = args.output_dir / "logs" / f"{slug(unit[0])}-seed{unit[1]}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, __file__, "--preset", args.preset, "--output_dir", str(args.output_dir),
                       "--results_dir", str(args.results_dir), "--unit", unit[0], str(unit[1])]  # fmt: skip
            print(f"{time.strftime('%H:%M:%S')} start: {unit} (log: {log})", flush=True)
            running[unit] = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        time.sleep(1)
    return failed


# ----------------------------------------------------------------------------------------------------------------
# Statistics, pre-stated in docs/nano_ablations.md: paired differences over seeds, 95% t intervals.

MARGIN = 1.0  # MMEB points: a difference smaller than this is "no effect that matters" at this scale
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 24: 2.064, 29: 2.045}  # fmt: skip


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (the table above; 1.96 beyond it)."""
    if df in T_975:
        return T_975[df]
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:
        return 1.96


def paired_interval(differences: list[float]) -> dict:
    """Mean of paired differences and its 95% t interval (mean ± t(0.975, n-1) · sd / √n); no interval for n < 2."""
    n = len(differences)
    mean = statistics.mean(differences)
    if n < 2:
        return {"n": n, "mean": mean, "low": None, "high": None, "sd": None}
    sd = statistics.stdev(differences)
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half, "sd": sd}


def verdict(interval: dict, kind: str, margin: float = MARGIN) -> str:
    """The pre-stated verdict on "A > B" (kind ">") or "A >= B" (kind ">=") from the interval of A - B.

    ">": supported when the whole interval is above 0; not supported when it is wholly below 0, or wholly
    inside (-margin, +margin) (any effect is smaller than the margin); otherwise not resolved at this scale.
    ">=": supported when the whole interval is above -margin (A is not worse by the margin or more); not
    supported when it is wholly below 0; otherwise not resolved.
    """
    low, high = interval["low"], interval["high"]
    if low is None:
        return "not resolved at this scale"
    if kind == ">":
        if low > 0:
            return "supported"
        if high < 0 or (low > -margin and high < margin):
            return "not supported"
        return "not resolved at this scale"
    if kind == ">=":
        if low > -margin:
            return "supported"
        if high < 0:
            return "not supported"
        return "not resolved at this scale"
    raise ValueError(f"unknown kind {kind!r}")


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys on xs."""
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


# (id, statement, kind, metric, A, B): the hypotheses of docs/nano_ablations.md, as differences A - B per seed.
HYPOTHESES = [
    ("H1 (overall)", "full > no CPT, MMEB overall", ">", "MMEB overall", "full", "no CPT (bidirectional + CL)"),
    ("H1 (OOD)", "full > no CPT, MMEB OOD", ">", "MMEB OOD", "full", "no CPT (bidirectional + CL)"),
    ("H2", "without CPT, causal + CL >= bidirectional + CL", ">=", "MMEB overall", "causal + CL",
     "no CPT (bidirectional + CL)"),
    ("H3 (MLM)", "full > no MLM", ">", "MMEB overall", "full", "no MLM"),
    ("H3 (MAE)", "full > no MAE", ">", "MMEB overall", "full", "no MAE"),
    ("H4", "MMEB gain grows with CPT data: slope of MMEB overall on log2(CPT scale) over 0.25x, 1x, 4x > 0", ">",
     "MMEB overall", "slope", None),
    ("H5", "task-aware batching >= mixed batches", ">=", "MMEB overall", "full", "mixed batches"),
]  # fmt: skip
SCALE_VARIANTS = {0.25: "CPT data 0.25x", 1.0: "full", 4.0: "CPT data 4x"}


def paired(scores: dict, a: str, b: str, metric: str) -> tuple[list[int], list[float]]:
    """Seeds that both variants finished, and A - B on each."""
    seeds = sorted(set(scores.get(a, {})) & set(scores.get(b, {})))
    return seeds, [scores[a][s][metric] - scores[b][s][metric] for s in seeds]


def scale_slopes(scores: dict, metric: str) -> tuple[list[int], list[float]]:
    seeds = sorted(set.intersection(*(set(scores.get(v, {})) for v in SCALE_VARIANTS.values())))
    xs = [math.log2(scale) for scale in SCALE_VARIANTS]
    return seeds, [slope(xs, [scores[v][s][metric] for v in SCALE_VARIANTS.values()]) for s in seeds]


def judge_hypotheses(scores: dict) -> list[dict]:
    rows = []
    for hid, statement, kind, metric, a, b in HYPOTHESES:
        seeds, diffs = scale_slopes(scores, metric) if a == "slope" else paired(scores, a, b, metric)
        interval = paired_interval(diffs) if diffs else {"n": 0, "mean": None, "low": None, "high": None}
        rows.append({"id": hid, "statement": statement, "kind": kind, "metric": metric, "seeds": seeds,
                     "differences": diffs, **interval, "verdict": verdict(interval, kind) if diffs else "not run"})  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The report.

TABLE_COLUMNS = ["MMEB overall", "MMEB IND", "MMEB OOD", "MMEB held-out combinations", "MMEB CPT-only concepts",
                 "MMEB Classification", "MMEB VQA", "MMEB Retrieval", "MMEB Visual Grounding", "ViDoRe nDCG@5"]  # fmt: skip


def load_scores(results_dir: Path, preset: GridSettings, seeds: list[int], variants: list[str]) -> tuple[dict, dict]:
    scores, extra = {}, {}
    for variant in [BASE, *variants]:
        for seed in seeds:
            result = load_result(results_dir, preset, variant, seed)
            if result:
                scores.setdefault(variant, {})[seed] = result["scores"]
                extra.setdefault(variant, {})[seed] = result
    return scores, extra


def fmt(value, signed=False, digits=1):
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def report(scores: dict, extra: dict, preset_name: str, seeds: list[int], variants: list[str], plot_path: Path) -> str:
    complete = all(len(scores.get(v, {})) == len(seeds) for v in [BASE, *variants])
    lines = [f"Preset `{preset_name}`, seeds {seeds}: "
             + ("every run finished." if complete else "**PARTIAL: some runs have not finished** (counts below)."), ""]
    lines += ["Mean over seeds (± standard deviation), in percent: MMEB-layout Precision@1, ViDoRe-layout nDCG@5.", "",
              "| variant | seeds | " + " | ".join(c.replace("MMEB ", "") for c in TABLE_COLUMNS) + " |",
              "|---|---:|" + "---:|" * len(TABLE_COLUMNS)]  # fmt: skip
    for variant in [BASE, *variants]:
        per_seed = scores.get(variant, {})
        if not per_seed:
            lines.append(f"| {variant} | 0 | " + " | ".join("–" for _ in TABLE_COLUMNS) + " |")
            continue
        cells = []
        for column in TABLE_COLUMNS:
            values = [s[column] for s in per_seed.values() if column in s]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {sd:.1f}" if values else "–")
        lines.append(f"| {variant} | {len(per_seed)} | " + " | ".join(cells) + " |")
    lines += ["", "Variant − full, paired by seed: mean [95% t interval] (seeds where the variant was ahead).", "",
              "| variant − full | seeds | " + " | ".join(c.replace("MMEB ", "") for c in TABLE_COLUMNS[:5]) + " |",
              "|---|---:|" + "---:|" * 5]  # fmt: skip
    for variant in variants:
        if variant == "full":
            continue
        cells, n = [], 0
        for column in TABLE_COLUMNS[:5]:
            seeds_both, diffs = paired(scores, variant, "full", column)
            if not diffs:
                cells.append("–")
                continue
            n = len(diffs)
            i = paired_interval(diffs)
            cells.append(f"{i['mean']:+.1f} [{fmt(i['low'], True)}, {fmt(i['high'], True)}] ({sum(d > 0 for d in diffs)}/{n})")
        lines.append(f"| {variant} | {n} | " + " | ".join(cells) + " |")
    lines += ["", "### Hypotheses (pre-stated; verdict rule above)", "",
              "| hypothesis | metric | seeds | A − B (per seed) | mean | 95% t interval | verdict |",
              "|---|---|---:|---|---:|---:|---|"]  # fmt: skip
    for row in judge_hypotheses(scores):
        per_seed = ", ".join(f"{d:+.1f}" for d in row["differences"])
        unit = " (points per doubling)" if row["id"] == "H4" else ""
        lines.append(f"| {row['id']}: {row['statement']} | {row['metric']}{unit} | {len(row['seeds'])} | {per_seed} | "
                     f"{fmt(row['mean'], True)} | [{fmt(row['low'], True)}, {fmt(row['high'], True)}] | **{row['verdict']}** |")  # fmt: skip
    lines += ["", "Final training losses (mean of the last five logged values, mean over seeds):", "",
              "| variant | CPT MLM | CPT MAE | contrastive | CPT steps |", "|---|---:|---:|---:|---:|"]
    for variant in variants:
        runs = list(extra.get(variant, {}).values())
        if not runs:
            continue

        def mean_of(get):
            values = [v for v in (get(r) for r in runs) if v is not None]
            return statistics.mean(values) if values else None

        # A loss the variant switches off is logged as 0.0 by the trainer: shown as "–", not as a loss it reached.
        trained = {"mlm_loss": VARIANTS.get(variant, {}).get("text_mask_ratio") != 0.0,
                   "mae_loss": VARIANTS.get(variant, {}).get("image_mask_ratio") != 0.0}  # fmt: skip

        def cpt_loss(name):
            return mean_of(lambda r: r["final_losses"].get("cpt", {}).get(name)) if trained[name] else None

        lines.append(f"| {variant} | {fmt(cpt_loss('mlm_loss'), digits=3)} | {fmt(cpt_loss('mae_loss'), digits=3)} | "
                     f"{fmt(mean_of(lambda r: r['final_losses']['contrastive'].get('loss')), digits=3)} | "
                     f"{fmt(mean_of(lambda r: r.get('cpt_steps')), digits=0)} |")  # fmt: skip
    curves = [r["warmup_loss"] for r in extra.get(BASE, {}).values() if len(r["warmup_loss"]) >= 10]
    if curves:
        fifth = len(curves[0]) // 5
        fourth = statistics.mean(statistics.mean(v for _, v in c[-2 * fifth : -fifth]) for c in curves)
        last = statistics.mean(statistics.mean(v for _, v in c[-fifth:]) for c in curves)
        lines += ["", "Causal warm-up of the base VLM (next-token loss, mean over seeds): "
                  f"{fourth:.3f} over the fourth fifth of its {curves[0][-1][0]} steps, {last:.3f} over the last fifth "
                  f"({100 * (last - fourth) / fourth:+.1f}%)."]  # fmt: skip
    minutes = [r.get("minutes", 0) for v in extra.values() for r in v.values()]
    lines += ["", f"Compute: {sum(minutes):.0f} run-minutes in the stored results (wall time per run, including waits "
              "for the shared cores; world and warm-up time is counted in each seed's first run).",
              "", f"![paired differences]({plot_path.name})"]  # fmt: skip
    return "\n".join(lines)


def plot(scores: dict, variants: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [v for v in variants if v != "full"]
    figure, axes = plt.subplots(1, 2, figsize=(13, 5.4), gridspec_kw={"width_ratios": [3, 2]})
    for k, (column, colour) in enumerate([("MMEB overall", "tab:blue"), ("MMEB OOD", "tab:orange"),
                                          ("MMEB CPT-only concepts", "tab:green")]):  # fmt: skip
        for row, variant in enumerate(others):
            _, diffs = paired(scores, variant, "full", column)
            if not diffs:
                continue
            i = paired_interval(diffs)
            y = row + 0.25 * (k - 1)
            axes[0].plot([i["low"] if i["low"] is not None else i["mean"], i["high"] if i["high"] is not None else i["mean"]],
                         [y, y], color=colour, linewidth=2)  # fmt: skip
            axes[0].plot(i["mean"], y, "o", color=colour, label=column.replace("MMEB ", "MMEB ") if row == 0 else None)
    axes[0].axvline(0, color="grey", linewidth=1)
    axes[0].set_yticks(range(len(others)), others, fontsize=8)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("variant − full (points), mean and 95% t interval over seeds")
    # Legends below the axes: inside, they cover intervals or curves.
    axes[0].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)
    axes[0].set_title("ablations, paired by seed")
    xs = [0.0] + list(SCALE_VARIANTS)
    names = ["no CPT (bidirectional + CL)"] + list(SCALE_VARIANTS.values())
    for column, colour in [("MMEB overall", "tab:blue"), ("MMEB OOD", "tab:orange"), ("MMEB CPT-only concepts", "tab:green")]:
        points = [(x, [s[column] for s in scores.get(n, {}).values()]) for x, n in zip(xs, names)]
        points = [(x, v) for x, v in points if v]
        if points:
            axes[1].errorbar([f"{x:g}x" for x, _ in points], [statistics.mean(v) for _, v in points],
                             yerr=[statistics.stdev(v) if len(v) > 1 else 0 for _, v in points], marker="o",
                             color=colour, capsize=3, label=column)  # fmt: skip
    base = [s["MMEB overall"] for s in scores.get(BASE, {}).values()]
    if base:
        axes[1].axhline(statistics.mean(base), color="tab:blue", linestyle="--", linewidth=1,
                        label="MMEB overall, base VLM (no training)")  # fmt: skip
    axes[1].set_xlabel("CPT data (0x = no CPT)")
    axes[1].set_ylabel("score (%), mean ± sd over seeds")
    axes[1].set_title("more CPT data")
    axes[1].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(args, preset: GridSettings, seeds: list[int], variants: list[str]) -> str:
    scores, extra = load_scores(args.results_dir, preset, seeds, variants)
    plot_path = args.doc.with_name(f"{args.doc.stem}-{args.preset}.png")
    text = report(scores, extra, args.preset, seeds, variants, plot_path)
    plot(scores, variants, plot_path)
    start, end = results_markers(args.preset)
    doc = args.doc.read_text() if args.doc.is_file() else ""
    if start not in doc:  # a new preset's section goes at the end of the doc
        doc = doc.rstrip("\n") + f"\n\n{start}\n{end}\n" if doc else f"{start}\n{end}\n"
    head, rest = doc.split(start, 1)
    tail = rest.split(end, 1)[1]
    args.doc.write_text(head + start + "\n" + text + "\n" + end + tail)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--output_dir", type=Path, default=None, help="default: out/nano-ablations-<preset>")
    parser.add_argument("--results_dir", type=Path, default=None, help="default: docs/nano_ablations/results/<preset>")
    parser.add_argument("--doc", type=Path, default=REPO_ROOT / "docs" / "nano_ablations.md")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--unit", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.output_dir = args.output_dir or REPO_ROOT / "out" / f"nano-ablations-{args.preset}"
    args.results_dir = args.results_dir or REPO_ROOT / "docs" / "nano_ablations" / "results" / args.preset
    preset = PRESETS[args.preset]
    if args.unit:
        run_unit(args.output_dir, args.results_dir, preset, args.unit[0], int(args.unit[1]))
        return
    if "mixed batches" in args.variants and "full" not in args.variants:
        args.variants.insert(0, "full")  # it reuses the full variant's CPT
    failed = [] if args.report_only else run_grid(args, preset, grid_units(args.seeds, args.variants))
    print(write_report(args, preset, args.seeds, args.variants))
    if failed:
        raise SystemExit(f"{len(failed)} runs failed or were blocked: {failed} (their logs: {args.output_dir}/logs)")


if __name__ == "__main__":
    main()
