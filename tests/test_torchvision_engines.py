"""The paths that need torchvision: the stock Qwen-VL processors (their video processor imports it),
sentence-transformers' own multimodal Transformer without remote code, and the fast image processors.

`make test` runs these in a second environment with torchvision (`.venv-tv`: torch 2.14.1 + torchvision 0.29.1),
after the main suite, which runs without it.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

from moca import MoCaModel, MoCaProcessor
from moca.testing import make_tiny_vlm

from engine_inputs import engine_inputs

pytestmark = pytest.mark.torchvision

# Different batches (each encoder sorts its inputs its own way) and, for sentence-transformers, the fast image
# processor: float32 embeddings agree to ~1e-7 (observed), asserted to 1e-5.
ATOL = 1e-5
# The fast (torchvision) and PIL image processors resize with different kernels: pixel values differ by 2.4e-7
# (observed on these images), asserted to 1e-6.
PIXEL_ATOL = 1e-6
QUERY_PROMPT = "Represent the query for retrieval: {text}\n"

plain, by_prompt = engine_inputs()
red, green = plain[1], plain[2]["image"]

_ST_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["moca"] = None  # nothing of ours: stock sentence-transformers and transformers only
    from safetensors.torch import save_file
    from sentence_transformers import SentenceTransformer

    checkpoint, output, tests_dir = sys.argv[1:4]
    sys.path.insert(0, tests_dir)
    from engine_inputs import engine_inputs

    model = SentenceTransformer(checkpoint)  # no trust_remote_code
    assert type(model[0].auto_model).__module__.startswith("transformers.models."), type(model[0].auto_model)
    assert type(model[0].processor).__module__.startswith("transformers.models."), type(model[0].processor)
    plain, by_prompt = engine_inputs()
    tensors = {"plain": model.encode(plain, batch_size=3, convert_to_tensor=True),
               "query": model.encode_query(by_prompt["caption"], convert_to_tensor=True)}
    for name, inputs in by_prompt.items():
        tensors[name] = model.encode(inputs, prompt_name=name, convert_to_tensor=True)
    save_file({name: t.contiguous() for name, t in tensors.items()}, output)
    """
)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def checkpoint(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    make_tiny_vlm(root / "vlm", request.param, hidden_size=64)
    model = MoCaModel.from_backbone(str(root / "vlm"), image_tokens=(1, 16), query_prompt=QUERY_PROMPT)
    model.save_pretrained(root / "moca")
    return root / "moca", MoCaModel.from_pretrained(root / "moca")


def test_sentence_transformers_without_remote_code_equals_encode(checkpoint, tmp_path):
    path, model = checkpoint
    output = tmp_path / "st.safetensors"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-c", _ST_SCRIPT, str(path), str(output), str(Path(__file__).parent)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    got = load_file(output)
    torch.testing.assert_close(got["plain"], model.encode(plain), atol=ATOL, rtol=0)
    torch.testing.assert_close(got["query"], model.encode_queries(by_prompt["caption"]), atol=ATOL, rtol=0)
    for name, inputs in by_prompt.items():
        torch.testing.assert_close(got[name], model.encode(inputs, prompt_name=name), atol=ATOL, rtol=0, msg=name)
    # The prompts change the embeddings (a template that dropped them would still agree with itself).
    assert (got["caption"] - model.encode(by_prompt["caption"])).abs().max() > 1e-3


def test_stock_processor_chat_template_builds_moca_inputs(checkpoint):
    path, model = checkpoint
    stock = AutoProcessor.from_pretrained(path)  # no remote code: the backbone's processor
    assert type(stock).__module__.startswith("transformers.models.")
    prompt = model.config.prompts["image_question"]
    messages = [
        [{"role": "system", "content": [{"type": "text", "text": prompt}]},
         {"role": "user", "content": [{"type": "text", "text": "What colour?"}, {"type": "image", "image": red}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Two images <image> and <image>"},
                                      {"type": "image", "image": green}, {"type": "image", "image": red}]}],
        [{"role": "user", "content": [{"type": "image", "image": green}]}],
    ]  # fmt: skip
    rendered = stock.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt",
                                         processor_kwargs={"text_kwargs": {"padding": True}})  # fmt: skip
    items = model.processor.parse_inputs(
        [{"text": "What colour?", "image": red}], prompt, image_prompt=model.config.image_prompt
    ) + model.processor.parse_inputs(
        [{"text": "Two images <image> and <image>", "image": [green, red]}, green], image_prompt=model.config.image_prompt
    )  # fmt: skip
    ours = model.processor.batch(items)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(rendered[key], ours[key]), key
    torch.testing.assert_close(rendered["pixel_values"], ours["pixel_values"], atol=PIXEL_ATOL, rtol=0)
    with pytest.raises(Exception, match="1 image placeholder.s. but 0 image"):
        stock.apply_chat_template([[{"role": "system", "content": prompt}, {"role": "user", "content": "no image"}]])


def test_fast_and_pil_image_processors_agree(checkpoint):
    path, model = checkpoint
    fast = MoCaProcessor(AutoImageProcessor.from_pretrained(path, backend="torchvision"), AutoTokenizer.from_pretrained(path))
    pil = MoCaProcessor(AutoImageProcessor.from_pretrained(path, backend="pil"), AutoTokenizer.from_pretrained(path))
    assert "Pil" in type(pil.image_processor).__name__ and "Pil" not in type(fast.image_processor).__name__
    items = fast.parse_inputs(plain, image_prompt=model.config.image_prompt)
    fast_batch, pil_batch = fast.batch(items), pil.batch(items)
    assert torch.equal(fast_batch["input_ids"], pil_batch["input_ids"])
    assert torch.equal(fast_batch["image_grid_thw"], pil_batch["image_grid_thw"])
    torch.testing.assert_close(fast_batch["pixel_values"], pil_batch["pixel_values"], atol=PIXEL_ATOL, rtol=0)
    torch.testing.assert_close(model.encode(plain, processor=fast), model.encode(plain, processor=pil), atol=ATOL, rtol=0)


def test_checkpoint_processor_files_name_the_stock_classes(checkpoint):
    path, _ = checkpoint
    config = json.loads((path / "processor_config.json").read_text())
    assert type(AutoProcessor.from_pretrained(path)).__name__ == config["processor_class"]
    assert type(AutoProcessor.from_pretrained(path, trust_remote_code=True)).__name__ == "MoCaProcessor"


def test_vllm_prompts_through_the_stock_processor_give_moca_inputs(checkpoint):
    """vLLM takes `examples/vllm_embed.py`'s raw prompts and runs them through the backbone's stock processor (with
    the checkpoint's resolution bounds): that is what it can be checked on without vLLM."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    try:
        from vllm_embed import vllm_prompts
    finally:
        sys.path.pop(0)
    path, model = checkpoint
    stock = AutoProcessor.from_pretrained(path)
    for inputs, prompt_name in ((by_prompt["caption"], None), ([green, red], "document_page"), (plain, None)):
        prompts = vllm_prompts(model, inputs, prompt_name)
        items = model.processor.parse_inputs(inputs, model.resolve_prompt(prompt_name=prompt_name), model.config.image_prompt)
        for prompt, item in zip(prompts, items):
            images = prompt.get("multi_modal_data", {}).get("image")
            engine = stock(text=[prompt["prompt"]], images=images, return_tensors="pt")
            ours = model.processor.batch([item])
            assert torch.equal(engine["input_ids"], ours["input_ids"]), prompt["prompt"]
            if images:
                torch.testing.assert_close(engine["pixel_values"], ours["pixel_values"], atol=PIXEL_ATOL, rtol=0)
