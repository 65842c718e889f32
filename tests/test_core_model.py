"""MoCaModel: bidirectional attention, invariances, backbones, positions (tiny models, CPU, fp32)."""

import pytest
import torch
from PIL import Image

from moca import MoCaModel

# fp32 on CPU: the same input embedded in different batch layouts differs only by reduction order.
ATOL = 1e-5


def _image(color, size=(56, 56)):
    return Image.new("RGB", size, color)


def _load(path, **kw):
    model = MoCaModel.from_backbone(path, image_tokens=None, dtype=torch.float32, **kw).eval()
    if "attn_implementation" in kw:
        assert model.model.language_model.config._attn_implementation == kw["attn_implementation"]
    return model


@pytest.fixture(scope="module")
def models(tiny_vlm_dir):
    return {
        (attn, bidirectional): _load(tiny_vlm_dir, attn_implementation=attn, bidirectional=bidirectional)
        for attn in ("eager", "sdpa")
        for bidirectional in (True, False)
    }


def _first_token_change(model, padded: bool):
    processor = model.processor
    texts = ["red circle on the left of a blue square", "red circle on the left of a blue star"]
    if padded:  # a longer neighbour gives both probes padding
        texts.append("a much longer neighbour sentence that forces padding into the batch of probes")
    batch = processor(text=texts)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    return (hidden[0, 0] - hidden[1, 0]).abs().max().item()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padded", [False, True])
def test_later_token_changes_earlier_hidden_state_only_when_bidirectional(models, attn, padded):
    bidirectional_change = _first_token_change(models[attn, True], padded)
    causal_change = _first_token_change(models[attn, False], padded)
    assert bidirectional_change > 1e-3, "a later token must reach the first token"
    assert causal_change < 1e-6, "a causal model must not let a later token reach the first token"


def test_image_reaches_text_before_it(models):
    model = models["sdpa", True]
    texts = ["a caption before the picture <image>"] * 2
    batch = model.processor(text=texts, images=[[_image("red")], [_image("blue")]])
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert (hidden[0, 0] - hidden[1, 0]).abs().max() > 1e-3


INPUTS = [
    "a red circle",
    {"text": "two blue squares and a yellow line on a white page, with a caption below", "image": None},
    {"text": "<image> What colour is the shape?", "image": _image("green", (84, 56))},
    _image("purple", (56, 112)),
    {"text": "first <image> then <image> done", "image": [_image("red"), _image("yellow", (112, 56))]},
]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_embedding_independent_of_batch_layout(models, attn):
    model = models[attn, True]
    alone = torch.cat([model.encode([x], batch_size=1) for x in INPUTS])
    batched = model.encode(INPUTS, batch_size=len(INPUTS))
    reversed_order = model.encode(INPUTS[::-1], batch_size=len(INPUTS)).flip(0)
    torch.testing.assert_close(batched, alone, atol=ATOL, rtol=0)
    torch.testing.assert_close(reversed_order, alone, atol=ATOL, rtol=0)

    processor = model.processor
    texts = ["<image> What colour is the shape?", "a red circle", "an image <image> here"]
    images = [[_image("green", (84, 56))], [], [_image("red")]]
    with torch.no_grad():
        right = model(**processor(text=texts, images=images, padding_side="right")).embeddings
        left = model(**processor(text=texts, images=images, padding_side="left")).embeddings
        singles = torch.cat([model(**processor(text=[t], images=[i])).embeddings for t, i in zip(texts, images)])
    torch.testing.assert_close(left, right, atol=ATOL, rtol=0)
    torch.testing.assert_close(right, singles, atol=ATOL, rtol=0)


def test_eager_and_sdpa_agree(models):
    eager = models["eager", True].encode(INPUTS)
    sdpa = models["sdpa", True].encode(INPUTS)
    torch.testing.assert_close(eager, sdpa, atol=ATOL, rtol=0)


def test_mm_token_type_ids_are_derived_when_missing(models):
    model = models["sdpa", True]
    batch = model.processor(text=["<image> a picture", "text only"], images=[[_image("red", (112, 56))], []])
    without = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        given = model(**batch).embeddings
        derived = model(**without).embeddings
        # 1-D positions (what the backbone silently falls back to) give a different result: the 3-D ones matter.
        flat_positions = batch["attention_mask"].cumsum(-1) - 1
        flat = model(**without, position_ids=flat_positions.clamp(min=0)).embeddings
    assert torch.equal(given, derived)
    assert (flat[0] - given[0]).abs().max() > 1e-4


