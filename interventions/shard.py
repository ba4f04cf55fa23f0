"""`--shard i/n`: a deterministic share of a plan's run keys, for independent processes writing into one results
store (SLURM job arrays, torchrun ranks, machines by hand); `--shard auto` reads the launcher's environment."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from eval.errors import UserError


@dataclass(frozen=True)
class Shard:
    """`--shard i/n` (1 ≤ i ≤ n): this process runs the grid points whose key falls in bucket i of n.

    `--shard auto` takes i/n from the launcher's environment (`Shard.from_env`); `source` says from where."""

    index: int = 1
    count: int = 1
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not (self.count >= 1 and 1 <= self.index <= self.count):
            where = f" (from {self.source})" if self.source else ""
            raise UserError(f"bad shard {self.index}/{self.count}{where}; use i/n with 1 <= i <= n, e.g. --shard 1/4")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Shard":
        """The shard of a SLURM array task (SLURM_ARRAY_TASK_ID with _COUNT, or _MIN/_MAX, and _STEP), else of a
        SLURM step's task (SLURM_PROCID of SLURM_NTASKS), else of a torchrun/MPI-style rank (RANK of WORLD_SIZE)."""
        env = os.environ if env is None else env

        def num(name: str) -> int:
            try:
                return int(env[name])
            except ValueError:
                raise UserError(f"--shard auto: {name}={env[name]!r} is not an integer") from None

        if "SLURM_ARRAY_TASK_ID" in env:
            tid = num("SLURM_ARRAY_TASK_ID")
            lo = num("SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
            step = num("SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
            if "SLURM_ARRAY_TASK_COUNT" in env:
                count = num("SLURM_ARRAY_TASK_COUNT")
            elif "SLURM_ARRAY_TASK_MAX" in env:
                count = (num("SLURM_ARRAY_TASK_MAX") - lo) // max(step, 1) + 1
            else:
                raise UserError("--shard auto: SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT nor "
                                "SLURM_ARRAY_TASK_MAX is; use --shard i/n")
            names = [n for n in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP",
                                 "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MAX") if n in env]
            return cls((tid - lo) // max(step, 1) + 1, count, ", ".join(f"{n}={env[n]}" for n in names))
        for rank, size in (("SLURM_PROCID", "SLURM_NTASKS"), ("RANK", "WORLD_SIZE")):
            if rank in env and size in env:
                return cls(num(rank) + 1, num(size), f"{rank}={env[rank]}, {size}={env[size]}")
        raise UserError("--shard auto: none of SLURM_ARRAY_TASK_ID, SLURM_PROCID/SLURM_NTASKS or RANK/WORLD_SIZE is "
                        "set; use --shard i/n")

    @classmethod
    def parse(cls, text: str | None) -> "Shard":
        if text is None:
            return cls()
        if str(text).strip().lower() == "auto":
            return cls.from_env()
        i, slash, n = str(text).partition("/")
        try:
            if not slash:
                raise ValueError
            return cls(int(i), int(n))
        except ValueError:
            raise UserError(f"bad --shard {text!r}; use i/n with 1 <= i <= n, e.g. 2/4") from None

    def owns(self, key: str) -> bool:
        return int(key, 16) % self.count == self.index - 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def describe(self) -> str:
        """`i/n`, and where `--shard auto` found it."""
        return f"{self} (from {self.source})" if self.source else str(self)
