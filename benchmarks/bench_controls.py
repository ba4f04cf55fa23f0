"""Benchmark: a 10-point rank-fraction sweep over ViT-B-32's core set vs one rank fraction (target ratio ≤ 1.5).

Both runs start from an empty SVD cache, so each pays for one float64 SVD per matrix; the sweep then reuses the
factors for all ten fractions. Random init (real shapes): `eval.loading.load_model("ViT-B-32")`.
Run: `python benchmarks/bench_controls.py [--model ViT-B-32] [--layers core] [--device cpu]`.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from eval.loading import load_model
from interventions.registry import apply_edit
from spectral.selector import select
from spectral.svd import SVDCache
from spectral.views import weight_views

FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def one_run(model: torch.nn.Module, fractions: tuple[float, ...], layers: str) -> tuple[float, list[float], SVDCache]:
    """Seconds to apply every fraction in turn (each on a fresh copy of the weights) with one shared, initially
    empty cache; also the seconds of each fraction (the first pays for the SVDs)."""
    cache = SVDCache()
    each = []
    for f in fractions:
        m = copy.deepcopy(model)  # copying is not part of the edit's cost
        t0 = time.perf_counter()
        apply_edit(m, f"lowrank:{f}", layers, cache=cache)
        each.append(time.perf_counter() - t0)
        del m
    return sum(each), each, cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--layers", default="core")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    model = load_model(args.model, device=args.device).model
    views = select(weight_views(model), args.layers)
    print(f"{args.model} ({args.device}), layers {args.layers!r}: {len(views)} matrices, "
          f"{sum(v.numel for v in views) / 1e6:.1f}M parameters, torch threads {torch.get_num_threads()}")
    t_one, _, c_one = one_run(model, (0.5,), args.layers)
    print(f"one rank fraction (0.5):        {t_one:8.2f} s   SVDs {c_one.misses}, cache hits {c_one.hits}")
    t_sweep, each, c_sweep = one_run(model, FRACTIONS, args.layers)
    print(f"10-point sweep (0.1 … 1.0):     {t_sweep:8.2f} s   SVDs {c_sweep.misses}, cache hits {c_sweep.hits}")
    print("  per fraction: " + ", ".join(f"{f:g}: {t:.2f}s" for f, t in zip(FRACTIONS, each)))
    t_again, _, _ = one_run(model, (0.5,), args.layers)  # again after the sweep: shows drift of a shared machine
    print(f"one rank fraction again:        {t_again:8.2f} s")
    ratio = t_sweep / t_one
    ratio_mean = t_sweep / ((t_one + t_again) / 2)
    print(f"ratio sweep / one:              {ratio:8.2f}   "
          f"(vs mean of both single runs {ratio_mean:.2f}; target ≤ 1.5: "
          f"{'ok' if max(ratio, ratio_mean) <= 1.5 else 'NOT MET'})")


if __name__ == "__main__":
    main()
