"""Tables and merged files from benchmark results (``bench report``, ``bench merge``, ``bench plot``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

from .meta import write_result
from .speed import speed_table


def codec_table(results: List[dict]) -> str:
    """Markdown table of codec rows from one or more codec result files."""
    rows = sorted((row for r in results if r["kind"] == "codec" for row in r["rows"]),
                  key=lambda row: (row["code_bytes"], -row["mse"]))
    with_device = any("device" in row for row in rows)
    lines = ["| bytes | method | MSE | R@1 | R@10 | R@100 | train s | encode vec/s | decode vec/s |"
             + (" measured on |" if with_device else ""),
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if with_device else "")]
    for row in rows:
        lines.append(f"| {row['bytes']:g} | {row['method']} | {row['mse']:.5g} | {row['R@1']:.4f} | "
                     f"{row['R@10']:.4f} | {row['R@100']:.4f} | {row['train_s']:.1f} | "
                     f"{row['encode_vps']:.3g} | {row['decode_vps']:.3g} |"
                     + (f" {row.get('device', '')} |" if with_device else ""))
    return "\n".join(lines)


def search_table(result: dict) -> str:
    """Markdown table of a search result: every grid point of every method."""
    lines = ["| method | bytes | params | R@1 | R@10 | queries/s |", "|---|---:|---|---:|---:|---:|"]
    for name, method in result["methods"].items():
        for row in method["grid"]:
            params = ", ".join(f"{k}={row[k]}" for k in ("nprobe", "nshort", "k_factor") if k in row)
            scan = f", scan={row['scan']}" if "scan" in row else ""
            lines.append(f"| {name} | {method['bytes']} | {params}{scan} | {row['R@1']:.4f} | {row['R@10']:.4f} | "
                         f"{row['qps']:.0f} |")
    timed = [(name, row) for name, method in result["methods"].items() for row in method.get("latency", [])]
    if timed:
        lines += ["", "| method | params | one query alone, median ms | 90th percentile ms |", "|---|---|---:|---:|"]
        for name, row in timed:
            params = ", ".join(f"{k}={row[k]}" for k in ("nprobe", "nshort", "scan", "cuda_graphs") if k in row)
            lines.append(f"| {name} | {params} | {row['median_ms']:.3f} | {row['p90_ms']:.3f} |")
    return "\n".join(lines)


def merge_codec_results(results: List[dict]) -> dict:
    """One codec result from several runs on the same split (e.g. static codecs on a CPU, learned ones
    on a GPU): rows and extras concatenated, each row stamped with the device it was measured on.
    A method measured in several files at the same code size keeps the row of the last file."""
    if not results or any(r["kind"] != "codec" for r in results):
        raise ValueError("merge takes one or more codec result files")
    datasets_seen = {json.dumps(r["dataset"], sort_keys=True) for r in results}
    if len(datasets_seen) != 1:
        raise ValueError(f"cannot merge results measured on different splits: {sorted(datasets_seen)}")
    rows = {}
    merged = {"kind": "codec", "meta": [r["meta"] for r in results], "dataset": results[0]["dataset"],
              "extras": {}}
    for r in results:
        metas = r["meta"] if isinstance(r["meta"], list) else [r["meta"]]
        for row in r["rows"]:
            rows.pop((row["method"], row["code_bytes"]), None)  # the later measurement goes last
            rows[(row["method"], row["code_bytes"])] = dict(row, device=row.get("device", metas[0]["device"]))
        merged["extras"].update(r["extras"])
    merged["rows"] = list(rows.values())
    return merged


def _load_all(files) -> List[dict]:
    return [json.loads(Path(p).read_text()) for p in files]


def run_merge(args) -> None:
    write_result(merge_codec_results(_load_all(args.files)), args.out)


def run_plot(args) -> None:
    from . import plots

    for path in plots.plot_all(args.files, args.out_dir):
        print(path)


def run_report(args) -> str:
    results = _load_all(args.files)
    parts = []
    if any(r["kind"] == "codec" for r in results):
        parts.append(codec_table(results))
    parts.extend(search_table(r) for r in results if r["kind"] == "search")
    parts.extend(speed_table(r) for r in results if r["kind"] == "speed")
    text = "\n\n".join(parts)
    if args.md:
        Path(args.md).write_text(text + "\n")
    print(text)
    return text
