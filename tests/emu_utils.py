"""The host emulator of the CUDA kernels (tools/cuda_emu) in the op tests: S3SPARSE_CUDA_EMU=<library>
adds a `cuda_emu` device whose ops are torch.ops.s3emu.* on CPU tensors."""

from __future__ import annotations

import os

import torch

from s3sparse import ops

EMU_LIB = os.environ.get("S3SPARSE_CUDA_EMU")


def use_emulator(monkeypatch) -> None:
    """Route s3sparse.ops to the emulator's ops for this test: torch.ops.s3emu, and the real ops' eager
    fast calls (bound to torch.ops.s3sparse) turned off."""
    torch.ops.load_library(EMU_LIB)
    monkeypatch.setattr(ops, "_ops", torch.ops.s3emu)
    monkeypatch.setattr(ops, "_packed_linear_call", lambda *args: NotImplemented)
    monkeypatch.setattr(ops, "_sp24_linear_call", lambda *args: NotImplemented)
