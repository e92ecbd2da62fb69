import json

import pytest

pytest.importorskip("matplotlib")

from faiss_rqmoe.bench import plots  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def codec_result():
    history = {"epoch": [1, 2, 3], "time_s": [1.0, 2.5, 4.0], "val_mse": [30.0, 25.0, 24.0], "init_val_mse": 40.0}
    return {
        "kind": "codec",
        "dataset": {"name": "tiny", "n_db": 100},
        "meta": {"device": "cpu"},
        "rows": [
            {"method": "PQ4x8", "code_bytes": 4, "mse": 50.0},
            {"method": "RQ4x8 (beam 1)", "code_bytes": 4, "mse": 45.0},
            {"method": "RQ-MoE", "code_bytes": 4, "mse": 30.0},
            {"method": "RQ-MoE", "code_bytes": 8, "mse": 12.0},
        ],
        "extras": {
            "RQ-MoE@4": {"mse_per_step": [80.0, 60.0, 40.0, 30.0], "history": history},
            "QINCo-style@4": {"mse_per_step": [80.0, 62.0, 45.0, 33.0], "history": history},
            "RQ-MoE@8": {"mse_per_step": [80.0, 60.0, 40.0, 30.0, 22.0, 18.0, 14.0, 12.0]},
        },
    }


def search_result():
    grid = [{"nprobe": p, "nshort": s, "R@1": r, "R@10": min(1.0, r + 0.2), "qps": q}
            for p, s, r, q in [(1, 10, 0.2, 9000.0), (4, 10, 0.35, 4000.0), (4, 50, 0.4, 2500.0),
                               (16, 50, 0.45, 3000.0), (16, 200, 0.5, 800.0)]]
    return {"kind": "search", "methods": {
        "IVF-RQ-MoE": {"grid": grid},
        "IVF-PQ": {"grid": [{"nprobe": 1, "R@1": 0.1, "R@10": 0.3, "qps": 20000.0},
                            {"nprobe": 16, "R@1": 0.25, "R@10": 0.5, "qps": 5000.0}]},
    }}


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_each_plot_writes_a_png(tmp_path):
    assert_png(plots.plot_mse_per_step(codec_result(), tmp_path / "steps.png"))
    assert_png(plots.plot_training_curves(codec_result(), tmp_path / "train.png"))
    assert_png(plots.plot_recall_qps(search_result(), tmp_path / "sub" / "qps.png"))


def test_plot_all_dispatches_by_kind(tmp_path):
    codec_path, search_path = tmp_path / "codec.json", tmp_path / "search.json"
    codec_path.write_text(json.dumps(codec_result()))
    search_path.write_text(json.dumps(search_result()))
    written = plots.plot_all([codec_path, search_path], tmp_path / "out")
    assert [p.name for p in written] == ["codec_mse_per_step.png", "codec_training.png", "search_recall_qps.png"]
    for path in written:
        assert_png(path)


def test_pareto_front_drops_dominated_points():
    points = [(0.2, 9000.0), (0.35, 4000.0), (0.4, 2500.0), (0.45, 3000.0), (0.5, 800.0), (0.3, 100.0)]
    assert plots.pareto_front(points) == [(0.2, 9000.0), (0.35, 4000.0), (0.45, 3000.0), (0.5, 800.0)]


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="expected a 'codec' result"):
        plots.plot_mse_per_step(search_result(), tmp_path / "x.png")
    with pytest.raises(TypeError, match="must be a dict"):
        plots.plot_recall_qps([1, 2], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"must end in \.png"):
        plots.plot_recall_qps(search_result(), tmp_path / "x.pdf")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "other"}))
    with pytest.raises(ValueError, match="unknown result kind"):
        plots.plot_all([bad], tmp_path)


def test_search_legend_names_bytes_and_device():
    assert plots._method_label("IVF-RQ8x8", {"bytes": 9, "device": "cpu"}) == "IVF-RQ8x8 (9 B, CPU)"
    assert plots._method_label("IVF-RQ-MoE", {"bytes": 9, "device": "cuda:0"}) == "IVF-RQ-MoE (9 B, GPU)"
    assert plots._method_label("X", {}) == "X"
