"""The quickstart notebook executes top to bottom in a real Jupyter kernel (nbclient, as notebook users' CI runs
it: magics, the display path and all), on the embedded teacher with a tiny budget."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2_memory")  # the kernel holds teacher, hybrid and their compiled steps: ~9 GB
def test_quickstart_notebook_runs_in_a_kernel(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("ZEBRAX_QUICKSTART_STEPS", "2")  # the kernel inherits the environment
    monkeypatch.setenv("ZEBRAX_QUICKSTART_SEQ_LEN", "32")
    monkeypatch.setenv("ZEBRAX_QUICKSTART_BATCH", "2")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "CPU" in text and "Paris" in text and "LSSSSLSSSSSLSSSSSLSSSSSLSSSSLS" in text
    assert "after KD" in text and "128.0 KiB KV cache per token" in text
    assert any("image/png" in o.get("data", {}) for o in outputs), "the plot did not reach the display"
    assert (tmp_path / "artifacts" / "quickstart-run" / "metrics.jsonl").exists()
