import json

import pytest
import torch

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
                "--train-encode-candidates", "8", "--encode-candidates", "8", "--codec", codec, "--centroid",
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


def test_bench_search_of_a_trained_index_file_matches_searching_it_directly(tmp_path):
    """`bench search --trained-index` adds the database to the file's index and measures it: its recall
    equals that of the same file read, filled and searched here; a filled index is refused."""
    from faiss_rqmoe import index_factory, read_index, write_index
    from faiss_rqmoe.bench import datasets, evaluation
    from faiss_rqmoe.train import TrainConfig

    ds = datasets.load_small(n_train=3000, n_val=200, n_db=2000, n_query=40)
    index = index_factory(ds.d, "IVF16,RQMoE4x8_N2L1H16", encode_candidates=8, encode_beam=1,
                          train_config=TrainConfig(max_epochs=1, train_encode_candidates=8, device="cpu", progress=False))
    index.train(ds.xt, ds.xval)
    path = tmp_path / "trained.rqmoe"
    write_index(index, path)
    out = tmp_path / "search.json"
    bench.main(["search", "--dataset", "small", "--n-train", "3000", "--n-db", "2000", "--n-query", "40",
                "--trained-index", str(path), "--encode-candidates", "8", "--nprobe", "4", "--nshort", "20",
                "--no-baselines", "--device", "cpu", "--quiet", "--out", str(out)])
    result = json.loads(out.read_text())
    row, = result["methods"]["IVF-RQ-MoE"]["grid"]
    direct = read_index(path, device="cpu")
    direct.add(ds.xb)
    _, I = direct.search(ds.xq, 10, params={"nprobe": 4, "nshort": 20})
    assert row["R@1"] == evaluation.recall_at(I, ds.gt, ks=(1,))["R@1"]
    assert result["train_s"] is None and result["description"] == "file:trained.rqmoe"
    filled = tmp_path / "filled.rqmoe"
    write_index(direct, filled)
    with pytest.raises(ValueError, match="holds 2000 vectors"):
        bench.main(["search", "--dataset", "small", "--n-train", "3000", "--n-db", "2000", "--n-query", "40",
                    "--trained-index", str(filled), "--no-baselines", "--device", "cpu", "--quiet"])


def test_faiss_rqmoe_train_takes_the_metric_of_the_data_set(tmp_path):
    """An inner-product data set trains an inner-product index unless --metric says otherwise."""
    import faiss
    import numpy as np

    from faiss_rqmoe import read_index
    from faiss_rqmoe.bench import datasets, train_cli

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1700, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ds = datasets.Dataset("unit", x[:1200], x[1200:1400], x[1400:1690], x[1690:],
                          np.zeros((10, 5), dtype=np.int64), metric="ip")
    split = datasets.export_split(ds, tmp_path / "unit.npz")
    common = ["--dataset", str(split), "--description", "RQMoE2x8_N2L1H16", "--max-epochs", "1",
              "--train-encode-candidates", "8", "--device", "cpu", "--quiet"]
    train_cli.main(common + ["--out", str(tmp_path / "ip.rqmoe")])
    train_cli.main(common + ["--metric", "l2", "--out", str(tmp_path / "l2.rqmoe")])
    assert read_index(tmp_path / "ip.rqmoe").metric_type == faiss.METRIC_INNER_PRODUCT
    assert read_index(tmp_path / "l2.rqmoe").metric_type == faiss.METRIC_L2


def test_training_candidates_and_database_candidates_are_separate_flags():
    """--train-encode-candidates sets training's encoding, --encode-candidates the database's: one must not
    overwrite the other, in either order."""
    import torch

    from faiss_rqmoe.bench.cli import build_parser
    from faiss_rqmoe.bench.options import train_config_from_args

    for order in (["--train-encode-candidates", "32", "--encode-candidates", "16"],
                  ["--encode-candidates", "16", "--train-encode-candidates", "32"]):
        args = build_parser().parse_args(["codec", *order, "--instr-dim", "64"])
        assert args.encode_candidates == 16 and args.instr_dim == 64
        assert train_config_from_args(args, torch.device("cpu")).train_encode_candidates == 32
    args = build_parser().parse_args(["search", "--encode-candidates", "8"])
    assert args.encode_candidates == 8 and train_config_from_args(args, torch.device("cpu")).train_encode_candidates == "auto"


