"""The nano pipeline end to end (its --quick variant), the ablation grid's wiring and table, and the contrastive
script's causal option that the grid relies on."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

import run_ablations
from run_ablations import VARIANTS, ablation_table, paired_difference_table, run_variant, summary_scores
from run_pipeline import QUICK


def test_quick_pipeline_writes_report_results_and_searches(tmp_path):
    out = tmp_path / "nano"
    result = subprocess.run([sys.executable, "examples/nano/run_pipeline.py", "--output_dir", str(out), "--quick"],
                            check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "| task | base VLM, bidirectional | MoCa (CPT + CL) | gain |" in report
    assert "| MMEB overall" in report and "| ViDoRe average nDCG@5" in report
    assert "| MMEB overall" in result.stdout  # the table is printed too
    base, final = (json.loads((out / run / "results.json").read_text()) for run in ("eval-base", "eval-final"))
    # Training works: the final model beats the base VLM on both suites (seed 0 gives +9 and +26 points; a
    # pipeline that trained nothing, or evaluated the base twice, gives +0).
    for suite, metric, summary in (("mmeb", "precision_at_1", "overall"), ("vidore", "ndcg_at_5", "average")):
        assert final[suite][summary][metric] > base[suite][summary][metric] + 0.03, suite
    overall = next(line for line in report.splitlines() if line.startswith("| MMEB overall"))
    base_cell, final_cell, gain_cell = (float(cell) for cell in overall.split("|")[2:5])
    assert abs(base_cell - 100 * base["mmeb"]["overall"]["precision_at_1"]) < 0.051
    assert abs(final_cell - 100 * final["mmeb"]["overall"]["precision_at_1"]) < 0.051
    assert abs(gain_cell - (final_cell - base_cell)) < 0.11
    # The fresh-process search ran and reported how many of its queries found their image first.
    search = next(line for line in report.splitlines() if line.startswith("Fresh-process text-to-image search"))
    found, asked = map(int, search.split(": ")[1].split(" ")[0].split("/"))
    assert asked == 8 and 0 <= found <= asked
    # Each MMEB subset's gain carries a paired-bootstrap interval that contains the gain itself.
    for line in report.splitlines():
        if line.startswith("| MMEB") and "[" in line:
            gain, interval = line.split("|")[4:6]
            low, high = map(float, interval.strip(" []").split(","))
            assert low <= float(gain) <= high, line
    assert "MMEB subsets whose whole 95% interval of the gain lies above zero:" in report
    assert "contrastive loss" in report  # the contrastive stage saved its loss history
    assert (out / "report.png").stat().st_size > 0


def fake_results(overall: float) -> dict:
    categories = {c: {"precision_at_1": overall} for c in ("Classification", "VQA", "Retrieval", "Visual Grounding")}
    return {
        "mmeb": {
            "overall": {"precision_at_1": overall},
            "splits": {"IND": {"precision_at_1": overall + 0.1}, "OOD": {"precision_at_1": overall - 0.1}},
            "categories": categories,
        },
        "vidore": {"average": {"ndcg_at_5": overall / 2}},
    }


def test_ablation_table_mean_and_spread():
    runs = {
        "full": [summary_scores(fake_results(0.5)), summary_scores(fake_results(0.7))],
        "no CPT (bidirectional + CL)": [summary_scores(fake_results(0.2)), summary_scores(fake_results(0.2))],
    }
    table = ablation_table(runs, reference=[summary_scores(fake_results(0.1))])
    lines = table.splitlines()
    assert lines[0].startswith("| variant | seeds | MMEB overall | MMEB IND | MMEB OOD | MMEB Classification")
    assert lines[0].endswith("| ViDoRe nDCG@5 |")
    assert lines[2].startswith("| base VLM (no training) | 1 | 10.0 ± 0.0 | 20.0 ± 0.0 | 0.0 ± 0.0 |")
    # mean of 50 and 70 is 60; the sample standard deviation is 14.14; ViDoRe is half of the overall score.
    assert lines[3].startswith("| full | 2 | 60.0 ± 14.1 | 70.0 ± 14.1 | 50.0 ± 14.1 |")
    assert lines[3].endswith("| 30.0 ± 7.1 |")
    assert lines[4].startswith("| no CPT (bidirectional + CL) | 2 | 20.0 ± 0.0 |")


def test_paired_differences_cancel_what_seeds_share():
    # Seed 1 is 20 points better than seed 0 for both variants: the paired difference has no spread at all.
    runs = {
        "full": [summary_scores(fake_results(0.5)), summary_scores(fake_results(0.7))],
        "no MLM": [summary_scores(fake_results(0.4)), summary_scores(fake_results(0.6))],
        "no MAE": [summary_scores(fake_results(0.6)), summary_scores(fake_results(0.6))],
    }
    lines = paired_difference_table(runs).splitlines()
    assert lines[0].startswith("| variant − full | MMEB overall |")
    assert lines[2].startswith("| no MLM | -10.0 ± 0.0 (0/2) |")
    # +10 then -10: mean 0, sample standard deviation 14.1, ahead on one seed of two.
    assert lines[3].startswith("| no MAE | +0.0 ± 14.1 (1/2) |")
    assert len(lines) == 4  # no row for the reference variant itself


def test_ablation_variants_start_from_the_right_checkpoints(tmp_path, monkeypatch):
    """Which stages each variant runs and from where, with the stages replaced by recorders."""
    calls = []
    monkeypatch.setattr(run_ablations, "make_base_vlm", lambda out, settings, seed: out / "base-vlm")

    def fake_cpt(start, out, settings, seed, data):
        calls.append(("cpt", start.name, out.name, settings.text_mask_ratio, settings.mae_loss_weight))
        return out / "cpt"

    def fake_contrastive(start, out, settings, seed, data):
        calls.append(("cl", f"{start.parent.name}/{start.name}", out.name, settings.bidirectional,
                      settings.task_aware_batching))  # fmt: skip
        return out / "final"

    monkeypatch.setattr(run_ablations, "train_cpt", fake_cpt)
    monkeypatch.setattr(run_ablations, "train_contrastive", fake_contrastive)
    monkeypatch.setattr(run_ablations, "evaluate", lambda model, out, data, settings: {"model": str(model)})
    for name, changes in VARIANTS.items():
        run_variant(tmp_path, 0, name, replace(QUICK, **changes))
    assert calls == [
        ("cpt", "base-vlm", "full", 0.4, 0.5), ("cl", "full/cpt", "full", True, True),
        ("cpt", "base-vlm", "no-mlm", 0.0, 0.5), ("cl", "no-mlm/cpt", "no-mlm", True, True),
        ("cpt", "base-vlm", "no-mae", 0.4, 0.0), ("cl", "no-mae/cpt", "no-mae", True, True),
        ("cl", "seed0/base-vlm", "no-cpt", True, True),
        ("cl", "seed0/base-vlm", "causal-plus-cl", False, True),
        ("cpt", "base-vlm", "full", 0.4, 0.5), ("cl", "full/cpt", "no-task-aware-batching", True, False),
    ]  # fmt: skip


@pytest.mark.parametrize("bidirectional, pooling, expected_pooling", [(False, None, "last"), (True, None, "mean"),
                                                                        (True, "last", "last")])  # fmt: skip
def test_contrastive_script_keeps_a_causal_backbone_causal(tiny_vlm_dir, bidirectional, pooling, expected_pooling):
    from moca.training.contrastive import ContrastiveArguments, load_contrastive_model as load_model

    args = ContrastiveArguments(model_name_or_path=tiny_vlm_dir, min_image_tokens=1, max_image_tokens=16, dataset=["unused"], bidirectional=bidirectional,
                                pooling=pooling)  # fmt: skip
    model = load_model(args).eval()
    assert model.config.bidirectional is bidirectional and model.config.pooling == expected_pooling
    # Causal attention: the first token's hidden state does not depend on the tokens after it.
    ids = torch.tensor([[5, 6, 7, 8], [5, 9, 10, 11]])
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    first_tokens_differ = (hidden[0, 0] - hidden[1, 0]).abs().max().item()
    assert (first_tokens_differ < 1e-5) if not bidirectional else (first_tokens_differ > 1e-4)


def test_a_stage_is_reused_only_when_made_by_the_same_command_inputs_and_code(tmp_path):
    """The pipeline reuses a stage's folder only when its record matches: a README number once came from a folder
    that older settings had made."""
    from run_pipeline import is_current, mark_current, stage_key

    data, model = tmp_path / "data", tmp_path / "model"
    data.mkdir()
    data_key = stage_key("data", {"seed": 0})
    mark_current(data, data_key)
    model.mkdir()
    (model / "weights").write_text("w")
    key = stage_key("train", ["--max_steps", "5"], [data])
    assert not is_current(model, key) and not model.exists()  # unfinished (no record): removed, to be remade
    model.mkdir()
    mark_current(model, key)
    assert is_current(model, stage_key("train", ["--max_steps", "5"], [data]))
    assert not is_current(model, stage_key("train", ["--max_steps", "6"], [data])) and not model.exists()
    model.mkdir()
    mark_current(model, key)
    mark_current(data, stage_key("data", {"seed": 1}))  # the input was remade otherwise: the output is stale
    assert not is_current(model, stage_key("train", ["--max_steps", "5"], [data])) and not model.exists()


def test_the_causal_warm_up_ends_each_uncut_text_with_the_end_of_text_id(tiny_vlm_dir):
    """The end-of-text token goes in as an id (written into the text, the processor reads it as plain text), and
    only after a text that max_length did not cut, as `text + eos` cut at max_length gave."""
    from train_causal_vlm import CaptionCollator

    from moca import MoCaProcessor

    processor = MoCaProcessor.from_pretrained(tiny_vlm_dir)
    eos, short, long = processor.tokenizer.eos_token_id, "a red circle", "a much longer text that goes on and on and on"
    batch = CaptionCollator(processor, max_length=12)([{"text": short, "images": []}, {"text": long, "images": []}])
    short_ids = processor.tokenizer(short)["input_ids"]
    assert batch["input_ids"][0, : len(short_ids) + 1].tolist() == short_ids + [eos]
    assert batch["attention_mask"][0].sum() == len(short_ids) + 1 and batch["labels"][0, len(short_ids)] == eos
    assert batch["input_ids"][1].tolist() == processor.tokenizer(long)["input_ids"][:12]  # cut: no end-of-text
    assert batch["input_ids"].shape[1] == 12
