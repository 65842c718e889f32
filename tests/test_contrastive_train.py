"""train_contrastive.py end to end on the tiny backbone and tiny data made here."""

import io
import json

import datasets
import pytest
import torch
from PIL import Image
from transformers import AutoModel

import train_contrastive

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["square", "circle", "star", "triangle"]


def png(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Two tasks in the layout of the nano data: text pairs with hard negatives, and caption -> image."""
    root = tmp_path_factory.mktemp("contrastive")
    pairs = [(c, s) for c in COLOURS for s in SHAPES][:16]
    text_rows = [
        {"query_text": f"which thing is {c} and {s}?", "pos_text": f"a {s} painted {c}",
         "neg_text": [f"a {s} painted {COLOURS[(i + 1) % 8]}", f"a {SHAPES[(i + 1) % 4]} painted {c}"]}
        for i, (c, s) in enumerate(pairs)
    ]  # fmt: skip
    datasets.Dataset.from_list(text_rows).save_to_disk(str(root / "text_pairs"))
    image_rows = [{"query_text": f"a {c} picture", "pos_image": {"bytes": png(c), "path": None}} for c in COLOURS]
    features = datasets.Features({"query_text": datasets.Value("string"), "pos_image": datasets.Image()})
    datasets.Dataset.from_list(image_rows, features=features).save_to_disk(str(root / "caption_to_image"))
    tasks = {
        "text_pairs": {"query_prompt": "Query: {text}", "document_prompt": "{text}"},
        "caption_to_image": {"query_prompt": "Find an image: {text}", "document_prompt": "<image>Represent the image."},
    }
    (root / "tasks.json").write_text(json.dumps(tasks))
    return root


def retrieval_accuracy(model, dataset, query_prompt):
    """Share of training queries whose own positive is the nearest of all the task's positives and hard negatives."""
    model.eval()
    queries = model.encode(list(dataset["query_text"]), prompt=query_prompt)
    candidates = model.encode(list(dataset["pos_text"]) + [text for texts in dataset["neg_text"] for text in texts])
    return (queries @ candidates.T).argmax(1).eq(torch.arange(len(queries))).float().mean().item()


def run(tiny_vlm_dir, task_dir, output_dir, *extra):
    argv = [
        "--model_name_or_path", tiny_vlm_dir, "--min_image_tokens", "1", "--max_image_tokens", "16", "--dataset", str(task_dir), "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "8", "--learning_rate", "5e-4", "--warmup_steps", "0",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--max_length", "64",
        "--seed", "0", "--temperature", "0.05", *extra,
    ]  # fmt: skip
    return train_contrastive.main(argv)


def test_training_lowers_the_loss_and_raises_retrieval_accuracy(tiny_vlm_dir, task_dir, tmp_path):
    from moca import MoCaModel

    pairs = datasets.load_from_disk(str(task_dir / "text_pairs"))
    before = retrieval_accuracy(MoCaModel.from_backbone(tiny_vlm_dir, image_tokens=None, dtype=torch.float32), pairs, "Query: {text}")

    trainer = run(tiny_vlm_dir, task_dir, tmp_path, "--max_steps", "24", "--grad_cache_chunk_size", "8",
                  "--matryoshka_dims", "128", "64")  # fmt: skip
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.6 * sum(losses[:4]) / 4
    after = retrieval_accuracy(trainer.model, pairs, "Query: {text}")
    # The random backbone finds 25-75% of the positives by word overlap; training finds (nearly) all.
    assert after > before and after >= 0.9, (before, after)

    # The saved folder is a MoCa checkpoint that loads as remote code, with a card.
    loaded = AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
    assert loaded.config.model_type == "moca" and loaded.config.matryoshka_dims == [128, 64]
    torch.testing.assert_close(loaded.state_dict()["model.language_model.layers.0.mlp.up_proj.weight"],
                               trainer.model.state_dict()["model.language_model.layers.0.mlp.up_proj.weight"])  # fmt: skip
    # The prompts trained with travel with the checkpoint, by task; the two tasks share neither prompt, so
    # neither role gets a default.
    prompts = loaded.config.prompts
    assert prompts["text_pairs/query"] == "Query: {text}" and prompts["caption_to_image/query"] == "Find an image: {text}"
    assert prompts["caption_to_image/document"] == "<image>Represent the image." and prompts["caption"].startswith("Find me")
    assert loaded.config.query_prompt is None and loaded.config.document_prompt is None
    settings = json.loads((tmp_path / "config_sentence_transformers.json").read_text())
    assert settings["prompts"]["text_pairs/query"] == "Query: {text}"
    card = (tmp_path / "README.md").read_text()
    assert "multimodal-embedding" in card and "2506.23115" in card and "temperature" in card
    assert str(task_dir) not in card  # local paths stay out of the card


def test_lora_is_merged_into_the_saved_checkpoint(tiny_vlm_dir, task_dir, tmp_path):
    from moca import MoCaModel

    run(tiny_vlm_dir, task_dir / "text_pairs", tmp_path, "--max_steps", "2", "--lora_r", "4", "--merge_lora",
        "--dataset_config", str(task_dir / "tasks.json"))
    # One task: its prompts are also the checkpoint's query and document prompts.
    config = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).config
    assert (config.query_prompt, config.document_prompt) == ("Query: {text}", "{text}")
    base = MoCaModel.from_backbone(tiny_vlm_dir, image_tokens=None, dtype=torch.float32).state_dict()
    merged = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).state_dict()
    assert set(merged) == set(base)  # a plain MoCa checkpoint: no adapter weights left
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in changed
    assert changed and all("language_model.layers" in name for name in changed)  # the vision tower is untouched
