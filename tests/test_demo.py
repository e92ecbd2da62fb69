"""The demo (README's first command) on a tiny split, and the command line around it."""
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import faiss_rqmoe
from faiss_rqmoe import __main__ as cli
from faiss_rqmoe.bench import datasets

TINY = (2_000, 200, 2_000, 50)
ROW = re.compile(r"^(IVF-RQ-MoE \(pretrained\), nshort (?:50|10)|faiss IVF-RQ8x8|faiss IVF-PQ8x8)\s+(\d+)\s+([\d.e+]+)"
                 r"\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)$", re.MULTILINE)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(cli, "QUICK_SPLIT", TINY)


def test_quick_demo_prints_the_table_and_saves_a_loadable_index(tiny, tmp_path, capsys):
    out = tmp_path / "demo.rqmoe"
    assert cli.main(["demo", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert cli.TABLE_HEADER in printed
    rows = {m.group(1): m.groups()[1:] for m in ROW.finditer(printed)}
    assert len(rows) == 4, printed
    for code_bytes, mse, r1, r10, qps, _ in rows.values():
        assert 8 <= int(code_bytes) <= 9  # 8 code bytes, + 1 norm byte for the additive quantizers
        assert 0 <= float(r1) <= float(r10) <= 1 and float(mse) > 0 and int(qps) > 0
    assert f"faiss_rqmoe.read_index({str(out.resolve())!r})" in printed
    assert "IVF-RQ-MoE against faiss IVF-RQ8x8: MSE" in printed

    # the saved index loads and answers as the table says: recompute R@10 at nshort 50 from the file
    index = faiss_rqmoe.read_index(out, device="cpu")
    ds = datasets.load_small(n_train=TINY[0], n_val=TINY[1], n_db=TINY[2], n_query=TINY[3])
    assert index.ntotal == TINY[2] and index.d == 128 and index.pretrained == "sift-ivf1024-8B"
    _, I = index.search(ds.xq, 10, {"nprobe": cli.NPROBE, "nshort": 50})
    recall_at_10 = float((I == ds.gt[:, :1]).any(axis=1).mean())
    assert abs(recall_at_10 - float(rows["IVF-RQ-MoE (pretrained), nshort 50"][3])) < 1e-3


def test_the_default_output_path_is_printed_in_full(tiny, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli.tempfile, "gettempdir", lambda: str(tmp_path))
    assert cli.main(["demo", "--quick", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    expected = tmp_path / "faiss_rqmoe_demo" / "demo_index.rqmoe"
    assert expected.is_file() and str(expected.resolve()) in printed and "data cache:" in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is missing")
def test_missing_cuda_is_a_clear_error(tiny, tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--device", "cuda", "--out", str(tmp_path / "x")]) == 2
    assert "--device cuda: device 'cuda' was requested but torch.cuda.is_available() is False" in \
        capsys.readouterr().err


def test_bad_bytes_is_a_clear_error(capsys):
    assert cli.main(["demo", "--quick", "--bytes", "0"]) == 2
    assert "--bytes must be 8 or 16" in capsys.readouterr().err


def test_missing_data_extra_names_the_install_command(tiny, monkeypatch, capsys):
    def no_opencv(**sizes):
        raise ImportError(f"the SIFT data sets need OpenCV: {datasets.DATA_EXTRA_HINT}")

    monkeypatch.setattr(datasets, "load_small", no_opencv)
    assert cli.main(["demo", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "the SIFT data sets need OpenCV" in err and 'pip install -e ".[data]"' in err


def run(*args):
    return subprocess.run([sys.executable, "-m", "faiss_rqmoe", *args], capture_output=True, text=True, timeout=120)


def test_the_command_line_names_itself_and_has_help_everywhere():
    top = run("--help")
    assert top.returncode == 0 and top.stdout.startswith("usage: faiss-rqmoe") and "``" not in top.stdout
    assert run("--version").stdout.strip() == f"faiss-rqmoe {faiss_rqmoe.__version__}"
    demo = run("demo", "--help")
    assert demo.returncode == 0 and "--quick" in demo.stdout and "--bytes" in demo.stdout
    bench = run("bench", "--help")
    assert bench.returncode == 0 and bench.stdout.startswith("usage: faiss-rqmoe bench")
    for job in ("codec", "search", "speed", "build", "report", "merge", "plot"):
        assert job in bench.stdout
    search = run("bench", "search", "--help").stdout
    # every option has a help line: no option line is followed directly by the next option
    options = re.findall(r"^  (--[a-z0-9-]+)([^\n]*)\n(?!\s{10,}\S)", search, re.MULTILINE)
    assert all(text.strip() for _, text in options), [name for name, text in options if not text.strip()]
    assert run("train", "--help").stdout.startswith("usage: faiss-rqmoe train")
    assert "sift-8B" in run("pretrained", "list").stdout


def test_bench_through_the_main_command_line_equals_the_module(tmp_path):
    out = tmp_path / "speed.json"
    result = run("bench", "speed", "--devices", "cpu", "--methods", "QINCo1-shape", "--batches", "256",
                 "--cpu-n-encode", "64", "--cpu-train-steps", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    import json

    speed = json.loads(out.read_text())
    assert speed["kind"] == "speed" and speed["meta"]["command"].startswith("python -m faiss_rqmoe.bench speed")
    row = speed["rows"][0]
    assert row["method"] == "QINCo1-shape" and row["batch"] == 256 and row["decode_vps"] > 0
    assert set(row["encode_vps"]) == {"greedy16", "beam4x16", "exact"} and row["train_sps"] > 0


def test_data_exports_a_split_that_loads_back(sift, tmp_path, capsys):
    sizes = {"n_train": 1000, "n_val": 100, "n_db": 2000, "n_query": 20}
    flags = [arg for key, n in sizes.items() for arg in (f"--{key.replace('_', '-')}", str(n))]
    path = tmp_path / "default_small.npz"
    assert cli.main(["data", "default", "--export", str(path), *flags, "--float16"]) == 0
    assert f"written to {path} as uint8" in capsys.readouterr().out  # SIFT bytes stay bytes
    back, ds = datasets.load_dataset(str(path)), datasets.load_dataset("default", **sizes)
    for key in ("xt", "xval", "xb", "xq", "gt"):
        np.testing.assert_array_equal(getattr(back, key), getattr(ds, key))
    assert cli.main(["data", "default", "--export", str(tmp_path / "x.npy")]) == 2
    assert "must end in .npz" in capsys.readouterr().err
    assert cli.main(["data", "default", "--n-train", "1000"]) == 2  # sizes without --export would be ignored
    assert "add --export FILE.npz" in capsys.readouterr().err
    (tmp_path / "folder.npz").mkdir()
    assert cli.main(["data", "default", "--export", str(tmp_path / "folder.npz"), *flags]) == 2
    assert "folder.npz" in capsys.readouterr().err and not list(tmp_path.glob("*.tmp.npz"))


def test_data_builds_into_the_cache_and_reports_the_set(sift, capsys, monkeypatch):
    assert cli.main(["data", "default"]) == 0  # the sift fixture built it: this only reads the cache
    out = capsys.readouterr().out
    data = datasets.default_descriptors(progress=False)
    assert f"default: {data.shape[0]} vectors of 128 dimensions, uint8" in out and str(datasets.cache_dir()) in out

    def no_opencv(progress=True):
        raise ImportError("the SIFT data sets need OpenCV")

    monkeypatch.setattr(datasets, "wallpaper_descriptors", no_opencv)
    assert cli.main(["data", "wallpaper"]) == 2
    assert 'building the wallpaper set needs: pip install -e ".[data]"' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["data", "wallpapers"])  # argparse names the valid choices
