"""Test helper: writes a small but realistic results folder in the METHODS §8 contract.

Spectra come from real (small, synthetic) weight matrices and real edits of them (per-row 4/8-bit RTN,
M1-matched low-rank, gain transplant, matched white noise); per-sample logits come from a simple
cosine-similarity model; metrics and comparison records are computed from those logits (paired bootstrap),
so every table is consistent with the arrays it claims to summarise.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

MATRIX_SHAPES = {"q": (1, 1), "k": (1, 1), "v": (1, 1), "out": (1, 1), "fc": (4, 1), "proj": (1, 4)}
TOWER_WIDTH = {"visual": 40, "text": 24}
BLOCKS = (0, 1, 2)
N_CLASSES = 10
N_SAMPLES = 300
LOGIT_SCALE = 100.0
OVERLAP_KS = ("k8", "k32", "0.1r", "0.5r")

# variant -> (family, matched quantizer, δ, per-sample noise level, temperature factor)
VARIANTS: dict[str, tuple[str, str, float, float, float]] = {
    "fp": ("fp", "", 0.0, 0.0, 1.0),
    "int8": ("quant", "int8", 0.004, 0.002, 1.0),
    "int4": ("quant", "int4", 0.06, 0.012, 0.8),
    "lowrank-m1": ("lowrank", "int4", 0.06, 0.014, 0.82),
    "damp-b3": ("damping", "int4", 0.06, 0.006, 0.8),
    "noise-c1": ("noise", "int4", 0.06, 0.013, 0.98),
    "clip-int4": ("clipping", "int4", 0.01, 0.003, 1.0),
    "scale-int4": ("scale", "int4", 0.03, 0.0, 0.93),
    "randproj-m1": ("random-projection", "int4", 0.06, 0.03, 0.95),
    "topdamp-m1": ("top-damping", "int4", 0.06, 0.035, 0.9),
    "rot-int4": ("rotation", "int4", 0.06, 0.012, 0.97),
    "temp-int4": ("temperature", "int4", 0.0, 0.0, 0.8),
}
DOSE_DELTAS = (0.01, 0.02, 0.05, 0.1, 0.2)
DOSE_FAMILIES = {"lowrank": 0.25, "noise": 0.2, "damping": 0.1}  # noise per unit δ
SWEEP_FRACS = (0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
SAMPLE_VARIANTS = ("fp", "int4", "lowrank-m1", "noise-c1")
ID_SET, OOD_SETS, NOISE_SEVERITIES = "fmnist", ("mnist", "kmnist"), ("0.08", "0.18")


# ---------------------------------------------------------------------------------------------- weights
def _matrices(rng: np.random.Generator) -> dict[str, tuple[str, int, str, np.ndarray]]:
    """name -> (tower, block, kind, W): power-law spectrum plus a dense bulk, like trained weights."""
    out = {}
    for tower, d in TOWER_WIDTH.items():
        for b in BLOCKS:
            for kind, (fo, fi) in MATRIX_SHAPES.items():
                m, n = d * fo, d * fi
                r = min(m, n)
                u, _ = np.linalg.qr(rng.standard_normal((m, r)))
                v, _ = np.linalg.qr(rng.standard_normal((n, r)))
                s = 2.0 * np.arange(1, r + 1) ** -0.8
                w = (u * s) @ v.T + 0.02 * rng.standard_normal((m, n))
                out[f"{tower}.blocks.{b}.{'attn' if kind in 'qkvout' else 'mlp'}.{kind}"] = (tower, b, kind, w)
    return out


def _rtn(w: np.ndarray, bits: int) -> np.ndarray:
    qmax = 2 ** (bits - 1) - 1
    step = np.maximum(np.abs(w).max(axis=1, keepdims=True) / qmax, 1e-12)
    return step * np.clip(np.round(w / step), -qmax, qmax)


def _lowrank_matched(w: np.ndarray, err: float, svd: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    u, s, vt = svd
    tail = np.cumsum((s**2)[::-1])[::-1]  # tail[k] = Σ_{i≥k} σ_i²
    k = int(np.argmax(np.append(tail, 0.0) <= err**2))
    return (u[:, :k] * s[:k]) @ vt[:k]


def _gain_transplant(w: np.ndarray, wq: np.ndarray, svd: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    u, s, vt = svd
    g = np.einsum("mi,mn,in->i", u, wq, vt) / s
    return (u * (g * s)) @ vt


def _matched_noise(w: np.ndarray, wq: np.ndarray, rng: np.random.Generator, svd: object) -> np.ndarray:
    e = wq - w
    return w + np.sqrt((e**2).mean(axis=1, keepdims=True)) * rng.standard_normal(w.shape)


def _spectral_row(w: np.ndarray, svd: tuple[np.ndarray, np.ndarray, np.ndarray], w2: np.ndarray | None
                  ) -> tuple[dict, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """§4 metrics of W (w2 None) or of the edit W → w2 (svd = W's thin SVD); returns (row, σ, gain, σ(E))."""
    m, n = w.shape
    r = min(m, n)
    u, s0, vt = svd
    if w2 is not None:
        u2, s, vt2 = np.linalg.svd(w2, full_matrices=False)
    else:
        s = s0
    p = s / s.sum()
    row = {"m": m, "n": n, "r": r, "stable_rank": (s**2).sum() / s[0] ** 2,
           "effective_rank": float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))}
    if w2 is None:
        return row, s, None, None
    g = np.einsum("mi,mn,in->i", u, w2, vt) / s0
    e = w2 - w
    se = np.linalg.svd(e, compute_uv=False)
    row["delta"] = np.linalg.norm(e) / np.linalg.norm(w)
    dec = np.arange(r) * 10 // r  # METHODS §4: decile j holds the 1-based i with ⌊10(i−1)/r⌋ = j − 1
    for d in range(1, 11):
        row[f"gain_d{d}"] = g[dec == d - 1].mean() if (dec == d - 1).any() else np.nan
    for key in OVERLAP_KS:
        k = int(key[1:]) if key.startswith("k") else max(1, int(round(float(key[:-1]) * r)))
        k = min(k, r)
        row[f"overlap_u_{key}"] = np.linalg.norm(u[:, :k].T @ u2[:, :k]) ** 2 / k
        row[f"overlap_v_{key}"] = np.linalg.norm(vt[:k] @ vt2[:k].T) ** 2 / k
    sd = e.std()
    row.update(mp_lo=sd * abs(np.sqrt(m) - np.sqrt(n)), mp_hi=sd * (np.sqrt(m) + np.sqrt(n)), err_sigma1=se[0],
               tail_gain=g[r // 2:].mean(), tail_gain_null=1.0)
    return row, s, g, se


EDITS: dict[str, tuple[str, Callable[..., np.ndarray]]] = {
    "int8": ("quant", lambda w, q4, rng, svd: _rtn(w, 8)),
    "int4": ("quant", lambda w, q4, rng, svd: q4),
    "lowrank-m1": ("lowrank", lambda w, q4, rng, svd: _lowrank_matched(w, np.linalg.norm(q4 - w), svd)),
    "damp-b3": ("damping", lambda w, q4, rng, svd: _gain_transplant(w, q4, svd)),
    "noise-c1": ("noise", _matched_noise),
}


def _spectra(rng: np.random.Generator) -> tuple[pd.DataFrame, dict[str, dict[str, np.ndarray]], list[dict]]:
    rows, arrays, edits = [], {v: {} for v in ("fp", *EDITS)}, []
    for name, (tower, block, kind, w) in _matrices(rng).items():
        base = {"matrix": name, "tower": tower, "kind": kind, "block": block}
        svd = np.linalg.svd(w, full_matrices=False)
        row, s, _, _ = _spectral_row(w, svd, None)
        rows.append({"variant": "fp", **base, **row})
        arrays["fp"][f"sigma:{name}"] = s
        q4 = _rtn(w, 4)
        for v, (family, fn) in EDITS.items():
            w2 = fn(w, q4, rng, svd)
            row, s, g, se = _spectral_row(w, svd, w2)
            rows.append({"variant": v, **base, **row})
            arrays[v].update({f"sigma:{name}": s, f"gain:{name}": g, f"err_sigma:{name}": se})
            edits.append({"variant": v, **base, "shape": f"{w.shape[0]}x{w.shape[1]}", "delta": row["delta"],
                          "coverage": 0.9, "param_frac": w.size / 1e5, "spec": v, "family": family,
                          "seed": 0 if family == "noise" else np.nan})
    return pd.DataFrame(rows), arrays, edits


# ---------------------------------------------------------------------------------------------- samples
def _logits(rng: np.random.Generator, labels: np.ndarray, noise: float, temp: float, base: np.ndarray) -> np.ndarray:
    cos = base + noise * rng.standard_normal(base.shape)
    return (LOGIT_SCALE * temp * cos).astype(np.float32)


def _base_cos(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    cos = 0.20 + 0.035 * rng.standard_normal((labels.size, N_CLASSES))
    known = labels >= 0
    cos[known, labels[known]] += 0.07 + 0.02 * rng.standard_normal(known.sum())
    return cos


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _id_metrics(z: np.ndarray, y: np.ndarray) -> dict[str, float]:
    p = _softmax(z)
    conf, pred = p.max(1), p.argmax(1)
    correct = (pred == y).astype(float)
    bins = np.minimum(np.floor(conf * 15).astype(int), 14)  # METHODS §5: [lo, hi), the last bin closed
    gap = np.bincount(bins, correct - conf, minlength=15)
    ece = np.abs(gap).sum() / y.size
    onehot = np.eye(N_CLASSES)[y]
    return {"top1": correct.mean(), "ece": ece, "nll": -np.log(p[np.arange(y.size), y]).mean(),
            "brier": ((p - onehot) ** 2).sum(1).mean()}


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))
    return (ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size)


def _ood_metrics(z_id: np.ndarray, z_ood: np.ndarray) -> dict[tuple[str, str], float]:
    out = {}
    for score, fn in {"msp": lambda z: _softmax(z).max(1),
                      "energy": lambda z: np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)}.items():
        a, b = fn(z_id), fn(z_ood)
        out[("auroc", score)] = _auroc(a, b)
        out[("fpr95", score)] = float((b >= np.quantile(a, 0.05)).mean())
    return out


