"""The quickstart notebook runs top to bottom (its code cells, in order, in one namespace)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, capsys):
    cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for cell in cells:
            source = "".join(line for line in cell["source"] if not line.lstrip().startswith(("!", "%")))
            exec(compile(source, f"{NOTEBOOK.name}", "exec"), namespace)
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "Paris" in out and "128.0 KiB KV cache per token" in out
