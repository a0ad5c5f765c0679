"""Calibration data for one-layer benchmarks: a synthetic M×K layer, or real (W, H) pairs from files.

Synthetic layer (:func:`synthetic_layer`), fully determined by ``(M, K, N, seed)`` and the
keyword parameters below, identical on every device (all random numbers are drawn on the CPU
from seeded ``torch.Generator`` objects, then moved):

* per-channel scales ``s_k = exp(σ·g_k)``, ``g_k ~ N(0, 1)`` (log-normal, ``σ = 0.5``);
* ``round(0.5% · K)`` outlier channels (at least one), chosen at random, scaled ×10;
* inputs ``x = s ⊙ (z + 0.5 · B u)`` with ``z ~ N(0, I_K)``, ``u ~ N(0, I_64)`` and a fixed
  basis ``B`` (K × 64, entries ``N(0, 1/64)``) — a shared rank-64 component whose per-channel
  standard deviation is 0.5 × the channel's scale;
* ``W ~ N(0, 0.02²)`` (M × K);
* ``H = XᵀX / N`` accumulated in fp32 on the target device, 1024 rows of X at a time (X
  itself is never held whole: memory is O(K² + 1024·K)); row block ``b`` of X is drawn
  from its own generator seeded by ``(seed, b)``, so X does not depend on the device. H is
  symmetrised exactly (``(H + Hᵀ)/2``). With ``N < K`` (the default 8192 < 9728) H is
  rank-deficient, as on real layers with few calibration tokens.

Real layers (:func:`load_layers`): a ``.pt`` file holding ``{'W': (M, K), 'H': (K, K),
'name': str}`` (a list of such dicts, or ``{'layers': [...]}``, also works), or a directory
of such files (sorted by name). Tensors are cast to fp32 and moved to the device.

    from data import synthetic_layer, load_layers
    layer = synthetic_layer(2560, 9728, device="cuda")     # layer.W, layer.H, layer.meta
    layers = load_layers("fixtures/minilm/", device="cuda")
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["Layer", "synthetic_layer", "calibration_inputs", "channel_scales", "load_layers", "ROWS_PER_DRAW"]

ROWS_PER_DRAW = 1024
"""Rows of X drawn (and accumulated into H) at a time; part of the definition of X."""

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant, to derive sub-seeds


def _sub_seed(seed: int, *tags: int) -> int:
    s = int(seed) & (2**63 - 1)
    for t in tags:
        s = (s * 6364136223846793005 + (int(t) + 1) * _MIX) & (2**63 - 1)
    return s


@dataclass
class Layer:
    """One linear layer to prune: ``W`` (M × K) and its calibration Hessian ``H`` (K × K), fp32."""

    name: str
    W: Tensor
    H: Tensor
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple:
        return tuple(self.W.shape)


def channel_scales(
    K: int, seed: int = 0, sigma: float = 0.5, outlier_frac: float = 0.005, outlier_scale: float = 10.0
) -> tuple[Tensor, Tensor]:
    """``(scales (K,), outlier channel indices)`` of the synthetic inputs (CPU, fp32)."""
    g = torch.Generator(device="cpu").manual_seed(_sub_seed(seed, 1))
    scales = torch.exp(sigma * torch.randn(K, generator=g))
    n_out = max(1, round(outlier_frac * K)) if outlier_frac > 0 else 0
    outliers = torch.randperm(K, generator=g)[:n_out].sort().values
    scales[outliers] *= outlier_scale
    return scales, outliers


def calibration_inputs(
    K: int,
    N: int = 8192,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    sigma: float = 0.5,
    outlier_frac: float = 0.005,
    outlier_scale: float = 10.0,
    rank: int = 64,
    shared: float = 0.5,
    blocks: Optional[Sequence[int]] = None,
) -> Iterator[Tensor]:
    """The synthetic inputs X (N × K, fp32), as blocks of :data:`ROWS_PER_DRAW` rows on ``device``.

    ``blocks``: only these row blocks (block b is rows ``[1024·b, 1024·(b+1))``), e.g. one
    rank's share of the calibration set; the others are never drawn. All of them when None.
    """
    device = torch.device(device)
    scales, _ = channel_scales(K, seed, sigma, outlier_frac, outlier_scale)
    scales = scales.to(device)
    basis = None
    if rank > 0 and shared != 0:
        gb = torch.Generator(device="cpu").manual_seed(_sub_seed(seed, 2))
        basis = (torch.randn(rank, K, generator=gb) / math.sqrt(rank)).to(device)  # Bᵀ
    wanted = None if blocks is None else {int(b) for b in blocks}
    for b, start in enumerate(range(0, N, ROWS_PER_DRAW)):
        if wanted is not None and b not in wanted:
            continue
        n = min(ROWS_PER_DRAW, N - start)
        gx = torch.Generator(device="cpu").manual_seed(_sub_seed(seed, 3, b))
        z = torch.randn(n, K, generator=gx).to(device)
        if basis is not None:
            u = torch.randn(n, rank, generator=gx).to(device)
            z.addmm_(u, basis, alpha=shared)
        yield z.mul_(scales)


def synthetic_layer(
    M: int,
    K: int,
    N: int = 8192,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    sigma: float = 0.5,
    outlier_frac: float = 0.005,
    outlier_scale: float = 10.0,
    rank: int = 64,
    shared: float = 0.5,
    w_std: float = 0.02,
) -> Layer:
    """The synthetic layer described in the module docstring (W, H fp32 on ``device``)."""
    if min(M, K, N) < 1:
        raise ValueError(f"M, K, N must be >= 1, got {M}, {K}, {N}")
    device = torch.device(device)
    t0 = time.perf_counter()
    gw = torch.Generator(device="cpu").manual_seed(_sub_seed(seed, 0))
    W = (w_std * torch.randn(M, K, generator=gw)).to(device)
    H = torch.zeros(K, K, dtype=torch.float32, device=device)
    # fp32 accumulation, without TF32 (which would round the products to 10 mantissa bits).
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for x in calibration_inputs(K, N, seed, device, sigma, outlier_frac, outlier_scale, rank, shared):
            H.addmm_(x.T, x)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    H.div_(N)
    H = (H + H.T) / 2
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    _, outliers = channel_scales(K, seed, sigma, outlier_frac, outlier_scale)
    meta = dict(
        kind="synthetic",
        M=M,
        K=K,
        N=N,
        seed=seed,
        sigma=sigma,
        outlier_frac=outlier_frac,
        outlier_scale=outlier_scale,
        outlier_channels=int(outliers.numel()),
        rank=rank,
        shared=shared,
        w_std=w_std,
        rows_per_draw=ROWS_PER_DRAW,
        h_dtype="float32",
        mean_diag_h=float(H.diagonal().mean()),
        seconds_to_generate=round(time.perf_counter() - t0, 3),
    )
    return Layer(name=f"synthetic-{M}x{K}-N{N}-s{seed}", W=W, H=H, meta=meta)


# ------------------------------------------------------------------ real layers
def _as_layers(obj, source: Path) -> List[dict]:
    if isinstance(obj, dict) and "layers" in obj and "W" not in obj:
        obj = obj["layers"]
    if isinstance(obj, dict):
        return [obj]
    if isinstance(obj, (list, tuple)) and all(isinstance(o, dict) for o in obj):
        return list(obj)
    raise ValueError(
        f"{source}: expected a dict {{'W': (M, K), 'H': (K, K), 'name': str}}, a list of them "
        f"or {{'layers': [...]}}, got {type(obj).__name__}"
    )


def load_layers(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> List[Layer]:
    """Real-layer ``(W, H)`` pairs from a ``.pt`` file or a directory of ``.pt`` files."""
    path = Path(path)
    device = torch.device(device)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".pt")
        if not files:
            raise FileNotFoundError(f"{path}: no .pt files in this directory")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"{path}: no such file or directory")
    layers: List[Layer] = []
    for f in files:
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - report which file and why
            raise ValueError(f"{f}: could not be loaded with torch.load(weights_only=True): {exc}") from exc
        items = _as_layers(obj, f)
        for i, d in enumerate(items):
            missing = [k for k in ("W", "H") if k not in d]
            if missing:
                raise ValueError(f"{f}: entry {i} lacks {missing} (keys: {sorted(d)})")
            W, H = d["W"], d["H"]
            if not (isinstance(W, Tensor) and isinstance(H, Tensor)):
                raise ValueError(f"{f}: entry {i}: 'W' and 'H' must be tensors")
            if W.ndim != 2 or H.shape != (W.shape[1], W.shape[1]):
                raise ValueError(
                    f"{f}: entry {i}: need W (M, K) and H (K, K), got W {tuple(W.shape)}, H {tuple(H.shape)}"
                )
            name = str(d.get("name") or (f.stem if len(items) == 1 else f"{f.stem}[{i}]"))
            W = W.detach().to(device=device, dtype=torch.float32).contiguous()
            H = H.detach().to(device=device, dtype=torch.float32)
            H = (H + H.T) / 2
            meta = dict(kind="real", file=str(f), M=W.shape[0], K=W.shape[1], mean_diag_h=float(H.diagonal().mean()))
            for k, v in d.items():
                if k not in ("W", "H", "name") and isinstance(v, (int, float, str, bool)):
                    meta[k] = v
            layers.append(Layer(name=name, W=W, H=H, meta=meta))
    return layers
