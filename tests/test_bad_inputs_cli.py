"""`moca embed` / `search` under bad input and faults: each case a clear error, a counted skip, or a resume that
never mixes in work of another model or of other file contents."""

import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from PIL import Image

from moca import MoCaModel, cli
from moca.fingerprint import model_fingerprint

LONG_TEXT = " ".join(["a red circle on a white page"] * 300)  # ~2,100 tokens: over the default 1,280


@pytest.fixture(scope="module")
def checkpoint(tiny_moca, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_cli") / "checkpoint"
    tiny_moca[0].save_pretrained(folder)
    return folder


def save_with_changed_weights(model, folder, change) -> None:
    """`model` saved to `folder` with its final norm's weight changed by `change` (same size, other weights)."""
    weight = model.model.language_model.norm.weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight.copy_(change(original))
    try:
        model.save_pretrained(folder)
    finally:
        with torch.no_grad():
            weight.copy_(original)


def write_items(folder):
    folder.mkdir()
    Image.new("RGB", (56, 56), "red").save(folder / "red.png")
    Image.new("RGB", (84, 56), "blue").save(folder / "blue.png")
    for name, text in {"a.txt": "A red circle.", "b.txt": "A blue square.", "c.txt": "Revenue by year."}.items():
        (folder / name).write_text(text)
    return folder


def fail_on_second_chunk(monkeypatch):
    original = MoCaModel.encode_documents
    calls = []

    def encode(self, inputs, **kwargs):
        calls.append(len(inputs))
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a killed run leaves: the first chunk on disk, no index
        return original(self, inputs, **kwargs)

    monkeypatch.setattr(MoCaModel, "encode_documents", encode)
    return original


def embed(model, items, output, **kwargs):
    # float32 as the checkpoint is stored (auto is bf16 on some CPUs): fingerprints are compared with it.
    kwargs = {"dtype": "float32", **kwargs}
    return cli.embed(str(model), str(items), str(output), chunk_size=2, show_progress_bar=False, **kwargs)


@pytest.mark.parametrize("change", ["weights", "file"])
def test_a_resume_after_the_weights_or_a_file_changed_uses_no_old_chunk(tiny_moca, checkpoint, tmp_path, monkeypatch, change):
    model = tmp_path / "model"
    save_with_changed_weights(tiny_moca[0], model, lambda w: w)
    items = write_items(tmp_path / "items")
    output = tmp_path / "index.safetensors"
    original = fail_on_second_chunk(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        embed(model, items, output)
    assert len(list((tmp_path / "index.safetensors.partial").glob("*.safetensors"))) == 1
    monkeypatch.setattr(MoCaModel, "encode_documents", original)

    if change == "weights":  # another checkpoint at the same path
        save_with_changed_weights(tiny_moca[0], model, lambda w: w * -3.0)
    else:  # "a.txt" is in the saved first chunk
        (items / "a.txt").write_text("A green triangle, edited after the run was killed.")
    resumed = embed(model, items, output)
    fresh = embed(model, items, tmp_path / "fresh.safetensors")
    torch.testing.assert_close(resumed.embeddings, fresh.embeddings)
    assert resumed.model_fingerprint == model_fingerprint(MoCaModel.from_pretrained(model))


def test_search_refuses_what_does_not_match_the_index(tiny_moca, checkpoint, tmp_path):
    items = write_items(tmp_path / "items")
    output = tmp_path / "index.safetensors"
    index = embed(checkpoint, items, output)
    other = tmp_path / "other"
    save_with_changed_weights(tiny_moca[0], other, lambda w: w + 0.5)
    narrow = tmp_path / "narrow.safetensors"
    cli.write_index(
        cli.Index(index.embeddings[:, :64], index.ids, index.texts, index.images, index.model,
                  index.model_fingerprint),
        narrow,
    )  # fmt: skip
    other_fingerprint = model_fingerprint(MoCaModel.from_pretrained(other))
    cases = [  # (index, --model, --top_k, expected error)
        (output, None, 0, "--top_k must be at least 1, got 0"),
        (output, None, -3, "--top_k must be at least 1, got -3"),
        (output, str(other), 2, f"fingerprint {index.model_fingerprint}.*has fingerprint {other_fingerprint}"),
        (narrow, None, 2, "holds 64-dimensional embeddings .* gives 128 dimensions"),
        (output, str(tmp_path / "no" / "such" / "checkpoint"), 2,
         "--model_name_or_path .*checkpoint: no such folder, and not a Hub model id"),
    ]  # fmt: skip
    for index_path, model, top_k, expected in cases:
        with pytest.raises(ValueError, match=expected):
            cli.search(str(index_path), query="a red circle", model_path=model, top_k=top_k)
    assert len(cli.search(str(output), query="a red circle", top_k=2)) == 2  # the index's own model


def truncated_png(path):
    Image.new("RGB", (56, 56), "green").save(path)
    path.write_bytes(path.read_bytes()[:60])


# (file written into a good folder, how, skipped count, text of the warning and of the --strict error)
BAD_FILES = [
    ("latin1.txt", lambda p: p.write_bytes("caf\xe9 cr\xe8me".encode("latin-1")), 1, "latin1.txt: 'utf-8' codec"),
    ("blank.txt", lambda p: p.write_text("  \n "), 1, "blank.txt: empty text file"),
    ("cut.png", truncated_png, 1, "cut.png.*cannot read image"),
    ("fake.jpg", lambda p: p.write_bytes(b"not an image at all"), 1, "fake.jpg.*cannot read image"),
]


@pytest.mark.parametrize("name, write, skipped, message", BAD_FILES, ids=[row[0] for row in BAD_FILES])
def test_an_unreadable_file_is_skipped_and_counted_or_stops_a_strict_run(checkpoint, tmp_path, name, write, skipped, message):
    items = write_items(tmp_path / "items")
    write(items / name)
    index = embed(checkpoint, items, tmp_path / "index.safetensors")
    assert name not in index.ids and len(index.ids) == 5
    assert len(index.skipped) == skipped and re.search(message, index.skipped[0])
    assert cli.read_index(tmp_path / "index.safetensors").skipped == index.skipped

    with pytest.raises(ValueError, match=f"{message}.*--strict"):
        embed(checkpoint, items, tmp_path / "strict.safetensors", strict=True)
    assert not (tmp_path / "strict.safetensors").exists()


def test_the_summary_line_counts_skips_and_cuts(checkpoint, tmp_path, capsys):
    items = write_items(tmp_path / "items")
    (items / "long.txt").write_text(LONG_TEXT)
    (items / "latin1.txt").write_bytes(b"caf\xe9")
    output = tmp_path / "index.parquet"
    cli.main(["embed", "--model", str(checkpoint), "--input", str(items), "--output", str(output)])
    assert capsys.readouterr().out.strip().endswith("(1 skipped as unreadable, 1 cut to --max_length 1280)")
    assert cli.read_index(output).truncated == 1
    cli.main(["embed", "--model", str(checkpoint), "--input", str(items), "--output", str(output), "--max_length", "0"])
    assert capsys.readouterr().out.strip().endswith("(1 skipped as unreadable, none cut)")
    with pytest.raises(SystemExit, match="--max_length must be 0 .* or positive, got -1"):
        cli.main(["embed", "--model", str(checkpoint), "--input", str(items), "--output", str(output), "--max_length", "-1"])


def test_truncation_counts_tokens_as_the_processor_makes_them(tiny_moca, tmp_path):
    """An input of exactly max_length tokens is not cut, one more token is: texts, images, placeholders, prompts."""
    model, processor = tiny_moca
    Image.new("RGB", (84, 56), "blue").save(tmp_path / "blue.png")
    image_prompt = "<|vision_start|><|image_pad|><|vision_end|>Represent the given image."
    cases = [  # (input, prompt)
        ("A red circle on a white background.", None),
        (str(tmp_path / "blue.png"), None),
        ({"text": "Look at <image> then answer.", "image": tmp_path / "blue.png"}, None),
        ({"text": "No placeholder here.", "image": tmp_path / "blue.png"}, None),
        (tmp_path / "blue.png", image_prompt),
        ("what colour is it", "Find me an everyday image that matches the given caption: {text}\n"),
    ]
    for item, prompt in cases:
        text, images = processor.parse_inputs([item], prompt, image_prompt=model.config.image_prompt)[0]
        length = processor.batch([(text, images)])["input_ids"].shape[1]
        assert cli.count_truncated(model, [item], length, prompt) == 0, item
        assert cli.count_truncated(model, [item], length - 1, prompt) == 1, item


def test_non_finite_weights_stop_embed_naming_the_item(tiny_moca, tmp_path):
    broken = tmp_path / "nan"
    save_with_changed_weights(tiny_moca[0], broken, lambda w: w * float("nan"))
    items = write_items(tmp_path / "items")
    with pytest.raises(ValueError, match="Item 'a.txt'"):
        embed(broken, items, tmp_path / "index.safetensors")
    assert not (tmp_path / "index.safetensors").exists()


def exited_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_run_on_one_output_refuses_and_a_stale_lock_is_taken_over(checkpoint, tmp_path):
    items = write_items(tmp_path / "items")
    output = tmp_path / "index.safetensors"
    lock = tmp_path / "index.safetensors.lock"
    lock.write_text(f"{socket.gethostname()} {os.getpid()}")  # a live run holds it
    with pytest.raises(RuntimeError, match=f"Another `moca embed` .* is writing .*; its lock file is {lock}"):
        embed(checkpoint, items, output)
    assert not output.exists() and lock.exists()

    lock.write_text(f"{socket.gethostname()} {exited_pid()}")  # left by a killed run
    embed(checkpoint, items, output)
    assert output.exists() and not lock.exists()
