import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# Everything the tests read lies in the repository (tests/fixtures/: data made by the original release's code).
FIXTURES = REPO_ROOT / "tests" / "fixtures"
sys.path.insert(0, str(REPO_ROOT))
# The nano world and its pipeline are an example (examples/nano/), not part of the package.
sys.path.insert(0, str(REPO_ROOT / "examples" / "nano"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory) -> str:
    """A tiny random causal Qwen2.5-VL checkpoint (the stand-in for a real base VLM)."""
    from moca.testing import make_tiny_vlm

    return make_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"), arch="qwen2_5_vl", seed=0)


@pytest.fixture(scope="session")
def tiny_vlm_dirs(tmp_path_factory) -> dict:
    """Tiny causal checkpoints of every supported backbone."""
    from moca.testing import ARCHS, make_tiny_vlm

    return {arch: make_tiny_vlm(tmp_path_factory.mktemp(arch), arch=arch, seed=0) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_moca(tiny_vlm_dir):
    """(model, processor): a fresh bidirectional MoCa model on the tiny backbone, fp32, eval mode."""
    from moca import MoCaModel

    model = MoCaModel.from_backbone(tiny_vlm_dir, image_tokens=None, dtype=torch.float32).eval()
    return model, model.processor


@pytest.fixture(scope="session")
def official_fixture() -> Path:
    path = FIXTURES / "official-moca-tiny-a"
    if not path.is_dir():
        pytest.fail(f"missing reference fixture {path}")
    return path
