"""Benchmark: GPTQ (and AWQ) on ViT-B-32's core set (random init, real shapes, 144 matrices) with 256 captured
calibration inputs per matrix, against RTN on the same grid in the same run.

Goal (issue 14): GPTQ ≤ 20× RTN on 2 CPU cores. The inputs are captured once (forward hooks through the weight
view, `interventions.capture`) and not timed; each method's line is the best of `--repeats` passes over all
matrices, through the commands' path (`prepare` once, then `quantize_in` per matrix: GPTQ's batched column loop).
Wall and process CPU time are printed with the load average (read CPU seconds on a busy machine).
Usage: `python benchmarks/bench_gptq.py [--model ViT-B-32] [--grid int4-g128] [--rows 256] [--threads 2]`.
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from eval.loading import load_model
from interventions.capture import capture_inputs
from interventions.registry import parse_edit
from spectral.selector import select
from spectral.views import weight_views

GOAL = 20.0


@dataclass(frozen=True)
class Captured:
    """The part of a `QuantSource` that GPTQ and AWQ read: the selected views and their captured inputs."""

    selected: list[Any]
    x: dict[str, torch.Tensor]

    def views(self) -> list[Any]:
        return self.selected

    def inputs(self) -> dict[str, torch.Tensor]:
        return self.x


def timed(fn: Callable[[], None], repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` (wall, CPU) seconds of fn()."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--grid", default="int4-g128", help="the RTN grid (baseline); GPTQ and AWQ run on it")
    ap.add_argument("--rows", type=int, default=256, help="calibration inputs (token rows) per matrix")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device)
    model = loaded.model.eval()
    views = select(weight_views(model), "core")
    gen = torch.Generator().manual_seed(0)
    h, w = loaded.info.image_size
    images = torch.randn(16, 3, h, w, generator=gen).to(args.device)
    tokens = loaded.tokenizer([f"a photo of a {c}." for c in ("cat", "dog", "car", "tree", "boat", "house")])
    x = capture_inputs(model, views, images, tokens.to(args.device), max_rows=args.rows)
    mats = [(v.get().to(torch.float32).clone(), x[v.name]) for v in views]
    print(f"model {args.model} (random init), {len(mats)} core matrices, {min(t.shape[0] for _, t in mats)}–"
          f"{max(t.shape[0] for _, t in mats)} input rows each, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} cores, device {args.device}, load average {os.getloadavg()[0]:.1f}")
    rtn = parse_edit(args.grid)
    source = Captured(views, x)
    methods = {args.grid: lambda: [rtn.quantize(w) for w, _ in mats]}
    for spec in (f"gptq-{args.grid}", f"awq-{args.grid}"):
        q = parse_edit(spec)  # the command's path: prepare once per plan, then Ŵ per matrix from its state
        methods[spec] = lambda q=q: [q.quantize_in(v.get(), st[v.name]) for st in [q.prepare(source)] for v in views]
    base = None
    for spec, fn in methods.items():
        wall, cpu = timed(fn, args.repeats)
        base = base or (wall, cpu)
        goal = f"  [goal ≤ {GOAL:.0f}× RTN: {'OK' if wall / base[0] <= GOAL else 'SLOW'}]" if spec.startswith("gptq") \
            else ""
        print(f"{spec:>20}: wall {wall:7.2f} s, cpu {cpu:7.2f} s; ratio to {args.grid}: wall {wall / base[0]:6.1f}×, "
              f"cpu {cpu / base[1]:6.1f}×{goal}")
    print(f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
