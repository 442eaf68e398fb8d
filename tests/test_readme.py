"""The README's runnable Python examples run as written.

Blocks fenced as ```python are executed in order, in one namespace, in a fresh process (as a user would paste
them). Blocks that need files a test machine does not have (an official release checkpoint, a Hub repo, a state
file) are fenced as ```py: shown with highlighting, not executed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_the_readme_has_runnable_examples():
    assert python_blocks(), "README.md has no ```python block to test"


def test_readme_python_examples_run_as_written(tmp_path):
    script = "\n\n".join(python_blocks())
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**__import__("os").environ, "RWKV_HF_CACHE": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "the examples print their results"
