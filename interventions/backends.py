"""Where a plan's unfinished runs execute: in this process (`Serial`) or as tasks of a Ray cluster (`RayBackend`).

A backend is a frozen config mapped to its handler (`BACKENDS`, the registry idiom of `interventions.registry`).
Every handler runs points through the same `Runner.result` into the same results store, so a run is published
atomically by whichever process finishes it, and a killed driver or worker loses nothing finished: a rerun
resumes. Ray workers are actors that each build one `Session` (the model and datasets loaded once per worker from
the same path or hub name, the SVD/quantizer caches and evaluator kept across its runs); a run that raises or
whose worker dies is retried once on another, then recorded as failed (`<out>/failed/<key>.json`, merged into
runs.csv with its error) instead of ending the sweep.

`--shard` stays the way to split a plan across independent processes (SLURM arrays, torchrun: `--shard auto`,
`interventions.store.Shard`); `--backend ray` is the way to spread one process's plan over GPUs and nodes.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from eval.cli import ArgumentParser
from eval.errors import UserError

RETRIES = 1  # a failed run is tried once more, then recorded


@dataclass(frozen=True)
class Serial:
    """Run every point in this process, in plan order; an error ends the command (one line, exit 2)."""


@dataclass(frozen=True)
class RayBackend:
    """Each point a task on a Ray actor asking `cpus_per_run` CPUs and `gpus_per_run` GPUs; `address` None starts a
    local Ray instance on this machine's resources, "auto" or HOST:PORT joins a running cluster."""

    address: str | None = None
    gpus_per_run: float = 0.0
    cpus_per_run: float = 1.0
    workers: int | None = None  # actors to start (default: as many as the cluster's resources fit)

    def __post_init__(self) -> None:
        if not (self.cpus_per_run > 0):
            raise UserError(f"--cpus-per-run must be > 0, got {self.cpus_per_run:g}")
        if not (self.gpus_per_run >= 0):
            raise UserError(f"--gpus-per-run must be >= 0, got {self.gpus_per_run:g}")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--ray-workers must be >= 1, got {self.workers}")
        if self.address is not None and not self.address.strip():
            raise UserError("--address is empty; use auto or HOST:PORT (or leave it out for a local instance)")


@dataclass
class Outcome:
    """What a backend did with the runs it was given: keys that ran here, keys that failed (with their error)."""

    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds by phase (Ray: start, workers, runs)


Handler = Callable[[Any, Any, Sequence[Any], bool, str], Outcome]
BACKENDS: dict[type, Handler] = {}


def register_backend(config_type: type) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        BACKENDS[config_type] = fn
        return fn

    return deco


def execute(backend: Any, runner: Any, todo: Sequence[Any], progress: bool, label: str = "runs") -> Outcome:
    """Run the planned points `todo` (`runner.Planned`) with `backend`; finished runs land in `runner.store`."""
    return BACKENDS[type(backend)](backend, runner, todo, progress, label)


@register_backend(Serial)
def _serial(backend: Serial, runner: Any, todo: Sequence[Any], progress: bool, label: str) -> Outcome:
    from tqdm.auto import tqdm

    for t in tqdm(todo, desc=label, unit="run", disable=not progress or len(todo) < 2):
        runner.result(t.point)
    return Outcome(ran=list(runner.ran))


# --------------------------------------------------------------------------------------------- Ray
def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError("--backend ray needs Ray: pip install -e '.[ray]' (or pip install 'ray>=2.9')") from None
    return ray


class _Worker:
    """A Ray actor: one session (model, datasets, caches) for every run it is given."""

    def __init__(self, grid: Any, out: str, version: str, threads: int) -> None:
        import torch

        from eval.version import set_code_version
        from interventions.runner import Runner
        from interventions.session import Session
        from interventions.store import ResultsStore

        t0 = time.perf_counter()
        torch.set_num_threads(threads)  # the run's CPU share (recorded in run.json; a mixed resume warns)
        set_code_version(version)  # the driver's run keys, whatever this worker's checkout says
        self.runner = Runner(Session(grid), ResultsStore(out), verbose=False)
        self.startup = time.perf_counter() - t0

    def ready(self) -> tuple[int, float]:
        return os.getpid(), self.startup

    def run(self, point: Any, key: str) -> tuple[str, str | None, float]:
        """(key, error or None, seconds): exceptions come back as text so the driver decides about retries."""
        from interventions.runner import point_config
        from interventions.store import run_key

        t0 = time.perf_counter()
        try:
            got = run_key(point_config(point, self.runner.session))
            if got != key:
                raise RuntimeError(f"this worker computes run key {got} for {key}: model or code differs")
            self.runner.result(point)
        except Exception as exc:  # noqa: BLE001 - reported to the driver, retried there
            return key, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", 0.0
        return key, None, time.perf_counter() - t0


