"""A MoCa checkpoint is the backbone's stock checkpoint: code that never runs ours reads it.

Stock transformers (no remote code) loads the backbone class with bidirectional attention; run on the processor's
outputs, mean pooled and normalised, it gives `MoCaModel.encode`'s embeddings. The config carries what vLLM reads.
Checkpoints of the earlier layout (`model_type: moca`, `vlm.*` keys) still load and re-save in the new one.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModel

from moca import MoCaModel
from moca.testing import make_tiny_vlm

FIXTURES = Path(__file__).parent / "fixtures"
# Same batches, same weights, same kernels: the stock path and encode agree to ~1e-7 (observed); asserted to 1e-5.
ATOL = 1e-5

# Read from vLLM 0.32.0 (vllm/model_executor/models/registry.py, vllm/transformers_utils/config.py): the
# architectures vLLM serves for each backbone (with `--runner pooling --convert embed`), the sentence-transformers
# module types it reads pooling and normalisation from, and the attention switch of its Qwen2/Qwen3 decoder layers
# (`getattr(config, "is_causal", True)` on the text config: False gives encoder-only attention).
VLLM_VERSION = "0.32.0"
VLLM_ARCHITECTURES = {
    "qwen2_vl": {"Qwen2VLForConditionalGeneration"},
    "qwen2_5_vl": {"Qwen2_5_VLForConditionalGeneration"},
    "qwen3_vl": {"Qwen3VLForConditionalGeneration"},
}
VLLM_ST_POOLING_TYPES = {
    "sentence_transformers.models.Pooling",
    "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
}
VLLM_ST_NORMALIZE_TYPES = {
    "sentence_transformers.models.Normalize",
    "sentence_transformers.base.modules.normalize.Normalize",
    "sentence_transformers.sentence_transformer.modules.normalize.Normalize",
}
# vLLM's weight-name prefixes for these architectures (`hf_to_vllm_mapper`): every saved key must start with one.
VLLM_WEIGHT_PREFIXES = ("model.language_model.", "model.visual.", "visual.", "lm_head.", "model.")


def _inputs():
    return [
        "A red circle on a white background.",
        Image.new("RGB", (56, 84), "red"),
        {"text": "Page 3 of the report <image> with a chart", "image": Image.new("RGB", (84, 56), (20, 200, 90))},
    ]


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def checkpoint(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    make_tiny_vlm(root / "vlm", request.param, hidden_size=64)
    model = MoCaModel.from_backbone(str(root / "vlm"), image_tokens=(1, 16))
    model.save_pretrained(root / "moca")
    return request.param, root / "moca", model


def _stock_embeddings(stock, batch):
    with torch.no_grad():
        hidden = stock(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_stock_automodel_equals_encode_and_is_bidirectional(checkpoint):
    arch, path, model = checkpoint
    stock, info = AutoModel.from_pretrained(path, output_loading_info=True)  # no remote code
    assert type(stock).__module__.startswith("transformers.models."), type(stock)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert stock.config.model_type == arch and stock.config.get_text_config().is_causal is False
    stock.eval()

    processor = model.processor
    inputs = _inputs()
    expected = model.encode(inputs)
    items = processor.parse_inputs(inputs, image_prompt=model.config.image_prompt)
    got = _stock_embeddings(stock, processor.batch(items))  # one padded batch: text, image, text+image
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)

    # Bidirectional: a token at the end changes the first token's state (a causal model leaves it unchanged).
    short, longer = processor(text=["a red circle"]), processor(text=["a red circle on a white page"])
    with torch.no_grad():
        first_short = stock(**short).last_hidden_state[0, 0]
        first_longer = stock(**longer).last_hidden_state[0, 0]
    assert (first_short - first_longer).abs().max() > 1e-4


def test_config_has_what_vllm_reads(checkpoint):
    arch, path, model = checkpoint
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == arch
    assert set(config["architectures"]) <= VLLM_ARCHITECTURES[arch], (VLLM_VERSION, config["architectures"])
    assert config["text_config"]["is_causal"] is False
    assert config["moca"]["pooling"] == "mean" and config["moca"]["normalize"] is True
    # vLLM takes pooling and normalisation from the sentence-transformers files, as it parses them.
    modules = json.loads((path / "modules.json").read_text())
    pooling = next(m for m in modules if m["type"] in VLLM_ST_POOLING_TYPES)
    assert any(m["type"] in VLLM_ST_NORMALIZE_TYPES for m in modules)
    pooling_config = json.loads((path / pooling["path"] / "config.json").read_text())
    assert pooling_config["pooling_mode"].upper() == "MEAN"
    # The resolution bounds travel with the processor (vLLM's `--mm-processor-kwargs` can override them).
    processor_config = json.loads((path / "processor_config.json").read_text())
    side = 32 if arch == "qwen3_vl" else 28
    assert processor_config["image_processor"]["size"] == {"shortest_edge": side * side, "longest_edge": 16 * side * side}
    assert processor_config["processor_class"] in {"Qwen2VLProcessor", "Qwen2_5_VLProcessor", "Qwen3VLProcessor"}
    with safe_open(path / "model.safetensors", "pt") as weights:
        keys = list(weights.keys())
    assert all(key.startswith(VLLM_WEIGHT_PREFIXES) for key in keys), [k for k in keys if not k.startswith(VLLM_WEIGHT_PREFIXES)]
    assert not any(key.startswith("vlm.") for key in keys)


def test_remote_code_automodel_is_still_moca(checkpoint, tmp_path):
    _, path, model = checkpoint
    loaded = AutoModel.from_pretrained(path, trust_remote_code=True)
    assert type(loaded).__name__ == "MoCaModel" and hasattr(loaded, "encode")
    assert loaded.config.model_type == "moca" and loaded.config.prompts == model.config.prompts
    torch.testing.assert_close(loaded.encode(_inputs()), model.encode(_inputs()), atol=0, rtol=0)


def test_checkpoint_of_the_earlier_layout_loads_and_resaves_in_the_stock_one(tmp_path):
    """`moca-checkpoint-v0` was written by this package before the stock layout (commit cbb27a3: `model_type:
    moca`, the backbone nested in `vlm_config`, `vlm.*` weight keys); its embeddings were computed by that code."""
    old = FIXTURES / "moca-checkpoint-v0"
    assert json.loads((old / "config.json").read_text())["model_type"] == "moca"
    expected = load_file(FIXTURES / "moca-checkpoint-v0-embeddings.safetensors")
    model = MoCaModel.from_pretrained(old)
    assert model.config.query_prompt == "Q: {text}\n"
    torch.testing.assert_close(model.encode(_inputs()), expected["embeddings"], atol=1e-6, rtol=0)
    torch.testing.assert_close(model.encode_queries(_inputs()[:1]), expected["queries"], atol=1e-6, rtol=0)

    resaved = tmp_path / "resaved"
    model.save_pretrained(resaved)
    assert json.loads((resaved / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    stock = AutoModel.from_pretrained(resaved).eval()
    items = model.processor.parse_inputs(_inputs(), image_prompt=model.config.image_prompt)
    torch.testing.assert_close(_stock_embeddings(stock, model.processor.batch(items)), expected["embeddings"],
                               atol=ATOL, rtol=0)  # fmt: skip


def test_export_command_converts_an_earlier_checkpoint(tmp_path):
    from moca.cli import main

    shutil.copytree(FIXTURES / "moca-checkpoint-v0", tmp_path / "old")
    main(["export", str(tmp_path / "old"), str(tmp_path / "new")])
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and config["text_config"]["is_causal"] is False
    assert (tmp_path / "new" / "chat_template.jinja").is_file()
    expected = load_file(FIXTURES / "moca-checkpoint-v0-embeddings.safetensors")["embeddings"]
    torch.testing.assert_close(MoCaModel.from_pretrained(tmp_path / "new").encode(_inputs()), expected, atol=1e-6, rtol=0)
