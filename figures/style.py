"""House style for every figure: family palette, column sizes, fonts, and deterministic saving.

One fixed colour per intervention family (METHODS §3) so a reader can follow a family across figures;
the palette is Paul Tol's colour-blind-safe "muted" set plus black (fp) and grey, and each family also
gets its own marker so no figure relies on colour alone.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import matplotlib
from matplotlib.figure import Figure

from eval.atomic import write_bytes

# Family order is also the legend / drawing order everywhere.
FAMILIES: tuple[str, ...] = (
    "fp", "quant", "lowrank", "damping", "noise", "clipping", "scale",
    "random-projection", "top-damping", "rotation", "temperature",
)
PALETTE: dict[str, str] = {
    "fp": "#000000",                 # black
    "quant": "#882255",              # wine
    "lowrank": "#332288",            # indigo
    "damping": "#117733",            # green
    "noise": "#999933",              # olive
    "clipping": "#777777",           # grey
    "scale": "#44AA99",              # teal
    "random-projection": "#88CCEE",  # cyan
    "top-damping": "#CC6677",        # rose
    "rotation": "#AA4499",           # purple
    "temperature": "#DDCC77",        # sand
}
# Family names as other parts of the toolkit write them (edit registry class names, short forms) -> the
# canonical family whose colour they get. Rounding-only and dead-zone-only are clipping's companions (§3 d).
FAMILY_ALIASES: dict[str, str] = {
    "fp32": "fp", "full": "fp", "full-precision": "fp",
    "quantizer": "quant", "quantization": "quant", "quantize": "quant", "fakequant": "quant",
    "low-rank": "lowrank", "low_rank": "lowrank",
    "damp": "damping", "shrinkage": "damping", "transplant": "damping",
    "clip": "clipping", "round": "clipping", "rounding": "clipping", "deadzone": "clipping", "dead-zone": "clipping",
    "scale-only": "scale", "bussgang": "scale",
    "randproj": "random-projection", "random_projection": "random-projection", "rproj": "random-projection",
    "topdamp": "top-damping", "top_damping": "top-damping",
    "rotquant": "rotation", "rotated": "rotation", "rot": "rotation",
    "temp": "temperature", "temperature-matched": "temperature",
}
OTHER_FAMILY = "other"
OTHER_COLOR = "#BBBBBB"
MARKERS: dict[str, str] = {
    "fp": "o", "quant": "s", "lowrank": "v", "damping": "^", "noise": "D", "clipping": "P",
    "scale": "X", "random-projection": "<", "top-damping": ">", "rotation": "h", "temperature": "*",
}
# Within one family, variants are told apart by line style (colour stays the family's).
VARIANT_LINESTYLES: tuple[object, ...] = ("-", (0, (5, 1.5)), (0, (1, 1)), (0, (4, 1, 1, 1)), (0, (2, 2)))

WIDTHS_IN: dict[str, float] = {"single": 3.3, "double": 6.9}
DPI = 300
MIN_FONT_PT = 6.0

RC: dict[str, object] = {
    "font.family": "DejaVu Sans",
    "font.size": 7.0,
    "axes.titlesize": 7.0,
    "axes.labelsize": 7.0,
    "xtick.labelsize": 6.5,
    "ytick.labelsize": 6.5,
    "legend.fontsize": 6.5,
    "legend.title_fontsize": 6.5,
    "figure.titlesize": 7.5,
    "axes.linewidth": 0.6,
    "lines.linewidth": 1.1,
    "lines.markersize": 3.5,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.minor.width": 0.4,
    "ytick.minor.width": 0.4,
    "xtick.major.size": 2.5,
    "ytick.major.size": 2.5,
    "xtick.minor.size": 1.5,
    "ytick.minor.size": 1.5,
    "legend.frameon": False,
    "legend.handlelength": 1.8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "svg.fonttype": "none",
    "svg.hashsalt": "figures",
    "savefig.dpi": DPI,
    "figure.dpi": DPI,
    "path.simplify": True,
    "image.interpolation": "nearest",
}

# Fixed metadata: no creation dates, so identical inputs give identical bytes.
PDF_METADATA: dict[str, str | None] = {"CreationDate": None, "ModDate": None, "Creator": "clip-spectral figures"}
PNG_METADATA: dict[str, str | None] = {"Software": "clip-spectral figures"}


def canonical_family(family: str) -> str:
    """The canonical family name for any alias (case-insensitive); unknown names are returned unchanged."""
    key = family.strip().lower()
    if key in PALETTE:
        return key
    return FAMILY_ALIASES.get(key, family)


def family_color(family: str) -> str:
    """The family's fixed colour (grey for a family outside METHODS §3's list)."""
    return PALETTE.get(family, OTHER_COLOR)


def family_marker(family: str) -> str:
    return MARKERS.get(family, "o")


def family_rank(family: str) -> int:
    """Position of a family in the fixed drawing/legend order (unknown families last)."""
    return FAMILIES.index(family) if family in FAMILIES else len(FAMILIES)


def variant_styles(variant_family: dict[str, str]) -> dict[str, dict[str, object]]:
    """Line kwargs per variant: the family's colour and marker, a line style distinguishing variants of one family."""
    out: dict[str, dict[str, object]] = {}
    seen: dict[str, int] = {}
    for v in sorted(variant_family, key=lambda v: (family_rank(variant_family[v]), v)):
        fam = variant_family[v]
        i = seen.get(fam, 0)
        seen[fam] = i + 1
        out[v] = {"color": family_color(fam), "marker": family_marker(fam),
                  "linestyle": VARIANT_LINESTYLES[i % len(VARIANT_LINESTYLES)], "gid": tag(fam, v)}
    return out


