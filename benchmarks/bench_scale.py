"""The ablation's statistics at ImageNet scale (issue 19, METHODS §6, §8): synthetic per-sample outputs of 24 runs
(FP, the quantizer, 12 control families, five of them with 3 seeds) on an ID set of N = 50 000 images and K = 1 000
classes, four OOD sets of 10 000 and a calibration set, d = 512, stored as the evaluator stores them (float16
features + class weights: `eval.samples`), then the default endpoints (ID top1/ECE/NLL/Brier/ECE-TS, AUROC and
FPR95 with MCM and MSP per OOD set) compared exactly as `python -m interventions.ablation` does
(`interventions.referee.compare.compare_endpoints`, streamed from the files).

Prints, per B: wall time and peak RSS of the statistics (each in a fresh subprocess, so the RSS is the statistics'
own), and bytes per variant (the ID set's file and all of a run's files). With `--baseline DIR` (a checkout of the
previous implementation, e.g. `git worktree add /tmp/wt19 <commit>`) the same statistics run there too, on a
subsample small enough for it (`--baseline-n`), against this implementation on the same subsample: their ratio.

    python benchmarks/bench_scale.py [--quick] [--B 2000,10000] [--baseline DIR] [--threads 2]

Goals (2 cores): ≤ 4 GB peak RSS and ≤ 5 min at B = 10⁴ at full scale. `--quick`: N = 10 000, K = 1 000,
OOD sets of 2 000, B = 2 000 only (a few minutes). The machine's load average is printed: the times are only as
quiet as the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GROUPS = (("fp", 1), ("quant", 1), ("lowrank", 1), ("damping:gains", 1), ("damping:tikhonov", 1), ("noise:c1", 3),
          ("noise:c2", 3), ("noise:c4", 3), ("rotquant", 3), ("randproj", 3), ("topdamp", 1), ("scale", 1),
          ("clip", 1), ("temperature", 1))  # 24 runs, the default ablation's shape
SCALE = 100.0


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def generate(root: Path, n: int, k: int, d: int, n_ood: int, n_ood_sets: int, n_cal: int, seed: int = 0) -> dict:
    """Write every run's samples files (features form) under root/samples/<run>/ and return the layout."""
    sys.path.insert(0, str(ROOT))
    from eval.samples import SampleOutputs, save_samples

    rng = np.random.default_rng(seed)
    w = _unit(rng.standard_normal((k, d)))
    w_mcm = _unit(w + 0.3 * _unit(rng.standard_normal((k, d))))
    sets = [("imagenet", "id", n, 0), *[(f"ood{i}", "ood", n_ood, 1 + i) for i in range(n_ood_sets)],
            ("calibration", "calibration", n_cal, 1 + n_ood_sets)]
    base = {}
    for name, role, m, order in sets:
        y = rng.integers(0, k, m) if role != "ood" else -np.ones(m, dtype=np.int64)
        # top-1 ≈ 70 % in distribution; OOD images near a random class, less confident (AUROC ≈ 0.7–0.8)
        signal = 0.17 * w[np.maximum(y, 0)] if role != "ood" else 0.1 * w[rng.integers(0, k, m)]
        base[name] = (_unit(signal + rng.standard_normal((m, d)).astype(np.float32) / np.sqrt(d)), y, order, role)
    runs, temps = [], {}
    for control, seeds in GROUPS:
        for s in range(seeds):
            run = f"{control.replace(':', '_')}#s{s}"
            r = np.random.default_rng([seed, len(runs)])
            sigma = 0.0 if control in ("fp", "temperature") else 0.08 + 0.04 * r.random()
            scale = SCALE * (0.9 if control == "temperature" else 1.0)
            for name, (f, y, order, role) in base.items():
                fv = _unit(f + sigma * r.standard_normal(f.shape).astype(np.float32) / np.sqrt(d)) if sigma else f
                out = SampleOutputs.from_features(features=fv, class_weights=w, mcm_weights=w_mcm, logit_scale=scale,
                                                  form="features", dataset=name, role=role, labels=y,
                                                  ids=np.arange(len(y)), order=order)
                save_samples(out, root, run)
            temps[run] = 1.0 + 0.2 * r.random()  # as the evaluator stores it with the run's metrics
            runs.append((control, s, run))
    return {"runs": runs, "temperatures": temps}


