"""Nothing loads code or pickles it was not asked to: no pickle, `torch.load` only with `weights_only=True`, the
evaluations run a checkpoint's own Python only with `--trust_remote_code`, and that code is only the shipped files."""

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from moca.modeling_moca import REMOTE_CODE_FILES

# Loaders that run code from the data they read.
UNSAFE_LOADS = {
    "pickle": re.compile(r"\b(?:c?pickle|dill|joblib|cloudpickle)\.(?:load|loads|Unpickler)\b|^\s*import (?:c?pickle|dill)\b"),
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"),
    "numpy allow_pickle": re.compile(r"allow_pickle\s*=\s*True"),
}


def python_sources() -> list:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return [REPO_ROOT / name for name in listed if not name.endswith("test_security.py") and (REPO_ROOT / name).is_file()]


def test_the_sources_hold_no_unsafe_load():
    sources = python_sources()
    assert any(path.name == "modeling_moca.py" for path in sources)
    found = [
        f"{path.relative_to(REPO_ROOT)}:{number}: {what}: {line.strip()}"
        for path in sources
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        for what, pattern in UNSAFE_LOADS.items()
        if pattern.search(line)
    ]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "line, unsafe",
    [
        ("state = torch.load(path)", True),
        ("state = torch.load(path, map_location='cpu')", True),
        ("state = torch.load(path, weights_only=True)", False),
        ("rows = pickle.loads(blob)", True),
        ("import pickle", True),
        ("np.load(path, allow_pickle=True)", True),
        ("np.load(path)", False),
    ],
)
def test_the_scan_catches_unsafe_loads(line, unsafe):
    assert any(pattern.search(line) for pattern in UNSAFE_LOADS.values()) == unsafe


@pytest.fixture
def checkpoint_with_booby_trapped_code(tiny_moca, tmp_path):
    """A saved checkpoint whose shipped modeling file raises on import: proof of whether it was run."""
    folder = tmp_path / "checkpoint"
    tiny_moca[0].save_pretrained(folder)
    with open(folder / "modeling_moca.py", "a") as code:
        code.write('\nraise RuntimeError("the checkpoint\'s own code ran")\n')
    return folder


def test_the_evaluations_run_checkpoint_code_only_when_trusted(checkpoint_with_booby_trapped_code):
    from eval.encoding import load_model
    from moca import MoCaModel

    model = load_model(str(checkpoint_with_booby_trapped_code), device="cpu")
    assert type(model) is MoCaModel  # the installed package's class
    with pytest.raises(RuntimeError, match="the checkpoint's own code ran"):
        load_model(str(checkpoint_with_booby_trapped_code), device="cpu", trust_remote_code=True)


LOAD_AND_LIST_MODULES = """
import json, sys
from transformers import AutoModel
AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
remote = sorted({m.__file__.rsplit('/', 1)[-1] for name, m in sys.modules.items()
                 if name.startswith('transformers_modules') and getattr(m, '__file__', None)
                 and not m.__file__.endswith('__init__.py')})
print(json.dumps({"remote": remote, "moca_imported": any(n == 'moca' or n.startswith('moca.') for n in sys.modules)}))
"""


def test_trusted_remote_code_is_only_the_shipped_files(tiny_moca, tmp_path):
    folder = tmp_path / "checkpoint"
    tiny_moca[0].save_pretrained(folder)
    assert sorted(path.name for path in folder.glob("*.py")) == sorted(REMOTE_CODE_FILES)
    # A fresh process outside the repository, with its own module cache: what loading imports, and nothing of
    # the installed package (the shipped files import each other and installed libraries only).
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_LIST_MODULES, str(folder)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
        env={"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["remote"] and set(loaded["remote"]) <= set(REMOTE_CODE_FILES)
    assert not loaded["moca_imported"]
