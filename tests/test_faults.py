"""Faults never lose work: a run killed while writing a checkpoint resumes from the last complete one, a killed and
resumed contrastive run ends exactly where the uninterrupted one does, a second run into a folder in use (or used)
is refused, and a non-finite loss stops training, naming its step, before a checkpoint of it is written."""

import json
import logging
import shutil

import pytest
import torch
from cpt_rows import make_rows, write_jsonl
from safetensors.torch import load_file, save_file

import train_contrastive
import train_cpt
from moca.training.common import last_complete_checkpoint, output_dir_lock

STEPS = 4


def contrastive_arguments(model_dir, data, output_dir, *extra):
    return [
        "--model_name_or_path", model_dir, "--min_image_tokens", "1", "--max_image_tokens", "16",
        "--dataset", str(data), "--output_dir", str(output_dir), "--per_device_train_batch_size", "4",
        "--max_steps", str(STEPS), "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-3",
        "--warmup_steps", "0", "--lr_scheduler_type", "constant", "--max_length", "64", "--report_to", "none",
        "--seed", "0", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Text pairs with four hard negatives each, so that the random selection has something to draw from."""
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    rows = [
        {"query_text": f"which thing is {c}?", "pos_text": f"a shape painted {c}",
         "neg_text": [f"a shape painted {other}" for other in colours if other != c][:4]}
        for c in colours
    ]  # fmt: skip
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


@pytest.mark.parametrize("negative_selection", ["first", "random"])
@pytest.mark.parametrize("killed_file", ["model.safetensors", "trainer_state.json"])
def test_contrastive_run_killed_while_writing_resumes_exactly(
    tiny_vlm_dir, pairs, tmp_path, negative_selection, killed_file, caplog
):
    """The uninterrupted run against one killed while writing its step-4 checkpoint and resumed with `last`: the
    step-2 checkpoint is the one resumed from, and steps 3-4 give the same losses and the same weights."""
    extra = ["--negative_selection", negative_selection]
    full = train_contrastive.main(contrastive_arguments(tiny_vlm_dir, pairs, tmp_path / "full", *extra))

    # What a run killed while writing checkpoint-4 leaves: checkpoint-2, and a checkpoint-4 missing a file (the
    # Trainer writes the weights first and trainer_state.json last).
    killed = tmp_path / "killed"
    for step in (2, 4):
        shutil.copytree(tmp_path / "full" / f"checkpoint-{step}", killed / f"checkpoint-{step}")
    (killed / "checkpoint-4" / killed_file).unlink()
    with caplog.at_level(logging.WARNING, logger="moca.training.common"):
        resumed = train_contrastive.main(
            contrastive_arguments(tiny_vlm_dir, pairs, killed, *extra, "--resume_from_checkpoint", "last")
        )
    assert f"Skipping {killed / 'checkpoint-4'}: its writing did not finish (no {killed_file}" in caplog.text
    assert resumed.state.global_step == STEPS
    expected, actual = losses(full), losses(resumed)
    assert sorted(actual) == list(range(1, STEPS + 1))  # steps 1-2 come back with the checkpoint's trainer state
    for step in (3, 4):
        assert actual[step] == pytest.approx(expected[step], abs=1e-6), (step, actual, expected)
    expected_weights, actual_weights = load_file(tmp_path / "full" / "model.safetensors"), load_file(killed / "model.safetensors")
    for key, tensor in expected_weights.items():
        torch.testing.assert_close(actual_weights[key], tensor, rtol=0, atol=1e-6, msg=key)


def test_an_incomplete_checkpoint_named_explicitly_is_refused(tmp_path):
    from moca.training.common import resolve_resume

    (tmp_path / "checkpoint-6").mkdir()
    (tmp_path / "checkpoint-6" / "model.safetensors").write_bytes(b"")

    class Args:
        resume_from_checkpoint, output_dir = str(tmp_path / "checkpoint-6"), str(tmp_path)

    with pytest.raises(ValueError, match=r"checkpoint-6: not a complete checkpoint \(no trainer_state.json\)"):
        resolve_resume(Args)
    assert last_complete_checkpoint(tmp_path) is None  # and `last` finds none to resume


def test_a_cpt_run_killed_while_writing_resumes_from_the_last_complete_checkpoint(tiny_vlm_dir, tmp_path, caplog):
    data = write_jsonl(make_rows(6, seed=1), tmp_path / "data")

    def arguments(output_dir, *extra):
        return [
            "--model_name_or_path", tiny_vlm_dir, "--min_image_tokens", "1", "--max_image_tokens", "16",
            "--dataset", str(data), "--output_dir", str(output_dir), "--max_steps", "2", "--save_steps", "1",
            "--token_budget", "700", "--max_length", "64", "--report_to", "none", "--disable_tqdm", "true", *extra,
        ]  # fmt: skip

    train_cpt.main(arguments(tmp_path / "run"))
    (tmp_path / "run" / "checkpoint-2" / "cpt_heads.safetensors").unlink()  # killed before the heads were written...
    (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").unlink()  # ...and so before the state
    with caplog.at_level(logging.WARNING, logger="moca.training.common"):
        resumed = train_cpt.main(arguments(tmp_path / "run", "--resume_from_checkpoint", "last"))
    assert f"Skipping {tmp_path / 'run' / 'checkpoint-2'}: its writing did not finish" in caplog.text
    assert resumed.state.global_step == 2 and (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# One run per output folder


def test_a_second_run_into_a_used_output_dir_is_refused(tiny_vlm_dir, pairs, tmp_path):
    output_dir = tmp_path / "run"
    train_contrastive.main(contrastive_arguments(tiny_vlm_dir, pairs, output_dir, "--max_steps", "2"))
    again = contrastive_arguments(tiny_vlm_dir, pairs, output_dir, "--max_steps", "2")
    # Refused before anything loads, naming what the folder holds and the ways on.
    with pytest.raises(ValueError, match=r"holds another run \(checkpoint-2, trainer_state.json\): pass "
                                         r"--resume_from_checkpoint last .* --overwrite_output_dir"):  # fmt: skip
        train_contrastive.main(again)
    with pytest.raises(ValueError, match="holds another run"):
        train_cpt.main(["--model_name_or_path", tiny_vlm_dir, "--dataset", str(pairs), "--output_dir", str(output_dir)])
    assert train_contrastive.main([*again, "--overwrite_output_dir"]).state.global_step == 2


def test_a_run_into_an_output_dir_another_run_is_writing_is_refused(tiny_vlm_dir, pairs, tmp_path):
    output_dir = tmp_path / "run"
    # The lock is what the other run holds while it trains.
    with output_dir_lock(output_dir), pytest.raises(RuntimeError, match="another run is writing into it"):
        train_contrastive.main(contrastive_arguments(tiny_vlm_dir, pairs, output_dir, "--max_steps", "1"))
    assert not list(output_dir.glob("checkpoint-*"))
    # The lock goes with the run that held it: the folder is free again.
    assert train_contrastive.main(contrastive_arguments(tiny_vlm_dir, pairs, output_dir, "--max_steps", "1"))


# ---------------------------------------------------------------------------------------------------------------
# Non-finite losses


@pytest.fixture(scope="module")
def nan_backbone(tiny_vlm_dir, tmp_path_factory):
    """The tiny backbone with one NaN in its final norm: every hidden state, and so every loss, is NaN."""
    folder = tmp_path_factory.mktemp("nan_vlm")
    shutil.copytree(tiny_vlm_dir, folder, dirs_exist_ok=True)
    weights = load_file(folder / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return str(folder)


def test_a_nan_contrastive_loss_stops_training_before_its_checkpoint(nan_backbone, pairs, tmp_path):
    # Logged only every 10 steps: the check before writing checkpoint-1 is what stops it.
    argv = contrastive_arguments(nan_backbone, pairs, tmp_path, "--save_steps", "1", "--logging_steps", "10")
    with pytest.raises(FloatingPointError, match=r"Non-finite loss \(nan or inf\) at step 1: training stopped"):
        train_contrastive.main(argv)
    assert not list(tmp_path.glob("checkpoint-*"))


def test_a_nan_cpt_loss_stops_training_at_its_step(nan_backbone, tmp_path):
    data = write_jsonl(make_rows(6, seed=1), tmp_path / "data")
    with pytest.raises(FloatingPointError, match=r"Non-finite loss \(nan or inf\) at step 1"):
        train_cpt.main([
            "--model_name_or_path", nan_backbone, "--min_image_tokens", "1", "--max_image_tokens", "16",
            "--dataset", str(data), "--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--logging_steps", "1",
            "--token_budget", "700", "--max_length", "64", "--report_to", "none", "--disable_tqdm", "true",
        ])  # fmt: skip
    assert not list((tmp_path / "run").glob("checkpoint-*"))