def _bytes(folder: Path) -> tuple[int, int]:
    files = list(folder.glob("*.npz"))
    return next(f.stat().st_size for f in files if f.stem == "imagenet"), sum(f.stat().st_size for f in files)


def measure(root: Path, B: int, threads: int, subsample: int | None) -> dict:
    """The statistics of the ablation on the stored runs (this process: call it in a fresh subprocess)."""
    import resource

    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from interventions.referee.compare import Group, compare_endpoints
    from interventions.referee.endpoints import endpoints_of
    from interventions.referee.persample import RunSamples

    layout = json.loads((root / "layout.json").read_text())
    if subsample:  # the first rows of every set as files of their own (written before the clock starts)
        root = _subsampled(root, layout, subsample)
    t0 = time.perf_counter()
    by_control: dict[str, list] = {}
    for control, _, run in layout["runs"]:
        rs = RunSamples.from_folder(root / "samples" / run, name=run)
        rs.temperature = layout["temperatures"][run]
        by_control.setdefault(control, []).append(rs)
    groups = [Group(c, c, c, None, runs) for c, runs in by_control.items()]
    headers = groups[0].runs()[0].headers
    eps = endpoints_of(headers, ("mcm", "msp"), True)
    phases: dict[str, float] = {}

    def progress(phase: str, done: int, total: int) -> None:
        phases[phase] = time.perf_counter() - t0

    rows = compare_endpoints(eps, groups, B=B, seed=0, model="synthetic", edit_stats={}, threads=threads,
                             progress=progress)
    wall = time.perf_counter() - t0
    return {"B": B, "wall_s": wall, "samples_s": phases.get("samples", 0.0), "endpoints": len(eps),
            "records": len(rows), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _subsampled(root: Path, layout: dict, m: int) -> Path:
    """The runs restricted to the first m rows of every set, written under root/sub<m>/ (once)."""
    import dataclasses

    from eval.samples import AUTO, load_sample_file, save_samples

    sub = root / f"sub{m}"
    if not (sub / "done").is_file():
        for _, _, run in layout["runs"]:
            for path in sorted((root / "samples" / run).glob("*.npz")):
                o = load_sample_file(path)
                save_samples(dataclasses.replace(o, logits=None, mcm_logits=AUTO, labels=o.labels[:m], ids=o.ids[:m],
                                                 features=o.features[:m]), sub, run)
        (sub / "done").write_text("")
    return sub


BASELINE = r'''
import json, resource, sys, time
import numpy as np
root, B, m = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import torch; torch.set_num_threads(int(sys.argv[4]))
from eval.samples import SampleOutputs
from interventions.referee.compare import Group, compare_endpoint
from interventions.referee.endpoints import endpoints_of
layout = json.loads(open(root + "/layout.json").read())
t0 = time.perf_counter()
groups = {}
for control, _, run in layout["runs"]:
    outs = {}
    for key in ("imagenet", "calibration") + tuple(f"ood{i}" for i in range(layout["ood_sets"])):
        z = np.load(f"{root}/samples/{run}/{key}.npz")
        f = torch.from_numpy(z["features"][:m].astype(np.float32)); s = float(z["logit_scale"])
        logits = (s * (f @ torch.from_numpy(z["class_weights"]).T.contiguous())).numpy()
        mcm = (s * (f @ torch.from_numpy(z["mcm_weights"]).T.contiguous())).numpy()
        outs[key] = SampleOutputs(dataset=key, role=str(z["role"]), logits=logits, labels=z["labels"][:m],
                                  ids=z["ids"][:m], logit_scale=s, mcm_logits=mcm, order=int(z["order"]))
    groups.setdefault(control, []).append(outs)
gs = [Group(c, c, c, None, seeds) for c, seeds in groups.items()]
eps = endpoints_of(gs[0].seeds[0], ("mcm", "msp"), True)
rows = []
for ep in eps:
    rows += compare_endpoint(ep, gs, B=B, seed=0, model="synthetic", edit_stats={})
print(json.dumps({"wall_s": time.perf_counter() - t0, "records": len(rows),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def _child(args: list[str], cwd: Path | None = None, env: dict | None = None) -> dict:
    res = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"subprocess failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 10 000, OOD sets of 2 000, B = 2 000 (a few minutes)")
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--k", type=int, default=1_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--n-ood", type=int, default=10_000)
    ap.add_argument("--ood-sets", type=int, default=4)
    ap.add_argument("--n-cal", type=int, default=10_000)
    ap.add_argument("--B", default="2000,10000", help="comma list of bootstrap sizes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline", default=None, help="checkout of the previous implementation (for the ratio)")
    ap.add_argument("--baseline-n", type=int, default=2_000, help="rows per set for the baseline comparison")
    ap.add_argument("--baseline-B", type=int, default=500, help="B of the baseline comparison")
    ap.add_argument("--keep", default=None,
                    help="write the synthetic runs here (default: a temporary folder); reused if already there")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--subsample", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(Path(args.measure), int(args.B), args.threads, args.subsample or None)))
        return 0
    if args.quick:
        args.n, args.n_ood, args.n_cal, args.B = 10_000, 2_000, 2_000, "2000"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TQDM_DISABLE": "1"}
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        shape = [args.n, args.k, args.d, args.n_ood, args.ood_sets, args.n_cal]
        old = json.loads((root / "layout.json").read_text()) if (root / "layout.json").is_file() else {}
        if old.get("shape") == shape:  # --keep DIR of an earlier run of the same shape: reuse its files
            layout = old
        else:
            layout = generate(root, *shape)
            layout.update(ood_sets=args.ood_sets, shape=shape)
            (root / "layout.json").write_text(json.dumps(layout))
        id_bytes, run_bytes = _bytes(root / "samples" / layout["runs"][0][2])
        print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; threads {args.threads}")
        print(f"{len(layout['runs'])} runs: N = {args.n}, K = {args.k}, d = {args.d}, {args.ood_sets} OOD sets of "
              f"{args.n_ood}, calibration {args.n_cal}; generated in {time.perf_counter() - t0:.0f} s")
        logits_bytes = 2 * args.n * args.k * 4
        print(f"bytes per variant: ID set {id_bytes / 1e6:.1f} MB (two float32 logit sets: "
              f"{logits_bytes / 1e6:.0f} MB, {logits_bytes / id_bytes:.1f}x), "
              f"all of a run's sets {run_bytes / 1e6:.1f} MB")
        for B in (int(b) for b in args.B.split(",")):
            r = _child([__file__, "--measure", str(root), "--B", str(B), "--threads", str(args.threads)], env=env)
            print(f"B = {B}: statistics {r['wall_s']:.1f} s (per-sample statistics {r['samples_s']:.1f} s), "
                  f"peak RSS {r['peak_rss_mb'] / 1024:.2f} GB, {r['endpoints']} endpoints, {r['records']} records")
        if args.baseline:
            m, Bb = args.baseline_n, args.baseline_B
            new = _child([__file__, "--measure", str(root), "--B", str(Bb), "--threads", str(args.threads),
                          "--subsample", str(m)], env=env)
            old = _child(["-c", BASELINE, str(root), str(Bb), str(m), str(args.threads)], cwd=Path(args.baseline),
                         env={**env, "PYTHONPATH": str(Path(args.baseline).resolve())})
            print(f"baseline ({args.baseline}) on {m} rows per set, B = {Bb}: {old['wall_s']:.1f} s, "
                  f"peak RSS {old['peak_rss_mb'] / 1024:.2f} GB; this implementation {new['wall_s']:.1f} s, "
                  f"{new['peak_rss_mb'] / 1024:.2f} GB: {old['wall_s'] / new['wall_s']:.1f}x faster")
        print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
