"""Fake-quantizers on weight matrices (quantize then dequantize, float32), METHODS §2.

Everything works on *statistics sets*: a matrix is split into rows of a 2-D `[sets, k]` tensor (one row per
tensor / output channel / group of g contiguous inputs), each set gets its own range, and the result is
merged back. Per-group on a width that is not a multiple of g: every output row ends with one *short group*
holding the remaining `in mod g` entries, with statistics over those entries only (no padding, no error).

Uniform RTN (symmetric and asymmetric) is written once as Ŵ = Δ·clamp(round(W/Δ), n_lo, n_hi) with integer
bounds per set: symmetric (−q_max, q_max); asymmetric (−z, 2^b − 1 − z), which equals METHODS §2's
Δ·(clamp(round(W/Δ) + z, 0, 2^b − 1) − z). NF4 / FP4 are codebook quantizers with an absmax scale per block;
FP8 casts through torch's float8 dtypes with a per-row scale.
"""
from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group")
RANGES: tuple[str, ...] = ("minmax", "percentile", "mse")
GROUP_SIZES: tuple[int, ...] = (32, 64, 128)
PERCENTILES: tuple[float, ...] = (0.999, 0.9999, 0.99999)
BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
STEP_MIN = 1e-12  # METHODS §2 guard Δ ≥ 1e-12
# MSE-search clipping ratios a ∈ {1.00, 0.99, …, 0.50}: descending, so ties resolve to the widest range.
MSE_RATIOS: tuple[float, ...] = tuple(round(1.0 - i / 100, 2) for i in range(51))
MSE_CHUNK_ELEMENTS = 1 << 19  # bound on |a| × sets × k elements held at once by the MSE search

# NF4 code book (QLoRA / bitsandbytes values; METHODS §2 lists them to 4 decimals).
NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
# FP4 E2M1 magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}, normalised to absmax 1 and mirrored (15 distinct values).
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_LEVELS: tuple[float, ...] = tuple(sorted({s * m / 6.0 for m in _E2M1 for s in (-1.0, 1.0)}))
# FP8: torch dtype, largest finite value, smallest positive (subnormal) value.
FP8_FORMATS: dict[str, tuple[torch.dtype, float, float]] = {
    "e4m3": (torch.float8_e4m3fn, 448.0, 2.0**-9),
    "e5m2": (torch.float8_e5m2, 57344.0, 2.0**-16),
}


