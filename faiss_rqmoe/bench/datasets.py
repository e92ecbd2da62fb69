"""Vector files, the built-in real SIFT data sets, fixed splits and exact ground truth.

Nothing here downloads: the default set is SIFT computed with OpenCV on the
photos scikit-image ships in its wheel; the "wallpaper" set on the photos
of Debian's wallpaper packages. Both are cached as .npy under ``cache_dir()``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from .splits import Dataset, cache_dir, ground_truth, split  # noqa: F401  (this module's names too)
from .textset import load_text

logger = logging.getLogger(__name__)

DEFAULT_NAME = "sift_skimage_v1"
WALLPAPER_NAME = "sift_wallpaper_v1"
SHUFFLE_SEED = 20260514
WALLPAPER_PACKAGES = ("plasma-workspace-wallpapers", "mate-backgrounds", "ukui-wallpapers", "gnome-backgrounds",
                      "lomiri-wallpapers", "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04")
DATA_EXTRA_HINT = 'pip install "faiss_rqmoe[data]"'


# ------------------------------------------------------------------ file formats
def _read_vecs(path, dtype) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    raw = np.fromfile(path, dtype=np.uint8)
    item = np.dtype(dtype).itemsize
    if raw.size < 4:
        raise ValueError(f"{path} is empty or truncated: no dimension header")
    d = int(raw[:4].view(np.int32)[0])
    row_bytes = 4 + d * item
    if d <= 0 or raw.size % row_bytes:
        raise ValueError(f"{path} is not a valid {path.suffix} file: {raw.size} bytes is not a multiple of "
                         f"the row size {row_bytes} implied by d={d}")
    rows = raw.reshape(-1, row_bytes)
    if not (rows[:, :4].copy().view(np.int32)[:, 0] == d).all():
        raise ValueError(f"{path} is corrupted: rows disagree on the dimension (first row says d={d})")
    return np.ascontiguousarray(rows[:, 4:]).view(dtype)


def read_fvecs(path) -> np.ndarray:
    """Read a TEXMEX .fvecs file: returns (n, d) float32."""
    return _read_vecs(path, np.float32)


def read_bvecs(path) -> np.ndarray:
    """Read a TEXMEX .bvecs file: returns (n, d) uint8."""
    return _read_vecs(path, np.uint8)


def read_ivecs(path) -> np.ndarray:
    """Read a TEXMEX .ivecs file: returns (n, d) int32."""
    return _read_vecs(path, np.int32)


def _write_vecs(path, x: np.ndarray, dtype) -> None:
    x = np.ascontiguousarray(x, dtype=dtype)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {x.shape}")
    header = np.full((x.shape[0], 1), x.shape[1], dtype=np.int32).view(np.uint8)
    np.hstack([header, x.view(np.uint8).reshape(x.shape[0], -1)]).tofile(path)


def write_fvecs(path, x: np.ndarray) -> None:
    """Write (n, d) float32 as .fvecs."""
    _write_vecs(path, x, np.float32)


def write_bvecs(path, x: np.ndarray) -> None:
    """Write (n, d) uint8 as .bvecs."""
    _write_vecs(path, x, np.uint8)


def write_ivecs(path, x: np.ndarray) -> None:
    """Write (n, d) int32 as .ivecs."""
    _write_vecs(path, x, np.int32)


def load_vectors(path) -> np.ndarray:
    """Read .npy, .fvecs, .bvecs or .ivecs by suffix: returns the (n, d) array as stored."""
    path = Path(path)
    readers = {".fvecs": read_fvecs, ".bvecs": read_bvecs, ".ivecs": read_ivecs}
    if path.suffix == ".npy":
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        return np.load(path, allow_pickle=False)
    if path.suffix not in readers:
        raise ValueError(f"{path}: unknown vector file suffix {path.suffix!r}; expected .npy, .fvecs, .bvecs "
                         f"or .ivecs")
    return readers[path.suffix](path)


# ------------------------------------------------------------------ SIFT
def _cv2():
    try:
        import cv2
    except ImportError as exc:
        raise ImportError(f"the SIFT data sets need OpenCV: {DATA_EXTRA_HINT}") from exc
    return cv2


def sift_descriptors(image_paths: Sequence, scales: Sequence[int] = (1,), progress: bool = True) -> np.ndarray:
    """SIFT descriptors (contrastThreshold=0) of grayscale images at integer scales, rounded.

    image_paths: image files; scales: upsampling factors (bicubic).
    Returns (n, 128) uint8, in image then scale order (deterministic).
    """
    from tqdm.auto import tqdm

    cv2 = _cv2()
    sift = cv2.SIFT_create(contrastThreshold=0)
    parts = []
    for path in tqdm(list(image_paths), desc="SIFT", unit="image", disable=not progress):
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise ValueError(f"cannot read image {path}")
        for scale in scales:
            scaled = image if scale == 1 else cv2.resize(image, None, fx=scale, fy=scale,
                                                         interpolation=cv2.INTER_CUBIC)
            _, desc = sift.detectAndCompute(scaled, None)
            if desc is not None:
                parts.append(np.clip(np.rint(desc), 0, 255).astype(np.uint8))
    return np.concatenate(parts) if parts else np.empty((0, 128), np.uint8)


def skimage_image_paths() -> List[Path]:
    """The sample photos inside scikit-image's wheel (skimage/data/*.png, *.jpg), sorted by name."""
    try:
        import skimage.data
    except ImportError as exc:
        raise ImportError(f"the default data set needs scikit-image: {DATA_EXTRA_HINT}") from exc
    folder = Path(skimage.data.__file__).parent
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg")), key=lambda p: p.name)


