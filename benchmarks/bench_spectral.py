"""Benchmark: the per-matrix spectral report against a bare float64 `torch.linalg.svdvals` loop (same run).

On ViT-B-32's core set (random init: real shapes, no download) it times
  baseline  for each matrix: torch.linalg.svdvals(w.double())
  report    spectral.report.analyse_model(model) with a fresh SVDCache (hash, batched SVD, every §4 metric)
  cached    the same report again from the warm cache
and prints seconds, ratios (target: report/baseline ≤ 1.3, report/cached ≥ 20) and the peak resident memory
each phase added. `--repeats N` repeats the baseline/report pair N times (interleaved) and keeps the fastest of
each, which damps the noise of a shared machine. `--compare` also times one edited variant (per-row noise).

    python benchmarks/bench_spectral.py [--model ViT-B-32] [--layers core] [--threads 1] [--repeats 2] [--compare]
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from eval.loading import load_model  # noqa: E402
from spectral.report import analyse_model  # noqa: E402
from spectral.selector import select  # noqa: E402
from spectral.svd import SVDCache  # noqa: E402
from spectral.views import weight_views  # noqa: E402


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def measure(result: dict[str, float]) -> Iterator[None]:
    """Wall seconds, CPU seconds and the peak RSS above the starting RSS (sampled every 5 ms)."""
    start_rss, peak = _rss(), [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            stop.wait(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        result["wall"] = time.perf_counter() - t0
        result["cpu"] = time.process_time() - c0
        stop.set()
        th.join()
        result["peak_mb"] = max(peak[0], _rss()) / 2**20 - start_rss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--layers", default="core")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing a busy machine)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compare", action="store_true", help="also time one edited variant (per-row noise, δ ≈ 1 %%)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(args.model).model
    views = select(weight_views(model), args.layers)
    mats = [v.get() for v in views]
    n_params = sum(w.numel() for w in mats)
    shapes = sorted({tuple(w.shape) for w in mats})
    print(f"{args.model} {args.layers}: {len(mats)} matrices, {n_params / 1e6:.1f} M parameters, shapes {shapes}, "
          f"torch threads {torch.get_num_threads()}")

    base_runs, rep_runs, cached_runs = [], [], []
    for _ in range(args.repeats):
        b: dict[str, float] = {}
        with measure(b):
            for w in mats:
                torch.linalg.svdvals(w.double())
        base_runs.append(b)
        cache = SVDCache()
        r: dict[str, float] = {}
        with measure(r):
            report = analyse_model(model, layers=args.layers, cache=cache)
        rep_runs.append(r)
        c: dict[str, float] = {}
        with measure(c):
            again = analyse_model(model, layers=args.layers, cache=cache)
        cached_runs.append(c)
        assert again.frame.equals(report.frame), "cached report differs from the first"
        print(f"  run: baseline {b['wall']:.2f}s  report {r['wall']:.2f}s  cached {c['wall']:.3f}s")

    best = lambda runs: min(runs, key=lambda x: x["wall"])  # noqa: E731
    b, r, c = best(base_runs), best(rep_runs), best(cached_runs)
    print(f"baseline svdvals loop : {b['wall']:8.2f} s wall  {b['cpu']:8.2f} s cpu  peak +{b['peak_mb']:7.1f} MB")
    print(f"report (cold cache)   : {r['wall']:8.2f} s wall  {r['cpu']:8.2f} s cpu  peak +{r['peak_mb']:7.1f} MB")
    print(f"report (warm cache)   : {c['wall']:8.3f} s wall  {c['cpu']:8.3f} s cpu  peak +{c['peak_mb']:7.1f} MB")
    ratio_cost = r["wall"] / b["wall"]
    ratio_cache = r["wall"] / c["wall"]
    print(f"report / baseline     : {ratio_cost:.3f}  (target <= 1.3: {'PASS' if ratio_cost <= 1.3 else 'FAIL'}); "
          f"cpu-time ratio {r['cpu'] / b['cpu']:.3f}")
    print(f"cold / warm report    : {ratio_cache:.1f}x  (target >= 20: {'PASS' if ratio_cache >= 20 else 'FAIL'})")

    if args.compare:
        import copy

        from spectral.nulls import matrix_generator, per_row_noise

        edited = copy.deepcopy(model)
        for v in select(weight_views(edited), args.layers):
            w = v.get().double()
            v.set(w + 0.01 * per_row_noise(w, matrix_generator(v.name)))
        x: dict[str, float] = {}
        with measure(x):
            analyse_model(model, {"noise": edited}, layers=args.layers, cache=SVDCache(), n_null=4)
        print(f"report + 1 variant    : {x['wall']:8.2f} s wall  {x['cpu']:8.2f} s cpu  peak +{x['peak_mb']:7.1f} MB  "
              f"({x['wall'] / b['wall']:.2f}x baseline)")


if __name__ == "__main__":
    main()
