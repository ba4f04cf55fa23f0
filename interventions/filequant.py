"""A quantized checkpoint made elsewhere as a quantizer variant: `file:PATH` (METHODS §2 "a checkpoint file").

The file is a state dict (safetensors, or a torch `.pt`/`.pth`/`.bin` state dict; keys as the model's own
`state_dict()`, optionally wrapped in `{"state_dict": ...}` or prefixed `module.`) whose tensors are the
*dequantized* weights of any library (torchao, llm-compressor, GPTQModel, bitsandbytes after dequantize, …).
On every selected matrix Ŵ is the file's value of that 2-D view (q/k/v row slices of a fused in_proj, transposed
projections, as `spectral.views`); a key the file lacks leaves its matrices at full precision. The toolkit edits
matrices: a non-matrix tensor (bias, norm, embedding, buffer) or an unselected matrix that differs in the file is
*not applied*, and the edit report says so (`q_not_applied`, and the summary line).

Run keys (`interventions.store.run_key` hashes the spec string): parsing `file:PATH` hashes the file's bytes and
the canonical spec carries the hash, `str(q) == "file:PATH@<sha256[:12]>"`; parsing `file:PATH@<sha12>` checks it
and refuses a file that changed since. `prepare` hashes the very bytes it deserializes and refuses them unless they
hash to the spec's digest, so a result is never keyed by another file content than the one it was computed from.

The grid of Ŵ (for clipping-type controls, METHODS §3 d, c5) is inferred per output row from Ŵ alone:
lo = row min of Ŵ, hi = row max of Ŵ, step Δ = the smallest positive gap between the row's distinct values (a row
with one value: its magnitude, at least 1e-12), a = 1. When every value of every row is an integer multiple of its
row's Δ (within 2 % of Δ) the grid is uniform, with n_lo = round(lo/Δ), n_hi = round(hi/Δ); otherwise it is
non-uniform (n_lo, n_hi None, like the code-book formats). `bits` = ⌈log2(most distinct values in a row)⌉.
Caveat: per-group grids (e.g. g128) share a row, so the row's smallest gap can be far below any one group's Δ.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from eval.errors import UserError
from interventions.dataquant import DataQuantizer, QuantSource, matrix_state
from interventions.fakequant import STEP_MIN, QuantGrid
from interventions.quantizers import Quantizer
from interventions.registry import Edited, MatrixContext, register_edit

PREFIX = "file:"
SHA_CHARS = 12
SAFETENSORS = (".safetensors",)
TORCH_FILES = (".pt", ".pth", ".bin", ".ckpt")
UNIFORM_TOL = 0.02  # |Ŵ − Δ·round(Ŵ/Δ)| ≤ 2 % of Δ on every entry: the row's values lie on one uniform grid
NAMES_SHOWN = 5  # names of not-applied tensors kept per edits.csv row
_SPEC_RE = re.compile(rf"(?P<path>.+)@(?P<sha>[0-9a-f]{{{SHA_CHARS}}})")
_DIGESTS: dict[tuple[str, int, int, int], str] = {}  # (real path, size, mtime_ns, inode) -> sha256 hex


# ------------------------------------------------------------------------------------------------ the file
def _where(path: str) -> str:
    return f"{PREFIX}{path}"


def _stat_path(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{_where(path)}: the file does not exist")
    if not p.is_file():
        raise UserError(f"{_where(path)}: not a file (give a safetensors or torch state-dict file)")
    if not p.name.endswith(SAFETENSORS + TORCH_FILES):
        raise UserError(f"{_where(path)}: unknown file type; expected one of "
                        f"{', '.join(SAFETENSORS + TORCH_FILES)} (a state dict of dequantized weights)")
    return p


def file_digest(path: str) -> str:
    """sha256 of the file's bytes (hex), cached per (real path, size, mtime, inode)."""
    p = _stat_path(path)
    try:
        st = p.stat()
        key = (os.path.realpath(p), st.st_size, st.st_mtime_ns, st.st_ino)
        if key not in _DIGESTS:
            h = hashlib.sha256()
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            _DIGESTS[key] = h.hexdigest()
    except OSError as exc:
        raise UserError(f"{_where(path)}: could not read the file ({type(exc).__name__}: {exc.strerror})") from None
    return _DIGESTS[key]


