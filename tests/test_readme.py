"""Every Python example in README.md runs exactly as written (in a scratch directory)."""

import re
from pathlib import Path

import matplotlib
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_examples():
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)  # examples write runs/...; keep them out of the repository
    namespace: dict = {"__name__": f"readme_example_{index}"}
    exec(compile(EXAMPLES[index], f"README.md example {index}", "exec"), namespace)
