"""Selectors: which weight views an analysis or edit touches (towers, kinds, blocks, name globs).

A selector string is a preset name and/or `key=value` clauses joined by `;`, e.g.
`core`, `all`, `vision-only`, `mlp-only;block=0-5`, `kind=q,k;tower=text`, `name=visual.blocks.1*`,
`core;exclude=*.conv_dw` (`exclude=` globs leave views out of what the other clauses pick).
A selector that matches nothing is an error, never a silent no-op.

`early` / `late` halve each tower by parameters: a block is early when its middle lies in the first half of the
tower's block parameters (counted in block order). For towers of equal blocks (every transformer) that is the first
⌈depth/2⌉ blocks, as before; for CNN towers, whose blocks grow with the stage, it keeps both halves near 50 % of the
parameters (a running block index alone would give RN50 13 % / 87 %).
In the core scope a non-core view is selected only by naming its optional kind (`kind=head`); a non-core
attention/MLP matrix (CoCa's caption decoder) needs `scope=all`.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace
from typing import Sequence

from eval.errors import UserError
from spectral.views import BLOCK_KINDS, GENERIC_KINDS, KIND_GROUPS, OPTIONAL_KINDS, TOWERS, WeightView

SCOPES = ("core", "all")
PARTS = ("early", "late")
KEYS = ("tower", "kind", "block", "part", "name", "exclude", "scope")


@dataclass(frozen=True)
class Selector:
    """Conjunction of filters; an empty tuple means "any"."""

    towers: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    blocks: tuple[int, ...] = ()
    part: str | None = None  # "early" = first half of each tower's block parameters, "late" = second half
    names: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()  # name globs left out of whatever the other filters pick
    scope: str = "core"  # "core": METHODS §1 core set (generic: linear/conv); "all": optional views too

    def __post_init__(self) -> None:
        allowed_kinds = BLOCK_KINDS + OPTIONAL_KINDS + GENERIC_KINDS
        for t in self.towers:
            if t not in TOWERS:
                raise UserError(f"unknown tower {t!r}; allowed: {', '.join(TOWERS)}")
        for k in self.kinds:
            if k not in allowed_kinds:
                raise UserError(f"unknown kind {k!r}; allowed: {', '.join(allowed_kinds + tuple(KIND_GROUPS))}")
        if self.part is not None and self.part not in PARTS:
            raise UserError(f"unknown part {self.part!r}; allowed: {', '.join(PARTS)}")
        if self.scope not in SCOPES:
            raise UserError(f"unknown scope {self.scope!r}; allowed: {', '.join(SCOPES)}")
        if any(b < 0 for b in self.blocks):
            raise UserError(f"block indices must be >= 0, got {self.blocks}")

    def matches(self, v: WeightView, early: dict[str, set[int]]) -> bool:
        """`early`: the early blocks of each tower (`early_blocks`)."""
        if self.scope == "core" and not v.core and not (v.kind in self.kinds and v.kind not in BLOCK_KINDS):
            return False
        if self.towers and v.tower not in self.towers:
            return False
        if self.kinds and v.kind not in self.kinds:
            return False
        if self.blocks and v.block not in self.blocks:
            return False
        if self.part is not None:
            if v.block is None:
                return False
            if (v.block in early.get(v.tower, ())) != (self.part == "early"):
                return False
        if self.names and not any(fnmatch.fnmatchcase(v.name, g) for g in self.names):
            return False
        return not any(fnmatch.fnmatchcase(v.name, g) for g in self.exclude)


PRESETS: dict[str, Selector] = {
    "core": Selector(),
    "all": Selector(scope="all"),
    "vision-only": Selector(towers=("visual",)),
    "text-only": Selector(towers=("text",)),
    "attention-only": Selector(kinds=KIND_GROUPS["attn"]),
    "mlp-only": Selector(kinds=KIND_GROUPS["mlp"]),
    "early": Selector(part="early"),
    "late": Selector(part="late"),
}


def _parse_blocks(text: str) -> tuple[int, ...]:
    out: list[int] = []
    for piece in text.split(","):
        try:
            if "-" in piece:
                a, b = piece.split("-", 1)
                out += range(int(a), int(b) + 1)
            else:
                out.append(int(piece))
        except ValueError:
            raise UserError(f"bad block list {text!r}; use e.g. 0-5 or 0,3,7") from None
    return tuple(out)


def parse_selector(spec: str | Selector | None) -> Selector:
    """Parse a selector string (see module docstring); None means the core set."""
    if spec is None:
        return PRESETS["core"]
    if isinstance(spec, Selector):
        return spec
    sel = Selector()
    for clause in filter(None, (c.strip() for c in spec.split(";"))):
        if "=" not in clause:
            if clause in PRESETS:
                preset = PRESETS[clause]
                sel = replace(sel, **{f: getattr(preset, f) for f in ("towers", "kinds", "part") if getattr(preset, f)},
                              scope=preset.scope if preset.scope != "core" else sel.scope)
                continue
            if any(ch in clause for ch in "*?."):
                sel = replace(sel, names=sel.names + (clause,))
                continue
            raise UserError(f"unknown selector {clause!r}; presets: {', '.join(PRESETS)}; "
                            f"or key=value with keys {', '.join(KEYS)}")
        key, value = (s.strip() for s in clause.split("=", 1))
        vals = tuple(v for v in value.split(",") if v)
        if key == "tower":
            sel = replace(sel, towers=tuple("visual" if v in ("vision", "image") else v for v in vals))
        elif key == "kind":
            sel = replace(sel, kinds=tuple(k for v in vals for k in KIND_GROUPS.get(v, (v,))))
        elif key == "block":
            sel = replace(sel, blocks=_parse_blocks(value))
        elif key == "part":
            sel = replace(sel, part=value)
        elif key == "name":
            sel = replace(sel, names=sel.names + vals)
        elif key == "exclude":
            sel = replace(sel, exclude=sel.exclude + vals)
        elif key == "scope":
            sel = replace(sel, scope=value)
        else:
            raise UserError(f"unknown selector key {key!r}; allowed: {', '.join(KEYS)}")
    return sel


def early_blocks(views: Sequence[WeightView]) -> dict[str, set[int]]:
    """Per tower, the blocks whose middle lies in the first half of the tower's block parameters (in block order)."""
    sizes: dict[str, dict[int, int]] = {}
    for v in views:
        if v.block is not None:
            per = sizes.setdefault(v.tower, {})
            per[v.block] = per.get(v.block, 0) + v.numel
    out: dict[str, set[int]] = {}
    for tower, per in sizes.items():
        total, before = sum(per.values()), 0
        out[tower] = set()
        for block in sorted(per):
            if 2 * before + per[block] <= total:  # midpoint before + size/2 <= total/2
                out[tower].add(block)
            before += per[block]
    return out


def select(views: Sequence[WeightView], spec: str | Selector | None = None) -> list[WeightView]:
    """The views matching `spec`; raises UserError when none match."""
    sel = parse_selector(spec)
    early = early_blocks(views)
    chosen = [v for v in views if sel.matches(v, early)]
    if not chosen:
        towers = sorted({v.tower for v in views})
        kinds = sorted({v.kind for v in views})
        raise UserError(
            f"selector {spec if isinstance(spec, str) else sel!r} matches no weight matrix of this model "
            f"(towers: {', '.join(towers)}; kinds: {', '.join(kinds)})"
        )
    return chosen
