"""Every script in examples/ runs."""

import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).parent.parent / "examples").glob("*.py"))
#: what an example must also print: the backend example fuses every block of its 4-layer GPT
ALSO_PRINTS = {"compile_with_backend.py": "blocks with fused pre 8, fused mixing 8"}


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script):
    pytest.importorskip("transformers")
    # as a user runs it: the tests' Triton interpreter (conftest) is not in a user's environment
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(script), "--steps", "3"], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "relative error" in result.stdout
    assert ALSO_PRINTS.get(script.name, "") in result.stdout, result.stdout[-3000:]