def _unwrap(obj: Any, path: str) -> dict[str, Tensor]:
    """A flat {key: tensor} from a raw state dict, `{"state_dict": ...}` / `{"model": ...}` wrappers, `module.`."""
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not obj:
        raise UserError(f"{_where(path)}: holds no state dict (a mapping of parameter names to tensors)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise UserError(f"{_where(path)}: entry {bad[0]!r} is not a tensor; the file must be a flat state dict "
                        "of dequantized weights")
    out = dict(obj)
    if all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


def read_state_dict(path: str, sha: str) -> dict[str, Tensor]:
    """The file's tensors (CPU), deserialized from bytes whose sha256 starts with `sha` (else a one-line error)."""
    p = _stat_path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise UserError(f"{_where(path)}: could not read the file ({type(exc).__name__}: {exc.strerror})") from None
    digest = hashlib.sha256(data).hexdigest()[:SHA_CHARS]
    if digest != sha:
        raise UserError(f"{_where(path)}@{sha}: the file changed (its content hash is now {digest}); "
                        f"re-run with {PREFIX}{path} to use the new content")
    try:
        if p.name.endswith(SAFETENSORS):
            from safetensors.torch import load as load_safetensors

            obj: Any = load_safetensors(data)
        else:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign bytes: the libraries raise many types
        first = (str(exc).splitlines() or [""])[0][:160]
        raise UserError(f"{_where(path)}: could not read a state dict ({type(exc).__name__}: {first})") from None
    return _unwrap(obj, path)


# ------------------------------------------------------------------------------------------------ the grid
class RowGrid(QuantGrid):
    """The per-row grid inferred from Ŵ alone (module docstring); `levels`: most distinct values in one row."""

    def __init__(self, stats: dict[str, Tensor], shape: tuple[int, int], bits: int, uniform: bool,
                 levels: int) -> None:
        super().__init__([stats], shape, "channel", 0, bits, uniform)
        self.levels = levels


def row_grid(w_hat: Float[Tensor, "out in"], tol: float = UNIFORM_TOL) -> RowGrid:
    """lo/hi = row min/max of Ŵ, Δ = smallest positive gap between the row's distinct values, a = 1; uniform (with
    n_lo/n_hi) when every entry is an integer multiple of its row's Δ within `tol`·Δ (METHODS §3 d needs Q's grid)."""
    q = w_hat.to(torch.float32)
    srt = torch.sort(q, dim=1).values
    lo, hi = srt[:, :1], srt[:, -1:]
    gaps = srt[:, 1:] - srt[:, :-1]
    distinct = gaps > 0
    levels = int((1 + distinct.sum(dim=1)).max())
    inf = torch.full_like(lo, math.inf)
    smallest = torch.where(distinct, gaps, inf).amin(dim=1, keepdim=True) if gaps.shape[1] else inf
    single = torch.maximum(lo.abs(), hi.abs())  # a row of one value has no gap
    step = torch.where(torch.isfinite(smallest), smallest, single).clamp(min=STEP_MIN)
    uniform = bool(((q - step * torch.round(q / step)).abs() <= tol * step).all())
    stats = {"lo": lo, "hi": hi, "step": step, "a": torch.ones_like(lo)}
    if uniform:
        stats.update(n_lo=torch.round(lo / step), n_hi=torch.round(hi / step))
    bits = max(1, math.ceil(math.log2(levels))) if levels > 1 else 1
    return RowGrid(stats, (q.shape[0], q.shape[1]), bits, uniform, levels)


# ------------------------------------------------------------------------------------------------ the quantizer
class FileMatrix(NamedTuple):
    """One selected matrix's prepared state: Ŵ from the file (None: the file lacks its key, Ŵ = W), whether it
    differs from W, and the differing tensors of the file that are not applied (the same tuple for every matrix)."""

    w_hat: Tensor | None
    differs: bool
    not_applied: tuple[str, ...]


