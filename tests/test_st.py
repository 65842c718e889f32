"""Every MoCa checkpoint is a sentence-transformers model giving MoCaModel.encode's embeddings."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file


# Batches differ between the two encoders (each sorts its inputs its own way), so padding differs; in float32
# the embeddings then agree to ~1e-7 (observed), asserted to 1e-5.
ATOL = 1e-5


def _images():
    return [Image.new("RGB", (112, 112), "red"), Image.new("RGB", (56, 112), (20, 200, 90))]


def _inputs(image_path):
    red, green = _images()
    return [
        "A red circle on a white background.",
        red,
        {"text": "Page 3 of the report <image> with a chart", "image": green},
        "What colour is the square in the middle of the page?",
        str(image_path),
        {"text": "Two images <image> and <image>", "image": [green, red]},
    ]


# Run in a fresh process outside the repository, with the `moca` package made unimportable: the module and
# the model come from the checkpoint's own remote code.
_ENCODE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["moca"] = None
    from PIL import Image
    from safetensors.torch import save_file
    import torch
    from sentence_transformers import SentenceTransformer

    checkpoint, output, save_to, image_path = sys.argv[1:5]
    model = SentenceTransformer(checkpoint, trust_remote_code=True)
    # The stock Transformer module runs the checkpoint's own MoCaModel and MoCaProcessor (no torchvision needed).
    assert type(model[0].auto_model).__module__.startswith("transformers_modules."), type(model[0].auto_model)
    assert type(model[0].processor).__name__ == "MoCaProcessor", type(model[0].processor)
    red, green = Image.new("RGB", (112, 112), "red"), Image.new("RGB", (56, 112), (20, 200, 90))
    inputs = [
        "A red circle on a white background.",
        red,
        {"text": "Page 3 of the report <image> with a chart", "image": green},
        "What colour is the square in the middle of the page?",
        image_path,
        {"text": "Two images <image> and <image>", "image": [green, red]},
    ]
    tensors = {
        "encode": model.encode(inputs, batch_size=4, convert_to_tensor=True),
        "query": model.encode_query(inputs, batch_size=3, convert_to_tensor=True),
        "document": model.encode_document(inputs, convert_to_tensor=True),
        "named": model.encode(inputs, prompt_name="caption", convert_to_tensor=True),
        "truncated": model.encode(inputs, truncate_dim=32, normalize_embeddings=True, convert_to_tensor=True),
        "int8": torch.from_numpy(model.encode(inputs, precision="int8")),
        "ubinary": torch.from_numpy(model.encode(inputs, precision="ubinary")),
        "single": model.encode(inputs[2], convert_to_tensor=True)[None],
    }
    save_file({name: t.contiguous() for name, t in tensors.items()}, output)
    if save_to != "-":
        model.save(save_to)
    """
)


# The checkpoint's query prompt (as training records one): it has text after `{text}`.
QUERY_PROMPT = "Represent the query for retrieval: {text}\n"


@pytest.fixture(scope="module")
def moca_checkpoint(tiny_moca, tmp_path_factory):
    model, _ = tiny_moca
    folder = tmp_path_factory.mktemp("moca_st") / "checkpoint"
    model.config.query_prompt = QUERY_PROMPT
    try:
        model.save_pretrained(folder)
    finally:
        model.config.query_prompt = None
    return folder


