"""Benchmark: fake-quantize ViT-B-32's core set (random init, real shapes) with `int4-g128-mse`.

Target: ≤ 10 s on 2 CPU cores. Baseline in the same run: `int4-g128` (min-max), so the printed ratio is the
cost of the MSE search. Wall time and process CPU time are both printed, with the load average: on a shared
machine (load above the core count) wall time mostly measures the neighbours, and with more than one torch
thread oversubscription makes OpenMP threads spin, so prefer `--threads 1` there and read the CPU seconds.
Usage: `python benchmarks/bench_quant.py [--model ViT-B-32] [--specs ...] [--repeats 1] [--threads 2]`.
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from eval.loading import load_model
from interventions.registry import apply_edit

TARGET_S = 10.0


def time_spec(model: torch.nn.Module, spec: str, repeats: int) -> tuple[float, float, int, float]:
    """Best-of-`repeats` (wall, CPU) seconds of `apply_edit(model copy, spec)` over the core set."""
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        work = copy.deepcopy(model)
        t0, c0 = time.perf_counter(), time.process_time()
        report = apply_edit(work, spec, "core")
        best_wall = min(best_wall, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
        del work
    return best_wall, best_cpu, len(report.rows), report.coverage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--specs", nargs="*", default=["int4-g128", "int4-g128-mse"], help="first = baseline")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model).model
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model} (random init), {n_params / 1e6:.1f}M parameters, "
          f"torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    base = None
    for spec in args.specs:
        wall, cpu, n, cov = time_spec(model, spec, args.repeats)
        base = base or (wall, cpu)
        idle = cpu / torch.get_num_threads()  # what an idle machine's wall clock would show if threads scale
        verdict = "" if spec != "int4-g128-mse" else (
            f"  [target <= {TARGET_S:.0f} s: wall {'OK' if wall <= TARGET_S else 'SLOW'}, "
            f"cpu/threads {idle:.2f} s {'OK' if idle <= TARGET_S else 'SLOW'}]")
        print(f"{spec:>16}: wall {wall:7.2f} s, cpu {cpu:7.2f} s for {n} matrices (coverage {100 * cov:.1f}%); "
              f"ratio to {args.specs[0]}: wall {wall / base[0]:5.2f}x, cpu {cpu / base[1]:5.2f}x{verdict}")
    print(f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