# ---------------------------------------------------------------------------------------------- builder
FEATURE_DIM = 24
FEATURE_SEEDS = 3


def _features(rng: np.random.Generator) -> pd.DataFrame:
    """features.csv from real feature-space SQNR computations (`spectral.features`) on synthetic unit-norm features:
    the quantizer's error leans to the tail, matched white noise (3 seeds) is isotropic, low-rank drops the tail."""
    import torch

    from spectral.features import FeatureBasis, feature_error

    f = rng.standard_normal((N_SAMPLES, FEATURE_DIM)) * np.logspace(0, -1.5, FEATURE_DIM) + 0.3
    fp = f / np.linalg.norm(f, axis=1, keepdims=True)
    basis = FeatureBasis.fit(torch.from_numpy(fp))
    tail = basis.basis.numpy()[FEATURE_DIM // 2:]
    white = 0.002 * rng.standard_normal((2, *fp.shape))
    edits = {("int4", "quant", "quant", None):
             fp + 0.01 * rng.standard_normal((N_SAMPLES, tail.shape[0])) @ tail + white[0],
             ("lowrank-m1", "lowrank", "lowrank", None): fp - (fp - fp.mean(0)) @ tail.T @ tail * 0.5 + white[1]}
    for s in range(FEATURE_SEEDS):
        edits[(f"noise-c1#s{s}", "noise:c1", "noise", s)] = fp + 0.004 * rng.standard_normal(fp.shape)
    rows = []
    for (variant, control, family, seed), v in edits.items():
        sq = feature_error(basis, torch.from_numpy(fp), torch.from_numpy(v)).sqnr()
        for r in sq.frame().to_dict("records"):
            rows.append({"variant": variant, "control": control, "spec": variant.split("#")[0], "family": family,
                         "seed": seed, "dataset": ID_SET, "n_images": N_SAMPLES, "k": basis.k, **r,
                         "total_noise": sq.total_noise, "noise_outside": sq.noise_outside,
                         "total_sqnr_db": sq.total_sqnr_db, "tail_share": sq.tail_share})
    return pd.DataFrame(rows)


def build_results(root: Path, *, parquet: bool = True, drop_files: Sequence[str] = (),
                  drop_columns: Mapping[str, Sequence[str]] | None = None, seed: int = 0) -> Path:
    """Write a complete synthetic results folder under `root`; `drop_*` remove tables/columns to make broken ones."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    drop_columns = dict(drop_columns or {})

    spectra, arrays, edit_rows = _spectra(rng)

    # Per-sample logits: one base similarity per image shared by all variants (paired design).
    ydata = {ID_SET: rng.integers(0, N_CLASSES, N_SAMPLES)}
    ydata.update({d: np.full(N_SAMPLES, -1) for d in OOD_SETS})
    base = {d: _base_cos(rng, y) for d, y in ydata.items()}
    for sev in NOISE_SEVERITIES:
        ydata[f"{ID_SET}@{sev}"] = ydata[ID_SET]
        base[f"{ID_SET}@{sev}"] = base[ID_SET] + float(sev) * 0.15 * rng.standard_normal(base[ID_SET].shape)

    def variant_logits(noise: float, temp: float, vseed: int) -> dict[str, np.ndarray]:
        r = np.random.default_rng(1000 + vseed)
        return {d: _logits(r, ydata[d], noise, temp, base[d]) for d in ydata}

    variants = dict(VARIANTS)
    for fam, per_delta in DOSE_FAMILIES.items():
        for d in DOSE_DELTAS:
            variants[f"{fam}-dose{d:g}"] = (fam, "", d, per_delta * d, 1.0 - 1.5 * d if fam != "noise" else 1.0)
    for d, bits in zip((0.004, 0.02, 0.06, 0.15), (8, 6, 4, 3)):
        variants.setdefault(f"int{bits}", ("quant", f"int{bits}", d, 0.2 * d, 1.0 - 3 * d))
    for frac in SWEEP_FRACS:
        variants[f"lowrank:{frac:g}"] = ("lowrank", "", 0.3 * (1 - frac), 0.08 * (1 - frac), 1.0 - 0.3 * (1 - frac))
        variants[f"randproj:{frac:g}"] = ("random-projection", "", 0.3 * (1 - frac), 0.2 * (1 - frac), 1.0)

    logits = {v: variant_logits(spec[3], spec[4], i) for i, (v, spec) in enumerate(variants.items())}

    # metrics.csv
    mrows = []
    for v, z in logits.items():
        for k, val in _id_metrics(z[ID_SET], ydata[ID_SET]).items():
            mrows.append({"variant": v, "dataset": ID_SET, "role": "id", "metric": k, "value": val})
        for sev in NOISE_SEVERITIES:
            for k, val in _id_metrics(z[f"{ID_SET}@{sev}"], ydata[ID_SET]).items():
                mrows.append({"variant": v, "dataset": ID_SET, "role": "noise", "metric": k, "value": val,
                              "severity": sev})
        for d in OOD_SETS:
            for (k, score), val in _ood_metrics(z[ID_SET], z[d]).items():
                mrows.append({"variant": v, "dataset": d, "role": "ood", "metric": k, "value": val, "score": score})
    metrics = pd.DataFrame(mrows, columns=["variant", "dataset", "role", "metric", "value", "score", "severity"])

    # comparisons.csv: paired bootstrap of Δ = M(v) − M(fp) (B = 200, shared resamples).
    boot = rng.integers(0, N_SAMPLES, (200, N_SAMPLES))
    crow = []
    for v, (fam, quant, delta, _, _) in variants.items():
        if v == "fp":
            continue
        for metric in ("top1", "ece", "nll"):
            fpv = _id_metrics(logits["fp"][ID_SET], ydata[ID_SET])[metric]
            vv = _id_metrics(logits[v][ID_SET], ydata[ID_SET])[metric]
            bs = np.array([_id_metrics(logits[v][ID_SET][b], ydata[ID_SET][b])[metric]
                           - _id_metrics(logits["fp"][ID_SET][b], ydata[ID_SET][b])[metric] for b in boot[:30]])
            crow.append(_record(v, fam, quant, delta, ID_SET, metric, np.nan, fpv, vv, bs))
        for d in OOD_SETS[:1]:
            fpv = _ood_metrics(logits["fp"][ID_SET], logits["fp"][d])[("auroc", "msp")]
            vv = _ood_metrics(logits[v][ID_SET], logits[v][d])[("auroc", "msp")]
            bs = np.array([_ood_metrics(logits[v][ID_SET][b], logits[v][d][b])[("auroc", "msp")]
                           - _ood_metrics(logits["fp"][ID_SET][b], logits["fp"][d][b])[("auroc", "msp")]
                           for b in boot[:30]])
            crow.append(_record(v, fam, quant, delta, d, "auroc", "msp", fpv, vv, bs))
    comparisons = pd.DataFrame(crow)
    q_diff = comparisons[comparisons["variant"] == "int4"].set_index(["dataset", "metric"])["diff"]
    ratio = comparisons.apply(lambda r: r["diff"] / q_diff.get((r["dataset"], r["metric"]), np.nan)
                              if r["quant"] == "int4" else np.nan, axis=1)
    comparisons["repro_ratio"] = ratio
    comparisons["repro_lo"] = ratio - 0.3
    comparisons["repro_hi"] = ratio + 0.3

    # edits.csv: the spectral variants' real rows plus sweep variants with their rank fraction.
    for v, (fam, _quant, delta, _, _) in variants.items():
        if v.startswith(("lowrank:", "randproj:")):
            frac = float(v.split(":")[1])
            for name in spectra.loc[spectra["variant"] == "fp", "matrix"]:
                edit_rows.append({"variant": v, "matrix": name, "tower": name.split(".")[0],
                                  "kind": name.split(".")[-1],
                                  "shape": "48x48", "delta": delta, "coverage": 0.9, "param_frac": 0.01,
                                  "spec": v, "family": fam, "seed": 0 if fam == "random-projection" else np.nan,
                                  "p_rank_frac": frac})
    edits = pd.DataFrame(edit_rows)
    if "p_rank_frac" not in edits.columns:
        edits["p_rank_frac"] = np.nan

    tables = {"metrics": metrics, "edits": edits, "spectra": spectra, "comparisons": comparisons,
              "features": _features(rng)}
    for name, df in tables.items():
        df = df.drop(columns=[c for c in drop_columns.get(name, ()) if c in df.columns])
        if f"{name}.csv" not in drop_files:
            df.to_csv(root / f"{name}.csv", index=False)
        if parquet and name in ("metrics", "spectra") and f"{name}.parquet" not in drop_files:
            df.to_parquet(root / f"{name}.parquet", index=False)

    if "spectra/" not in drop_files:
        (root / "spectra").mkdir(exist_ok=True)
        for v, arr in arrays.items():
            np.savez(root / "spectra" / f"{v}.npz", **arr)
    if "samples/" not in drop_files:
        for v in SAMPLE_VARIANTS:
            (root / "samples" / v).mkdir(parents=True, exist_ok=True)
            for d, z in logits[v].items():
                ds, _, sev = d.partition("@")
                role = "ood" if ds in OOD_SETS else ("noise" if sev else "id")
                np.savez(root / "samples" / v / f"{d}.npz", logits=z, labels=ydata[d], ids=np.arange(N_SAMPLES),
                         dataset=np.array(ds), role=np.array(role), logit_scale=np.array(LOGIT_SCALE),
                         severity=np.array(float(sev) if sev else np.nan))
    if "config.json" not in drop_files:
        (root / "config.json").write_text(json.dumps({"model": "synthetic", "code_version": "test"}))
    return root


def _record(v: str, fam: str, quant: str, delta: float, dataset: str, metric: str, score: object,
            fpv: float, vv: float, boot: np.ndarray) -> dict:
    lo, hi = np.percentile(boot, [2.5, 97.5])
    p = float(min(1.0, 2 * min((boot <= 0).mean(), (boot >= 0).mean())))
    return {"model": "synthetic", "dataset": dataset, "metric": metric, "score": score, "severity": np.nan,
            "variant": v, "family": fam, "quant": quant or np.nan, "match": "m1" if quant else "dose",
            "seeds": 1, "coverage": 0.9, "delta_median": delta, "delta_max": 1.2 * delta, "n": N_SAMPLES,
            "value_fp": fpv, "value_v": vv, "diff": vv - fpv, "ci_lo": lo, "ci_hi": hi, "test": "bootstrap",
            "statistic": vv - fpv, "p": p, "p_adj": min(1.0, 3 * p), "family_id": "h1", "effect_size": vv - fpv,
            "tost": "inconclusive"}


def cached_results(tmp_path_factory) -> Path:
    """The standard synthetic folder, built once per test session (read-only for tests: derive() to change it)."""
    root = tmp_path_factory.getbasetemp() / "figures_synthetic"
    if not (root / ".complete").exists():
        build_results(root)
        (root / ".complete").touch()
    return root


def derive(src: Path, dst: Path, *, keep: Sequence[str] | None = None, drop_files: Sequence[str] = (),
           drop_columns: Mapping[str, Sequence[str]] | None = None,
           drop_arrays: Mapping[str, Sequence[str]] | None = None) -> Path:
    """A copy of a results folder with files (or only `keep`), table columns or npz arrays removed."""
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".complete"))
    if keep is not None:
        for p in dst.iterdir():
            if p.name not in keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    for name in drop_files:
        p = dst / name.rstrip("/")
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for table, cols in (drop_columns or {}).items():
        for suffix in (".csv", ".parquet"):
            p = dst / f"{table}{suffix}"
            if not p.exists():
                continue
            df = pd.read_csv(p) if suffix == ".csv" else pd.read_parquet(p)
            df = df.drop(columns=[c for c in cols if c in df.columns])
            df.to_csv(p, index=False) if suffix == ".csv" else df.to_parquet(p, index=False)
    for rel, keys in (drop_arrays or {}).items():
        p = dst / rel
        with np.load(p) as z:
            arrays = {k: z[k] for k in z.files if k not in keys}
        np.savez(p, **arrays)
    return dst
