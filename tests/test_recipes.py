"""The recipes run as they are, two steps each, on a tiny model and rows in the released data's layouts; only
the model, data, output folder, length of the run and what a CPU cannot do (bf16) are overridden."""

import io
import json
from pathlib import Path

import datasets
from PIL import Image
from transformers import AutoModel

import train_contrastive
import train_cpt
from moca.training.common import arguments_from_file
from test_contrastive_release_data import classification_rows, document_rows, write_images

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "moca-3b"
CPU = ["--bf16", "false", "--dataloader_num_workers", "0", "--min_image_tokens", "1", "--max_image_tokens", "16"]


def png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (56, 84), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def cpt_rows(count: int) -> list[dict]:
    """The CPT sets' layout: `text` with the backbone's vision markers, `images` a list of encoded images."""
    marker = "<|vision_start|><|image_pad|><|vision_end|>"
    rows = []
    for i in range(count):
        if i % 3 == 0:
            rows.append({"text": f"Plain web text number {i} about shapes and colours.", "images": []})
        else:
            rows.append({"text": f"{marker}A photo, number {i}. {marker} And a second one.",
                         "images": [png("red"), png((20 * i % 255, 90, 200))]})  # fmt: skip
    return rows


def recipe(name: str) -> dict:
    return json.loads((RECIPES / name).read_text())


def test_recipe_files_are_read_as_flags_that_later_flags_override():
    flags = arguments_from_file([str(RECIPES / "cpt.json"), "--learning_rate", "1e-3"])
    assert flags[flags.index("--max_grad_norm") + 1] == "5.0"
    assert flags[flags.index("--bf16") + 1] == "true"
    assert flags[-2:] == ["--learning_rate", "1e-3"]
    start = flags.index("--dataset") + 1
    assert flags[start : start + 8] == recipe("cpt.json")["dataset"]


def test_the_cpt_recipe_runs_two_steps(tiny_vlm_dir, tmp_path):
    data = tmp_path / "pixelprose_like"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(cpt_rows(48))}).save_to_disk(str(data))
    trainer = train_cpt.main([
        str(RECIPES / "cpt.json"), "--model_name_or_path", tiny_vlm_dir, "--dataset", str(data), "--split", "train",
        "--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--learning_rate", "1e-4", "--logging_steps", "1", *CPU,
    ])  # fmt: skip
    args = trainer.args
    assert trainer.state.global_step == 2
    assert (args.gradient_accumulation_steps, args.max_grad_norm, args.warmup_steps) == (4, 5.0, 0.1)
    assert args.activation_checkpointing and args.lr_scheduler_type == "linear"
    assert trainer.token_budget == 12800 and trainer.model.mae_loss_weight == 0.1
    assert trainer.data_collator.max_length == 1280 and trainer.data_collator.mae_noise == "shared"
    assert (trainer.data_collator.text_mask_ratio, trainer.data_collator.image_mask_ratio) == (0.4, 0.5)
    losses = [log for log in trainer.state.log_history if "loss" in log]
    assert losses and all("mlm_loss" in log and "mae_loss" in log for log in losses)


def test_the_contrastive_recipe_runs_two_steps_on_the_released_layout(tiny_vlm_dir, tmp_path):
    collection = tmp_path / "MoCa-CL-Pairs"
    collection.mkdir()
    datasets.Dataset.from_list(document_rows()).save_to_disk(str(collection / "visrag_ind"))
    datasets.Dataset.from_list(classification_rows()).to_parquet(str(collection / "ImageNet_1K.parquet"))
    write_images(collection, document_rows() + classification_rows())
    trainer = train_contrastive.main([
        str(RECIPES / "cl.json"), "--model_name_or_path", tiny_vlm_dir, "--dataset", str(collection),
        "--subsets", "visrag_ind", "ImageNet_1K", "--split", "train", "--image_dir", str(collection),
        "--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--per_device_train_batch_size", "4", *CPU,
    ])  # fmt: skip
    args, settings = trainer.args, trainer.contrastive_args
    assert trainer.state.global_step == 2
    assert (args.learning_rate, args.warmup_steps, args.max_grad_norm, args.lr_scheduler_type) == (2e-5, 0.05, 5.0, "linear")
    assert (settings.temperature, settings.num_hard_negatives, settings.max_length) == (0.03, 2, 1280)
    assert (settings.negatives, settings.negative_selection, settings.task_aware_batching) == ("own", "first", True)
    assert [task.name for task in trainer.tasks] == ["visrag_ind", "ImageNet_1K"]
    assert sum(trainer.skipped_rows_by_reason().values()) == 0
    saved = AutoModel.from_pretrained(tmp_path / "run", trust_remote_code=True)
    assert saved.processor.image_token_bounds == (1, 16)
