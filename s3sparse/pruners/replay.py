"""Run one function over many same-shaped inputs, recorded once as a CUDA graph.

Left-looking True OBS runs the same sequence of a few thousand small kernels for
every chunk of rows; issuing them from Python costs more than running them. A
:class:`GraphReplay` records that sequence on the first CUDA input and replays it
for every later input of the same shape, so the host work is paid once. On other
devices, or where recording fails, it simply calls the function.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["GraphReplay"]


class GraphReplay:
    """``replay(x)`` returns ``fn(x)``; ``fn`` must take one tensor and return a tuple
    of tensors, never wait for the device, and have shapes that depend on ``x.shape``
    alone. ``warmup()`` (optional) runs once before recording, to set up library
    handles and workspaces outside the capture."""

    def __init__(self, fn: Callable[[Tensor], Tuple[Tensor, ...]], warmup: Optional[Callable[[], object]] = None,
                 enabled: bool = True):
        self.fn = fn
        self.warmup = warmup
        self.enabled = enabled
        self._graph = None
        self._key = None
        self._input: Optional[Tensor] = None
        self._output: Tuple[Tensor, ...] = ()

    def _record(self, x: Tensor) -> bool:
        if self.warmup is not None:
            self.warmup()
            self.warmup = None
        torch.cuda.synchronize(x.device)
        self._input = x.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._output = tuple(self.fn(self._input))
        except Exception as exc:  # an op that cannot be recorded: run eagerly from now on
            warnings.warn(f"CUDA graph recording failed ({type(exc).__name__}: {exc}); running eagerly",
                          RuntimeWarning, stacklevel=3)
            self.enabled = False
            self._graph, self._input, self._output = None, None, ()
            return False
        self._graph, self._key = graph, (x.shape, x.dtype, x.device)
        return True

    def __call__(self, x: Tensor) -> Tuple[Tensor, ...]:
        if not (self.enabled and x.is_cuda):
            return tuple(self.fn(x))
        if self._graph is None or self._key != (x.shape, x.dtype, x.device):
            if not self._record(x):
                return tuple(self.fn(x))
        self._input.copy_(x)
        self._graph.replay()
        return tuple(t.clone() for t in self._output)

    def release(self) -> None:
        """Free the recorded graph and its memory pool."""
        self._graph, self._input, self._output = None, None, ()
