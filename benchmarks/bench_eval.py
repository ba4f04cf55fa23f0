"""Benchmark the Evaluator against a bare `encode_image` + matmul loop over the same images, in the same run.

    python benchmarks/bench_eval.py [--model M] [--pretrained P] [--n 4096] [--batch-size 256] [--repeats 5] [--full]

Prints seconds and images/s for (a) the bare loop on pre-normalised tensors (preprocessing not timed: the strictest
baseline) and (b) `Evaluator.run` on a variant whose vision tower changed (so its image features are recomputed,
from uint8 pixels, including preprocessing, logits, and writing samples/), the ratio (target >= 0.9), and the
number of text-encoder calls of that variant (target 0). With --full it also times a complete default evaluation
(all embedded sets + 5 noise severities on a 2000-image subset) and checks one forward pass per dataset.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TQDM_DISABLE", "1")

from eval.datasets import ArrayImageDataset, subset  # noqa: E402
from eval.evaluator import Evaluator  # noqa: E402
from eval.loading import load_model  # noqa: E402
from eval.zeroshot import logit_scale_of  # noqa: E402


class Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.fn(*a, **k)


def id_images(n: int) -> ArrayImageDataset:
    """The embedded ID set (first n images), or synthetic Fashion-MNIST-sized images if it is not available."""
    try:
        from eval.embedded.data import embedded_datasets

        ds = next(d for d in embedded_datasets() if d.role == "id")
        return subset(ds, np.arange(min(n, len(ds))))
    except (ImportError, StopIteration):
        rng = np.random.default_rng(0)
        return ArrayImageDataset(name="synthetic", role="id", class_names=tuple(f"class {i}" for i in range(10)),
                                 templates=("a photo of a {}.",), labels=rng.integers(0, 10, n), ids=np.arange(n),
                                 pixels=rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))


def vision_variant(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = m.visual.transformer.resblocks[-1].mlp.c_proj.weight
        w.add_(1e-3 * torch.randn(w.shape, generator=g))
    return m


@torch.inference_mode()  # the fastest plain loop (the Evaluator encodes under inference_mode too)
def bare_loop(model, x: torch.Tensor, w: torch.Tensor, scale: float, bs: int) -> tuple[float, float]:
    t, c = time.perf_counter(), time.process_time()
    for s in range(0, len(x), bs):
        f = model.encode_image(x[s:s + bs]).float()
        f = f / f.norm(dim=-1, keepdim=True)
        _ = (scale * (f @ w)).numpy()
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--full", action="store_true")
    args = ap.parse_args()
    loaded = load_model(args.model, args.pretrained)
    model = loaded.model
    ds = id_images(args.n)
    print(f"model {loaded.info.name} ({loaded.info.source}), {len(ds)} images, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")

    with tempfile.TemporaryDirectory() as tmp:
        ev = Evaluator.from_loaded(loaded, [ds], noise_severities=(), batch_size=args.batch_size,
                                   out_dir=Path(tmp), progress=False)
        ev.run("fp", model)  # warm-up; builds the text classifier once
        w = next(iter(ev._classifiers.values()))
        x = ev.split.normalize(torch.cat([b for _, b in ev._unit_batches(0, np.arange(len(ds)))]))
        t_eval, t_bare, text_calls = [], [], []
        for r in range(args.repeats):
            variant = vision_variant(model, r)
            variant.encode_text = Counter(variant.encode_text)
            t_bare.append(bare_loop(variant, x, w, logit_scale_of(variant), args.batch_size))
            t, c = time.perf_counter(), time.process_time()
            ev.run(f"v{r}", variant)
            t_eval.append((time.perf_counter() - t, time.process_time() - c))
            text_calls.append(variant.encode_text.calls)
    fmt = lambda runs: ", ".join(f"{w:.2f}/{c:.2f}" for w, c in runs)  # noqa: E731
    for label, runs in (("bare encode_image+matmul", t_bare),
                        ("Evaluator.run (vision-only variant; incl. preprocessing, metrics, samples/)", t_eval)):
        w, c = min(r[0] for r in runs), min(r[1] for r in runs)
        print(f"{label}: best wall {w:.2f} s ({len(ds) / w:.1f} img/s), best CPU {c:.2f} s   "
              f"(wall/CPU runs: {fmt(runs)})")
    wall = min(r[0] for r in t_bare) / min(r[0] for r in t_eval)
    cpu = min(r[1] for r in t_bare) / min(r[1] for r in t_eval)
    med = float(np.median([b[0] for b in t_bare]) / np.median([e[0] for e in t_eval]))
    print(f"throughput ratio Evaluator / bare: best wall {wall:.3f}, best CPU {cpu:.3f}, "
          f"median wall {med:.3f}  (target >= 0.9)")
    print(f"text-encoder calls in vision-only variants: {text_calls}  (target 0)")

    if args.full:
        from eval.dataset_specs import load_datasets

        sets = load_datasets(None)
        ev = Evaluator.from_loaded(loaded, sets, batch_size=args.batch_size, progress=False)
        m = copy.deepcopy(model)
        m.encode_image = Counter(m.encode_image)
        t = time.perf_counter()
        ev.run("fp", m)
        metrics = ev.metrics()
        dt = time.perf_counter() - t
        expected = sum(-(-len(pos) // args.batch_size) for _, _, pos in ev._jobs)
        print(f"full default evaluation: {len(ev._jobs)} dataset/severity jobs, "
              f"{ev.stats['images_encoded']} images, {dt:.1f} s, {len(metrics)} metric rows; "
              f"encode_image calls {m.encode_image.calls} == batches {expected}: "
              f"{m.encode_image.calls == expected}")


if __name__ == "__main__":
    main()
