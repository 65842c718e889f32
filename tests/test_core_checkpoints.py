"""Checkpoints: remote-code round trip, conversion of the original release, parity with its outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from moca import MoCaModel

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_round_trip_with_remote_code_outside_the_repository(tiny_moca, tmp_path):
    model, processor = tiny_moca
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    for name in ("configuration_moca.py", "modeling_moca.py", "processing_moca.py"):
        assert (checkpoint / name).is_file()
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_moca.MoCaModel"

    texts = ["<image> What colour is the shape?", "a red circle on a white background"]
    images = [[Image.new("RGB", (84, 56), "green")], []]
    batch = processor(text=texts, images=images)
    save_file({k: v.contiguous() for k, v in batch.items()}, tmp_path / "batch.safetensors")
    with torch.no_grad():
        expected = model(**batch).embeddings

    script = f"""
import sys, torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoProcessor
assert "moca" not in sys.modules
ckpt = {str(checkpoint)!r}
config = AutoConfig.from_pretrained(ckpt, trust_remote_code=True)
model = AutoModel.from_pretrained(ckpt, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(ckpt, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert type(processor).__name__ == "MoCaProcessor" and config.model_type == "moca"
batch = processor(text={texts!r}, images=[[Image.new("RGB", (84, 56), "green")], []])
saved = load_file({str(tmp_path / "batch.safetensors")!r})
assert all(torch.equal(batch[k], saved[k]) for k in saved), "processor outputs differ"
with torch.no_grad():
    out = model(**batch).embeddings
save_file({{"embeddings": out, "encoded": model.encode({texts[1:]!r})}}, {str(tmp_path / "out.safetensors")!r})
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = load_file(tmp_path / "out.safetensors")
    assert torch.equal(out["embeddings"], expected)
    torch.testing.assert_close(out["encoded"], expected[1:], atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def converted(official_fixture, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "convert_original_checkpoint.py"), "--model_name_or_path", str(official_fixture), "--output_dir", str(out),
         # The fixture was made by the release's code with these bounds (its preprocessor config): 4-64 tokens.
         "--min_image_tokens", "4", "--max_image_tokens", "64"],
        check=True, capture_output=True, timeout=300,
    )
    return out


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_converted_original_checkpoint_reproduces_its_embeddings(converted, official_fixture, attn):
    """The original code's outputs on its own tiny checkpoint, to max-abs 1e-4 in fp32."""
    model = MoCaModel.from_pretrained(converted, dtype=torch.float32, attn_implementation=attn).eval()
    tensors = load_file(official_fixture / "tensors.safetensors")
    expected = load_file(official_fixture / "expected.safetensors")
    inputs = {k: tensors[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    with torch.no_grad():
        out = model(**inputs)
        out32 = model(**{**inputs, "input_ids": tensors["input_ids_pad32"], "attention_mask": tensors["attention_mask_pad32"]})
        image_embeds = model.model.visual(tensors["pixel_values"], grid_thw=tensors["image_grid_thw"]).pooler_output
    torch.testing.assert_close(out.embeddings, expected["mean_normalized"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out32.embeddings, expected["mean_normalized"], atol=1e-4, rtol=0)
    raw = model.config.normalize
    model.config.normalize = False
    try:
        with torch.no_grad():
            unnormalised = model(**inputs).embeddings
    finally:
        model.config.normalize = raw
    torch.testing.assert_close(unnormalised, expected["mean_raw"], atol=1e-4, rtol=0)
    torch.testing.assert_close(image_embeds, expected["image_embeds"], atol=1e-4, rtol=0)
    positions = model.compute_position_ids(tensors["input_ids"], tensors["attention_mask"], tensors["image_grid_thw"])
    mask = tensors["attention_mask"].bool()
    assert torch.equal(positions[:, mask], expected["position_ids"][:, mask])


def test_converted_checkpoint_processor_and_encode_match_the_original(converted, official_fixture):
    model = MoCaModel.from_pretrained(converted, dtype=torch.float32).eval()
    spec = json.loads((official_fixture / "inputs.json").read_text())
    tensors = load_file(official_fixture / "tensors.safetensors")
    expected = load_file(official_fixture / "expected.safetensors")
    texts = [item["text"] for item in spec["inputs"]]
    images = [[Image.open(official_fixture / path) for path in item["images"]] for item in spec["inputs"]]
    batch = model.processor(text=texts, images=images)
    for key in ("input_ids", "attention_mask", "image_grid_thw"):
        assert torch.equal(batch[key], tensors[key]), key
    # Equal with the PIL image processor; the fast (torchvision) one rescales and normalises in another order
    # (2.4e-7 observed).
    torch.testing.assert_close(batch["pixel_values"], tensors["pixel_values"], atol=1e-6, rtol=0)
    encoded = model.encode([{"text": t, "image": i} for t, i in zip(texts, images)], batch_size=4)
    torch.testing.assert_close(encoded, expected["mean_normalized"], atol=1e-4, rtol=0)


def test_causal_variant_matches_upstream_causal_model(official_fixture):
    """bidirectional=False is truly causal (unlike the original code's flag, which only switched pooling)."""
    model = MoCaModel.from_backbone(official_fixture, image_tokens=None, dtype=torch.float32, bidirectional=False, normalize=False).eval()
    tensors = load_file(official_fixture / "tensors.safetensors")
    expected = load_file(official_fixture / "expected.safetensors")
    with torch.no_grad():
        out = model(**{k: tensors[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")})
    torch.testing.assert_close(out.embeddings, expected["hf_causal_last_raw"], atol=1e-4, rtol=0)


def test_converter_rejects_other_models(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "convert_original_checkpoint.py"), "--input", str(tmp_path), "--output", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0 and "model_type 'llama'" in result.stderr


def test_missing_processor_warns_and_broken_processor_raises(tiny_moca, tmp_path, caplog):
    import logging

    model, _ = tiny_moca
    model.save_pretrained(tmp_path / "full")
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        (weights_only / name).write_bytes((tmp_path / "full" / name).read_bytes())
    with caplog.at_level(logging.WARNING):
        reloaded = MoCaModel.from_pretrained(weights_only)
    assert reloaded.processor is None
    assert "has no processor (no image processor (processor_config.json or preprocessor_config.json), tokenizer" in caplog.text
    with pytest.raises(ValueError, match="No processor"):
        reloaded.encode(["a text"])
    torch.testing.assert_close(reloaded.encode(["a text"], processor=model.processor), model.encode(["a text"]))

    (tmp_path / "full" / "tokenizer_config.json").write_text("{ not json")
    with pytest.raises(Exception, match="(?i)json|expecting|decode"):
        MoCaModel.from_pretrained(tmp_path / "full")


def test_encode_restores_train_mode_when_an_input_is_bad(tiny_moca):
    model, _ = tiny_moca
    model.train()
    try:
        with pytest.raises(ValueError, match=r"Input 1: cannot read image <3 bytes>"):
            model.encode(["a text", {"image": b"abc"}], batch_size=1)
        assert model.training
    finally:
        model.eval()
