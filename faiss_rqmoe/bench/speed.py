"""``bench speed``: decode, encode and training throughput of the codec, by batch size and execution
strategy, on CPU and GPU, beside the public QINCo1 and RQ-MoE reference code when they are given.

Weights are random (speed does not depend on their values), moved off the
identity so that every expert and the gate compute something. Rows:
method, device, kernel, precision, batch, decode_vps (parallel; small CUDA
batches replay a CUDA graph), decode_eager_vps (the same without graphs),
decode_seq_vps, encode_vps {greedy16, beam4x16, exact} and train_sps (on
CUDA also at batch 4 096, and both replayed from CUDA graphs:
train_sps_graphed, train_sps_bs4096_graphed).
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .. import graphs
from ..config import RQMoEConfig
from ..devices import resolve_device
from ..engine import Engine, Execution
from ..model import RQMoE
from ..train import TrainConfig, make_optimizer, train_step
from ..train_graph import WARMUP_STEPS, GraphedTrainStep, graphable
from .meta import run_meta, sync, timed, write_result

logger = logging.getLogger("faiss_rqmoe.bench")

METHODS = {  # name -> RQMoEConfig fields besides d, M, nbits
    "RQ-MoE": dict(condition="instruction", n_experts=4, n_layers=2, hidden=256),
    "QINCo-style": dict(condition="reconstruction", n_experts=4, n_layers=2, hidden=256),
    "QINCo1-shape": dict(condition="reconstruction", n_experts=1, n_layers=2, hidden=256),
    "RQ-MoE top-1": dict(condition="instruction", n_experts=4, n_layers=2, hidden=256, routing="top1"),
    "QINCo-style top-1": dict(condition="reconstruction", n_experts=4, n_layers=2, hidden=256, routing="top1"),
}
ENCODINGS = {"greedy16": (16, 1), "beam4x16": (16, 4), "exact": (None, 1)}


def random_model(config: RQMoEConfig, device: torch.device, seed: int = 0) -> RQMoE:
    """A model with random, non-trivial weights (speed does not depend on their values)."""
    torch.manual_seed(seed)
    model = RQMoE(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.initialized.fill_(True)
    return model.to(device).eval()


MAX_REPEATS = 10_000  # a small batch replayed from a CUDA graph is so short that a low cap times only milliseconds


def random_engine(config: RQMoEConfig, device: torch.device, kernel: str = "auto", precision: str = "auto",
                  cuda_graphs: bool = True) -> Engine:
    """An engine over ``random_model``, running it as asked, with a 4 GiB memory budget."""
    return Engine(random_model(config, device), Execution(kernel=kernel, dtype=precision, cuda_graphs=cuda_graphs),
                  mem_budget_bytes=4 << 30)


def _vps(n: int, fn, device: torch.device, min_seconds: float = 0.3) -> float:
    """Vectors a second of fn() on n vectors, repeated for about min_seconds (after a warm-up)."""
    _, once = timed(fn, device, repeats=1)
    repeats = max(1, min(MAX_REPEATS, int(min_seconds / max(once, 1e-6))))
    _, seconds = timed(fn, device, repeats=repeats, warmup=False)
    return n / seconds


def measure_ours(name: str, config: RQMoEConfig, device: torch.device, batches: List[int], kernel: str,
                 precision: str, n_encode: int, train_steps: int) -> List[dict]:
    engine = random_engine(config, device, kernel, precision)
    eager = random_engine(config, device, kernel, precision, cuda_graphs=False)
    K, M = config.K, config.M
    rows = []
    for batch in batches:
        codes = torch.randint(0, K, (batch, M), device=device)
        backend = engine.backend(device)
        row = {"method": name, "device": str(device), "kernel": kernel, "precision": precision, "batch": batch,
               "runs": {"fused": backend.fused, "precision": backend.precision},
               "config": config.to_dict(), "macs_per_vector": config.macs_per_vector()}
        with torch.inference_mode():
            row["decode_vps"] = _vps(batch, lambda: engine.decode(codes), device)
            if device.type == "cuda" and K == 256:  # codes as an index stores them: no range check, no host wait
                as_bytes = codes.to(torch.uint8)
                row["decode_bytes_vps"] = _vps(batch, lambda: engine.decode(as_bytes), device)
            if device.type == "cuda" and graphs.bucket(batch):  # the same decode without CUDA graphs
                row["decode_eager_vps"] = _vps(batch, lambda: eager.decode(codes), device)
            if batch <= 8192:  # the network's sequential decoder is the reference, not a fast path
                row["decode_seq_vps"] = _vps(batch, lambda: engine.model.decode_sequential(codes), device)
        row["decode_tflops"] = row["decode_vps"] * 2 * config.macs_per_vector() / 1e12
        rows.append(row)
        logger.info("%s", row)
    x = torch.randn(n_encode, config.d, device=device) * 0.1
    encode = {}
    with torch.inference_mode():
        for label, (candidates, beam) in ENCODINGS.items():
            n = n_encode if candidates is not None else max(1, n_encode // 4)
            encode[label] = _vps(n, lambda: engine.encode_scaled(x[:n], candidates, beam), device, min_seconds=0.5)
    rows[-1]["encode_vps"] = encode
    if train_steps:  # the batch's encoding runs on the row's kernel and precision, its backward in float32
        rows[-1]["train_sps"] = measure_training(config, device, train_steps, kernel=kernel, precision=precision)
        if device.type == "cuda":
            rows[-1]["train_sps_bs4096"] = measure_training(config, device, max(1, train_steps // 4), batch=4096,
                                                            kernel=kernel, precision=precision)
            for batch, key in ((1024, "train_sps_graphed"), (4096, "train_sps_bs4096_graphed")):
                rows[-1][key] = measure_training(config, device, 4 * train_steps, batch=batch, kernel=kernel,
                                                 precision=precision, graphed=True)
    return rows


def measure_training(config: RQMoEConfig, device: torch.device, steps: int, batch: int = 1024,
                     kernel: str = "auto", precision: str = "auto", graphed: bool = False) -> Optional[float]:
    """Training samples a second: ``train_step`` (greedy encoding with the device's default candidate
    count, under the row's kernel and precision rather than TrainConfig.encode_precision, then forward and
    backward in float32); graphed: each step replayed from a recorded CUDA graph, as the training loop
    runs full batches on one GPU (train_graph.py); None where the step cannot be recorded."""
    engine = random_engine(config, device, kernel, precision)
    model = engine.model.train()
    train_config = TrainConfig(device=str(device))
    candidates = train_config.resolved_encode_candidates(device)
    capturable = graphed and graphable(engine, device, candidates, 1)
    if graphed and not capturable:
        return None
    optimizer = make_optimizer(model, train_config, capturable=capturable)
    eager = lambda xs: train_step(engine, model, optimizer, xs, None, candidates)  # noqa: E731
    step = eager
    if capturable:
        runner = GraphedTrainStep(model, engine, optimizer, lambda xs, ctx: eager(xs), batch)
        step = lambda xs: runner(xs, None)  # noqa: E731
    xs = torch.randn(batch * 4, config.d, device=device) * 0.1
    for _ in range(WARMUP_STEPS + 1 if capturable else 1):  # compiles, and the recording
        step(xs[:batch])
    if capturable and runner.failed:  # what would be timed is eager steps: no graphed figure
        return None
    sync(device)
    import time
    start = time.perf_counter()
    for i in range(steps):
        rows = slice((i % 4) * batch, (i % 4 + 1) * batch)
        step(xs[rows])
    sync(device)
    return steps * batch / (time.perf_counter() - start)


# ---------------------------------------------------------------- peers
def _load_peer(folder: Path, module: str):
    """Import a peer's model module from its folder, with its own 'utils' (both peers have one)."""
    saved = sys.modules.pop("utils", None)
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(f"peer_{folder.name}_{module}", folder / f"{module}.py")
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        return loaded
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("utils", None)
        if saved is not None:
            sys.modules["utils"] = saved