def unique_rows(x: np.ndarray) -> np.ndarray:
    """Distinct rows of x (n, d) uint8, in lexicographic (unsigned byte) order: (n_unique, d) uint8.

    Same result as np.unique(x, axis=0) for uint8, about 10x faster (rows compared as raw bytes).
    """
    x = np.ascontiguousarray(x, dtype=np.uint8)
    as_bytes = x.view(np.dtype((np.void, x.shape[1]))).ravel()
    return np.unique(as_bytes).view(np.uint8).reshape(-1, x.shape[1])


def _dedup_shuffle(x: np.ndarray) -> np.ndarray:
    # the shuffle starts from the sorted unique rows, so the result does not depend on image order
    unique = unique_rows(x)
    return unique[np.random.default_rng(SHUFFLE_SEED).permutation(len(unique))]


def _build_sift_set(image_paths: Sequence, scales: Sequence[int], progress: bool):
    raw = sift_descriptors(image_paths, scales=scales, progress=progress)
    data = _dedup_shuffle(raw)
    info = {"n_images": len(image_paths), "scales": list(scales), "n_descriptors": len(raw),
            "n_unique": len(data)}
    return data, info


def _cached(name: str, build) -> np.ndarray:
    """Load cache_dir()/name.npy, building it first with build() -> (data, info dict) when absent;
    info goes to name.json with the build time and library versions (see build_info)."""
    path = cache_dir() / f"{name}.npy"
    if not path.exists():
        start = time.perf_counter()
        data, info = build()
        info = {"name": name, "shape": list(data.shape), **info,
                "build_s": round(time.perf_counter() - start, 1), "versions": _versions()}
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, data)
        os.replace(tmp, path)
        path.with_suffix(".json").write_text(json.dumps(info, indent=1))
        logger.info("built %s: %s", path, info)
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _versions() -> dict:
    versions = {"numpy": np.__version__}
    try:
        import cv2
        versions["opencv"] = cv2.__version__
    except ImportError:
        pass
    return versions


def build_info(name: str) -> Optional[dict]:
    """What was recorded when the cached set `name` was built (counts, build_s, versions), or None."""
    path = cache_dir() / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def default_descriptors(progress: bool = True) -> np.ndarray:
    """The default real set: SIFT on scikit-image's photos at 1x and 2x, deduplicated, shuffled.

    Built once and cached (``build_info`` records the counts and time of the build). Returns (n, 128) uint8
    (memory-mapped).
    OpenCV picks SIMD code paths by CPU, and its SIFT output differs between them: the same
    versions built 734 915 rows on an AVX2 and on an AVX-512 machine, with different values.
    To compare numbers across machines, build on one and copy the cache, or pin the dispatch
    with the environment variable ``OPENCV_CPU_DISABLE`` (e.g. the AVX-512 features) before
    cv2 is imported.
    """
    return _cached(DEFAULT_NAME, lambda: _build_sift_set(skimage_image_paths(), (1, 2), progress))


def _package_installed(name: str) -> bool:
    if shutil.which("dpkg-query") is None:
        return False
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", name], capture_output=True, text=True)
    return result.returncode == 0 and "install ok installed" in result.stdout


