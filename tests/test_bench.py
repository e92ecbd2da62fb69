import json

import pytest

from faiss_rqmoe import bench
from faiss_rqmoe.bench.report import merge_codec_results


def test_bench_merge_keeps_the_last_measurement_and_stamps_devices():
    def result(device, rows, dataset="a"):
        return {"kind": "codec", "meta": {"device": device}, "dataset": {"name": dataset}, "rows": rows,
                "extras": {}}

    first = result("cpu", [{"method": "PQ", "code_bytes": 8, "mse": 2.0}, {"method": "RQ", "code_bytes": 8, "mse": 3.0}])
    second = result("gpu", [{"method": "PQ", "code_bytes": 8, "mse": 1.0}, {"method": "PQ", "code_bytes": 16, "mse": 0.5}])
    merged = merge_codec_results([first, second])
    assert [(r["method"], r["code_bytes"], r["mse"], r["device"]) for r in merged["rows"]] == [
        ("RQ", 8, 3.0, "cpu"), ("PQ", 8, 1.0, "gpu"), ("PQ", 16, 0.5, "gpu")]
    with pytest.raises(ValueError, match="different splits"):
        merge_codec_results([first, result("gpu", [], dataset="b")])


@pytest.mark.parametrize("codec, condition", [("moe", "instruction"), ("qinco", "reconstruction")])
def test_bench_search_runs_end_to_end_with_a_centroid_conditioned_codec(tmp_path, codec, condition):
    """A tiny `bench search`: our IVF index (conditioned on the centroid) and faiss's, one JSON with the grid."""
    out = tmp_path / "search.json"
    bench.main(["search", "--dataset", "small", "--n-train", "3000", "--n-db", "2000", "--n-query", "40",
                "--bytes", "4", "--nlist", "16", "--nprobe", "2", "16", "--nshort", "10", "2000",
                "--n-experts", "2", "--n-layers", "1", "--hidden", "16", "--max-epochs", "1",
                "--train-candidates", "8", "--encode-candidates", "8", "--codec", codec, "--centroid",
                "--no-keep-rq-if-better", "--no-refine",
                "--device", "cpu", "--quiet", "--out", str(out)])
    result = json.loads(out.read_text())
    ours = result["methods"]["IVF-RQ-MoE"]
    assert result["description"].endswith("_centroid") and ours["config"]["ctx_dim"] == 128
    assert ours["config"]["condition"] == condition
    assert set(result["methods"]) == {"IVF-RQ-MoE", "IVF-PQ4x8", "IVF-RQ4x8"}
    grid = {(row["nprobe"], row["nshort"]): row for row in ours["grid"]}
    assert set(grid) == {(2, 10), (2, 2000), (16, 10), (16, 2000)}
    for row in ours["grid"]:
        assert 0 <= row["R@1"] <= row["R@10"] <= 1 and row["qps"] > 0
    # probing every list and re-ranking everything is exhaustive search: it finds at least what 2 lists do
    assert grid[(16, 2000)]["R@10"] >= grid[(2, 2000)]["R@10"]
    assert len(result["train_history"]["val_mse"]) == 1
