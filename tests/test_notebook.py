"""The quickstart notebook executes top to bottom in a real Jupyter kernel on the embedded teacher with a tiny
budget."""

from __future__ import annotations

from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs_in_a_kernel(notebook_kernel, tmp_path, monkeypatch):
    monkeypatch.setenv("ZEBRAX_QUICKSTART_STEPS", "2")  # the kernel inherits the environment
    monkeypatch.setenv("ZEBRAX_QUICKSTART_SEQ_LEN", "96")  # the chat template alone is ~30 tokens
    monkeypatch.setenv("ZEBRAX_QUICKSTART_BATCH", "2")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    outputs = notebook_kernel(NOTEBOOK)
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "CPU" in text and "Paris" in text and "LSSSSLSSSSSLSSSSSLSSSSSLSSSSLS" in text
    assert "after KD" in text and "128.0 KiB KV cache per token" in text
    assert any("image/png" in o.get("data", {}) for o in outputs), "the plot did not reach the display"
    assert (tmp_path / "artifacts" / "quickstart-run" / "metrics.jsonl").exists()
