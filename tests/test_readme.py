"""The README's usage example runs as written."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run_as_written(tmp_path):
    """Every python block, in order, in one fresh directory (later blocks use the checkpoint the first saves)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2, "the README lost its python examples"
    for block in blocks:
        result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{block}\n{result.stderr[-3000:]}"
        assert result.stdout.strip(), "an example printed nothing"


def test_readme_opens_with_the_two_commands():
    lines = [line for line in README.read_text().splitlines()[:6] if line.startswith("make ")]
    assert [line.split()[1] for line in lines] == ["demo", "test"]
