"""One-file storage without pickle: named numeric arrays plus a JSON header, in an uncompressed .npz.

Index files and training checkpoints are both written here. Reading never
unpickles and never trusts the file: every member is parsed by this module
(not by ``np.load``), object dtypes are refused, each array's bytes must
match its own header, the JSON table of contents and each array's SHA-256,
and nothing is allocated beyond the file's own size. Every failure is a
``FileFormatError`` (a ValueError) that names the user's path and the cause.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, Tuple, Union

import numpy as np
import torch

META_KEY = "__meta_json__"
_ZIP_MAGIC = b"PK\x03\x04"

PathOrFile = Union[str, os.PathLike, io.IOBase]


class MissingFolderError(FileNotFoundError, RuntimeError):
    """A write to a path whose folder does not exist: a FileNotFoundError, and the RuntimeError that
    ``faiss.write_index`` raises for the same path, so handlers written for either catch it."""


class FileFormatError(ValueError):
    """A file that is not, or no longer, a readable faiss_rqmoe file. ``kind`` says what it looks like."""

    def __init__(self, message: str, kind: str = "corrupted"):
        super().__init__(message)
        self.kind = kind


# ------------------------------------------------------------------ writing
def _payload(arrays: Dict[str, np.ndarray], meta: dict) -> Dict[str, np.ndarray]:
    payload, table = {}, {}
    for name, array in arrays.items():
        array = np.asarray(array)
        if not array.flags.c_contiguous:  # (np.ascontiguousarray would turn 0-d arrays into 1-d ones)
            array = array.copy(order="C")
        if array.dtype.hasobject:
            raise TypeError(f"array {name!r} has dtype {array.dtype}; only numeric arrays can be stored")
        if name == META_KEY or not name or "/" in name:
            raise ValueError(f"{name!r} cannot name a stored array")
        payload[name] = array
        table[name] = {"dtype": array.dtype.str, "shape": list(array.shape),
                       "sha256": hashlib.sha256(array.tobytes()).hexdigest()}
    try:
        header = json.dumps(dict(meta, arrays=table)).encode("utf-8")
    except TypeError as exc:
        raise TypeError(f"the file header must be JSON: {exc}") from None
    payload[META_KEY] = np.frombuffer(header, dtype=np.uint8)
    return payload


def save_arrays(target: PathOrFile, arrays: Dict[str, np.ndarray], meta: dict, make_parents: bool = True) -> None:
    """Write numeric arrays and a JSON-serialisable ``meta`` dict to one file (or binary file object).

    arrays: name -> numpy array of a numeric dtype. make_parents: create
    missing folders of a path (False: a ``MissingFolderError``, as
    ``faiss.write_index`` refuses such a path). A path is written
    atomically: the bytes go to a temporary file beside it, which is synced
    and renamed over ``target``, so an interrupted write leaves the previous
    file intact. OS errors name ``target``, never the temporary file.
    """
    payload = _payload(arrays, meta)
    if not isinstance(target, (str, os.PathLike)):
        np.savez(target, **payload)
        return
    path = Path(target)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a directory; give a file name")
    if not make_parents and not path.parent.is_dir():
        raise MissingFolderError(errno.ENOENT, f"could not open {path} for writing: no such folder {path.parent}")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would have made it: mkstemp's files are private (0600)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise type(exc)(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


# ------------------------------------------------------------------ reading
def sniff(head: bytes) -> Tuple[str, str]:
    """What the first bytes of a file look like: (kind, description).

    kind: 'npz' (ours or numpy's), 'faiss' (a faiss index: a four-letter tag), 'pickle', 'npy',
    'empty', 'text' or 'unknown'.
    """
    if not head:
        return "empty", "an empty file"
    if head.startswith(_ZIP_MAGIC):
        return "npz", "a zip archive"
    if head.startswith(b"\x93NUMPY"):
        return "npy", "a single NumPy .npy array"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return "pickle", "a Python pickle (faiss_rqmoe never reads pickles)"
    if len(head) >= 4 and all(65 <= c <= 90 or 97 <= c <= 122 or 48 <= c <= 57 for c in head[:4]):
        return "faiss", f"a faiss index (tag {head[:4].decode('ascii')!r}): use faiss.read_index"
    try:
        head.decode("utf-8")
        return "text", "a text file"
    except UnicodeDecodeError:
        return "unknown", f"unknown binary data (starts with {head[:8].hex()})"


def is_package_file(source: PathOrFile) -> bool:
    """Whether ``source`` (a path or a seekable binary file object) is an archive with this module's
    header, i.e. a file ``save_arrays`` wrote (checked or not). False for anything else, unreadable or
    missing paths included; never raises."""
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                return is_package_file(f)
        start = source.tell()
        try:
            if sniff(source.read(8))[0] != "npz":
                return False
            source.seek(start)
            with zipfile.ZipFile(source) as archive:
                return f"{META_KEY}.npy" in archive.namelist()
        finally:
            source.seek(start)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return False


def _open_source(source: PathOrFile, what: str):
    """(binary file object, its size, label). Missing paths, directories and permissions raise with the path."""
    if not isinstance(source, (str, os.PathLike)):
        start = source.tell()
        size = source.seek(0, io.SEEK_END) - start
        source.seek(start)
        return source, size, "<file object>"
    path = Path(source)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not {what}")
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        f = open(path, "rb")
    except PermissionError as exc:
        raise PermissionError(exc.errno, f"cannot read {path}: permission denied") from None
    return f, path.stat().st_size, str(path)


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, label: str) -> np.ndarray:
    name = info.filename[:-len(".npy")]
    if info.compress_type != zipfile.ZIP_STORED or info.file_size > limit:
        raise FileFormatError(f"{label} is corrupted: member {info.filename!r} is compressed or larger "
                              "than the file")
    try:
        data = archive.read(info)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise FileFormatError(f"{label} is truncated or corrupted: member {info.filename!r}: {exc}") from None
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buffer)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buffer)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, SyntaxError, TypeError, EOFError) as exc:
        raise FileFormatError(f"{label} is corrupted: array {name!r} has a bad header: {exc}") from None
    if dtype.hasobject:
        raise FileFormatError(f"{label} is not a faiss_rqmoe file: array {name!r} holds Python objects "
                              f"(dtype {dtype}), which this format never stores; nothing was unpickled")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count < 0 or count * dtype.itemsize != len(data) - buffer.tell():
        raise FileFormatError(f"{label} is corrupted: array {name!r} declares shape {shape} of {dtype} "
                              f"({count * dtype.itemsize} bytes) but holds {len(data) - buffer.tell()} bytes")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=buffer.tell())
    return array.reshape(shape, order="F" if fortran else "C").copy()


def load_arrays(source: PathOrFile, what: str = "a faiss_rqmoe file") -> Tuple[Dict[str, np.ndarray], dict]:
    """Read a file written by ``save_arrays``: returns (arrays, meta).

    source: a path or a binary file object. Raises FileNotFoundError,
    IsADirectoryError or PermissionError naming the path, and
    ``FileFormatError`` (a ValueError) for a file that is truncated,
    corrupted or of another kind (its ``kind`` says which, e.g. 'faiss').
    """
    f, size, label = _open_source(source, what)
    try:
        head = f.read(8)
        f.seek(-len(head), io.SEEK_CUR)
        kind, description = sniff(head)
        if kind != "npz":
            raise FileFormatError(f"{label} is not {what}: it looks like {description}", kind=kind)
        try:
            archive = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
            raise FileFormatError(f"{label} is truncated or corrupted (not a complete archive): {exc}") from None
        arrays = {}
        with archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy") or "/" in info.filename:
                    raise FileFormatError(f"{label} is not {what}: unexpected member {info.filename!r}")
                name = info.filename[:-len(".npy")]
                if name in arrays:
                    raise FileFormatError(f"{label} is corrupted: member {info.filename!r} appears twice")
                arrays[name] = _read_member(archive, info, size, label)
    finally:
        if f is not source:
            f.close()
    if META_KEY not in arrays:
        raise FileFormatError(f"{label} is not {what}: it has no faiss_rqmoe header (a plain NumPy .npz?)",
                              kind="npz")
    try:
        meta = json.loads(arrays.pop(META_KEY).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise FileFormatError(f"{label} has a corrupted header: {exc}") from None
    if not isinstance(meta, dict):
        raise FileFormatError(f"{label} has a corrupted header: expected a JSON object")
    _check_table(arrays, meta.pop("arrays", None), label)
    return arrays, meta


def _check_table(arrays: Dict[str, np.ndarray], table, label: str) -> None:
    """The header's table of contents must describe exactly the arrays present, byte for byte."""
    if table is None:  # files written before the table existed
        return
    if not isinstance(table, dict) or set(table) != set(arrays):
        listed = sorted(table) if isinstance(table, dict) else table
        raise FileFormatError(f"{label} is corrupted: its header lists arrays {listed}, the file holds "
                              f"{sorted(arrays)}")
    for name, array in arrays.items():
        entry = table[name]
        if not isinstance(entry, dict) or entry.get("dtype") != array.dtype.str \
                or entry.get("shape") != list(array.shape):
            raise FileFormatError(f"{label} is corrupted: array {name!r} is {array.dtype.str} {list(array.shape)}, "
                                  f"its header says {entry}")
        if entry.get("sha256") != hashlib.sha256(array.tobytes()).hexdigest():
            raise FileFormatError(f"{label} is corrupted: array {name!r} does not match its checksum")


# --------------------------------------------------------------- state dicts
def state_to_arrays(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, np.ndarray]:
    """A module's state dict as named numpy arrays '<prefix><key>' (host copies)."""
    return {prefix + key: value.detach().cpu().numpy() for key, value in state.items()}


def arrays_to_state(arrays: Dict[str, np.ndarray], prefix: str, expected: Dict[str, torch.Tensor],
                    label: str) -> Dict[str, torch.Tensor]:
    """The entries '<prefix><key>' of ``arrays`` as a state dict matching ``expected`` exactly.

    Missing, extra, wrongly typed or wrongly shaped entries raise FileFormatError naming them:
    ``load_state_dict`` would otherwise cast dtypes silently.
    """
    found = {name[len(prefix):]: array for name, array in arrays.items() if name.startswith(prefix)}
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise FileFormatError(f"{label} is corrupted: weights {prefix}* missing {missing}, unexpected {extra}")
    state = {}
    for key, reference in expected.items():
        tensor = torch.from_numpy(found[key])
        if tensor.dtype != reference.dtype or tuple(tensor.shape) != tuple(reference.shape):
            raise FileFormatError(f"{label} is corrupted: {prefix}{key} is {tensor.dtype} {tuple(tensor.shape)}, "
                                  f"expected {reference.dtype} {tuple(reference.shape)}")
        state[key] = tensor
    return state