def _levels(todo: Sequence[Any], grid: Any) -> list[list[Any]]:
    """Points without dependencies first, then the model edits (e5) whose dependencies those are."""
    from interventions.runner import dependencies

    first = [t for t in todo if not dependencies(t.point, grid)]
    later = [t for t in todo if dependencies(t.point, grid)]
    return [lvl for lvl in (first, later) if lvl]


def _n_workers(backend: RayBackend, resources: dict[str, float], n_todo: int) -> int:
    fit = int(resources.get("CPU", 1) // backend.cpus_per_run)
    if backend.gpus_per_run > 0:
        fit = min(fit, int(resources.get("GPU", 0) // backend.gpus_per_run))
        if fit < 1:
            raise UserError(f"--gpus-per-run {backend.gpus_per_run:g}: the Ray cluster has "
                            f"{resources.get('GPU', 0):g} GPU(s)")
    n = backend.workers if backend.workers is not None else max(1, fit)
    return max(1, min(n, n_todo))


@register_backend(RayBackend)
def _ray_backend(backend: RayBackend, runner: Any, todo: Sequence[Any], progress: bool, label: str) -> Outcome:
    from tqdm.auto import tqdm

    from eval.version import code_version

    ray = _ray()
    out = Outcome()
    if not todo:
        return out
    t0 = time.perf_counter()
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=backend.address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"cannot start or reach Ray at --address {backend.address or '(local)'}: "
                            f"{str(exc).splitlines()[0]}") from None
    out.timings["ray_start"] = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        actor = ray.remote(num_cpus=backend.cpus_per_run, num_gpus=backend.gpus_per_run,
                           max_restarts=-1, max_task_retries=0)(_Worker)
        grid, store_root = runner.session.grid, str(runner.store.root)
        n = _n_workers(backend, ray.cluster_resources(), len(todo))
        version = code_version()
        per_run_threads = max(1, int(backend.cpus_per_run))  # intra-op threads follow the CPU share (run.json)
        workers = [actor.remote(grid, store_root, version, per_run_threads) for _ in range(n)]
        try:
            startups = ray.get([w.ready.remote() for w in workers])
        except Exception as exc:  # noqa: BLE001 - e.g. the model path is not on the worker's node
            cause = getattr(exc, "cause", None) or exc
            raise UserError(f"a Ray worker could not load the model and datasets: {type(cause).__name__}: "
                            f"{str(cause).splitlines()[0] if str(cause) else ''}") from None
        out.timings["workers_start"] = time.perf_counter() - t1
        out.timings["worker_session_build"] = max(s for _, s in startups)
        t2 = time.perf_counter()
        bar = tqdm(total=len(todo), desc=f"{label} on {n} Ray worker(s)", unit="run", disable=not progress)
        for level in _levels(todo, grid):
            _run_level(ray, workers, level, out, bar)
        bar.close()
        out.timings["runs"] = time.perf_counter() - t2
    finally:
        if started_here:
            ray.shutdown()
    return out


REVIVE_TRIES = 120  # probes (1 s apart) of a lost worker while Ray restarts it, before it is given up


def _run_level(ray: Any, workers: list[Any], level: Sequence[Any], out: Outcome, bar: Any) -> None:
    """Feed the level's points to idle workers; a failure (an error, or a worker lost) is retried once. A lost
    worker rejoins the pool only once its restarted actor answers again (Ray rebuilds its session)."""
    queue = [(t, 0) for t in level]
    busy: dict[Any, tuple[Any, Any, int]] = {}  # ref -> (worker, planned or None for a revival probe, attempt)
    idle = list(workers)
    while queue or busy:
        while queue and idle:
            t, attempt = queue.pop(0)
            w = idle.pop(0)
            busy[w.run.remote(t.point, t.key)] = (w, t, attempt)
        if not busy:  # every worker was given up: what is left fails here rather than waiting forever
            for t, _ in queue:
                out.failed[t.key] = "no Ray worker left (every worker was lost and did not restart)"
                bar.update(1)
            return
        done, _ = ray.wait(list(busy), num_returns=1)
        w, t, attempt = busy.pop(done[0])
        if t is None:  # a revival probe: attempt counts the probes
            try:
                ray.get(done[0])
                idle.append(w)
            except Exception:  # noqa: BLE001 - still restarting
                if attempt < REVIVE_TRIES:
                    time.sleep(1.0)
                    busy[w.ready.remote()] = (w, None, attempt + 1)
            continue
        try:
            _, error, _ = ray.get(done[0])
            idle.append(w)
        except Exception as exc:  # noqa: BLE001 - the worker died (killed, out of memory): Ray restarts it
            error = f"worker lost: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            busy[w.ready.remote()] = (w, None, 0)
        if error is None:
            out.ran.append(t.key)
            out.failed.pop(t.key, None)
            bar.update(1)
        elif attempt < RETRIES:
            queue.append((t, attempt + 1))
        else:
            out.failed[t.key] = f"{error} (tried {attempt + 1} times)"
            bar.update(1)
        bar.set_postfix(failed=len(out.failed), refresh=False)


# --------------------------------------------------------------------------------------------- CLI
BACKEND_NAMES = ("serial", "ray")


def failed_line(failed: dict[str, str], out: Any) -> str:
    """The one stderr line of a command some of whose runs failed twice (exit code 1: nothing was wrong with the
    input, and every finished run is kept)."""
    key, error = next(iter(failed.items()))
    return (f"error: {len(failed)} run(s) failed twice (first {key}: {error}); their errors are in {out}/runs.csv; "
            "re-run the same command to retry them")


def add_backend_args(ap: ArgumentParser) -> None:
    """`--backend serial|ray` and Ray's resource flags (sweep and ablation)."""
    ap.add_argument("--backend", default="serial", choices=BACKEND_NAMES,
                    help="serial: this process; ray: each run a Ray task (local instance, or --address)")
    ap.add_argument("--address", default=None, help="Ray cluster to join: auto or HOST:PORT (default: start one here)")
    ap.add_argument("--gpus-per-run", type=float, default=0.0, help="GPUs each Ray run asks for (e.g. 1)")
    ap.add_argument("--cpus-per-run", type=float, default=1.0, help="CPUs each Ray run asks for")
    ap.add_argument("--ray-workers", type=int, default=None,
                    help="Ray workers (actors) to start (default: as many as the resources fit)")


def backend_from_args(args: Any) -> Serial | RayBackend:
    """The backend the flags ask for; Ray flags without `--backend ray` are an error rather than ignored."""
    if args.backend == "ray":
        _ray()
        return RayBackend(args.address, args.gpus_per_run, args.cpus_per_run, args.ray_workers)
    given = [f for f, v, d in (("--address", args.address, None), ("--gpus-per-run", args.gpus_per_run, 0.0),
                               ("--cpus-per-run", args.cpus_per_run, 1.0), ("--ray-workers", args.ray_workers, None))
             if v != d]
    if given:
        raise UserError(f"{', '.join(given)} only apply with --backend ray (got --backend {args.backend})")
    return Serial()


def command_setup(args: Any) -> tuple[Any, Serial | RayBackend, Any]:
    """The start every plan command (sweep, ablation, scan) shares, checked before any work: (shard, backend, out
    folder), and the pinned code version of the run keys when `--code-version` is given."""
    from eval.folders import check_out
    from eval.version import set_code_version
    from interventions.store import Shard

    shard = Shard.parse(args.shard)
    backend = backend_from_args(args)
    out = check_out(args.out)
    if args.code_version is not None:
        set_code_version(args.code_version)
    return shard, backend, out
