"""Where an eager PackedLinear call's host time goes (issue 17 lab: eager within 1.1x of F.linear).

On a layer so small that the GPU time is a few µs, a plain loop of eager calls (synchronised at
the end) is bound by the host: its time per call is the host cost of a call. Timed, per call:
``F.linear``; ``nn.Linear`` (for the module call's own cost); ``PackedLinear``;
``s3sparse.ops.packed_linear`` (the Python wrapper, its eager C++ call); the op through ``torch.ops``
directly (the boxed dispatcher path and the C++ host path); and, for scale, two cheap aten ops.
The median of ``--repeat`` loops of ``--calls`` calls each.

    python benchmarks/lab/packed_host.py --device cuda [--shape 256x256] [--tokens 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import environment, time_eager  # noqa: E402
from s3sparse import ops  # noqa: E402
from s3sparse.sparse import PackedLinear  # noqa: E402


def per_call(fn, device: torch.device, calls: int, repeat: int) -> float:
    for _ in range(20):
        fn()
    return time_eager([fn], device, calls, repeat)["seconds"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="256x256")
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    M, K = (int(v) for v in a.shape.split("x"))
    lin = torch.nn.Linear(K, M, bias=False).to(dev, dtype)
    with torch.no_grad():
        W = lin.weight
        groups = W.reshape(M, K // 4, 4)
        keep = groups.abs().topk(2, dim=-1).indices
        W.copy_(torch.zeros_like(groups).scatter(-1, keep, groups.gather(-1, keep)).reshape(M, K))
    packed = PackedLinear.from_linear(lin, pattern=a.pattern).to(dev)
    x = torch.randn(a.tokens, K, device=dev, dtype=dtype)
    b = packed._buffers
    args = (x, b["values"], b["meta"], b["subsets"], b["block_off"], b["elem_off"], list(packed.scope_shape),
            list(packed.scope_stride), int(packed.meta_bits), int(packed.out_features), int(packed.row_group), None)
    with torch.no_grad():
        packed(x)  # (the first call checks the tables: later ones pass checked=True)
        cases = {
            "F.linear": lambda: F.linear(x, W),
            "nn.Linear (the dense module)": lambda: lin(x),
            "PackedLinear": lambda: packed(x),
            "ops.packed_linear (checked)": lambda: ops.packed_linear(*args, True),
            "torch.ops packed_linear (checked)": lambda: torch.ops.s3sparse.packed_linear.default(*args, True),
            "ops.packed_linear (unchecked: host sync)": lambda: ops.packed_linear(*args, False),
            "torch.add (scale)": lambda: torch.add(x, x),
            "x.reshape + contiguous (scale)": lambda: x.reshape(-1, K).contiguous(),
        }
        rows = []
        print(f"{'case':42s} {'µs/call':>8s}", flush=True)
        for name, fn in cases.items():
            us = per_call(fn, dev, a.calls, a.repeat) * 1e6
            rows.append(dict(case=name, us_per_call=us))
            print(f"{name:42s} {us:8.2f}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(dict(environment=environment(dev), shape=[M, K], tokens=a.tokens,
                                               pattern=a.pattern, rows=rows), indent=1))


if __name__ == "__main__":
    main()
