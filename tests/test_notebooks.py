"""The notebooks run top to bottom (quickstart in its quick mode) and are stored with a full run's outputs."""
import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(name: str, timeout_s: int = 300) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel from the notebooks folder; a cell error raises CellExecutionError."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=timeout_s, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.extend(str(value) for value in output.get("data", {}).values())
    return "\n".join(parts)


@pytest.mark.parametrize("name", ["quickstart.ipynb", "benchmarks.ipynb"])
def test_stored_with_the_outputs_of_a_full_run(name):
    """Readers see tables and figures without running anything: the stored outputs are one top-to-bottom run."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), \
        f"{name}: store the outputs of one run from a fresh kernel (see the notebook's introduction)"
    outputs = [output for cell in code for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert any("image/png" in output.get("data", {}) for output in outputs), f"{name}: its figures are missing"
    if name == "quickstart.ipynb":
        assert "quick=False" in outputs_text(nb), "store the full run, not the quick mode CI uses"


def test_quickstart_runs_in_quick_mode(monkeypatch):
    monkeypatch.setenv("FAISS_RQMOE_QUICK", "1")
    nb = execute("quickstart.ipynb")
    text = outputs_text(nb)
    assert "quick=True" in text and "same results after the round trip" in text
    assert "IndexRQMoE" in text and "faiss IVF-PQ" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # MSE per step, recall vs nprobe x nshort


def _codec_result():
    """A codec file as a run in progress leaves it: static rows, one learned codec, some keys missing."""
    return {"kind": "codec", "meta": {"device": "cpu"}, "dataset": {"name": "sift_skimage_v1", "n_db": 1000},
            "rows": [{"method": "PQ", "code_bytes": 8, "bytes": 8.0, "mse": 30000.0, "R@1": 0.2, "R@10": 0.6},
                     {"method": "RQ-MoE", "code_bytes": 8, "bytes": 8.0, "mse": 25000.0, "R@1": 0.3,
                      "train_s": 12.5}],
            "extras": {"RQ-MoE@8": {"mse_per_step": [9e4, 7e4, 6e4, 5e4, 4e4, 3.5e4, 3e4, 2.5e4],
                                    "history": {"time_s": [1.0, 2.0], "val_mse": [26000.0, 25000.0],
                                                "init_val_mse": 28000.0}}}}


def _search_result():
    return {"kind": "search", "meta": {"device": "cpu"}, "dataset": {"name": "sift_skimage_v1"},
            "methods": {"IVF-RQ-MoE": {"bytes": 9, "grid": [{"nprobe": 1, "nshort": 10, "R@1": 0.3, "R@10": 0.5,
                                                             "qps": 900.0},
                                                            {"nprobe": 4, "nshort": 50, "R@1": 0.4, "R@10": 0.7,
                                                             "qps": 300.0}]},
                        "IVF-PQ8x8": {"bytes": 8, "grid": []}}}


def test_benchmarks_copes_with_empty_and_partial_results(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("FAISS_RQMOE_RESULTS", str(empty))
    assert "No results yet" in outputs_text(execute("benchmarks.ipynb"))

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "codec_cpu.json").write_text(json.dumps(_codec_result()))
    (partial / "search_cpu.json").write_text(json.dumps(_search_result()))
    (partial / "codec_gpu.json").write_text('{"kind": "codec", "rows": [{"meth')  # being written
    (partial / "codec_empty.json").write_text(json.dumps({"kind": "codec", "rows": [], "extras": {}}))
    monkeypatch.setenv("FAISS_RQMOE_RESULTS", str(partial))
    nb = execute("benchmarks.ipynb")
    text = outputs_text(nb)
    assert "3 codec and 1 search result files" not in text  # the half-written file is skipped
    assert "2 codec and 1 search result files" in text and "skipping codec_gpu.json" in text
    assert "| RQ-MoE | 8 | 25000 | 0.3000 |" in text and "| IVF-RQ-MoE | 9 | 0.4000 | 0.7000 | 300 |" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 3  # MSE per step, training curve, recall vs qps


def test_benchmarks_runs_on_the_committed_results(monkeypatch):
    results = Path(__file__).resolve().parent.parent / "notebooks" / "results"
    monkeypatch.setenv("FAISS_RQMOE_RESULTS", str(results))
    text = outputs_text(execute("benchmarks.ipynb"))  # merged files keep a list of metas: must still plot
    skipped = [line for line in text.splitlines() if line.startswith("skipping")]
    assert "RQ-MoE" in text and skipped == []  # every committed file is of a kind the notebook shows
    assert "| build_default200k_sharded_cpu | sharded | 200000 |" in text