def test_a_results_files_command_re_runs_as_it_is_even_with_spaces_in_a_name():
    """meta.command is the argument list quoted for a shell: a method name with a space stays one argument."""
    import shlex

    from faiss_rqmoe.bench.meta import run_meta

    argv = ["speed", "--methods", "RQ-MoE", "RQ-MoE top-1", "--out", "a b.json"]
    command = run_meta(argv, torch.device("cpu"))["command"]
    assert shlex.split(command) == ["python", "-m", "faiss_rqmoe.bench"] + argv


def test_a_training_flag_of_a_few_words_refuses_any_other_before_anything_runs(capsys):
    """--encode-precision, --lr-schedule, --optimizer and --rq-train-type list their words: a typo is
    argparse's error naming them, and a valid word reaches TrainConfig."""
    from faiss_rqmoe.bench.cli import build_parser
    from faiss_rqmoe.bench.options import train_config_from_args

    with pytest.raises(SystemExit):
        build_parser().parse_args(["codec", "--encode-precision", "fp16"])
    err = capsys.readouterr().err
    assert "invalid choice: 'fp16'" in err and "bfloat16" in err
    args = build_parser().parse_args(["codec", "--encode-precision", "model", "--lr-schedule", "cosine"])
    config = train_config_from_args(args, torch.device("cpu"))
    assert (config.encode_precision, config.lr_schedule) == ("model", "cosine")


def test_a_decode_profile_splits_the_call_into_its_operators_own_times():
    """bench speed --profile-batch: the operators' own times (never an operator and the work inside it twice),
    largest first, with shares of their sum that add up to at most 1 (the top 12 of them)."""
    from faiss_rqmoe.bench.speed import profile_decode

    profile = profile_decode(torch.device("cpu"), 64, "torch", "float32", repeats=2)
    top = profile["top"]
    assert top and [row["ms"] for row in top] == sorted((row["ms"] for row in top), reverse=True)
    assert 0 < sum(row["share"] for row in top) <= 1 + 1e-9
    assert profile["wall_ms"] > 0 and profile["profiled_ms"] > 0
    assert any("bmm" in row["name"] or "addmm" in row["name"] for row in top)  # the experts' products


def test_bench_search_on_synthetic_clusters_times_single_queries_and_records_memory(tmp_path):
    """`--dataset synthetic` needs no data files; `--latency` times queries searched alone for ours and faiss's;
    `--profile` records where a search spends its time; every run records the bytes a vector of faiss's
    lists and of the scan's store (on the CPU: the term)."""
    from faiss_rqmoe.bench.search import synthetic_split

    ds = synthetic_split(300, 500, 7, n_val=50, d=16, clusters=8)
    assert ds.xb.shape == (500, 16) and ds.xq.shape == (7, 16) and ds.gt.shape == (7, 100)
    assert (ds.gt[:, 0] == ((ds.xq[:, None] - ds.xb[None]) ** 2).sum(-1).argmin(1)).all()
    out = tmp_path / "search.json"
    bench.main(["search", "--dataset", "synthetic", "--clusters", "16", "--n-train", "1000", "--n-db", "800",
                "--n-query", "20", "--bytes", "4", "--nlist", "8", "--nprobe", "2", "--nshort", "20",
                "--n-experts", "2", "--n-layers", "1", "--hidden", "16", "--max-epochs", "1", "--train-candidates", "8",
                "--encode-candidates", "8", "--no-keep-rq-if-better", "--no-refine", "--latency", "2:20",
                "--latency-queries", "5", "--profile", "2:20", "--device", "cpu", "--quiet", "--out", str(out)])
    result = json.loads(out.read_text())
    ours = result["methods"]["IVF-RQ-MoE"]
    assert result["dataset"]["name"] == "synthetic-16-clusters" and result["dataset"]["n_db"] == 800
    assert ours["memory_bytes_per_vector"] == {"faiss_lists": 5 + 8, "scan_store": 4, "scan_store_device": "cpu"}
    (point,) = ours["latency"]
    assert point["nprobe"] == 2 and point["n"] == 5 and 0 < point["median_ms"] <= point["p90_ms"]
    assert all(len(method["latency"]) == 1 for method in result["methods"].values())
    assert [(p["batch"], p["queries"]) for p in result["profile"]] == [("all queries", 20), ("one query", 1)]
    assert all(p["top"] and 0 < p["top"][0]["share"] <= 1 for p in result["profile"])