def tag(family: str, variant: str) -> str:
    """The gid put on every data artist, so tests (and users) can find a family's artists in any figure."""
    return f"family={family};variant={variant}"


def figsize(size: str, height_in: float) -> tuple[float, float]:
    """(width, height) in inches for a column size; height rounded to 0.01 in so pixels = inches × DPI exactly."""
    if size not in WIDTHS_IN:
        from eval.errors import UserError

        raise UserError(f"unknown figure size {size!r}; use one of {', '.join(WIDTHS_IN)}")
    return WIDTHS_IN[size], round(height_in, 2)


def new_figure(size: str, height_in: float) -> Figure:
    """A pyplot-free Figure (no global figure registry) at a column width, with constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    w, h = figsize(size, height_in)
    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # a real canvas, so fig.canvas.get_renderer() / fig.savefig work without pyplot
    return fig


@contextmanager
def house_style() -> Iterator[None]:
    """Apply RC for the duration of a block only (no global state leaks into the caller)."""
    with matplotlib.rc_context(RC):
        yield


_SAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


def safe_name(text: str) -> str:
    """A file-name-safe rendering of a variant/dataset name."""
    return _SAFE.sub("-", text).strip("-") or "x"




def render(fig: Figure, fmt: str) -> bytes:
    """The figure's bytes as PDF (vector, Type 42 fonts) or PNG (DPI), with fixed metadata."""
    import io

    buf = io.BytesIO()
    with house_style():
        if fmt == "pdf":
            fig.savefig(buf, format="pdf", metadata=PDF_METADATA)
        elif fmt == "png":
            fig.savefig(buf, format="png", dpi=DPI, metadata=PNG_METADATA)
        else:
            raise ValueError(f"unsupported format {fmt!r}")
    return buf.getvalue()


def save(fig: Figure, out_dir: Path, stem: str, formats: tuple[str, ...] = ("pdf", "png")) -> list[Path]:
    """Write `stem.pdf` and `stem.png` atomically into out_dir; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out_dir / f"{stem}.{fmt}"
        write_bytes(path, render(fig, fmt))
        paths.append(path)
    return paths