def test_embeddings_normalised_and_matryoshka_truncation(models):
    model = models["sdpa", True]
    full = model.encode(INPUTS)
    torch.testing.assert_close(full.norm(dim=-1), torch.ones(len(INPUTS)), atol=1e-5, rtol=0)
    short = model.encode(INPUTS, truncate_dim=32)
    assert short.shape == (len(INPUTS), 32)
    torch.testing.assert_close(short, torch.nn.functional.normalize(full[:, :32], dim=-1), atol=1e-5, rtol=0)


def test_last_token_pooling_with_left_and_right_padding(models):
    model = models["sdpa", False]
    assert model.config.pooling == "last"
    texts = ["a red circle", "two blue squares and a yellow line"]
    with torch.no_grad():
        right = model(**model.processor(text=texts, padding_side="right"))
        left = model(**model.processor(text=texts, padding_side="left"))
        single = model(**model.processor(text=texts[:1])).embeddings
    torch.testing.assert_close(left.embeddings, right.embeddings, atol=ATOL, rtol=0)
    torch.testing.assert_close(right.embeddings[:1], single, atol=ATOL, rtol=0)


def test_prompts_of_encode_queries_and_documents(models):
    model = models["sdpa", True]
    model.config.query_prompt = "Find me an everyday image that matches the given caption: {text}\n"
    queries = model.encode_queries(["a red circle"])
    by_hand = model.encode(["Find me an everyday image that matches the given caption: a red circle\n"])
    torch.testing.assert_close(queries, by_hand, atol=0, rtol=0)
    image_doc = model.encode_documents([_image("red")])
    by_hand = model.encode([{"text": "<image>Represent the given image.\n", "image": _image("red")}])
    torch.testing.assert_close(image_doc, by_hand, atol=0, rtol=0)


def test_named_prompts_are_the_releases_spelled_out(models):
    model = models["sdpa", True]
    red, page = _image("red"), _image("blue")
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    cases = [
        ("caption", "a red circle", "Find me an everyday image that matches the given caption: a red circle\n"),
        ("image_question", {"text": "what colour?", "image": red},
         {"text": vision + "Represent the given image with the following question: what colour?\n", "image": red}),
        ("image", red, {"text": vision + "Represent the given image.\n", "image": red}),
        ("document_page", page, {"text": vision + "\nRepresent the given document image.", "image": page}),
        ("text", "a plain sentence", "a plain sentence"),
    ]  # fmt: skip
    for name, item, by_hand in cases:
        torch.testing.assert_close(model.encode([item], prompt_name=name), model.encode([by_hand]), atol=0, rtol=0, msg=name)
    # An image alone under a prompt with `{text}` to fill gets the image prompt, not an empty caption.
    torch.testing.assert_close(
        model.encode([red], prompt_name="caption"), model.encode([{"text": vision + "Represent the given image.\n", "image": red}]),
        atol=0, rtol=0,
    )  # fmt: skip


def test_queries_without_a_prompt_are_encoded_as_they_are(tiny_vlm_dir):
    model = MoCaModel.from_backbone(tiny_vlm_dir, image_tokens=None, dtype=torch.float32).eval()
    assert model.config.query_prompt is None and model.config.document_prompt is None
    torch.testing.assert_close(model.encode_queries(["a red circle"]), model.encode(["a red circle"]), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"No prompt named 'query'.*'caption'"):
        model.encode(["a red circle"], prompt_name="query")
    with pytest.raises(ValueError, match="not both"):
        model.encode(["a red circle"], prompt="{text}", prompt_name="text")
    with pytest.raises(ValueError, match="the prompt holds an image placeholder"):
        model.encode(["a red circle"], prompt_name="image_question")


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_every_backbone_embeds_bidirectionally(tiny_vlm_dirs, arch):
    model = _load(tiny_vlm_dirs[arch])
    assert model.model.config.model_type == arch
    embeddings = model.encode(INPUTS)
    assert embeddings.shape == (len(INPUTS), model.config.hidden_size)
    assert torch.isfinite(embeddings).all()
    alone = model.encode(INPUTS[2:3])
    torch.testing.assert_close(embeddings[2:3], alone, atol=ATOL, rtol=0)
    assert _first_token_change(model, padded=False) > 1e-3
