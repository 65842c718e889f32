"""The README's usage example runs as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


# A python block that needs torchvision says so on its first line; `make test` runs it in the torchvision
# environment. (`py` blocks, the vLLM calls, need vLLM and a GPU: not run here.)
NEEDS_TORCHVISION = "# needs torchvision"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _run_in_order(blocks, tmp_path):
    for block in blocks:
        result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{block}\n{result.stderr[-3000:]}"
        assert result.stdout.strip(), "an example printed nothing"


def test_readme_python_examples_run_as_written(tmp_path):
    """Every python block, in order, in one fresh directory (later blocks use the checkpoint the first saves)."""
    blocks = [block for block in _python_blocks() if not block.startswith(NEEDS_TORCHVISION)]
    assert len(blocks) >= 2, "the README lost its python examples"
    _run_in_order(blocks, tmp_path)


@pytest.mark.torchvision
def test_readme_torchvision_examples_run_as_written(tmp_path):
    blocks = _python_blocks()
    needing = [block for block in blocks if block.startswith(NEEDS_TORCHVISION)]
    assert needing, "the README lost its torchvision example"
    _run_in_order([blocks[0], *needing], tmp_path)  # the first block saves the checkpoint they load


def test_readme_opens_with_the_two_commands():
    lines = [line for line in README.read_text().splitlines()[:6] if line.startswith("make ")]
    assert [line.split()[1] for line in lines] == ["demo", "test"]
