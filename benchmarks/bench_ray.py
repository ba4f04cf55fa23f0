"""The Ray backend against the serial run (issue 16): the same 12-point sweep (3 quantizers × itself, a matched
low-rank control and matched noise with 2 seeds; experiment `edit` or `reliability`) on a model, run serially and
with `--backend ray` on a local instance, in one invocation. Prints both wall times, their ratio and where Ray's
time goes (instance start, worker start with each worker's session build, the runs themselves).

    python benchmarks/bench_ray.py [--model ViT-B-32] [--experiment edit|reliability] [--device cuda]
                                   [--gpus-per-run 1] [--cpus-per-run 1]

Default: a tiny random-init open_clip config (CPU, a minute or two). On a GPU node, `--model ViT-B-32
--experiment reliability --device cuda --gpus-per-run 1` spreads the runs over the node's GPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def _sweep(grid: Path, out: Path, extra: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "interventions.sweep", str(grid), "--out", str(out), *extra],
                         env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"sweep failed ({' '.join(extra) or 'serial'}): {res.stderr[-1500:]}")
    return wall, res.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="open_clip name or config (default: a tiny config)")
    ap.add_argument("--experiment", default="edit", choices=("edit", "reliability"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpus-per-run", default="0")
    ap.add_argument("--cpus-per-run", default="1")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of every process (serial and workers)")
    args = ap.parse_args()
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        work = Path(tmp)
        model = args.model
        if model is None:
            model = str(work / "tiny.json")
            Path(model).write_text(json.dumps(TINY))
        grid = {"experiment": args.experiment, "model": model, "quant": ["int8-ch", "int4-ch", "nf4"],
                "controls": ["none", "lowrank", "noise:c1"], "match": ["fro"], "seeds": 2, "include_fp": False,
                "options": {"noise_severities": []}}
        if args.device != "cpu":
            grid["device"] = args.device
        (work / "grid.json").write_text(json.dumps(grid))
        load = os.getloadavg()[0]
        serial, s_line = _sweep(work / "grid.json", work / "serial", [], env)
        ray, r_line = _sweep(work / "grid.json", work / "ray", ["--backend", "ray", "--gpus-per-run",
                                                                args.gpus_per_run, "--cpus-per-run",
                                                                args.cpus_per_run], env)
        same = all((work / "serial" / f"{t}.csv").read_bytes() == (work / "ray" / f"{t}.csv").read_bytes()
                   for t in ("edits", "runs"))
    print(f"load average {load:.2f} at the start on {os.cpu_count()} CPUs; {args.threads} thread(s) per process")
    print(f"serial: {serial:.1f} s wall   | {s_line}")
    print(f"ray:    {ray:.1f} s wall   | {r_line}")
    phases = dict(re.findall(r"(\w+) ([\d.]+) s", r_line.split("(", 1)[-1]))
    print(f"ray / serial = {ray / serial:.2f}; Ray's time: {', '.join(f'{k} {v} s' for k, v in phases.items())}")
    print(f"tables identical (edits.csv, runs.csv bytes): {same}")


if __name__ == "__main__":
    main()
