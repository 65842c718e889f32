"""The embedding cache: one encoding per distinct input, shards written as they finish, resumption after a kill."""

import copy
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from eval.encoding import EmbeddingCache, content_key, encode_with_cache, model_fingerprint

REPO_ROOT = Path(__file__).resolve().parents[1]


def fake_embedding(text: str) -> torch.Tensor:
    return torch.tensor(list(hashlib.blake2b(text.encode(), digest_size=8).digest()), dtype=torch.float32)


class FakeEncoder:
    """Embeds texts by hashing them; counts calls and inputs; can be interrupted after some calls (shards)."""

    def __init__(self, interrupt_after_calls: int | None = None):
        self.calls = self.inputs = 0
        self.interrupt_after_calls = interrupt_after_calls

    def __call__(self, texts):
        if self.interrupt_after_calls is not None and self.calls >= self.interrupt_after_calls:
            raise KeyboardInterrupt
        self.calls += 1
        self.inputs += len(texts)
        return torch.stack([fake_embedding(text) for text in texts])


TEXTS = [f"text {i % 9}" for i in range(14)]  # 9 distinct texts, some repeated
KEYS = [content_key("test", text) for text in TEXTS]


def test_each_distinct_input_is_encoded_once_and_rows_follow_the_inputs(tmp_path):
    encoder = FakeEncoder()
    embeddings = encode_with_cache(TEXTS, KEYS, encoder, cache=EmbeddingCache(tmp_path), namespace="a")
    assert encoder.inputs == 9
    torch.testing.assert_close(embeddings, torch.stack([fake_embedding(t) for t in TEXTS]), atol=0, rtol=0)


def test_an_interrupted_run_keeps_finished_shards_and_resumes(tmp_path):
    cache = EmbeddingCache(tmp_path)
    with pytest.raises(KeyboardInterrupt):  # 3 shards of 3 inputs: stopped in the third
        encode_with_cache(TEXTS, KEYS, FakeEncoder(interrupt_after_calls=2), cache=cache, namespace="a", shard_size=3)
    assert len(list((tmp_path / "a").glob("shard-*.safetensors"))) == 2
    (tmp_path / "a" / "shard-000002.tmp").write_bytes(b"half-written shard of a killed run")
    resumed = FakeEncoder()
    embeddings = encode_with_cache(TEXTS, KEYS, resumed, cache=cache, namespace="a", shard_size=3)
    assert resumed.inputs == 3
    torch.testing.assert_close(embeddings, torch.stack([fake_embedding(t) for t in TEXTS]), atol=0, rtol=0)
    again = FakeEncoder()
    encode_with_cache(TEXTS, KEYS, again, cache=cache, namespace="a", shard_size=3)
    assert again.inputs == 0


def test_a_killed_process_resumes_where_it_stopped(tmp_path):
    """SIGKILL (no cleanup at all) after the first shards are on disk; the next run encodes only the rest."""
    texts = [f"text {i}" for i in range(40)]
    script = f"""
import time, sys, torch
sys.path.insert(0, {str(REPO_ROOT)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
from eval.encoding import EmbeddingCache, content_key, encode_with_cache
from test_eval_encoding import fake_embedding
texts = {texts!r}
def slow(texts):
    time.sleep(0.3)
    return torch.stack([fake_embedding(t) for t in texts])
encode_with_cache(texts, [content_key("test", t) for t in texts], slow, cache=EmbeddingCache({str(tmp_path)!r}),
                  namespace="a", shard_size=4)
"""
    process = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while len(list((tmp_path / "a").glob("shard-*.safetensors"))) < 2:
            assert process.poll() is None and time.monotonic() < deadline, "the encoding process ended early"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    done = len(EmbeddingCache(tmp_path).load("a"))
    assert 8 <= done < 40
    resumed = FakeEncoder()
    embeddings = encode_with_cache(
        texts,
        [content_key("test", t) for t in texts],
        resumed,
        cache=EmbeddingCache(tmp_path),
        namespace="a",
        shard_size=4,
    )
    assert resumed.inputs == 40 - done
    torch.testing.assert_close(embeddings, torch.stack([fake_embedding(t) for t in texts]), atol=0, rtol=0)


def test_the_model_fingerprint_follows_weights_and_config_not_location(tiny_moca):
    model = tiny_moca[0]
    same = copy.deepcopy(model)
    same.config._name_or_path = "/somewhere/else"
    assert model_fingerprint(same) == model_fingerprint(model)
    changed_weight = copy.deepcopy(model)
    with torch.no_grad():
        next(changed_weight.parameters()).view(-1)[0] += 1e-3
    assert model_fingerprint(changed_weight) != model_fingerprint(model)
    changed_prompt = copy.deepcopy(model)
    changed_prompt.config.query_prompt = "Query: {text}"
    assert model_fingerprint(changed_prompt) != model_fingerprint(model)


def test_loading_a_checkpoint_that_is_not_moca_says_so(tiny_vlm_dir):
    from eval.encoding import load_model

    with pytest.raises(ValueError, match=r"is a 'qwen2_5_vl' checkpoint, not a MoCa one.*convert_original_checkpoint"):
        load_model(tiny_vlm_dir)


def test_an_unknown_dtype_is_named(tiny_moca, tmp_path):
    from eval.encoding import load_model

    tiny_moca[0].save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"--dtype 'bf16': use auto or one of float32, bfloat16, float16"):
        load_model(str(tmp_path), dtype="bf16")
