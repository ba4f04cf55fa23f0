"""Run the lowrank CLI, a quantizer and a 3-control ablation in this process on one device and report, per command:
wall time, images encoded and images/s, the share of the image passes spent waiting for data, the SVDs and
quantizations done, text encoding, peak GPU memory, and any device error (`benchmarks/gpu_check.sh` drives it).

    python benchmarks/gpu_check.py --datasets SPEC --out DIR [--device cuda] [--model ViT-B-32] [--workers N]
                                   [--templates openai-80] [--noise-subset 1000] [--B 200] [--layers core]

The commands are the real entry points (`interventions.lowrank.main`, `interventions.quantize.main`,
`interventions.ablation.main`); the sessions they build are observed (not changed) to read their counters.
Exit status 1 when a command failed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from interventions import session as session_module  # noqa: E402

DEVICE_WORDS = ("device", "cuda", "Expected all tensors", "CUBLAS", "cusolver", "illegal memory", "out of memory")


class Observed:
    """Every Session built while active (its caches and evaluators hold the counters)."""

    def __init__(self) -> None:
        self.sessions: list[Any] = []
        self._init = session_module.Session.__init__

    def __enter__(self) -> "Observed":
        real = self._init
        sessions = self.sessions

        def init(s: Any, *a: Any, **k: Any) -> None:
            real(s, *a, **k)
            sessions.append(s)

        session_module.Session.__init__ = init  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        session_module.Session.__init__ = self._init  # type: ignore[method-assign]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_command(name: str, main: Callable[[list[str]], int], argv: list[str], device: str) -> dict[str, Any]:
    """Run one CLI entry point; collect its sessions' counters and any exception."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    error = ""
    with Observed() as seen:
        try:
            rc = int(main(argv) or 0)
        except Exception:  # noqa: BLE001  (a check reports every failure, device or not)
            rc, error = 1, traceback.format_exc()
    _sync(device)
    wall = time.perf_counter() - t0
    evs = [ev for s in seen.sessions for ev in s._evaluators.values()]
    images = sum(ev.stats["images_encoded"] for ev in evs)
    encode = sum(ev.timings["encode"] for ev in evs)
    wait = sum(ev.timings["load_wait"] for ev in evs)
    return {
        "command": name, "rc": rc, "wall_s": wall, "images": images, "encode_s": encode, "load_wait_s": wait,
        "img_per_s": images / encode if encode else float("nan"),
        "load_share": wait / encode if encode else float("nan"),
        "texts": sum(ev.stats["texts_encoded"] for ev in evs),
        "classifiers": sum(ev.stats["text_encodes"] for ev in evs),
        "svds": sum(s.svd_cache.misses for s in seen.sessions),
        "quantizations": sum(s.quant_cache.misses for s in seen.sessions),
        "workers": sorted({ev.workers_for(i) for ev in evs for i in range(len(ev.datasets))}),
        "pinned": any(ev.pin_memory for ev in evs),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0,
        "error": error,
    }


def report(r: dict[str, Any]) -> str:
    head = (f"{r['command']:<10} rc={r['rc']} wall {r['wall_s']:7.1f} s | images {r['images']:6d} in "
            f"{r['encode_s']:6.1f} s = {r['img_per_s']:7.1f} img/s, data loading {100 * r['load_share']:5.1f}% "
            f"of the image passes (workers {r['workers']}, pinned {r['pinned']}) | texts {r['texts']} "
            f"({r['classifiers']} classifiers) | SVDs {r['svds']} | quantizations {r['quantizations']} | "
            f"peak GPU {r['peak_gpu_gib']:.2f} GiB")
    if not r["error"]:
        return head
    last = [ln for ln in r["error"].splitlines() if ln.strip()][-1]
    kind = "DEVICE ERROR" if any(w in r["error"] for w in DEVICE_WORDS) else "ERROR"
    return f"{head}\n  {kind}: {last}\n" + "\n".join("    " + ln for ln in r["error"].splitlines()[-12:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the evaluator's auto)")
    ap.add_argument("--templates", default="openai-80")
    ap.add_argument("--noise-subset", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--B", type=int, default=200)
    ap.add_argument("--layers", default="core")
    ap.add_argument("--controls", nargs="+", default=["lowrank", "damping:tikhonov", "noise:c1"])
    args = ap.parse_args()

    from eval.batches import auto_workers
    from interventions import ablation, lowrank, quantize

    workers = auto_workers() if args.workers is None else args.workers
    common = ["--model", args.model, "--device", args.device, "--layers", args.layers, "--datasets", args.datasets,
              "--workers", str(workers), "--batch-size", str(args.batch_size), "--templates", args.templates,
              "--noise-subset", str(args.noise_subset), "--force"]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"torch {torch.__version__}, device {args.device} (GPU: {gpu}), {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads, workers {workers}, model {args.model}, templates {args.templates}")
    commands = [
        ("lowrank", lowrank.main, [*common, "--rank-frac", "0.5", "--out", str(args.out / "lowrank")]),
        ("quantize", quantize.main, [*common, "--spec", "int4-g128-mse", "--out", str(args.out / "quantize")]),
        ("ablation", ablation.main, [*common, "--controls", *args.controls, "--seeds", "1", "--B", str(args.B),
                                     "--out", str(args.out / "ablation")]),
    ]
    results = []
    for name, fn, argv in commands:
        print(f"\n=== {name}: {' '.join(argv)}", flush=True)
        results.append(run_command(name, fn, argv, args.device))
    print("\n=== summary")
    for r in results:
        print(report(r))
    total_images = sum(r["images"] for r in results)
    total_encode = sum(r["encode_s"] for r in results)
    total_wait = sum(r["load_wait_s"] for r in results)
    print(f"all: {sum(r['wall_s'] for r in results):.1f} s; {total_images} images at "
          f"{total_images / max(total_encode, 1e-9):.1f} img/s in the image passes, data loading "
          f"{100 * total_wait / max(total_encode, 1e-9):.1f}% of them")
    failed = [r for r in results if r["rc"] != 0]
    device_errors = [r["command"] for r in failed if any(w in r["error"] for w in DEVICE_WORDS)]
    print("device errors: " + (", ".join(device_errors) if device_errors else "none")
          + ("" if not failed else f"; failed commands: {', '.join(r['command'] for r in failed)}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
