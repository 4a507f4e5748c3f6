"""Every example runs (smoke level, short settings), and the docs quote them faithfully."""

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DOCS = ROOT / "docs"
TUTORIALS = DOCS / "tutorials"
# "{tmp}" stands for a fresh temporary folder, so that examples write nothing into the checkout.
SHORT_ARGS = {
    "breast_cancer_pipeline.py": ["--epochs", "3"],
    "certify_network.py": ["--epochs", "2"],
    "dask_grid_search.py": ["--epochs", "2"],
    "checkpoint_resume.py": ["--epochs", "4"],
    "grid_search.py": ["--epochs", "2"],
    "onnx_deploy.py": ["--epochs", "2"],
    "persistence.py": ["--epochs", "2"],
    "quickstart.py": ["--epochs", "2"],
    "radius_histograms.py": ["--epochs", "2", "--output", "{tmp}"],
}
# Files an example must leave in "{tmp}".
OUTPUTS = {"radius_histograms.py": ["radius_histogram.png"]}
# Modules of an optional extra an example needs (all of them are in the "test" extra).
REQUIRES = {"dask_grid_search.py": "distributed", "onnx_deploy.py": "onnxruntime"}


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_runs(script, tmp_path):
    if script in REQUIRES and importlib.util.find_spec(REQUIRES[script]) is None:
        pytest.skip(f"{script} needs {REQUIRES[script]}")
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in SHORT_ARGS.get(script, [])]
    # One thread, as in conftest.py: the examples' networks are tiny, and intra-op threads only
    # slow them down on a loaded machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()
    for name in OUTPUTS.get(script, []):
        assert (tmp_path / name).is_file(), f"{script} did not write {name}"


# Code blocks of the documentation that name their source, ```python title="examples/x.py".
_QUOTE = re.compile(r'^```python title="(examples/[\w.]+)"\n(.*?)^```', re.MULTILINE | re.DOTALL)


def _quotes():
    for page in sorted(DOCS.rglob("*.md")):
        name = page.relative_to(DOCS).with_suffix("").as_posix()
        for number, match in enumerate(_QUOTE.finditer(page.read_text(encoding="utf-8"))):
            yield pytest.param(match.group(1), match.group(2), id=f"{name}-{number}")


def _contains(source: list[str], quote: list[str]) -> bool:
    """Whether ``quote`` is a run of consecutive lines of ``source``, up to a common indent."""
    first = quote[0]
    for start, line in enumerate(source[: len(source) - len(quote) + 1]):
        if line.strip() != first.strip():
            continue
        indent = line[: len(line) - len(line.lstrip())]
        window = source[start : start + len(quote)]
        if all(
            s.rstrip() == (indent + q).rstrip() if q.strip() else not s.strip()
            for s, q in zip(window, quote, strict=True)
        ):
            return True
    return False


@pytest.mark.parametrize(("source", "code"), list(_quotes()))
def test_tutorial_quotes_its_example(source, code):
    # A tutorial's code must stay the code that test_example_runs runs.
    quote = textwrap.dedent(code).rstrip("\n").splitlines()
    lines = (ROOT / source).read_text(encoding="utf-8").splitlines()
    assert _contains(lines, quote), f"this code is not (any more) in {source}:\n{code}"


def test_every_tutorial_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    missing = [p.name for p in TUTORIALS.glob("*.md") if f"tutorials/{p.name}" not in nav]
    assert not missing, f"tutorial pages missing from the nav of mkdocs.yml: {missing}"
