"""Control interventions matched to a quantizer (METHODS §3); importing this package registers their specs.

Families: `lowrank` (a), `damping` (b1–b4), `noise` (c1–c5), `clip`/`round`/`deadzone` (d), `scale` (e1),
`randproj` (e2), `topdamp` (e3), `rotquant` (e4); e5 (temperature) is a model-level edit in `temperature`,
e6 scopes are selector presets (`--layers vision-only` …). Grammar: see `interventions.controls.base`.
"""
from interventions.controls import (  # noqa: F401  (imported for registration)
    clipping,
    damping,
    lowrank,
    noise,
    projection,
    rotation,
    scale,
    temperature,
    topdamp,
)
from interventions.controls.base import Control

__all__ = ["Control"]
