"""Training steps replayed from a CUDA graph.

On a GPU a training step at batch 1 024 is bound by launching its kernels
from Python, several hundred of them: the encoding of the batch, the forward,
the backward and Adam (docs/experiments.md, section 1). A CUDA graph records
the whole step once and replays it as one launch. What that takes:

- fixed shapes: only full batches replay; a shorter last batch runs eagerly;
- weights read where they live: the model's caches of derived weights (the
  fused first layer, the codeword tables, the kernel's bfloat16 copies) are
  bypassed while the step records (``Engine.uncached_weights``), so every
  replay derives them from the weights as they are then;
- an optimiser whose state and learning rate live on the device: Adam(W)
  with ``capturable=True`` and a tensor learning rate (``make_optimizer``,
  ``set_lr`` fills it in place);
- no host synchronisation inside the step: exact encoding (``torch.unique``)
  and top-k routing on the torch path wait on the device, so they are never
  recorded. ``graphable`` is the guard: a recording that fails anyway falls
  back to eager steps, but it leaves torch's CUDA random generator unusable
  for the process (dropout, or any later ``torch.randn`` on the GPU, then
  raises), so it must decline every step that waits on the device.

A replay changes the weights in place without the host seeing it, so the
version counters that the model's caches key on (graphs.stamp) are bumped
after every replay: an eager use of the model afterwards (validation, the
trained codec) sees new weights.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from .engine import Engine
from .model import RQMoE

logger = logging.getLogger(__name__)

WARMUP_STEPS = 2  # eager steps before the recording: kernels compile, the optimiser's state is created


def graphable(engine: Engine, device: torch.device, candidates: Optional[int], world: int) -> bool:
    """Whether training steps of ``engine``'s model on ``device`` can be recorded when ``engine`` encodes
    its batches: one CUDA process, encoding with fewer candidates than codewords
    (exact encoding, which ``candidates >= K`` also is, groups rows with torch.unique, a host wait), and
    dense experts or top-1 in the fused kernel (the torch path's routing counts rows on the host). A
    recording that fails leaves torch's CUDA generator unusable for the process, so this must say no
    wherever the step waits on the device."""
    if device.type != "cuda" or world != 1 or candidates is None or candidates >= engine.config.K:
        return False
    top_k = engine.config.top_k
    if top_k is None:
        return True
    return top_k == 1 and engine.fused(device)


class GraphedTrainStep:
    """``step(xs, ctx) -> loss`` for batches of exactly ``batch`` rows, through one recorded CUDA graph.

    step: the eager training step (train.train_step with its other arguments bound): it encodes xs
    (batch, d) float32 under no_grad, computes the loss, and runs backward and the optimiser. The first
    WARMUP_STEPS calls run it eagerly on a side stream; the next one records it (a recording runs
    nothing) and replays it; later calls copy their batch into the graph's input and replay. A call
    returns None where the graph does not apply (another batch size, or a recording that failed): the
    caller then runs the eager step itself. The returned loss is the graph's output tensor: read or add
    it before the next call.
    """

    def __init__(self, model: RQMoE, engine: Engine, optimizer: torch.optim.Optimizer,
                 step: Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor], batch: int):
        self.model, self.engine, self.optimizer, self.step, self.batch = model, engine, optimizer, step, batch
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.failed = False
        self.replays = 0
        self._warmup_left = WARMUP_STEPS
        self._inputs = None
        self._loss = None
        self._side = None
        self._weights = [t for t in (*model.parameters(), *model.buffers())]

    def __call__(self, xs: torch.Tensor, ctx: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if self.failed or xs.shape[0] != self.batch:
            return None
        with torch.cuda.device(xs.device):  # warm-up, recording and replays on the batch's GPU
            return self._run(xs, ctx)

    def _run(self, xs: torch.Tensor, ctx: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if self._side is None:
            self._side = torch.cuda.Stream(device=xs.device)
        current = torch.cuda.current_stream(xs.device)
        if self._warmup_left > 0:
            self._warmup_left -= 1
            self._side.wait_stream(current)
            with torch.cuda.stream(self._side):
                loss = self.step(xs, ctx)
            current.wait_stream(self._side)
            return loss
        if self.graph is None:
            if not self._record(xs, ctx):
                return None
        else:
            self._inputs[0].copy_(xs)
            if ctx is not None:
                self._inputs[1].copy_(ctx)
        self.graph.replay()
        self.replays += 1
        for tensor in self._weights:  # the replay changed them: the model's caches must see it
            torch.autograd.graph.increment_version(tensor)
        return self._loss

    def _record(self, xs: torch.Tensor, ctx: Optional[torch.Tensor]) -> bool:
        inputs = (xs.clone(), None if ctx is None else ctx.clone())
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # the recorded backward makes the gradients, in its pool
        try:
            # on the side stream of the warm-up, which lives on the batch's device (torch's default
            # capture stream belongs to whichever device was current when it was first made)
            self._side.wait_stream(torch.cuda.current_stream(xs.device))
            with self.engine.uncached_weights(), torch.cuda.graph(graph, stream=self._side,
                                                                 capture_error_mode="thread_local"):
                loss = self.step(*inputs)
        except RuntimeError as exc:  # e.g. a host synchronisation inside the step
            torch.cuda.synchronize()
            self.optimizer.zero_grad(set_to_none=True)
            self.failed = True
            logger.info("training steps run eagerly: the step cannot be recorded as a CUDA graph (%s)",
                        str(exc).splitlines()[0])
            return False
        self.graph, self._inputs, self._loss = graph, inputs, loss
        return True
