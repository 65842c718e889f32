"""The nano ablation grid (scripts/run_nano_ablations.py) and its world (examples/nano/paper_world.py)."""

import json
import math
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from datasets import load_from_disk

from paper_world import CPT_ONLY, CPT_ONLY_COLOURS, HELD_OUT, MMEB_GROUPS, RGB, WorldSizes, cpt_dir, make_paper_world

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))
import run_nano_ablations as grid  # noqa: E402

SIZES = WorldSizes(warmup_rows=40, cpt_rows=24, contrastive_rows=10, mmeb_rows=4, vidore_topics=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper_world") / "seed0"
    manifest = make_paper_world(out, seed=0, sizes=SIZES)
    return out, manifest


def _texts(dataset):
    texts = []
    for row in dataset:
        texts += [row[k] for k in ("text", "query_text", "pos_text") if row.get(k)]
        texts += list(row.get("neg_text") or [])
    return " ".join(texts).lower()


def _images(dataset):
    for row in dataset:
        for key in ("images", "neg_image"):
            yield from row.get(key) or []
        for key in ("query_image", "pos_image"):
            if row.get(key) is not None:
                yield row[key]


def _has_colour(image, colour, min_pixels=20):
    counts = {rgb: n for n, rgb in image.convert("RGB").getcolors(maxcolors=1 << 16)}
    return counts.get(RGB[colour], 0) >= min_pixels


def test_cpt_only_colours_are_in_the_cpt_corpus_and_nowhere_else_in_training(world):
    out, _ = world
    training = [load_from_disk(str(out / "warmup"))] + [
        load_from_disk(str(p)) for p in sorted((out / "contrastive").iterdir()) if p.is_dir()
    ]
    for dataset in training:
        text = _texts(dataset)
        assert not [c for c in CPT_ONLY_COLOURS if re.search(rf"\b{c}\b", text)]
        assert not any(_has_colour(image, c) for image in _images(dataset) for c in CPT_ONLY_COLOURS)
    cpt = load_from_disk(str(cpt_dir(out, SIZES.max_cpt_scale)))
    cpt_text = _texts(cpt)
    assert all(re.search(rf"\b{c}\b", cpt_text) for c in CPT_ONLY_COLOURS)
    assert any(_has_colour(image, c) for image in _images(cpt) for c in CPT_ONLY_COLOURS)


def test_held_out_combinations_are_in_no_training_text_of_any_stage(world):
    out, _ = world
    folders = [out / "warmup", cpt_dir(out, SIZES.max_cpt_scale)] + sorted(
        p for p in (out / "contrastive").iterdir() if p.is_dir()
    )
    for folder in folders:
        text = _texts(load_from_disk(str(folder)))
        for shape, colour in HELD_OUT:
            assert not re.search(rf"\b{colour} {shape}", text), (folder.name, colour, shape)


def test_cpt_scales_are_nested_prefixes_of_one_corpus(world):
    out, manifest = world
    rows = {scale: load_from_disk(str(cpt_dir(out, scale)))["text"] for scale in (0.25, 1.0, 4.0)}
    assert [len(rows[s]) for s in (0.25, 1.0, 4.0)] == [6, 24, 96]
    assert rows[4.0][:24] == rows[1.0] and rows[1.0][:6] == rows[0.25]
    assert manifest["cpt"] == {"0.25x": {"rows": 6}, "1x": {"rows": 24}, "4x": {"rows": 96}}


def test_evaluation_groups_ask_about_what_they_say(world):
    import pyarrow.parquet as pq

    out, _ = world
    subsets = json.loads((out / "mmeb" / "subsets.json").read_text())
    assert {name: info["group"] for name, info in subsets.items()} == MMEB_GROUPS
    assert {info["split"] for name, info in subsets.items() if info["group"] != "IND"} == {"OOD"}
    cpt_only_labels = {f"{c} {s}" for s, c in CPT_ONLY}
    table = pq.read_table(out / "mmeb" / "data" / "NewColourClassification" / "test-00000-of-00001.parquet")
    assert all(row["tgt_text"][0] in cpt_only_labels for row in table.to_pylist())
    table = pq.read_table(out / "mmeb" / "data" / "ObjectClassification" / "test-00000-of-00001.parquet")
    assert not any(label in cpt_only_labels for row in table.to_pylist() for label in row["tgt_text"])


# ----------------------------------------------------------------------------------------------------------------
# Statistics: the numbers the verdicts rest on.


def test_paired_interval_is_the_t_interval_of_the_mean_difference():
    interval = grid.paired_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, sd sqrt(2.5), t(0.975, 4) = 2.776: 3 ± 2.776 * 1.5811 / sqrt(5) = 3 ± 1.9630
    assert interval["mean"] == pytest.approx(3.0)
    assert interval["low"] == pytest.approx(1.0370, abs=1e-3) and interval["high"] == pytest.approx(4.9630, abs=1e-3)
    assert grid.paired_interval([2.0])["low"] is None
    assert grid.paired_interval([4.0, 4.0, 4.0])["low"] == pytest.approx(4.0)


def test_t_table_matches_scipy():
    from scipy.stats import t

    for df in (1, 4, 9, 29):
        assert grid.t_quantile(df) == pytest.approx(t.ppf(0.975, df), abs=2e-3)
    assert grid.t_quantile(40) == pytest.approx(t.ppf(0.975, 40), abs=1e-6)


@pytest.mark.parametrize(
    "low, high, kind, expected",
    [
        (0.2, 3.0, ">", "supported"),
        (-3.0, -0.1, ">", "not supported"),
        (-0.8, 0.9, ">", "not supported"),  # any effect is smaller than the 1-point margin
        (-2.0, 3.0, ">", "not resolved at this scale"),
        (-0.9, 2.0, ">=", "supported"),
        (-3.0, -0.2, ">=", "not supported"),
        (-1.5, 2.0, ">=", "not resolved at this scale"),
        (None, None, ">", "not resolved at this scale"),
    ],
)
def test_verdict_rule(low, high, kind, expected):
    assert grid.verdict({"low": low, "high": high}, kind) == expected


def test_hypotheses_pair_runs_by_seed_and_h4_is_the_slope_per_doubling():
    def run(overall, ood=0.0):
        return {"MMEB overall": overall, "MMEB OOD": ood}

    base = {seed: 10.0 * seed for seed in range(5)}  # a seed effect every variant shares: it must cancel
    scores = {
        "full": {s: run(b + 20, b + 10) for s, b in base.items()},
        "no CPT (bidirectional + CL)": {s: run(b + 18 - 0.1 * s, b + 10) for s, b in base.items()},
        "CPT data 0.25x": {s: run(b + 18) for s, b in base.items()},
        "CPT data 4x": {s: run(b + 22 + s % 2) for s, b in base.items()},
    }
    rows = {row["id"]: row for row in grid.judge_hypotheses(scores)}
    h1 = rows["H1 (overall)"]
    assert h1["differences"] == pytest.approx([2.0, 2.1, 2.2, 2.3, 2.4]) and h1["verdict"] == "supported"
    assert rows["H1 (OOD)"]["verdict"] == "not supported"  # exactly 0 on every seed: inside the margin
    # log2 scales -2, 0, 2 and scores 18, 20, 22 (+1 on odd seeds at 4x): slope 1 or 1.25 points per doubling
    assert rows["H4"]["differences"] == pytest.approx([1.0, 1.25, 1.0, 1.25, 1.0])
    assert rows["H2"]["verdict"] == "not run" and rows["H2"]["seeds"] == []


def test_the_second_grid_changes_only_the_settings_its_doc_section_names():
    # docs/nano_ablations.md states that paper-long differs from paper in these three settings and no other.
    from dataclasses import asdict

    def flat(settings):
        return {**{f"world.{k}": v for k, v in asdict(settings.world).items()},
                **{k: v for k, v in asdict(settings).items() if k != "world"}}  # fmt: skip

    first, second = flat(grid.PRESETS["paper"]), flat(grid.PRESETS["paper-long"])
    changed = {k: (first[k], second[k]) for k in first if first[k] != second[k]}
    assert changed == {"world.cpt_rows": (800, 2000), "cl_steps": (200, 1200), "cl_batch_size": (8, 16)}


def test_the_loss_table_shows_a_switched_off_loss_as_absent():
    # The CPT trainer logs the MLM loss of a run without MLM as 0.0: the report must not show it as a loss reached.
    scores = {v: {0: {c: 1.0 for c in grid.TABLE_COLUMNS}} for v in (grid.BASE, "full", "no MLM", "no MAE")}
    extra = {
        "full": {0: {"final_losses": {"cpt": {"mlm_loss": 3.9, "mae_loss": 0.5}, "contrastive": {"loss": 1.0}}, "cpt_steps": 8}},
        "no MLM": {0: {"final_losses": {"cpt": {"mlm_loss": 0.0, "mae_loss": 0.4}, "contrastive": {"loss": 1.1}}, "cpt_steps": 8}},
        "no MAE": {0: {"final_losses": {"cpt": {"mlm_loss": 3.8}, "contrastive": {"loss": 1.2}}, "cpt_steps": 8}},
    }
    text = grid.report(scores, extra, "unit", [0], ["full", "no MLM", "no MAE"], Path("plot.png"))
    assert "| full | 3.900 | 0.500 | 1.000 | 8 |" in text
    assert "| no MLM | – | 0.400 | 1.100 | 8 |" in text and "| no MAE | 3.800 | – | 1.200 | 8 |" in text


# ----------------------------------------------------------------------------------------------------------------
# Resumability: results keyed on settings.


def test_a_result_is_reused_only_for_the_same_settings_and_seed(tmp_path):
    preset = grid.PRESETS["smoke"]
    grid.write_result(tmp_path, preset, "full", 0, {"scores": {"MMEB overall": 1.0}})
    assert grid.load_result(tmp_path, preset, "full", 0)["scores"] == {"MMEB overall": 1.0}
    assert grid.load_result(tmp_path, preset, "full", 1) is None
    assert grid.load_result(tmp_path, replace(preset, cl_steps=preset.cl_steps + 1), "full", 0) is None
    assert grid.load_result(tmp_path, preset, "no MLM", 0) is None
    other_world = replace(preset, world=replace(preset.world, cpt_rows=preset.world.cpt_rows + 1))
    assert grid.load_result(tmp_path, other_world, "full", 0) is None
    # A variant's own changes are part of its key: "no MLM" under the preset is not "full".
    assert grid.run_key(preset, "no MLM", 0)["settings"]["text_mask_ratio"] == 0.0


def test_units_wait_for_what_they_share():
    units = grid.grid_units([0, 1], ["full", "mixed batches", "no MLM"])
    assert units[0] == (grid.BASE, 0) and len(units) == 8
    assert grid.depends_on("mixed batches", 0) == [("full", 0)]
    assert grid.depends_on("no MLM", 1) == [(grid.BASE, 1)]
    assert grid.depends_on(grid.BASE, 1) == []


def test_the_smoke_grid_runs_resumes_and_reports(tmp_path, monkeypatch):
    """One seed, two variants of the real pipeline at smoke sizes; then a rerun that starts nothing."""
    preset = grid.PRESETS["smoke"]
    out, results = tmp_path / "out", tmp_path / "results"
    for variant in (grid.BASE, "full", "mixed batches"):
        result = grid.run_unit(out, results, preset, variant, 0)
        assert 0 <= result["scores"]["MMEB overall"] <= 100
        assert set(MMEB_GROUPS.values()) <= {k.removeprefix("MMEB ") for k in result["scores"]}
    full = json.loads(grid.result_path(results, "full", 0).read_text())
    assert full["cpt_steps"] > 0 and full["key"] == json.loads(json.dumps(grid.run_key(preset, "full", 0)))
    # the mixed variant trained from the full variant's CPT checkpoint: no CPT folder of its own
    assert not (out / "seed0" / "mixed-batches" / "cpt").exists() and (out / "seed0" / "full" / "cpt").is_dir()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    doc = tmp_path / "doc.md"
    start, end = grid.results_markers("smoke")
    other = "\n".join(grid.results_markers("paper")).replace("\n", "\nthe first grid's results\n")
    doc.write_text(f"before\n{start}\nold\n{end}\n{other}\nafter\n")
    grid.main(["--preset", "smoke", "--seeds", "0", "--variants", "full", "mixed batches", "--output_dir", str(out),
               "--results_dir", str(results), "--doc", str(doc)])  # fmt: skip
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith(f"{other}\nafter\n") and "old" not in text
    assert text.index(start) < text.index("| H5:") < text.index(end)  # the other preset's section is left as it was
    assert "| H5: task-aware batching >= mixed batches | MMEB overall | 1 |" in text
    assert (tmp_path / "doc-smoke.png").stat().st_size > 0
    h5 = {row["id"]: row for row in grid.judge_hypotheses(grid.load_scores(results, preset, [0], ["full", "mixed batches"])[0])}["H5"]
    mixed = json.loads(grid.result_path(results, "mixed batches", 0).read_text())["scores"]["MMEB overall"]
    assert h5["differences"] == pytest.approx([full["scores"]["MMEB overall"] - mixed])
    assert not math.isnan(h5["mean"])