class QuantGrid:
    """A quantizer's grid for one matrix, exposed per entry (tensors of the matrix's shape, float32, built lazily).

    lo, hi: the clipping range of the entry's statistics set (symmetric: ±a·max|W_S|; asymmetric:
    a·min(W_S, 0), a·max(W_S, 0); NF4/FP4/FP8: ±absmax of the block/row). step: Δ for uniform grids; for
    non-uniform formats the grid spacing at zero (smallest positive level × scale), so |W| < step/2 is the
    dead zone. n_lo, n_hi: integer level bounds (representable range = step·[n_lo, n_hi]); None when not
    uniform. a: the clipping ratio used (1 for min-max and code-book formats).
    """

    def __init__(
        self, sets: list[dict[str, Tensor]], shape: tuple[int, int], granularity: str, group: int, bits: int,
        uniform: bool,
    ) -> None:
        self._sets = sets  # per part of `split_sets`: {key: [sets, 1]}
        self.shape, self.granularity, self.group, self.bits, self.uniform = shape, granularity, group, bits, uniform
        self._cache: dict[str, Tensor] = {}
        self.info: dict[str, float] = {}  # a data-dependent quantizer's per-matrix edits.csv fields (e.g. AWQ's α)

    def _entry(self, key: str) -> Float[Tensor, "out in"] | None:
        if key not in self._sets[0]:
            return None
        if key not in self._cache:
            widths = self._part_widths()
            parts = [st[key].expand(st[key].shape[0], k) for st, k in zip(self._sets, widths)]
            self._cache[key] = merge_sets(parts, self.shape, self.granularity, self.group).contiguous()
        return self._cache[key]

    def columns(self, key: str) -> Float[Tensor, "in out"] | None:
        """The per-entry tensor of `key` transposed (row j = column j of the matrix), built from the sets without
        the per-entry expansion (GPTQ's column loop reads one column at a time)."""
        if key not in self._sets[0]:
            return None
        m, n = self.shape
        if self.granularity in ("tensor", "channel"):
            return self._sets[0][key].reshape(1, -1).expand(n, m)
        full = (n // self.group) * self.group
        pieces = []
        if full:
            per_group = self._sets[0][key].reshape(m, full // self.group).T  # [groups, m]
            idx = torch.arange(full, device=per_group.device) // self.group
            pieces.append(per_group.index_select(0, idx))
        if full < n:
            pieces.append(self._sets[-1][key].reshape(1, m).expand(n - full, m))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)

    def _part_widths(self) -> list[int]:
        m, n = self.shape
        if self.granularity == "tensor":
            return [m * n]
        if self.granularity == "channel":
            return [n]
        full = (n // self.group) * self.group
        return ([self.group] if full else []) + ([n - full] if full < n else [])

    @property
    def lo(self) -> Float[Tensor, "out in"]:
        return self._entry("lo")

    @property
    def hi(self) -> Float[Tensor, "out in"]:
        return self._entry("hi")

    @property
    def step(self) -> Float[Tensor, "out in"]:
        return self._entry("step")

    @property
    def a(self) -> Float[Tensor, "out in"]:
        return self._entry("a")

    @property
    def n_lo(self) -> Float[Tensor, "out in"] | None:
        return self._entry("n_lo")

    @property
    def n_hi(self) -> Float[Tensor, "out in"] | None:
        return self._entry("n_hi")

    def set_stats(self) -> list[dict[str, Tensor]]:
        """The per-set statistics ({key: [sets, 1]} per part of `split_sets`), without expanding them."""
        return self._sets

    def a_mean(self) -> float:
        """Mean clipping ratio over entries."""
        widths = self._part_widths()
        total = sum(float(st["a"].sum()) * k for st, k in zip(self._sets, widths))
        return total / (self.shape[0] * self.shape[1])

    def clipped_fraction(self, w: Float[Tensor, "out in"]) -> float:
        """Fraction of entries of `w` outside their set's [lo, hi]."""
        parts = split_sets(w.to(torch.float32), self.granularity, self.group)
        n_out = sum(int(((p < st["lo"]) | (p > st["hi"])).sum()) for p, st in zip(parts, self._sets))
        return n_out / (self.shape[0] * self.shape[1])


# ----------------------------------------------------------------------------------------- statistics sets
def split_sets(w: Float[Tensor, "out in"], granularity: str, group: int = 0) -> list[Float[Tensor, "_sets _k"]]:
    """Statistics sets of `w` as 2-D tensors (one set per row); per-group may yield a second, short part."""
    m, n = w.shape
    if granularity == "tensor":
        return [w.reshape(1, m * n)]
    if granularity == "channel":
        return [w]
    if granularity != "group" or group <= 0:
        raise ValueError(f"bad granularity {granularity!r} / group {group}")
    full = (n // group) * group
    parts = []
    if full:
        parts.append(w[:, :full].reshape(m * (full // group), group))
    if full < n:
        parts.append(w[:, full:])
    return parts


def merge_sets(
    parts: list[Float[Tensor, "_sets _k"]], shape: tuple[int, int], granularity: str, group: int = 0,
) -> Float[Tensor, "out in"]:
    """Inverse of `split_sets`."""
    m, n = shape
    if granularity in ("tensor", "channel"):
        return parts[0].reshape(m, n)
    full = (n // group) * group
    pieces = []
    i = 0
    if full:
        pieces.append(parts[0].reshape(m, full))
        i = 1
    if full < n:
        pieces.append(parts[i].reshape(m, n - full))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


# ------------------------------------------------------------------------------------------- uniform RTN
def quantile_rows(x: Float[Tensor, "sets k"], q: float) -> Float[Tensor, "sets 1"]:
    """Per-row quantile with linear interpolation (as numpy's default); kthvalue avoids torch.quantile's size cap."""
    k = x.shape[1]
    pos = q * (k - 1)
    lo_i = int(pos)
    frac = pos - lo_i
    lo_v = torch.kthvalue(x, lo_i + 1, dim=1, keepdim=True).values
    if frac == 0.0 or lo_i + 1 >= k:
        return lo_v
    hi_v = torch.kthvalue(x, lo_i + 2, dim=1, keepdim=True).values
    return lo_v + frac * (hi_v - lo_v)


def base_range(
    x: Float[Tensor, "sets k"], symmetric: bool, method: str = "minmax", p: float | None = None
) -> tuple[Float[Tensor, "sets 1"], Float[Tensor, "sets 1"]]:
    """(lo, hi) per set at a = 1: min-max, or the p-th percentile (of |W| if symmetric, else of W at p and 1 − p)."""
    if symmetric:
        mag = x.abs()
        m = quantile_rows(mag, p) if method == "percentile" else mag.amax(dim=1, keepdim=True)
        return -m, m
    if method == "percentile":
        lo, hi = quantile_rows(x, 1.0 - p), quantile_rows(x, p)
    else:
        lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    return lo.clamp(max=0.0), hi.clamp(min=0.0)


def uniform_grid(
    lo: Float[Tensor, "*b sets 1"], hi: Float[Tensor, "*b sets 1"], bits: int, symmetric: bool
) -> tuple[Float[Tensor, "*b sets 1"], Float[Tensor, "*b sets 1"], Float[Tensor, "*b sets 1"]]:
    """(Δ, n_lo, n_hi) for the range [lo, hi] (METHODS §2): symmetric Δ = hi/q_max; asymmetric
    Δ = (hi−lo)/(2^b−1), z = round(−lo/Δ)."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        step = (hi / qmax).clamp(min=STEP_MIN)
        return step, torch.full_like(step, -qmax), torch.full_like(step, qmax)
    levels = 2**bits - 1
    step = ((hi - lo) / levels).clamp(min=STEP_MIN)
    z = torch.round(-lo / step).clamp(0, levels)
    return step, -z, levels - z


def rtn(
    x: Float[Tensor, "*b sets k"], step: Float[Tensor, "*b sets 1"], n_lo: Float[Tensor, "*b sets 1"],
    n_hi: Float[Tensor, "*b sets 1"],
) -> Float[Tensor, "*b sets k"]:
    """Ŵ = Δ · clamp(round(W/Δ), n_lo, n_hi) (round half to even, as torch.round)."""
    return step * torch.minimum(torch.maximum(torch.round(x / step), n_lo), n_hi)


def mse_ratio(
    x: Float[Tensor, "sets k"],
    lo: Float[Tensor, "sets 1"],
    hi: Float[Tensor, "sets 1"],
    bits: int,
    symmetric: bool,
    ratios: tuple[float, ...] = MSE_RATIOS,
    chunk_elements: int = MSE_CHUNK_ELEMENTS,
) -> Float[Tensor, "sets 1"]:
    """a* = argmin_a ‖W_S − Q_a(W_S)‖² per set over `ratios` (METHODS §2), all sets × all a at once in chunks.

    At most ~`chunk_elements` candidates × entries are held at once (rows of sets, and column slices when one
    set alone is larger, e.g. per-tensor). Ties go to the earliest ratio (descending: a = 1 unless beaten).
    """
    s, k = x.shape
    n_a = len(ratios)
    a = torch.tensor(ratios, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    rows = max(1, chunk_elements // max(n_a * k, 1))
    cols = k if rows > 1 else max(1, chunk_elements // n_a)
    best = torch.empty(s, 1, dtype=x.dtype, device=x.device)
    for i in range(0, s, rows):
        step, n_lo, n_hi = uniform_grid(a * lo[i : i + rows], a * hi[i : i + rows], bits, symmetric)  # [A, c, 1]
        err = torch.zeros(n_a, step.shape[1], dtype=torch.float64 if cols < k else x.dtype, device=x.device)
        for j in range(0, k, cols):
            t = x[i : i + rows, j : j + cols] / step  # error in units of Δ: (W − Q(W))/Δ = t − clamp(round(t))
            r = torch.round(t)
            if symmetric:
                r.clamp_(-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
            else:
                torch.maximum(r, n_lo, out=r)
                torch.minimum(r, n_hi, out=r)
            t.sub_(r)
            err += torch.linalg.vecdot(t, t, dim=-1)
        err = err * step.squeeze(-1) ** 2  # [A, c]
        best[i : i + rows, 0] = a.view(-1)[torch.argmin(err, dim=0)]
    return best


def rtn_sets(
    x: Float[Tensor, "sets k"],
    bits: int,
    symmetric: bool = True,
    method: str = "minmax",
    p: float | None = None,
    clip: float = 1.0,
) -> tuple[Float[Tensor, "sets k"], dict[str, Float[Tensor, "sets 1"]]]:
    """Fake-quantize each row of `x` with its own range; also return the per-set grid statistics."""
    lo, hi = base_range(x, symmetric, method, p)
    if method == "mse":
        a = mse_ratio(x, lo, hi, bits, symmetric)
    else:
        a = torch.full_like(lo, clip)
    lo, hi = a * lo, a * hi
    step, n_lo, n_hi = uniform_grid(lo, hi, bits, symmetric)
    return rtn(x, step, n_lo, n_hi), {"lo": lo, "hi": hi, "step": step, "a": a, "n_lo": n_lo, "n_hi": n_hi}


def fake_quant_rtn(
    w: Float[Tensor, "out in"],
    bits: int,
    granularity: str = "channel",
    group: int = 0,
    symmetric: bool = True,
    method: str = "minmax",
    p: float | None = None,
    clip: float = 1.0,
) -> tuple[Float[Tensor, "out in"], QuantGrid]:
    """RTN fake-quant of a matrix (METHODS §2) and its grid."""
    w = w.to(torch.float32)
    outs, stats = [], []
    for part in split_sets(w, granularity, group):
        q, st = rtn_sets(part, bits, symmetric, method, p, clip)
        outs.append(q)
        stats.append(st)
    shape = (w.shape[0], w.shape[1])
    return merge_sets(outs, shape, granularity, group), QuantGrid(stats, shape, granularity, group, bits, True)


# ------------------------------------------------------------------------------------------ code books
def codebook_sets(
    x: Float[Tensor, "sets k"], levels: tuple[float, ...],
) -> tuple[Float[Tensor, "sets k"], Float[Tensor, "sets 1"]]:
    """Nearest code-book level (levels sorted in [−1, 1]) of x / absmax, times absmax; ties go to the lower level."""
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=STEP_MIN)
    lv = torch.tensor(levels, dtype=x.dtype, device=x.device)
    mid = (lv[1:] + lv[:-1]) / 2
    idx = torch.bucketize(x / scale, mid)
    return lv[idx] * scale, scale


def fake_quant_codebook(
    w: Float[Tensor, "out in"], levels: tuple[float, ...], block: int, bits: int
) -> tuple[Float[Tensor, "out in"], QuantGrid]:
    """Block-wise absmax code-book fake-quant (NF4 blocks of 64, FP4 E2M1 blocks of 32; METHODS §2)."""
    w = w.to(torch.float32)
    shape = (w.shape[0], w.shape[1])
    smallest = min(abs(v) for v in levels if v != 0.0)
    outs, stats = [], []
    for part in split_sets(w, "group", block):
        q, scale = codebook_sets(part, levels)
        outs.append(q)
        stats.append({"lo": -scale, "hi": scale, "step": scale * smallest, "a": torch.ones_like(scale)})
    return merge_sets(outs, shape, "group", block), QuantGrid(stats, shape, "group", block, bits, False)


def fake_quant_nf4(w: Float[Tensor, "out in"], block: int = 64) -> tuple[Float[Tensor, "out in"], QuantGrid]:
    """NF4: nearest of the 16 NF4 levels × absmax per block of `block` inputs."""
    return fake_quant_codebook(w, NF4_LEVELS, block, 4)


def fake_quant_fp4(w: Float[Tensor, "out in"], block: int = 32) -> tuple[Float[Tensor, "out in"], QuantGrid]:
    """FP4 E2M1: nearest of {0, .5, 1, 1.5, 2, 3, 4, 6}/6 (signed) × absmax per block of `block` inputs."""
    return fake_quant_codebook(w, FP4_LEVELS, block, 4)


def fake_quant_fp8(w: Float[Tensor, "out in"], fmt: str = "e4m3") -> tuple[Float[Tensor, "out in"], QuantGrid]:
    """FP8 per row: s = absmax/f_max, Ŵ = s · float(fp8(clamp(W/s, ±f_max))) through torch's float8 dtype."""
    dtype, fmax, tiny = FP8_FORMATS[fmt]
    w = w.to(torch.float32)
    absmax = w.abs().amax(dim=1, keepdim=True)
    s = (absmax / fmax).clamp(min=STEP_MIN / fmax)
    q = (w / s).clamp(-fmax, fmax).to(dtype).to(torch.float32) * s
    stats = {"lo": -absmax, "hi": absmax, "step": s * tiny, "a": torch.ones_like(s)}
    return q, QuantGrid([stats], (w.shape[0], w.shape[1]), "channel", 0, 8, False)