def _check_tensor(path: str, key: str, t: Tensor, ref: Tensor) -> None:
    """The file's tensor fits the model's: same shape, floating point, finite (one-line errors)."""
    if tuple(t.shape) != tuple(ref.shape):
        raise UserError(f"{_where(path)}: {key} has shape {list(t.shape)} but the model's is {list(ref.shape)}")
    if ref.is_floating_point() and not t.is_floating_point():
        raise UserError(f"{_where(path)}: {key} holds {str(t.dtype).removeprefix('torch.')} values, not "
                        "dequantized weights; dequantize them to float before saving the state dict")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        nan = int(torch.isnan(t).sum())
        raise UserError(f"{_where(path)}: {key} holds non-finite values ({nan} NaN, "
                        f"{int((~torch.isfinite(t)).sum()) - nan} inf of {t.numel()})")


def _same(a: Tensor, b: Tensor) -> bool:
    """Equal values (compared as float32 on the CPU: a bf16 file of an fp32 model differs where rounding does)."""
    return torch.equal(*(t.detach().to(device="cpu", dtype=torch.float32) for t in (a, b)))


@dataclass(frozen=True)
class FileQuantizer(DataQuantizer):
    """Ŵ read from a state-dict file of dequantized weights (`file:PATH@<sha12>`; see the module docstring)."""

    path: str
    sha: str
    bits: int = dataclasses.field(default=0, init=False)  # unknown before the file is read: see `q_levels`

    needs_calibration: ClassVar[bool] = False
    report_fields: ClassVar[tuple[str, ...]] = Quantizer.report_fields + (
        "q_from_file", "q_levels", "q_uniform", "q_not_applied", "q_not_applied_names",
    )

    def __post_init__(self) -> None:
        if not self.path:
            raise UserError(f"bad file spec {str(self)!r}: give a path, {PREFIX}PATH")
        if not re.fullmatch(rf"[0-9a-f]{{{SHA_CHARS}}}", self.sha):
            raise UserError(f"bad file spec {str(self)!r}: the hash after '@' is {SHA_CHARS} hex digits")

    def __str__(self) -> str:
        return f"{PREFIX}{self.path}@{self.sha}"

    def params(self) -> dict[str, Any]:
        return {"format": "file", "bits": self.bits, "granularity": "channel", "group": 0, "range": "file",
                "p": None, "clip": 1.0, "symmetric": None}

    def check(self, source: QuantSource) -> None:
        """Read and check the file before anything is written (the session keeps the prepared state)."""
        source.state(self)

    def prepare(self, source: QuantSource) -> dict[str, FileMatrix]:
        """{selected matrix: FileMatrix}: every tensor checked against the model's (shape, dtype, finite), unknown
        keys refused, and at least one selected matrix must differ from full precision."""
        from spectral.views import weight_views

        tensors = read_state_dict(self.path, self.sha)
        own = source.model.state_dict()
        unknown = [k for k in tensors if k not in own]
        if unknown:
            raise UserError(f"{_where(self.path)}: {len(unknown)} key(s) are not in the model's state_dict (e.g. "
                            f"{unknown[0]!r}); the file must hold dequantized weights keyed as model.state_dict()")
        for key, t in tensors.items():
            _check_tensor(self.path, key, t, own[key])
        selected = source.views()
        names = {v.name for v in selected}
        with_views = {v.param_name for v in weight_views(source.model)}
        not_applied = [f"{k} (non-matrix)" for k, t in tensors.items() if k not in with_views and not _same(t, own[k])]
        for v in weight_views(source.model):
            if v.name not in names and v.param_name in tensors:
                if not _same(dataclasses.replace(v, param=tensors[v.param_name]).get(), v.get()):
                    not_applied.append(f"{v.name} (not selected)")
        skipped = tuple(not_applied)
        state: dict[str, FileMatrix] = {}
        for v in selected:
            if v.param_name not in tensors:
                state[v.name] = FileMatrix(None, False, skipped)
                continue
            w = v.get()
            w_hat = dataclasses.replace(v, param=tensors[v.param_name]).get()
            w_hat = w_hat.to(device=w.device, dtype=torch.float32).contiguous()
            differs = not torch.equal(w_hat, w.to(torch.float32))
            state[v.name] = FileMatrix(w_hat if differs else None, differs, skipped)
        if not any(s.differs for s in state.values()):
            elsewhere = f"; it differs only on {len(skipped)} tensor(s) not applied, e.g. {skipped[0]}" if skipped \
                else ""
            raise UserError(f"{_where(self.path)}: the file changes none of the {len(selected)} selected matrices "
                            f"(every one equals full precision){elsewhere}")
        return state

    def quantize_in(self, w: Float[Tensor, "out in"], state: Any) -> tuple[Float[Tensor, "out in"], QuantGrid]:
        """Ŵ from the file (W itself where the file leaves the matrix as it is) and its per-row grid."""
        if not isinstance(state, FileMatrix):
            raise UserError(f"{self} quantizes from its prepared file state, not {type(state).__name__}")
        w_hat = w.to(torch.float32) if state.w_hat is None else state.w_hat.to(w.device)
        if w_hat.shape != w.shape:
            raise UserError(f"{self}: the file's matrix has shape {tuple(w_hat.shape)}, the weight {tuple(w.shape)}")
        return w_hat, row_grid(w_hat)

    def apply(self, w: Float[Tensor, "out in"], ctx: MatrixContext) -> Edited:
        out = super().apply(w, ctx)
        st = matrix_state(ctx.source, self, ctx.name)
        grid = ctx.quantized(self, w)[1]
        names = "; ".join(st.not_applied[:NAMES_SHOWN]) + ("; …" if len(st.not_applied) > NAMES_SHOWN else "")
        return Edited(out.weight, {**out.fields, "q_from_file": st.differs, "q_levels": getattr(grid, "levels", 0),
                                   "q_uniform": grid.uniform, "q_not_applied": len(st.not_applied),
                                   "q_not_applied_names": names})

    def report_note(self, rows: list[dict[str, Any]]) -> str:
        """Which selected matrices the file changes (δ), which it leaves at FP, what of it was not applied."""
        changed = [r for r in rows if r.get("q_from_file")]
        same = [r["matrix"] for r in rows if not r.get("q_from_file")]
        d = torch.tensor([r["delta"] for r in changed], dtype=torch.float64)
        line = (f"from file: {len(changed)} of {len(rows)} selected matrices differ from FP (δ median "
                f"{100 * d.median().item():.2f}% max {100 * d.max().item():.2f}%)")
        if same:
            line += f"; {len(same)} equal FP (e.g. {same[0]})"
        n = int(rows[0].get("q_not_applied", 0)) if rows else 0
        if n:
            line += (f"; not applied (the toolkit edits the selected matrices only): {n} differing tensor(s) of the "
                     f"file, e.g. {rows[0]['q_not_applied_names'].split('; ')[0]}")
        return line


@register_edit("file", (), help=f"{PREFIX}PATH: dequantized weights from a state-dict file (safetensors/.pt/.bin, "
                                "keys as model.state_dict()); canonical file:PATH@<sha12 of its bytes>")
def parse_file(spec: str) -> FileQuantizer:
    """`file:PATH` or `file:PATH@<sha12>` -> FileQuantizer with the file's current content hash (checked if given)."""
    spec = spec.strip()
    rest = spec[len(PREFIX):] if spec.startswith(PREFIX) else ""
    if not rest:
        raise UserError(f"bad file spec {spec!r}: write {PREFIX}PATH (a state dict of dequantized weights)")
    m = _SPEC_RE.fullmatch(rest)
    path, given = (m["path"], m["sha"]) if m else (rest, None)
    digest = file_digest(path)[:SHA_CHARS]
    if given is not None and given != digest:
        raise UserError(f"{spec}: the file changed (its content hash is now {digest}, not {given}); "
                        f"use {PREFIX}{path} for its new content")
    return FileQuantizer(path=path, sha=digest)