def wallpaper_image_paths() -> List[Path]:
    """Photos of Debian's wallpaper packages: *.jpg, *.png under /usr/share/wallpapers/*/contents/images
    and /usr/share/backgrounds, recursively, each file once (symbolic links resolved), sorted.

    Raises RuntimeError naming the `apt-get install` line when packages are missing.
    """
    missing = [p for p in WALLPAPER_PACKAGES if not _package_installed(p)]
    if missing:
        raise RuntimeError("the wallpaper data set needs Debian packages that are not installed; run:\n"
                           f"    apt-get install -y {' '.join(missing)}")
    roots = list(Path("/usr/share/wallpapers").glob("*/contents/images")) + [Path("/usr/share/backgrounds")]
    paths = {p.resolve() for root in roots if root.is_dir() for p in root.rglob("*")
             if p.suffix.lower() in (".jpg", ".png") and p.is_file()}
    if not paths:
        raise RuntimeError("no wallpaper images found under /usr/share/wallpapers or /usr/share/backgrounds; run:\n"
                           f"    apt-get install -y {' '.join(WALLPAPER_PACKAGES)}")
    return sorted(paths)


def wallpaper_descriptors(progress: bool = True) -> np.ndarray:
    """The wallpaper set: SIFT at 1x on Debian's wallpapers, deduplicated, shuffled, cached: (n, 128) uint8.

    On Debian 12 with OpenCV 5.0: 100 distinct image files, 8 461 442 descriptors, 8 385 691 unique; the
    build takes minutes, not seconds (build_info(WALLPAPER_NAME) records the counts and time of yours).
    """
    return _cached(WALLPAPER_NAME, lambda: _build_sift_set(wallpaper_image_paths(), (1,), progress))


def load_default(n_train: Optional[int] = None, n_val: int = 10_000, n_db: int = 500_000,
                 n_query: int = 10_000, progress: bool = True) -> Dataset:
    """The default SIFT set (scikit-image photos), split, with cached 100-NN ground truth."""
    return split(DEFAULT_NAME, default_descriptors(progress), n_train, n_val, n_db, n_query, cache_gt=True)


def load_small(n_train: int = 20_000, n_val: int = 2_000, n_db: int = 20_000, n_query: int = 500) -> Dataset:
    """A small split of the default SIFT set for tests and the quick demo (seconds once cached)."""
    return split(DEFAULT_NAME, default_descriptors(), n_train, n_val, n_db, n_query, cache_gt=True)


def load_wallpaper(n_train: int = 1_000_000, n_val: int = 10_000, n_db: int = 1_000_000,
                   n_query: int = 10_000, progress: bool = True) -> Dataset:
    """The wallpaper SIFT set (Debian wallpaper packages), split, with cached 100-NN ground truth."""
    return split(WALLPAPER_NAME, wallpaper_descriptors(progress), n_train, n_val, n_db, n_query, cache_gt=True)


def load_dataset(name_or_path: str, gt_path=None, **split_sizes) -> Dataset:
    """'default', 'small', 'wallpaper', 'text', a split written by export_split (.npz), or a vector file
    (.npy/.fvecs/.bvecs) split like the built-in sets (queries = first n_query rows, database = next
    n_db rows; gt_path, if given, must refer to those).

    split_sizes: n_train, n_val, n_db, n_query (for an .npz: at most the stored sizes).
    """
    loaders = {"default": load_default, "small": load_small, "wallpaper": load_wallpaper, "text": load_text}
    if name_or_path in loaders:
        return loaders[name_or_path](**split_sizes)
    if Path(name_or_path).suffix == ".npz":
        if gt_path is not None:
            raise ValueError(f"{name_or_path}: an exported split carries its own ground truth; gt_path must be None")
        return load_exported(name_or_path, **split_sizes)
    data = load_vectors(name_or_path)
    gt = None if gt_path is None else load_vectors(gt_path).astype(np.int64)
    sizes = {"n_train": None, "n_val": 10_000, "n_db": 100_000, "n_query": 1_000}
    sizes.update(split_sizes)
    return split(Path(name_or_path).stem, data, gt=gt, **sizes)


# ------------------------------------------------------------------ exported splits
EXPORT_FORMAT = "faiss_rqmoe.split"
EXPORT_VERSION = 1
_PARTS = ("xt", "xval", "xb", "xq")


def _head(n: Optional[int], available: int, what: str) -> int:
    if n is None:
        return available
    if not 0 <= n <= available:
        raise ValueError(f"{what}={n} is out of range: the split has {available}")
    return n


