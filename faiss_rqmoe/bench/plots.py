"""PNG figures of benchmark results (the JSON files that ``python -m faiss_rqmoe.bench`` writes).

matplotlib is imported inside the functions (``pip install "faiss_rqmoe[plot]"``). Figures are drawn
on matplotlib's Agg canvas through ``matplotlib.figure.Figure``, never through pyplot, so they need
no display and leave the caller's backend and pyplot state alone.

Result dicts, as loaded from JSON:
- ``kind == "codec"``: ``rows`` (dicts with ``method``, ``code_bytes``, ``mse``) and ``extras``
  (``"{method}@{bytes}"`` -> ``{"mse_per_step": [M floats], "history": {"time_s", "val_mse",
  "init_val_mse", ...}}``) for the learned codecs;
- ``kind == "search"``: ``methods`` (name -> ``{"grid": [{"nprobe", "nshort"?, "R@1", "R@10",
  "qps"}, ...]}``);
- ``kind == "speed"``: ``rows`` (dicts with ``method``, ``device``, ``kernel``?, ``precision``?,
  ``batch``, ``decode_vps``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

PLOT_EXTRA_HINT = 'pip install "faiss_rqmoe[plot]"'


def _figure(n_panels: int = 1, panel_size: Tuple[float, float] = (6.0, 4.2)):
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(f"the plots need matplotlib: {PLOT_EXTRA_HINT}") from exc
    fig = Figure(figsize=(panel_size[0] * n_panels, panel_size[1]), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, list(axes)


def _save(fig, path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: the figure file name must end in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _check_kind(result, kind: str) -> None:
    if not isinstance(result, dict):
        raise TypeError(f"result must be a dict loaded from a benchmark JSON file, got {type(result).__name__}")
    if result.get("kind") != kind:
        raise ValueError(f"expected a {kind!r} result, got kind={result.get('kind')!r}")


def _split_key(key: str) -> Tuple[str, int]:
    method, sep, n_bytes = key.rpartition("@")
    if not sep or not n_bytes.isdigit():
        raise ValueError(f"extras key {key!r} is not of the form 'method@bytes'")
    return method, int(n_bytes)


def _title(result: dict, what: str) -> str:
    dataset = result.get("dataset", {})
    metas = result.get("meta", {})
    metas = metas if isinstance(metas, list) else [metas]  # merged results keep every run's meta
    device = " + ".join(dict.fromkeys(m["device"] for m in metas if m.get("device")))
    parts = [what]
    if dataset.get("name"):
        parts.append(f"{dataset['name']} (n_db={dataset.get('n_db', '?')})")
    if device:
        parts.append(device)
    return "\n".join(parts)  # one line each: a single line overflows the figure


def plot_mse_per_step(result: dict, path) -> Path:
    """MSE of the partial reconstruction after each step for every learned codec, one panel a code size;
    static codecs of the same size are dashed horizontal lines at their final MSE. Returns path (.png)."""
    _check_kind(result, "codec")
    curves: Dict[int, List[Tuple[str, List[float]]]] = {}
    for key, extras in result.get("extras", {}).items():
        if extras.get("mse_per_step"):
            method, n_bytes = _split_key(key)
            curves.setdefault(n_bytes, []).append((method, [float(v) for v in extras["mse_per_step"]]))
    if not curves:
        raise ValueError("the result has no 'mse_per_step' in its extras: no learned codec to plot")
    sizes = sorted(curves)
    fig, axes = _figure(len(sizes))
    for ax, n_bytes in zip(axes, sizes):
        learned = {method for method, _ in curves[n_bytes]}
        for method, values in curves[n_bytes]:
            ax.plot(range(1, len(values) + 1), values, marker="o", label=method)
        static = [row for row in result.get("rows", [])
                  if row.get("code_bytes") == n_bytes and row["method"] not in learned]
        for i, row in enumerate(sorted(static, key=lambda row: -row["mse"]), start=len(curves[n_bytes])):
            ax.axhline(row["mse"], linestyle="--", linewidth=1, color=f"C{i % 10}",
                       label=f"{row['method']} (final)")
        ax.set_yscale("log")
        ax.set_xticks(range(1, max(len(values) for _, values in curves[n_bytes]) + 1))
        ax.set_xlabel("quantization step m")
        ax.set_ylabel("MSE of the reconstruction after step m")
        ax.set_title(f"{n_bytes} bytes a vector")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(_title(result, "MSE per quantization step"))
    return _save(fig, path)


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """The (recall, qps) points that no other point beats on both, sorted by recall ascending."""
    front, best_qps = [], float("-inf")
    for recall, qps in sorted(points, key=lambda p: (-p[0], -p[1])):
        if qps > best_qps:
            front.append((recall, qps))
            best_qps = qps
    return front[::-1]


def _method_label(name: str, method: dict) -> str:
    """A search method's legend entry: its name, bytes stored a vector and where it ran, where known."""
    device = str(method.get("device", ""))
    where = "CPU" if device == "cpu" else "GPU" if device.startswith("cuda") else ""
    details = [d for d in (f"{method['bytes']} B" if "bytes" in method else "", where) if d]
    return f"{name} ({', '.join(details)})" if details else name


