"""Tests of s3sparse.viz: element layouts of the named patterns and PNG output."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from s3sparse import patterns, viz
from s3sparse.viz import draw_layout, element_layout

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _weight(M: int = 16, K: int = 32, seed: int = 0) -> nn.Parameter:
    return nn.Parameter(torch.randn(M, K, generator=torch.Generator().manual_seed(seed)))


# ------------------------------------------------------------------ element layouts (what is drawn)
def test_layout_coupled_2_4_pairs_columns_8_apart() -> None:
    scope, _ = patterns.coupled_nm(_weight())
    lay = element_layout(scope)
    blk, scp, slot = lay.block, lay.scope, lay.slot
    tiles_b = blk.view(16, 2, 2, 8)
    assert torch.equal(tiles_b[:, :, 0], tiles_b[:, :, 1])  # col j and j+8: one block
    assert blk.unique().numel() == 16 * 32 // 2
    tiles_s = scp.view(16, 2, 2, 2, 4)  # [row, tile, half, group, j]
    assert bool((tiles_s == tiles_s[..., :1, :, :1]).all(-1).all())  # one scope per group of 4 pairs, both halves
    assert scp.unique().numel() == 16 * 2 * 2
    assert torch.equal(slot.view(16, 2, 2, 2, 4)[0, 0, 0, 0], torch.arange(4))


def test_layout_block16_rows_8_apart_share_a_scope() -> None:
    scope, _ = patterns.row_coupled_blocks(_weight())
    lay = element_layout(scope)
    blk, scp, slot = lay.block, lay.scope, lay.slot
    assert blk.unique().numel() == 16 * 2  # one block per (row, 16-column half)
    assert bool((blk.view(16, 2, 16) == blk.view(16, 2, 16)[..., :1]).all())
    assert torch.equal(scp[:8], scp[8:])  # rows p and p+8 compete
    assert scp.unique().numel() == 16
    assert bool((slot[:8] == 0).all()) and bool((slot[8:] == 1).all())


def test_layout_2_4_and_4_8() -> None:
    lay = element_layout(patterns.nm(_weight())[0])
    assert torch.equal(lay.block, torch.arange(16 * 32).view(16, 32))
    assert torch.equal(lay.scope, torch.arange(16 * 32).view(16, 32) // 4)
    lay = element_layout(patterns.nm_blocks(_weight())[0])
    assert torch.equal(lay.block, torch.arange(16 * 32).view(16, 32) // 2)
    assert torch.equal(lay.slot[0, :8], torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))


# ------------------------------------------------------------------ PNG output
@pytest.mark.parametrize("name", ["24", "48", "coupled24", "block16"])
def test_draw_layout_writes_png_for_each_pattern(name: str, tmp_path: Path) -> None:
    path = tmp_path / "sub" / f"{name}.png"
    fig = draw_layout(name, path, dpi=60)
    w_in, h_in = fig.get_size_inches()
    width, height = _png_size(path)
    assert abs(width - w_in * 60) <= 2 and abs(height - h_in * 60) <= 2
    assert width > 300 and height > 300


def test_draw_layout_scope_values_and_nnz(tmp_path: Path) -> None:
    w = _weight(8, 16, 3)
    before = w.detach().clone()
    scope, nnz = patterns.nm(w, 1, 4)
    fig = draw_layout(scope, tmp_path / "a.png", values=w.detach().abs() + 1, nnz=nnz, dpi=40, annotate=False)
    assert torch.equal(w.detach(), before)  # drawing never prunes
    assert fig.axes
    draw_layout((scope, nnz), tmp_path / "b.png", nnz=-1, dpi=40)  # structure only
    draw_layout(patterns.channels, tmp_path / "c.png", shape=(8, 12), dpi=40)
    for f in ("a", "b", "c"):
        _png_size(tmp_path / f"{f}.png")
    assert draw_layout("24", None, shape=(4, 8), dpi=40) is not None  # no file needed


def test_pruned_cells_match_get_masks() -> None:
    w = _weight(16, 32, 5)
    scope, nnz = patterns.coupled_nm(w)
    lay = element_layout(scope)
    pruned = viz._pruned_mask(scope, nnz, None, lay)
    with torch.no_grad():
        scope.hard_threshold(nnz=nnz)
    assert torch.equal(pruned, w.detach() == 0)


def test_missing_matplotlib_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install s3sparse\[viz\]"):
        draw_layout("24")


def test_package_import_does_not_import_matplotlib() -> None:
    code = "import sys, s3sparse; s3sparse.viz.draw_layout; assert 'matplotlib' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
