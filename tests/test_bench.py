import pytest

from faiss_rqmoe.bench import merge_codec_results


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
