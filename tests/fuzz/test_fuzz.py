"""``pytest -m fuzz``: runs the atheris harness (needs the ``fuzz`` extra: pip install -e ".[fuzz]")
for a bounded number of inputs; any crash fails the test with atheris' report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fuzz
RUNS = 20_000


def test_untrusted_input_parsers_survive_fuzzing(tmp_path: Path) -> None:
    harness = Path(__file__).with_name("fuzz_inputs.py")
    result = subprocess.run([sys.executable, str(harness), f"-runs={RUNS}", "-max_len=4096", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"Done {RUNS} runs" in result.stderr, result.stderr[-2000:]