def peer_makers(peers: Path, d: int, M: int, hidden: int = 256) -> list:
    """(name, make model, decode(model, codes), encode(model, x) or None) of the public QINCo1
    (peers/qinco_v1/model_qinco.py) and RQ-MoE reference (peers/rqmoe_ref/model_rqmoe.py) at our methods'
    widths (L=2, h=hidden; N=4), where those files are present."""
    makers = []
    if (peers / "qinco_v1" / "model_qinco.py").exists():
        qinco = _load_peer(peers / "qinco_v1", "model_qinco")
        makers.append(("QINCo1 (public code)", lambda: qinco.QINCo(d, 256, 2, M, hidden),
                       lambda m, c: m.decode(c), lambda m, x: m.encode(x)))
    if (peers / "rqmoe_ref" / "model_rqmoe.py").exists():
        ref = _load_peer(peers / "rqmoe_ref", "model_rqmoe")
        makers.append(("RQ-MoE reference (sequential)", lambda: ref.RQMoE(d, 256, M, 4, 2, hidden, 0.0),
                       lambda m, c: m.decode(c), lambda m, x: m.encode(x)))
        makers.append(("RQ-MoE reference (parallel)", lambda: ref.RQMoE(d, 256, M, 4, 2, hidden, 0.0),
                       lambda m, c: m.decode_parallel(c), None))
    return makers


