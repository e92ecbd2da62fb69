"""The demo (README's first command) on a tiny split: its table, its saved file, its error messages."""
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import faiss_rqmoe
from faiss_rqmoe import __main__ as cli
from faiss_rqmoe import datasets

# (n_train, n_val, n_db, n_query, nlist, architecture, training seconds, encode candidates, LUT vectors)
TINY = (1_500, 200, 2_000, 50, 8, "N1L1H16", 0.5, 4, 1_500)
ROW = re.compile(r"^(IVF-RQ-MoE|IVF-RQ4x8|IVF-PQ4x8)\s+(\d+)\s+([\d.e+]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)$",
                 re.MULTILINE)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(cli.SIZES, "quick", TINY)


def test_quick_demo_prints_the_table_and_saves_a_loadable_index(tiny, tmp_path, capsys):
    out = tmp_path / "demo.rqmoe"
    assert cli.main(["demo", "--quick", "--bytes", "4", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert cli.TABLE_HEADER in printed
    rows = {m.group(1): m.groups()[1:] for m in ROW.finditer(printed)}
    assert set(rows) == {"IVF-RQ-MoE", "IVF-RQ4x8", "IVF-PQ4x8"}, printed
    for code_bytes, mse, r1, r10, qps, _ in rows.values():
        assert 4 <= int(code_bytes) <= 5  # 4 code bytes, + 1 norm byte for the additive quantizers
        assert 0 <= float(r1) <= float(r10) <= 1 and float(mse) > 0 and int(qps) > 0
    assert f"faiss_rqmoe.read_index({str(out)!r})" in printed

    # the saved index loads and answers like the table says: recompute R@10 from the file
    index = faiss_rqmoe.read_index(out, device="cpu")
    ds = datasets.load_small(n_train=TINY[0], n_val=TINY[1], n_db=TINY[2], n_query=TINY[3])
    assert index.ntotal == TINY[2] and index.d == 128 and index.config.M == 4
    _, I = index.search(ds.xq, 10)
    recall_at_10 = float((I == ds.gt[:, :1]).any(axis=1).mean())
    assert abs(recall_at_10 - float(rows["IVF-RQ-MoE"][3])) < 1e-3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is missing")
def test_missing_cuda_is_a_clear_error(tiny, tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--device", "cuda", "--out", str(tmp_path / "x")]) == 2
    assert "--device cuda: device 'cuda' was requested but torch.cuda.is_available() is False" in \
        capsys.readouterr().err


def test_bad_bytes_is_a_clear_error(capsys):
    assert cli.main(["demo", "--quick", "--bytes", "0"]) == 2
    assert "--bytes must be >= 1, got 0" in capsys.readouterr().err


def test_missing_data_extra_names_the_install_command(tiny, monkeypatch, capsys):
    def no_opencv(**sizes):
        raise ImportError(f"the SIFT data sets need OpenCV: {datasets.DATA_EXTRA_HINT}")

    monkeypatch.setattr(datasets, "load_small", no_opencv)
    assert cli.main(["demo", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "the SIFT data sets need OpenCV" in err and 'pip install -e ".[data]"' in err


def test_faiss_few_points_warning_is_dropped_and_the_rest_passes(capfd):
    import faiss

    with cli._drop_from_stderr(cli._FAISS_FEW_POINTS):
        faiss.Kmeans(8, 16, niter=2).train(np.random.default_rng(0).standard_normal((100, 8), dtype=np.float32))
        print("still shown", file=sys.stderr, flush=True)
    err = capfd.readouterr().err
    assert "still shown" in err and "please provide at least" not in err


def test_command_line_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "faiss_rqmoe", "demo", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--quick" in result.stdout and "--bytes" in result.stdout
