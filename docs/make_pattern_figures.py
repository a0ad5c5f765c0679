"""Draw the four S3 reference patterns (SPEC §2) into docs/patterns/*.png.

Run from the repository root::

    python docs/make_pattern_figures.py [--out docs/patterns] [--dpi 150]

Each picture is ``s3sparse.viz.draw_layout`` of the pattern on a random 16 × 32
weight (seed 0), pruned by magnitude with the pattern's own budget.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from s3sparse.viz import draw_layout

#: (file stem, pattern name in s3sparse.patterns.PATTERNS, title)
FIGURES: list[tuple[str, str, str]] = [
    ("2_4", "24", "2:4 — keep 2 of every 4 adjacent weights"),
    ("4_8", "48", "4:8 — keep 2 of every 4 adjacent column pairs"),
    ("coupled_2_4", "coupled24", "coupled 2:4 — columns j and j+8 pruned together, 2 of 4 pairs kept"),
    ("block16_row_coupled", "block16", "16-column blocks — rows p and p+8 compete, 1 of 2 kept"),
]


def main(argv: list[str] | None = None) -> list[Path]:
    """Write one PNG per pattern; returns the paths written."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "patterns")
    parser.add_argument("--dpi", type=int, default=150)
    args = parser.parse_args(argv)
    written = []
    for stem, name, title in FIGURES:
        path = args.out / f"{stem}.png"
        draw_layout(name, path, title=title, dpi=args.dpi)
        written.append(path)
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