def _encode_in_fresh_process(checkpoint, output, save_to, image_path, cwd):
    result = subprocess.run(
        [sys.executable, "-c", _ENCODE_SCRIPT, str(checkpoint), str(output), str(save_to), str(image_path)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(output)


def test_checkpoint_files_make_a_sentence_transformers_model(moca_checkpoint, tiny_moca):
    model, _ = tiny_moca
    modules = json.loads((moca_checkpoint / "modules.json").read_text())
    # Stock modules only, so that no remote code is needed to build the pipeline; vLLM reads the same list.
    assert [module["type"] for module in modules] == [
        "sentence_transformers.base.modules.transformer.Transformer",
        "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
        "sentence_transformers.base.modules.normalize.Normalize",
    ]
    pooling = json.loads((moca_checkpoint / "1_Pooling" / "config.json").read_text())
    assert pooling == {"embedding_dimension": model.config.hidden_size, "pooling_mode": "mean", "include_prompt": True}
    transformer = json.loads((moca_checkpoint / "sentence_bert_config.json").read_text())
    assert transformer["unpad_inputs"] is False and "message" in transformer["modality_config"]
    settings = json.loads((moca_checkpoint / "config_sentence_transformers.json").read_text())
    assert settings["similarity_fn_name"] == "cosine"
    # The release's named prompts, and `query` (what encode_query uses) because the checkpoint has a query prompt;
    # no `document`: it has none.
    assert settings["prompts"] == {**model.config.prompts, "query": QUERY_PROMPT}
    assert settings["prompts"]["caption"] == "Find me an everyday image that matches the given caption: {text}\n"
    assert "{text}" in (moca_checkpoint / "chat_template.jinja").read_text()


def test_round_trip_in_fresh_processes_equals_moca_encode(moca_checkpoint, tiny_moca, tmp_path):
    from sentence_transformers.util import quantize_embeddings

    model, _ = tiny_moca
    image_path = tmp_path / "blue.png"
    Image.new("RGB", (84, 56), "blue").save(image_path)
    inputs = _inputs(image_path)
    expected = {
        "encode": model.encode(inputs),
        "query": model.encode(inputs, prompt=QUERY_PROMPT),
        "document": model.encode_documents(inputs),
        "named": model.encode(inputs, prompt_name="caption"),
        "truncated": model.encode(inputs, truncate_dim=32),
        "single": model.encode(inputs[2]),
    }
    # The query prompt has text after `{text}`: a prefix-only reading of it would embed differently.
    prefix_only = model.encode(inputs, prompt=QUERY_PROMPT.split("{text}")[0])
    assert (prefix_only[0] - expected["query"][0]).abs().max() > 1e-3

    reloaded_from = tmp_path / "saved_by_sentence_transformers"
    first = _encode_in_fresh_process(
        moca_checkpoint, tmp_path / "first.safetensors", reloaded_from, image_path, tmp_path
    )
    second = _encode_in_fresh_process(reloaded_from, tmp_path / "second.safetensors", "-", image_path, tmp_path)
    for got in (first, second):
        for name, reference in expected.items():
            torch.testing.assert_close(got[name], reference, atol=ATOL, rtol=0, msg=name)
        assert got["int8"].dtype == torch.int8 and got["int8"].shape == (len(inputs), model.config.hidden_size)
        packed = quantize_embeddings(expected["encode"].numpy(), precision="ubinary")
        mismatched_bits = (got["ubinary"].numpy() ^ packed).sum()
        assert got["ubinary"].shape == (len(inputs), model.config.hidden_size // 8) and mismatched_bits == 0
    # A checkpoint re-saved by sentence-transformers keeps the MoCa card and the remote code.
    assert "MoCa" in (reloaded_from / "README.md").read_text()
    assert (reloaded_from / "modeling_moca.py").is_file()


def test_prompt_with_text_after_placeholder_and_max_seq_length(tiny_moca):
    from sentence_transformers import SentenceTransformer

    from moca.sentence_transformers_moca import MoCaSentenceTransformer

    model, _ = tiny_moca
    st = SentenceTransformer(modules=[MoCaSentenceTransformer(model)], prompts={"query": "Q: {text} (find it)\n"})
    texts = ["a red circle", "the revenue table of the report"]
    got = st.encode_query(texts, convert_to_tensor=True)
    torch.testing.assert_close(got, model.encode(texts, prompt="Q: {text} (find it)\n"), atol=ATOL, rtol=0)
    st.max_seq_length = 5
    features = st.preprocess(texts)
    assert features["input_ids"].shape[1] == 5
    torch.testing.assert_close(
        st.encode(texts, convert_to_tensor=True), model.encode(texts, max_length=5), atol=ATOL, rtol=0
    )


def test_chat_messages_are_refused_with_a_clear_error(tiny_moca):
    from sentence_transformers import SentenceTransformer

    from moca.sentence_transformers_moca import MoCaSentenceTransformer

    st = SentenceTransformer(modules=[MoCaSentenceTransformer(tiny_moca[0])])
    with pytest.raises(ValueError, match=r"Input \{.role.: .user.*unknown keys"):
        st.encode(["a text", {"role": "user", "content": "hi"}])
