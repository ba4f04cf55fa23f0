"""The referee table as text: variants × headline endpoints, Δ (pp for proportions, * where p_adj < 0.05) and,
for controls, the reproduction ratio."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from interventions.referee.verdict import PROPORTIONS, headline_endpoints


def compact_table(comp: pd.DataFrame, id_dataset: str | None, ood_sets: Sequence[str], score: str | None) -> str:
    """Variants × headline endpoints: Δ (pp for proportions; * p_adj < 0.05) and, for controls, the reproduction
    ratio."""
    cols = headline_endpoints(id_dataset, ood_sets, score)
    headers = [f"{m}{'(' + s + ')' if s else ''}@{d}" for d, m, s in cols]
    order = list(dict.fromkeys(comp["control"]))
    lines = []
    name_w = max([len("variant")] + [len(o) for o in order])
    cell_w = max([18] + [len(h) for h in headers])
    lines.append("variant".ljust(name_w) + "  " + "  ".join(h.rjust(cell_w) for h in headers))
    for ctrl in order:
        cells = []
        for d, m, s in cols:
            r = comp[(comp["control"] == ctrl) & (comp["dataset"] == d) & (comp["metric"] == m) & (comp["score"] == s)
                     & comp["severity"].isna()]
            if r.empty:
                cells.append("-".rjust(cell_w))
                continue
            r = r.iloc[0]
            star = "*" if r["p_adj"] < 0.05 else " "
            txt = f"{100 * r['diff']:+.2f}{star}" if m in PROPORTIONS else f"{r['diff']:+.4f}{star}"
            if np.isfinite(r["repro_ratio"]):
                txt += f" r={r['repro_ratio']:.2f}"
            cells.append(txt.rjust(cell_w))
        lines.append(ctrl.ljust(name_w) + "  " + "  ".join(cells))
    return "\n".join(lines)
