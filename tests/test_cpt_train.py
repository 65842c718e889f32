"""train_cpt.py end to end on a tiny model: losses fall, checkpoints load as MoCa models, resuming is exact, masks
change each epoch, the skipped rows are counted at the end."""

import json
import logging
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

import train_cpt
from cpt_rows import make_rows, write_jsonl


def arguments(model_dir, data, output_dir, *extra):
    return [
        "--model_name_or_path", model_dir, "--min_image_tokens", "1", "--max_image_tokens", "16", "--dataset", str(data), "--output_dir", str(output_dir),
        "--max_steps", "6", "--save_steps", "3", "--logging_steps", "2", "--token_budget", "700",
        "--max_length", "256", "--learning_rate", "2e-3", "--warmup_steps", "0", "--lr_scheduler_type", "constant",
        "--report_to", "none", "--seed", "0", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = make_rows(12, seed=7) + [{"text": "<image> unreadable", "images": [b"not an image"]}]
    return write_jsonl(rows, tmp_path_factory.mktemp("cpt_data"))


@pytest.fixture(scope="module")
def full_run(tiny_vlm_dir, data, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("cpt_run")
    return train_cpt.main(arguments(tiny_vlm_dir, data, output_dir)), output_dir


def test_losses_are_finite_and_fall(full_run):
    trainer, _ = full_run
    logs = [entry for entry in trainer.state.log_history if "mlm_loss" in entry]
    # Two budget batches per epoch and one log per epoch: every log sees the same samples (with fresh masks).
    assert len(trainer.get_train_dataloader()) == 2 and len(logs) == 3
    for name in ("mlm_loss", "mae_loss"):
        first, last = logs[0][name], logs[-1][name]
        assert torch.isfinite(torch.tensor([first, last])).all()
        assert last < first, (name, first, last)
    assert logs[0]["skipped_rows"] == 1 and "skipped_rows" not in logs[1]


def test_checkpoint_loads_as_a_moca_model(full_run):
    _, output_dir = full_run
    for folder in (output_dir, output_dir / "checkpoint-3"):
        model = AutoModel.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__name__ == "MoCaModel" and model.processor is not None
        embeddings = model.encode(["a red circle", {"text": "a page", "image": None}])
        assert embeddings.shape == (2, 128) and torch.isfinite(embeddings).all()
    assert (output_dir / "cpt_heads.safetensors").exists()


def test_trainer_card_is_the_moca_card(full_run, tmp_path):
    """What `--push_to_hub` uploads: the MoCa card with the run's hyperparameters, not the Trainer's generic one."""
    from huggingface_hub import ModelCard

    trainer, _ = full_run
    # `Trainer.push_to_hub` calls it with the generic card's arguments (`model_name`, ...), which the MoCa card ignores.
    trainer.create_model_card(output_dir=str(tmp_path), model_name="ignored", language="en")
    card = ModelCard.load(tmp_path / "README.md")
    assert "moca" in card.data.tags and "continual-pretraining" in card.data.tags
    assert "2506.23115" in card.text and "learning_rate" in card.text


def test_resume_continues_at_the_right_step_and_matches(full_run, tiny_vlm_dir, data, tmp_path):
    _, output_dir = full_run
    resumed = train_cpt.main(
        arguments(tiny_vlm_dir, data, tmp_path, "--resume_from_checkpoint", str(output_dir / "checkpoint-3"))
    )
    assert resumed.state.global_step == 6
    steps = [entry["step"] for entry in resumed.state.log_history if "mlm_loss" in entry]
    assert steps == [2, 4, 6]  # the log of step 2 comes back with the checkpoint's trainer state
    state = json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    # Same data order, masks and optimizer state: the resumed run ends where the uninterrupted one did.
    for name in ("model.safetensors", "cpt_heads.safetensors"):
        expected, actual = load_file(output_dir / name), load_file(tmp_path / name)
        for key, tensor in expected.items():
            torch.testing.assert_close(actual[key], tensor, rtol=1e-5, atol=1e-6, msg=f"{name}:{key}")


def test_the_trainers_loader_draws_fresh_masks_each_epoch(full_run):
    """Through the Trainer's own loader (sampler, epoch-tagged rows, collator): each batch gets other masks in
    another epoch, and the same ones when the epoch comes again."""
    trainer, _ = full_run
    loader = trainer.get_train_dataloader()

    def labels_by_batch(epoch):
        loader.set_epoch(epoch)  # what the Trainer calls before each epoch
        # A batch is known by its unmasked tokens: the labels hold what the masks hid (labels are not shifted).
        batches = list(loader)
        clean = [batch["labels"].where(batch["labels"].ne(-100), batch["input_ids"]) for batch in batches]
        return {tuple(ids.flatten().tolist()): batch["labels"] for ids, batch in zip(clean, batches)}

    epoch0, epoch1 = labels_by_batch(0), labels_by_batch(1)
    assert len(epoch0) == 2 and epoch0.keys() == epoch1.keys()
    for key, labels in epoch0.items():
        assert not torch.equal(labels, epoch1[key])
    again = labels_by_batch(0)
    assert all(torch.equal(labels, again[key]) for key, labels in epoch0.items())


def test_the_run_ends_with_the_skipped_rows_by_reason(tiny_vlm_dir, tmp_path, caplog):
    rows = make_rows(6, seed=5) + [{"text": "", "images": []}]
    data = write_jsonl(rows, tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="moca.training.common"):
        trainer = train_cpt.main(
            arguments(tiny_vlm_dir, data, tmp_path / "run", "--max_steps", "1", "--save_strategy", "no")
        )
    lines = [record.getMessage() for record in caplog.records if record.name == "moca.training.common"]
    assert lines[-2:] == ["skipped rows: 1", "  1 empty text"]
    # Every process validated the whole data: its count is the run's, not to be summed over processes.
    assert trainer.skipped_rows_by_reason() == Counter({"empty text": 1}) and not trainer.skips_counted_per_process


def test_a_batch_size_flag_is_refused_not_ignored(tiny_vlm_dir, data, tmp_path):
    """CPT batches are built by compute: a row count would be silently ignored, so it is an error."""
    for flag in (["--per_device_train_batch_size", "4"], ["--per_device_train_batch_size=4"]):
        with pytest.raises(ValueError, match="set --token_budget, not --per_device_train_batch_size"):
            train_cpt.main(arguments(tiny_vlm_dir, data, tmp_path, *flag))


def test_release_defaults_and_half_precision_weights_refused(tiny_vlm_dir, data, tmp_path):
    from moca.training.common import parse_arguments
    from moca.training.contrastive import ContrastiveArguments, ContrastiveTrainingArguments
    from moca.training.cpt import CPTArguments, CPTTrainingArguments

    for classes in ((CPTArguments, CPTTrainingArguments), (ContrastiveArguments, ContrastiveTrainingArguments)):
        _, training_args = parse_arguments(
            classes, ["--model_name_or_path", tiny_vlm_dir, "--dataset", str(data), "--output_dir", str(tmp_path)]
        )
        # The release's scripts: one epoch, gradients clipped at norm 5 (the Trainer's own defaults: 3 and 1.0).
        assert (training_args.num_train_epochs, training_args.max_grad_norm) == (1.0, 5.0)
    with pytest.raises(ValueError, match="--dtype bfloat16 without --bf16/--fp16 trains half-precision weights"):
        train_cpt.main(arguments(tiny_vlm_dir, data, tmp_path, "--dtype", "bfloat16"))
