"""The intra-op thread count as part of a run's provenance (issue 18): float sums, and so results in their last bits,
depend on it, so every run records it in run.json and a resume under another count warns instead of mixing them
silently."""
from __future__ import annotations

from collections.abc import Sequence

from interventions.store import ResultsStore


def threads() -> int:
    """The intra-op thread count: float sums (and so results, in the last bits) depend on it."""
    import torch

    return torch.get_num_threads()


def warn_mixed_threads(store: ResultsStore, keys: Sequence[str]) -> str | None:
    """A warning when finished runs of the plan were computed with another thread count than this process's."""
    now = threads()
    other = [m["threads"] for k in keys
             if store.is_done(k) and "threads" in (m := store.meta(k)) and m["threads"] != now]
    if not other:
        return None
    return (f"warning: {len(other)} finished run(s) in {store.root} were computed with {sorted(set(other))} thread(s) "
            f"and this process uses {now}: results can differ in the last bits (set OMP_NUM_THREADS to match)")
