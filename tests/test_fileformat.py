"""Fault and fuzz tests of the index file: every damaged or foreign file gives a clear ValueError, runs no
code, allocates no more than the file's size; writes are atomic and adds all-or-nothing."""
import io
import os
import pickle
import zipfile

import faiss
import numpy as np
import pytest

import faiss_rqmoe
from faiss_rqmoe import storage
from faiss_rqmoe.storage import load_arrays, save_arrays

MARKER = "/tmp/faiss_rqmoe_fuzz_pwned"


@pytest.fixture(scope="module")
def index(sift):
    index = faiss_rqmoe.index_factory(128, "IVF8,RQMoE4x6_N2L1H16", max_epochs=1, progress=False, device="cpu")
    index.train(sift.xt[:1500])
    index.add(sift.xb[:300])
    return index


@pytest.fixture(scope="module")
def good(index, tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "index.rqmoe"
    faiss_rqmoe.write_index(index, path)
    return path.read_bytes()


def read_bytes(data: bytes, tmp_path, name="x.rqmoe"):
    path = tmp_path / name
    path.write_bytes(data)
    return faiss_rqmoe.read_index(path, device="cpu")


def member_spans(data: bytes):
    """(name, data offset, data size) of every member of the archive."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        spans = []
        for info in archive.infolist():
            start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
            spans.append((info.filename, start, info.compress_size))
    return spans


def test_the_good_file_reads(good, tmp_path, index, sift):
    loaded = read_bytes(good, tmp_path)
    np.testing.assert_array_equal(loaded.search(sift.xq[:5], 3)[1], index.search(sift.xq[:5], 3)[1])


@pytest.mark.parametrize("seed", range(8))
def test_random_bytes(seed, tmp_path):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, int(rng.integers(0, 5000)), dtype=np.uint8).tobytes()
    if seed == 0:
        data = b"PK\x03\x04" + data  # looks like a zip at first sight
    with pytest.raises(ValueError):
        read_bytes(data, tmp_path)


def test_truncation_anywhere(good, tmp_path):
    cuts = sorted(set(np.linspace(0, len(good) - 1, 60).astype(int)) |
                  {start + k for _, start, size in member_spans(good) for k in (0, 1, size // 2, size - 1)})
    for cut in cuts:
        with pytest.raises(ValueError):
            read_bytes(good[:cut], tmp_path)


def test_flipped_bytes_in_every_array_and_the_headers(good, tmp_path):
    positions = list(range(0, 40)) + [len(good) - k for k in range(1, 30)]  # local header, central directory
    for _, start, size in member_spans(good):
        positions += [start + 5, start + 60, start + size // 2, start + size - 1]  # npy header and payload
    for pos in positions:
        damaged = bytearray(good)
        damaged[pos] ^= 0x5A
        try:
            loaded = read_bytes(bytes(damaged), tmp_path)
        except ValueError:
            continue
        # a flip the format cannot notice (e.g. a zip field no reader uses) must leave the index intact
        assert loaded.ntotal == 300, pos


def _resave(good, tmp_path, change, keep_table=True):
    arrays, meta = load_arrays(io.BytesIO(good))
    change(arrays, meta)
    path = tmp_path / "changed.rqmoe"
    if keep_table:
        save_arrays(path, arrays, meta)  # a consistent file with inconsistent contents
    return path


@pytest.mark.parametrize("change, message", [
    (lambda a, m: a.update({"model.codebooks": a["model.codebooks"].astype(np.float64)}), "float64"),
    (lambda a, m: a.update({"model.codebooks": a["model.codebooks"][:, :3]}), "codebooks"),
    (lambda a, m: a.pop("model.codebooks"), "missing"),
    (lambda a, m: a.update({"model.extra": np.zeros(3)}), "unexpected"),
    (lambda a, m: a.update({"faiss_index": a["faiss_index"][:100]}), "corrupted"),
    (lambda a, m: a.update({"faiss_index": a["faiss_index"].astype(np.int32)}), "uint8"),
    (lambda a, m: m["config"].update(M=5), "corrupted"),
    (lambda a, m: m.update(nlist=16), "nlist"),
    (lambda a, m: m.update(metric_type=7), "metric"),
    (lambda a, m: m.update(version=99), "version 99"),
    (lambda a, m: m.update(format="something else"), "not an IndexRQMoE file"),
    (lambda a, m: m.update(train_options={"nprob": 8}), "nprob"),
])
def test_wrong_dtypes_shapes_and_lying_headers(good, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        faiss_rqmoe.read_index(_resave(good, tmp_path, change), device="cpu")


def test_a_table_of_contents_that_lies_about_sizes(good, tmp_path):
    arrays, meta = load_arrays(io.BytesIO(good))
    payload = storage._payload(arrays, meta)
    table_meta = __import__("json").loads(payload[storage.META_KEY].tobytes())
    table_meta["arrays"]["model.codebooks"]["shape"] = [1, 2, 3]
    payload[storage.META_KEY] = np.frombuffer(__import__("json").dumps(table_meta).encode(), dtype=np.uint8)
    path = tmp_path / "lying.rqmoe"
    with open(path, "wb") as f:
        np.savez(f, **payload)
    with pytest.raises(ValueError, match="its header says"):
        faiss_rqmoe.read_index(path, device="cpu")


def _npy_member(header_shape, payload: bytes, dtype="<f4") -> bytes:
    header = {"descr": dtype, "fortran_order": False, "shape": header_shape}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + payload


def test_a_huge_declared_shape_is_refused_without_allocating(tmp_path):
    path = tmp_path / "huge.rqmoe"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("__meta_json__.npy", _npy_member((2,), b"{}  ", "|u1"))
        archive.writestr("model.codebooks.npy", _npy_member((10**12, 10**6), b"\0" * 16))
    with pytest.raises(ValueError, match="declares shape"):
        faiss_rqmoe.read_index(path, device="cpu")


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def test_pickles_are_never_run(good, tmp_path):
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    (tmp_path / "raw.rqmoe").write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(ValueError, match="pickle"):
        faiss_rqmoe.read_index(tmp_path / "raw.rqmoe")
    evil = tmp_path / "evil.rqmoe"
    evil.write_bytes(good)
    with zipfile.ZipFile(evil, "a") as archive:
        with archive.open("faiss_index.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.array([_Exploit()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="Python objects|appears twice"):
        faiss_rqmoe.read_index(evil)
    assert not os.path.exists(MARKER)


def test_zip_with_extra_or_missing_members(good, tmp_path):
    extra = tmp_path / "extra.rqmoe"
    extra.write_bytes(good)
    with zipfile.ZipFile(extra, "a") as archive:
        archive.writestr("notes.txt", "hello")
    with pytest.raises(ValueError, match="unexpected member"):
        faiss_rqmoe.read_index(extra)
    missing = tmp_path / "missing.rqmoe"
    with zipfile.ZipFile(io.BytesIO(good)) as source, zipfile.ZipFile(missing, "w") as target:
        for info in source.infolist():
            if info.filename != "model.codebooks.npy":  # present whether or not the networks are kept
                target.writestr(info, source.read(info))
    with pytest.raises(ValueError, match="header lists arrays"):
        faiss_rqmoe.read_index(missing)


def test_errors_name_the_users_path_and_the_real_cause(index, tmp_path):
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        faiss_rqmoe.read_index(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.rqmoe"):
        faiss_rqmoe.read_index(tmp_path / "nope.rqmoe")
    faiss_index = tmp_path / "plain.faissindex"
    faiss.write_index(faiss.IndexFlatL2(8), str(faiss_index))
    assert isinstance(faiss_rqmoe.read_index(faiss_index), faiss.Index)  # faiss's own files read as faiss's
    npy = tmp_path / "array.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(ValueError, match="NumPy .npy array"):
        faiss_rqmoe.read_index(npy)
    good = tmp_path / "good.rqmoe"
    faiss_rqmoe.write_index(index, good)
    with pytest.raises(ValueError, match="device must be"):
        faiss_rqmoe.read_index(good, device="tpu")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OSError) as info:
        faiss_rqmoe.write_index(index, blocker / "sub" / "index.rqmoe")
    assert str(blocker / "sub" / "index.rqmoe") in str(info.value) and ".tmp" not in str(info.value)
    for message in (str(e) for e in ()):
        assert "allow_pickle" not in message


def test_no_message_suggests_unsafe_loading(good, tmp_path):
    for data in (b"garbage" * 10, good[: len(good) // 3], pickle.dumps({"a": 1})):
        with pytest.raises(ValueError) as info:
            read_bytes(data, tmp_path)
        assert "allow_pickle" not in str(info.value)


def test_an_interrupted_write_leaves_the_previous_file(index, tmp_path, monkeypatch):
    path = tmp_path / "index.rqmoe"
    faiss_rqmoe.write_index(index, path)
    before = path.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(storage.np, "savez", broken_savez)
    with pytest.raises(KeyboardInterrupt):
        faiss_rqmoe.write_index(index, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.rqmoe"]  # no temporary file left


def test_add_is_all_or_nothing(index, sift, monkeypatch):
    before = index.ntotal
    original = type(index)._encode
    calls = {"n": 0}

    def failing_encode(self, *args, **kwargs):
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(type(index), "_encode", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        index.add(sift.xb[:100])
    monkeypatch.setattr(type(index), "_encode", original)
    assert index.ntotal == before and calls["n"] == 1