def measure_peers(peers: Path, d: int, M: int, device: torch.device, batches: List[int], n_encode: int,
                  hidden: int = 256) -> List[dict]:
    """Decode (and exact encode) speed of the peers of ``peer_makers``: rows as ``measure_ours`` writes."""
    rows = []
    for name, make, decode, encode in peer_makers(peers, d, M, hidden):
        torch.manual_seed(0)
        model = make().to(device).eval()
        for batch in batches:
            codes = torch.randint(0, 256, (batch, M), device=device)
            with torch.inference_mode():
                row = {"method": name, "device": str(device), "batch": batch,
                       "decode_vps": _vps(batch, lambda: decode(model, codes), device)}
            rows.append(row)
            logger.info("%s", row)
        if encode is not None:
            x = torch.randn(max(1, n_encode // 4), d, device=device)
            with torch.inference_mode():
                rows[-1]["encode_vps"] = {"exact": _vps(len(x), lambda: encode(model, x), device, min_seconds=0.5)}
    return rows


def interleaved_decode(configs: Dict[str, RQMoEConfig], device: torch.device, batch: int, rounds: int = 7,
                       peers: Optional[Path] = None, precisions: Sequence[str] = ("float32",)) -> dict:
    """Decode vectors/s of every method (at every precision) measured in turns, ``rounds`` times, and the
    median of each: on a shared machine the ratios between methods hold where separate measurements drift.
    With peers, the public QINCo1 code takes its turn too. Returns {"batch", "rounds", "decode_vps": {method:
    median}}, a method named "<name> <precision>" where the precision is not float32."""
    decoders = {name if precision == "float32" else f"{name} {precision}":
                random_engine(config, device, precision=precision).decode
                for name, config in configs.items() for precision in precisions}
    first = next(iter(configs.values()))
    for name, make, decode, _ in peer_makers(Path(peers), first.d, first.M, first.hidden) if peers else []:
        if name.startswith("QINCo1"):
            torch.manual_seed(0)
            decoders[name] = functools.partial(decode, make().to(device).eval())
    codes = torch.randint(0, first.K, (batch, first.M), device=device)
    samples = {name: [] for name in decoders}
    with torch.inference_mode():
        for decode in decoders.values():
            decode(codes)  # warm-up
        for _ in range(rounds):
            for name, decode in decoders.items():
                _, seconds = timed(lambda: decode(codes), device, repeats=2, warmup=False)
                samples[name].append(batch / seconds)
    medians = {name: float(np.median(values)) for name, values in samples.items()}
    logger.info("interleaved decode, batch %d: %s", batch, medians)
    return {"batch": batch, "rounds": rounds, "decode_vps": medians}


# the tile settings --sweep tries, each as changes to kernels.TILES (rows a program, hidden units a chunk,
# warps, pipeline stages)
TILE_SWEEP = ({}, dict(num_stages=2), dict(num_warps=8), dict(BLOCK_R=32), dict(HC=32))


def sweep_kernel_tiles(device: torch.device, batches: List[int], precision: str) -> List[dict]:
    """Decode vectors/s of the fused kernel for each tile setting of TILE_SWEEP, on byte codes (no range
    check: the kernel's time, not a host wait)."""
    from .. import kernels

    config = RQMoEConfig(128, 8, 8, **METHODS["RQ-MoE"])
    engine = random_engine(config, device, "triton", precision)
    saved, rows = dict(kernels.TILES), []
    try:
        for changes in TILE_SWEEP:
            kernels.TILES.update(saved, **changes)
            for batch in batches:
                codes = torch.randint(0, config.K, (batch, config.M), device=device).to(torch.uint8)
                with torch.inference_mode():
                    vps = _vps(batch, lambda: engine.decode(codes), device)
                rows.append({"tiles": dict(kernels.TILES), "precision": precision, "batch": batch,
                             "decode_bytes_vps": vps})
                logger.info("%s", rows[-1])
    finally:
        kernels.TILES.update(saved)
    return rows


def profile_decode(device: torch.device, batch: int, kernel: str, precision: str, repeats: int = 5) -> dict:
    """Where a decode of ``batch`` codes spends its time (torch.profiler over ``repeats`` decodes of the default
    RQ-MoE, d=128, 8 bytes, N=4, L=2, H=256, whatever the run's other flags; eager, after a warm-up): the wall
    time of one decode, and each kernel's (on CUDA) or operator's (on a CPU) own time in one decode and its
    share of their sum, largest first. A diagnostic: it shows whether the fused kernel or the operations
    around it bound a batch."""
    from torch.profiler import ProfilerActivity, profile

    config = RQMoEConfig(128, 8, 8, **METHODS["RQ-MoE"])
    # no CUDA graphs: replaying one recorded before the profiler starts is not safe, and it would show its copies
    model = random_engine(config, device, kernel, precision, cuda_graphs=False)
    cuda = device.type == "cuda"
    codes = torch.randint(0, config.K, (batch, config.M), device=device)
    if cuda:
        codes = codes.to(torch.uint8)  # as an index stores them: no range check
    with torch.inference_mode():
        _, wall_s = timed(lambda: model.decode(codes), device, repeats=repeats)
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                model.decode(codes)
            sync(device)
    # own times: an operator's total would count the kernels it launched a second time
    own = [(e.key, (e.self_device_time_total if cuda else e.self_cpu_time_total) / repeats / 1e3)
           for e in prof.key_averages()]
    own = sorted(((name, ms) for name, ms in own if ms > 0), key=lambda item: -item[1])
    total_ms = sum(ms for _, ms in own)
    return {"config": config.to_dict(), "batch": batch, "kernel": kernel, "precision": precision, "repeats": repeats,
            "cuda_graphs": False, "wall_ms": wall_s * 1e3,
            "profiled_ms": total_ms, "top": [{"name": name[:120], "ms": ms, "share": ms / total_ms}
                                             for name, ms in own[:12]]}


def executions(args, device: torch.device) -> List[tuple]:
    """The (kernel, precision) pairs measured on ``device``: on CUDA --executions, or every pair of --kernels
    and --precisions but torch in TF32 (it follows its own switch) and Triton in float32 (exact float32 dots
    run without tensor cores); on a CPU the torch path at --cpu-precisions."""
    if device.type != "cuda":
        return [("torch", precision) for precision in args.cpu_precisions]
    if args.executions:
        pairs = [tuple(item.split(":")) for item in args.executions]
        bad = [item for item, pair in zip(args.executions, pairs) if len(pair) != 2]
        if bad:
            raise ValueError(f"--executions takes KERNEL:PRECISION pairs, e.g. auto:auto, got {bad}")
        for kernel, precision in pairs:  # clear errors for unknown names before anything runs
            Execution(kernel=kernel, dtype=precision)
        return pairs
    return [(kernel, precision) for kernel in args.kernels for precision in args.precisions
            if (kernel, precision) not in (("torch", "tfloat32"), ("triton", "float32"))]


def run_speed(args) -> dict:
    """The speed table on every requested device; see the module docstring."""
    devices = [resolve_device(d) for d in args.devices]
    result = {"kind": "speed", "meta": run_meta(args.argv, devices[-1]), "rows": []}
    if args.sweep:
        result["tile_sweep"] = [row for precision in args.precisions if precision != "float32"
                                for row in sweep_kernel_tiles(devices[0], args.batches, precision)]
        write_result(result, args.out)
    if args.profile_batch:
        cuda = devices[0].type == "cuda"
        result["profile"] = profile_decode(devices[0], args.profile_batch, args.kernels[-1] if cuda else "torch",
                                           args.precisions[-1] if cuda else "float32")
        write_result(result, args.out)
    configs = {name: RQMoEConfig(args.d, args.M, 8, **{**METHODS[name], "hidden": args.hidden})
               for name in args.methods}
    for device in devices:
        batches = args.batches if device.type == "cuda" else [b for b in args.batches if b <= args.cpu_max_batch]
        for name, config in configs.items():
            for kernel, precision in executions(args, device):
                if kernel == "triton" and config.top_k not in (None, 1):
                    continue  # the fused kernels run dense experts or top-1 routing
                result["rows"].extend(measure_ours(
                    name, config, device, batches, kernel, precision,
                    args.n_encode if device.type == "cuda" else args.cpu_n_encode,
                    args.train_steps if device.type == "cuda" else args.cpu_train_steps))
                write_result(result, args.out)
        if device.type == "cpu" and args.interleaved_rounds and batches:
            result["interleaved_cpu"] = interleaved_decode(configs, device, min(batches), args.interleaved_rounds,
                                                           args.peers, args.cpu_precisions)
            write_result(result, args.out)
        if args.peers:
            result["rows"].extend(measure_peers(Path(args.peers), args.d, args.M, device, batches,
                                                args.n_encode if device.type == "cuda" else args.cpu_n_encode, args.hidden))
            write_result(result, args.out)
    return result


def speed_table(result: dict) -> str:
    """Markdown table of a speed result: decode vectors/s by batch, encode and training speeds."""
    rows = result["rows"]
    batches = sorted({r["batch"] for r in rows})
    keys: Dict[tuple, Dict[int, dict]] = {}
    for r in rows:
        keys.setdefault((r["method"], r["device"], r.get("kernel", ""), r.get("precision", "")), {})[r["batch"]] = r
    lines = ["| method | device | kernel | precision | " + " | ".join(f"decode bs {b}" for b in batches)
             + " | encode greedy16 | beam4x16 | exact | train samples/s | at batch 4 096 | graphed | graphed, 4 096 |",
             "|---|---|---|---|" + "---:|" * (len(batches) + 7)]
    fmt = lambda v: f"{v:,.0f}" if isinstance(v, (int, float)) else ""  # noqa: E731
    for (method, device, kernel, precision), by_batch in keys.items():
        last = by_batch[max(by_batch)]
        encode: Optional[dict] = next((r.get("encode_vps") for r in by_batch.values() if r.get("encode_vps")), {})
        cells = [fmt(by_batch[b]["decode_vps"]) if b in by_batch else "" for b in batches]
        lines.append(f"| {method} | {device} | {kernel} | {precision} | " + " | ".join(cells) +
                     f" | {fmt(encode.get('greedy16'))} | {fmt(encode.get('beam4x16'))} | {fmt(encode.get('exact'))}"
                     f" | {fmt(last.get('train_sps'))} | {fmt(last.get('train_sps_bs4096'))}"
                     f" | {fmt(last.get('train_sps_graphed'))} | {fmt(last.get('train_sps_bs4096_graphed'))} |")
    as_bytes = [(method, kernel, precision, b, r["decode_bytes_vps"]) for (method, _, kernel, precision), by_batch
                in keys.items() for b, r in sorted(by_batch.items()) if "decode_bytes_vps" in r]
    if as_bytes:
        lines.append("\nDecode of codes given as bytes (uint8: no range check, so no wait on the device): " +
                     ", ".join(f"{m} {k} {p} bs {b}: {v:,.0f}" for m, k, p, b, v in as_bytes))
    interleaved = result.get("interleaved_cpu")
    if interleaved:
        vps = interleaved["decode_vps"]
        lines.append(f"\nCPU decode at batch {interleaved['batch']}, methods in turns ({interleaved['rounds']} "
                     "rounds, medians): " + ", ".join(f"{name} {value:,.0f}" for name, value in vps.items()))
    return "\n".join(lines)
