"""The README's usage example runs as written."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has no python example"
    result = subprocess.run([sys.executable, "-c", blocks[0]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tensor(" in result.stdout


def test_readme_opens_with_the_two_commands():
    lines = [line for line in README.read_text().splitlines()[:6] if line.startswith("make ")]
    assert [line.split()[1] for line in lines] == ["demo", "test"]
