"""The host emulator of the CUDA kernels (tools/cuda_emu) in the op tests: S3SPARSE_CUDA_EMU=<library>
adds a `cuda_emu` device whose ops are torch.ops.s3emu.* on CPU tensors."""

from __future__ import annotations

import contextlib
import os

import torch

from s3sparse import ops

EMU_LIB = os.environ.get("S3SPARSE_CUDA_EMU")
_ROUTED = ("_ops", "_packed_linear_call", "_sp24_linear_call")  # the s3sparse.ops attributes the emulator replaces
_HOST = {name: getattr(ops, name) for name in _ROUTED}  # (before any test patches them)


def use_emulator(monkeypatch) -> None:
    """Route s3sparse.ops to the emulator's ops for this test: torch.ops.s3emu, and the real ops' eager
    fast calls (bound to torch.ops.s3sparse) turned off."""
    torch.ops.load_library(EMU_LIB)
    emulated = {"_ops": torch.ops.s3emu, "_packed_linear_call": lambda *args: NotImplemented,
                "_sp24_linear_call": lambda *args: NotImplemented}
    assert emulated.keys() == set(_ROUTED)
    for name, value in emulated.items():
        monkeypatch.setattr(ops, name, value)


@contextlib.contextmanager
def host_ops():
    """s3sparse.ops on the compiled CPU kernels for a block of test setup (pruning and packing a case),
    also while the emulator is in use: through the emulated kernels that setup costs seconds a case (most
    of the emulator job's time) and checks nothing the op tests do not."""
    saved = {name: getattr(ops, name) for name in _ROUTED}
    for name, value in _HOST.items():
        setattr(ops, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(ops, name, value)
