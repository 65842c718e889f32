"""`moca embed` in several processes (torchrun, gloo on CPU) and in shards joined by `moca merge-index`: the
same index as one process over all the items."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from moca import cli

REPO_ROOT = Path(__file__).resolve().parents[1]
# Shards hold other chunks than one run (so other batches, other padding): agreement in float32 is ~1e-7.
ATOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tiny_moca, tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed_cli") / "checkpoint"
    tiny_moca[0].save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    """Nine items of mixed kinds and sizes, and one unreadable text file (skipped, reported once)."""
    folder = tmp_path_factory.mktemp("items")
    colours = ["red", "blue", "green", "white"]
    for number, colour in enumerate(colours):
        Image.new("RGB", (56 + 28 * number, 112 - 14 * number), colour).save(folder / f"image{number}.png")
    for number in range(5):
        (folder / f"text{number}.txt").write_text(" ".join(["a", colours[number % 4], "square on page", str(number)] * (number + 1)))
    (folder / "broken.txt").write_bytes(b"\xff\xfe not utf-8")
    return folder


def run_embed(arguments: list[str], output: Path, processes: int = 1) -> subprocess.CompletedProcess:
    # --standalone: torchrun binds its rendezvous store to port 0 and the workers join that store, so no port is
    # picked beforehand (a port chosen then bound later can be taken by a parallel test in the meantime).
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--standalone"] if processes > 1 else []
    # One thread each: the same kernels in every process, so equal batches give equal bits.
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *launcher, "-m", "moca", "embed", *arguments, "--output", str(output)],
        env=environment, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_two_processes_write_the_index_of_one(checkpoint, items, tmp_path):
    arguments = ["--model", str(checkpoint), "--input", str(items), "--batch_size", "2", "--chunk_size", "2",
                 "--dtype", "float32", "--device", "cpu"]  # fmt: skip
    one = run_embed(arguments, tmp_path / "one.safetensors")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_embed(arguments, tmp_path / "two.safetensors", processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    # Rank 0 alone reports (and writes); 5 chunks of 2 items, taken alternately by the two processes.
    assert two.stdout.count(" dimensions -> ") == 1, two.stdout
    assert "9 items" in two.stdout and "on 2 processes" in two.stdout and "(1 skipped" in two.stdout

    single, double = cli.read_index(tmp_path / "one.safetensors"), cli.read_index(tmp_path / "two.safetensors")
    assert double.ids == single.ids and len(single.ids) == 9
    assert (double.texts, double.images, double.skipped) == (single.texts, single.images, single.skipped)
    assert double.model_fingerprint == single.model_fingerprint and double.dtype == single.dtype == "float32"
    # The same chunks in the same batches: the same bits.
    assert torch.equal(double.embeddings, single.embeddings)
    assert not (tmp_path / "two.safetensors.partial").exists() and not (tmp_path / "two.safetensors.lock").exists()


def test_shards_merge_into_the_index_of_one_run(checkpoint, items, tmp_path):
    common = {"batch_size": 2, "chunk_size": 2, "dtype": "float32", "show_progress_bar": False}
    whole = cli.embed(str(checkpoint), str(items), str(tmp_path / "whole.safetensors"), **common)
    parts = [
        cli.embed(str(checkpoint), str(items), str(tmp_path / f"part-{i}.safetensors"), shard=f"{i}/3", **common)
        for i in range(3)
    ]
    assert [len(part.ids) for part in parts] == [3, 3, 3] and [part.shard for part in parts] == [[0, 3], [1, 3], [2, 3]]
    assert [len(part.skipped) for part in parts] == [1, 0, 0]  # the unreadable file: reported by shard 0 only

    shuffled = [str(tmp_path / f"part-{i}.safetensors") for i in (2, 0, 1)]
    cli.main(["merge-index", *shuffled, "--output", str(tmp_path / "merged.parquet")])
    merged = cli.read_index(tmp_path / "merged.parquet")
    assert merged.ids == whole.ids and merged.texts == whole.texts and merged.images == whole.images
    assert merged.skipped == whole.skipped and merged.truncated == whole.truncated and merged.shard is None
    assert merged.model_fingerprint == whole.model_fingerprint
    torch.testing.assert_close(merged.embeddings, whole.embeddings, atol=ATOL, rtol=0)
    # The merged index searches like the whole one.
    query = cli.search(str(tmp_path / "merged.parquet"), query="a red square", top_k=9)
    assert [item for _, item in query] == [item for _, item in cli.search(str(tmp_path / "whole.safetensors"),
                                                                            query="a red square", top_k=9)]

    with pytest.raises(ValueError, match=r"0/N\.\.N-1/N of one run, each once; got .*part-0.safetensors: 0/3"):
        cli.merge_indexes(shuffled[:2], str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"whole.safetensors'\] hold no shard number"):
        cli.merge_indexes([*shuffled, str(tmp_path / "whole.safetensors")], str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"item 'image0.png' is in both"):
        cli.merge_indexes([str(tmp_path / "whole.safetensors")] * 2, str(tmp_path / "bad.safetensors"))


def test_bad_shard_device_and_dtype_flags_name_themselves(checkpoint, items, tmp_path):
    output = str(tmp_path / "index.safetensors")
    for shard, message in (("3/3", r"--shard 3/3: i must be in 0\.\.N-1"), ("1-3", r"--shard '1-3': expected i/N")):
        with pytest.raises(ValueError, match=message):
            cli.embed(str(checkpoint), str(items), output, shard=shard)
    with pytest.raises(ValueError, match=r"--device 'gpu0': not a device"):
        cli.embed(str(checkpoint), str(items), output, device="gpu0")
    with pytest.raises(ValueError, match=r"--dtype 'fp8': use auto or one of float32"):
        cli.embed(str(checkpoint), str(items), output, dtype="fp8")
    with pytest.raises(ValueError, match=r"missing.safetensors: no such index file"):
        cli.merge_indexes([str(tmp_path / "missing.safetensors")], output)


def test_auto_dtype_is_bfloat16_only_where_the_hardware_computes_it(monkeypatch, checkpoint):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert cli.resolve_dtype("auto", cpu, str(checkpoint)) == "float32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert cli.resolve_dtype("auto", cpu, str(checkpoint)) == cli.resolve_dtype(None, cpu) == "bfloat16"
    assert cli.resolve_dtype("float32", cpu) == "float32"  # one flag away