def plot_recall_qps(result: dict, path, recall_key: str = "R@1") -> Path:
    """recall_key (default recall@1) vs queries a second over the search grid: every grid point faint,
    the Pareto front of each method as a line, qps on a log scale. Returns path (.png)."""
    _check_kind(result, "search")
    methods = result.get("methods", {})
    if not methods:
        raise ValueError("the result has no 'methods' to plot")
    fig, (ax,) = _figure()
    for name, method in methods.items():
        points = [(float(row[recall_key]), float(row["qps"])) for row in method.get("grid", [])
                  if recall_key in row and row.get("qps", 0) > 0]
        if not points:
            continue
        front = pareto_front(points)
        line, = ax.plot([p[0] for p in front], [p[1] for p in front], marker="o", label=_method_label(name, method))
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=10, alpha=0.3, color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel(recall_key.replace("R@", "recall@"))
    ax.set_ylabel("queries a second")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(_title(result, f"{recall_key.replace('R@', 'recall@')} vs speed (Pareto front)"), fontsize="medium")
    return _save(fig, path)


def plot_training_curves(result: dict, path) -> Path:
    """Validation MSE vs training time (s) of every learned codec, starting at its value before
    training (time 0). Returns path (.png)."""
    _check_kind(result, "codec")
    fig, (ax,) = _figure()
    drawn = 0
    for key, extras in result.get("extras", {}).items():
        history = extras.get("history")
        if not history or not history.get("time_s"):
            continue
        if len(history["time_s"]) != len(history["val_mse"]):
            raise ValueError(f"{key}: history has {len(history['time_s'])} times but "
                             f"{len(history['val_mse'])} validation MSEs")
        times = [0.0] + [float(t) for t in history["time_s"]]
        values = [float(history.get("init_val_mse", float("nan")))] + [float(v) for v in history["val_mse"]]
        ax.plot(times, values, marker=".", label=key.replace("@", ", ") + " bytes")
        drawn += 1
    if not drawn:
        raise ValueError("the result has no training 'history' in its extras")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation MSE")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(_title(result, "training curve"), fontsize="medium")
    return _save(fig, path)


def plot_speed(result: dict, path) -> Path:
    """Decode vectors a second against batch size, one line per method and execution strategy, one
    panel a device (log-log). Returns path (.png)."""
    _check_kind(result, "speed")
    lines: Dict[str, Dict[str, List[Tuple[int, float]]]] = {}
    for row in result.get("rows", []):
        label = " ".join(filter(None, [row["method"], row.get("kernel"), row.get("precision")]))
        lines.setdefault(row["device"], {}).setdefault(label, []).append((int(row["batch"]), float(row["decode_vps"])))
    if not lines:
        raise ValueError("the result has no speed rows to plot")
    fig, axes = _figure(len(lines))  # raises the install hint without matplotlib
    import matplotlib

    colours = matplotlib.colormaps["tab20"].colors  # 10 default colours repeat on the larger tables
    for ax, (device, by_label) in zip(axes, sorted(lines.items())):
        for i, (label, points) in enumerate(sorted(by_label.items())):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="os^D"[i // 20 % 4],
                    color=colours[i % 20], label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("batch (vectors decoded together)")
        ax.set_ylabel("decoded vectors a second")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="x-small")
        ax.set_title(_title(result, f"decode speed on {device}"), fontsize="medium")
    return _save(fig, path)


def _load(path) -> dict:
    path = Path(path)
    with open(path) as f:
        result = json.load(f)
    if not isinstance(result, dict) or "kind" not in result:
        raise ValueError(f"{path} is not a benchmark result: no 'kind'")
    return result


def plot_all(result_paths: Iterable, out_dir) -> List[Path]:
    """Every figure that each benchmark result file supports, as out_dir/<file stem>_<figure>.png.

    codec results: _mse_per_step.png (when learned codecs were run) and _training.png (when they
    have a history); search results: _recall_qps.png. Returns the paths written.
    """
    out_dir = Path(out_dir)
    written = []
    for result_path in result_paths:
        result, stem = _load(result_path), Path(result_path).stem
        if result["kind"] == "codec":
            extras = result.get("extras", {}).values()
            if any(e.get("mse_per_step") for e in extras):
                written.append(plot_mse_per_step(result, out_dir / f"{stem}_mse_per_step.png"))
            if any((e.get("history") or {}).get("time_s") for e in extras):
                written.append(plot_training_curves(result, out_dir / f"{stem}_training.png"))
        elif result["kind"] == "search":
            written.append(plot_recall_qps(result, out_dir / f"{stem}_recall_qps.png"))
        elif result["kind"] == "speed":
            written.append(plot_speed(result, out_dir / f"{stem}_speed.png"))
        elif result["kind"] != "build":
            raise ValueError(f"{result_path}: unknown result kind {result['kind']!r}; expected 'codec', 'search', "
                             "'speed' or 'build'")
    return written