def export_split(ds: Dataset, path, n_train: Optional[int] = None, n_val: Optional[int] = None,
                 n_db: Optional[int] = None, n_query: Optional[int] = None, k_gt: int = 100,
                 name: Optional[str] = None, float16: bool = False) -> Path:
    """Write a (reduced) split to one compressed .npz (np.savez_compressed, no pickle) for load_exported.

    Keeps the first n_* rows of each part of ds (None: all). Rows are stored as uint8 when every value
    is an integer in 0..255 (SIFT), else as float32, or as float16 with ``float16=True`` (half the
    bytes, for moving a float set between machines: every value is rounded to 11 significant bits, and
    the (L2, as for the named sets) ground truth is recomputed on the rounded rows; values past
    float16's range raise ValueError). The ground truth is stored as (n_query, k_gt)
    int32, recomputed with faiss when the database is cut. Returns the path written.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: the file name must end in .npz")
    n_train = _head(n_train, len(ds.xt), "n_train")
    n_val = _head(n_val, len(ds.xval), "n_val")
    n_db = _head(n_db, len(ds.xb), "n_db")
    n_query = _head(n_query, len(ds.xq), "n_query")
    if min(n_train, n_db, n_query) <= 0:
        raise ValueError(f"n_train={n_train}, n_db={n_db} and n_query={n_query} must be positive")
    if n_db >= 2**31:
        raise ValueError(f"n_db={n_db} does not fit the int32 ground truth")
    parts = {"xt": ds.xt[:n_train], "xval": ds.xval[:n_val], "xb": ds.xb[:n_db], "xq": ds.xq[:n_query]}
    as_bytes = all(np.array_equal(a, np.clip(np.rint(a), 0, 255)) for a in parts.values())
    dtype = np.uint8 if as_bytes else np.float16 if float16 else np.float32
    if dtype == np.float16:
        largest, limit = max(float(np.abs(a).max(initial=0)) for a in parts.values()), float(np.finfo(np.float16).max)
        if not largest <= limit:
            raise ValueError(f"float16=True: the rows reach {largest:.4g}, past float16's largest value "
                             f"{limit:.0f}; export them as float32 (float16=False)")
    parts = {key: np.ascontiguousarray(a, dtype=dtype) for key, a in parts.items()}
    k_gt = min(k_gt, n_db)
    # the split's own ground truth holds for the rows as stored unless the database is cut or rounded
    if dtype != np.float16 and n_db == len(ds.xb) and ds.gt.shape[1] >= k_gt:
        gt = ds.gt[:n_query, :k_gt]
    else:
        gt = ground_truth(parts["xb"], parts["xq"], k_gt)
    meta = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "name": name or ds.name, "dtype": np.dtype(dtype).name,
            "metric": ds.metric,
            "n_train": n_train, "n_val": n_val, "n_db": n_db, "n_query": n_query, "k_gt": k_gt,
            "source": {"name": ds.name, "n_train": len(ds.xt), "n_val": len(ds.xval), "n_db": len(ds.xb),
                       "n_query": len(ds.xq)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    try:
        np.savez_compressed(tmp, meta=np.array(json.dumps(meta)), gt=gt.astype(np.int32), **parts)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_exported(path, n_train: Optional[int] = None, n_val: Optional[int] = None, n_db: Optional[int] = None,
                  n_query: Optional[int] = None) -> Dataset:
    """Read a split written by export_split: a Dataset with float32 parts and (n_query, k_gt) int64 ground truth.

    n_*: keep only the first rows of a part (at most the stored sizes); a smaller n_db recomputes the
    ground truth with faiss.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with np.load(path, allow_pickle=False) as npz:
        missing = {"meta", "gt", *_PARTS} - set(npz.files)
        if missing:
            raise ValueError(f"{path} is not an exported split: missing arrays {sorted(missing)}")
        meta = json.loads(str(npz["meta"]))
        if meta.get("format") != EXPORT_FORMAT or meta.get("version") != EXPORT_VERSION:
            raise ValueError(f"{path}: unsupported format {meta.get('format')!r} version {meta.get('version')!r}, "
                             f"expected {EXPORT_FORMAT!r} version {EXPORT_VERSION}")
        stored = {key: npz[key] for key in _PARTS}
        gt = npz["gt"]
    sizes = {"xt": n_train, "xval": n_val, "xb": n_db, "xq": n_query}
    names = {"xt": "n_train", "xval": "n_val", "xb": "n_db", "xq": "n_query"}
    parts = {key: np.ascontiguousarray(stored[key][:_head(sizes[key], len(stored[key]), names[key])],
                                       dtype=np.float32) for key in _PARTS}
    if len(parts["xb"]) < len(stored["xb"]):
        gt = ground_truth(parts["xb"], parts["xq"], gt.shape[1])
    return Dataset(meta["name"], parts["xt"], parts["xval"], parts["xb"], parts["xq"],
                   np.ascontiguousarray(gt[:len(parts["xq"])], dtype=np.int64), meta.get("metric", "l2"))
