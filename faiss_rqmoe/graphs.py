"""CUDA graphs for small inference batches: record a fixed-shape computation once, then replay it.

A decode of 1 024 codes on a GPU is bound by launching its ~20 kernels from
Python, not by the GPU (docs/experiments.md, section 1). A CUDA graph
replays all of them in one launch. Batches are padded up to a power of two
(``bucket``), so a handful of graphs serve every size up to ``MAX_ROWS``;
larger batches run as they are. A graph is recorded again when the weights
it read have changed (their storage or version), and a computation that
cannot be recorded (one that synchronises with the host, such as top-k
routing on the torch path) runs eagerly from then on. The graphs keep their
memory (one pool a cache, as large as the largest batch's temporaries)
while the model lives; ``clear`` frees them.
"""
from __future__ import annotations

import logging
import statistics
import threading
import warnings
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

logger = logging.getLogger(__name__)

MIN_ROWS = 1024  # smaller batches are padded to this: on a GPU they cost the same
MAX_ROWS = 8192  # above it launches no longer dominate: batches run eagerly


def bucket(n: int) -> Optional[int]:
    """The padded batch a graph is recorded for: the power of two >= max(n, MIN_ROWS), or None past MAX_ROWS."""
    if n > MAX_ROWS:
        return None
    size = MIN_ROWS
    while size < n:
        size *= 2
    return size


def stamp(tensors: Sequence[torch.Tensor]) -> tuple:
    """What identifies some tensors' values, for the caches keyed on them (graphs, fused weights): every
    tensor's storage and in-place version."""
    # inference tensors keep no version (made in inference mode, e.g. a search's store): their storage says it
    return tuple((t.data_ptr(), 0 if t.is_inference() else t._version) for t in tensors)


class WeightsCache(dict):
    """A dict of values derived from a model's weights, keyed by their stamp(). Copies and pickles of the
    model start empty (the values are rebuilt on use; some are views of the original's parameters)."""

    def __reduce__(self):
        return (WeightsCache, ())


def host_synchronisation(fn: Callable, inputs: Sequence[torch.Tensor]) -> Optional[str]:
    """Run fn(*inputs) once more with torch's CUDA synchronisation warnings on: the first warning's text where
    fn makes the host wait for the device (which a CUDA graph cannot record), else None. Warnings rather than
    errors: the mode is global, and another thread's waits must not fail meanwhile."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn(*inputs)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for warning in caught:  # (not the warning that the mode itself is a prototype)
        if "called a synchronizing" in str(warning.message):
            return str(warning.message).splitlines()[0]
    return None


class GraphCache:
    """Recorded graphs of one computation ``fn(*inputs) -> tensor``, keyed by the caller (shape, options).

    ``run`` copies the inputs into the graph's static buffers (padded rows
    keep whatever they held: rows of a computation must not depend on each
    other), replays it and copies the first n rows of the output into the
    caller's tensor. One lock serialises recording and replays (threads
    share the buffers), and an event orders each replay after the previous
    one's copy-out whatever stream either ran on. All graphs of a cache share
    one memory pool: only one runs at a time and its output is copied out at
    once.
    """

    def __init__(self):
        self._graphs: Dict[tuple, tuple] = {}
        self._failed = set()
        self._lock = threading.Lock()
        self._pool = None
        self._done: Optional[torch.cuda.Event] = None

    def __reduce__(self):  # copies and pickles of a model start with no graphs (they hold device state)
        return (GraphCache, ())

    def clear(self) -> None:
        with self._lock:
            self._graphs.clear()
            self._failed.clear()
            self._pool = None  # a pool whose graphs are all gone cannot take a new capture

    def run(self, key: tuple, weights_stamp: tuple, fn: Callable, inputs: Tuple[torch.Tensor, ...],
            out, rows: int):
        """out[:] = fn(*inputs) for inputs of n = len(out) rows through the graph recorded for ``rows`` padded
        rows and ``key``; returns out, or None when this computation cannot be recorded (the caller then runs
        it eagerly). out is a tensor, or a tuple of tensors where fn returns a tuple (each output's first
        dimension the rows). Every input and output is on one CUDA device."""
        outs = out if isinstance(out, tuple) else (out,)
        n = outs[0].shape[0]
        with self._lock, torch.cuda.device(outs[0].device):
            if key in self._failed:
                return None
            entry = self._graphs.get(key)
            if entry is None or entry[0] != weights_stamp:
                entry = self._record(key, weights_stamp, fn, inputs, rows)
                if entry is None:
                    return None
            _, graph, static_inputs, static_out = entry
            stream = torch.cuda.current_stream()
            if self._done is not None:
                stream.wait_event(self._done)
            for buffer, value in zip(static_inputs, inputs):
                buffer[:n].copy_(value)
            graph.replay()
            for target, recorded in zip(outs, static_out if isinstance(static_out, tuple) else (static_out,)):
                target.copy_(recorded[:n])
            self._done = torch.cuda.Event()
            self._done.record(stream)
            return out

    def keys(self) -> list:
        """The keys of the graphs recorded so far."""
        with self._lock:
            return list(self._graphs)

    def replay_ms(self, key: tuple, repeats: int = 100) -> float:
        """GPU milliseconds of one replay of the graph recorded for ``key``, alone on the device: the median
        over ``repeats`` replays timed by CUDA events (a diagnostic: the device's share of a small search)."""
        with self._lock:
            graph = self._graphs[key][1]
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)

    def _record(self, key, weights_stamp, fn, inputs, rows):
        static_inputs = tuple(torch.zeros((rows,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
                              for t in inputs)
        side = torch.cuda.Stream()  # warm-up and capture run here, never on the caller's stream
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                fn(*static_inputs)  # warm-up: caches (fused weights, kernels) fill outside the graph
                synchronising = host_synchronisation(fn, static_inputs)
            if synchronising:  # a capture would fail part way, and a failed capture can leave torch's RNG broken
                logger.info("running %s eagerly: it waits for the GPU inside (%s)", key, synchronising)
                self._failed.add(key)
                return None
            graph = torch.cuda.CUDAGraph()
            # into the pool of a graph still held: capturing into a pool whose graphs were all freed fails
            # inside capture_begin and leaves torch's RNG in capture mode; thread_local: other threads may
            # use CUDA meanwhile
            with torch.cuda.graph(graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
                static_out = fn(*static_inputs)
            torch.cuda.current_stream().wait_stream(side)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.current_stream().wait_stream(side)  # the eager run after reads what the warm-up cached
            logger.info("running %s eagerly this time: no memory to record it as a CUDA graph", key)
            return None
        except RuntimeError as exc:  # e.g. a host synchronisation inside fn
            torch.cuda.synchronize()
            logger.info("running %s eagerly: it cannot be recorded as a CUDA graph (%s)", key,
                        str(exc).splitlines()[0])
            self._failed.add(key)
            return None
        if self._pool is None:
            self._pool = graph.pool()
        entry = (weights_stamp, graph, static_inputs, static_out)
        self._graphs[key] = entry
        return entry
