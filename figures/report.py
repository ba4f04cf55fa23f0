"""The referee-response report of a results folder: the question, the verdict lines, the headline table, the key
figures and the provenance, as one self-contained `report.html` (figures inlined as PNG, no network access) and the
same content as `report.md`; `figures.latex` writes the table as `tables.tex`. Everything is read from the folder
(comparisons.csv, verdict.txt, metrics.csv, spectra, config.json): nothing is recomputed here.
"""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import headline as H
from .io import Results
from .layout import HEADLINE_METRICS, metric_factor, metric_label
from .provenance import provenance, question

NEEDED = ("variant", "dataset", "metric", "score", "quant", "diff", "ci_lo", "ci_hi", "p_adj")
VERDICT = re.compile(r"^\S+ \S+: (supported|noise|confidence-scale|inconclusive)\b")


@dataclass(frozen=True)
class Shown:
    """A figure on the page: its file stem, caption and PNG file."""

    stem: str
    caption: str
    png: Path


@dataclass
class Report:
    """Everything the page says, in order."""

    title: str
    question: str
    verdict: list[str]
    notes: list[str]
    blocks: list[H.Endpoint]
    table_caption: str
    summary: tuple[list[str], list[list[str]]] | None  # (headers, rows) where the folder has no comparisons
    summary_caption: str
    figures: list[Shown] = field(default_factory=list)
    provenance: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def verdict_lines(results: Results) -> tuple[list[str], list[str]]:
    """(verdict lines, notes) of verdict.txt: what follows its table; ([], []) when the folder has none."""
    for d in results.dirs:
        p = d / "verdict.txt"
        if p.is_file():
            text = p.read_text(encoding="utf-8", errors="replace").split("\n\n", 1)
            lines = [ln.strip() for ln in (text[1] if len(text) > 1 else "").splitlines() if ln.strip()]
            return [ln for ln in lines if VERDICT.match(ln)], [ln for ln in lines if not VERDICT.match(ln)]
    return [], []


def metrics_summary(results: Results) -> tuple[list[str], list[list[str]]] | None:
    """Point values of the headline metrics per variant from metrics.csv (% for proportions), for folders without
    comparisons: ID top-1/ECE/NLL, AUROC with the preferred OOD score per OOD set."""
    if not results.has("metrics"):
        return None
    m = results.table("metrics")
    m = m[m["severity"].isna()]
    cols: list[tuple[str, str, str | None]] = []
    for d in dict.fromkeys(m.loc[m["role"] == "id", "dataset"]):
        cols += [(d, k, None) for k in HEADLINE_METRICS if k in ("top1", "ece", "nll")
                 and ((m["dataset"] == d) & (m["metric"] == k)).any()]
    for d in dict.fromkeys(m.loc[m["role"] == "ood", "dataset"]):
        scores = list(dict.fromkeys(m.loc[(m["dataset"] == d) & (m["metric"] == "auroc"), "score"].dropna()))
        if scores:
            cols.append((d, "auroc", "mcm" if "mcm" in scores else scores[0]))
    if not cols:
        return None
    headers = ["variant"] + [f"{metric_label(k, s)} @{d}" for d, k, s in cols]
    rows = []
    for v in dict.fromkeys(m["variant"]):
        row = [str(v)]
        for d, k, s in cols:
            sel = m[(m["variant"] == v) & (m["dataset"] == d) & (m["metric"] == k)
                    & (m["score"].isna() if s is None else (m["score"] == s))]
            x = float(sel["value"].iloc[0]) if not sel.empty else float("nan")
            row.append("n/a" if not np.isfinite(x) else f"{100 * x:.2f}" if metric_factor(k) == 100 else f"{x:.4f}")
        rows.append(row)
    return headers, rows


def spectra_summary(results: Results) -> tuple[list[str], list[list[str]]] | None:
    """Per variant of spectra.csv: matrices, and the median over matrices of δ, stable rank and tail gain."""
    if not results.has("spectra"):
        return None
    s = results.table("spectra")
    want = [c for c in ("delta", "stable_rank", "tail_gain") if c in s.columns]
    headers = ["variant", "matrices"] + [f"median {c}" for c in want]
    rows = []
    for v, g in s.groupby("variant", sort=False):
        vals = [pd.to_numeric(g[c], errors="coerce").median() for c in want]
        rows.append([str(v), str(len(g))] + ["n/a" if not np.isfinite(x) else f"{x:.4g}" for x in vals])
    return headers, rows


def build(results: Results, figures: list[Shown], skipped: list[str]) -> Report:
    """The report's content from the folder and the figures just written."""
    comp = results.require("comparisons", NEEDED, "the report's headline table") if results.has("comparisons") else None
    blocks = H.headline(comp) if comp is not None else []
    verdict, notes = verdict_lines(results)
    summary, what = None, ""
    if not blocks:
        summary = metrics_summary(results)
        what = ("Point values from metrics.csv (percent for proportions). This folder holds no paired comparisons, "
                "so no CIs: run `python -m interventions.ablation` for them.")
        if summary is None:
            summary = spectra_summary(results)
            what = "Medians over the weight matrices of spectra.csv (METHODS §4), per variant."
    quants = list(dict.fromkeys(b.quant for b in blocks))
    return Report(
        title=f"clip-spectral report: {results.label}", question=question(results, quants), verdict=verdict,
        notes=notes, blocks=blocks, table_caption=H.caption(blocks, comp) if blocks else "", summary=summary,
        summary_caption=what, figures=figures, provenance=provenance(results, comp), skipped=skipped)


# ---------------------------------------------------------------------------------------------------- HTML
CSS = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#111}
p,li{line-height:1.4}
table{border-collapse:collapse;margin:.5rem 0 1.2rem;font-size:.9rem}
th,td{padding:.15rem .55rem;border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}thead th{border-bottom:2px solid #444}
tr.quant td{font-weight:600}.verdict li{margin:.3rem 0}figure{margin:1.2rem 0}
figure img{max-width:100%;width:33rem;height:auto;border:1px solid #eee}figcaption{font-size:.85rem;color:#333}
caption{caption-side:top;text-align:left;font-weight:600;padding-bottom:.2rem}
.table-note{font-size:.85rem;color:#333}
dl{display:grid;grid-template-columns:max-content auto;gap:.2rem 1rem}dt{font-weight:600}dd{margin:0}"""
CELL_CLASS = dict(zip(H.COLUMNS, ("variant", "seeds", "dratio", "diff", "ci", "padj", "ratio", "ratioci")))


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def html_page(r: Report) -> str:
    """The report as one HTML page with its figures inlined as base64 PNG."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{_e(r.title)}</title><style>{CSS}</style></head><body>", f"<h1>{_e(r.title)}</h1>",
           "<h2>Question</h2>", f'<p class="question">{_e(r.question)}</p>', "<h2>Verdict</h2>"]
    if r.verdict:
        out += ['<ul class="verdict">'] + [f"<li>{_e(v)}</li>" for v in r.verdict] + ["</ul>"]
    else:
        out.append('<p class="verdict">No verdict: the folder holds no verdict.txt (only the referee ablation '
                   "writes one).</p>")
    if r.notes:
        out += ['<ul class="notes">'] + [f"<li>{_e(n)}</li>" for n in r.notes] + ["</ul>"]
    out.append("<h2>Headline table</h2>")
    for b in r.blocks:
        rows, src = H.table(b)
        out.append(f'<table class="headline" data-quant="{_e(b.quant)}" data-dataset="{_e(b.dataset)}" '
                   f'data-metric="{_e(b.metric)}" data-score="{_e(b.score)}">')
        out.append(f"<caption>{_e(b.name)} (Δ in {_e(b.unit)})</caption>")
        out.append("<thead><tr>" + "".join(f"<th>{_e(c)}</th>" for c in H.COLUMNS) + "</tr></thead><tbody>")
        for cells, row in zip(rows, src):
            cls = ' class="quant"' if row["variant"] == b.quant else ""
            out.append(f'<tr{cls} data-variant="{_e(row["variant"])}">' + "".join(
                f'<td class="{CELL_CLASS[c]}">{_e(cells[c])}</td>' for c in H.COLUMNS) + "</tr>")
        out.append("</tbody></table>")
    if r.blocks:
        out.append(f'<p class="table-note">{_e(r.table_caption)}</p>')
    if r.summary is not None:
        heads, rows = r.summary
        out.append(f'<table class="summary"><caption>{_e(r.summary_caption)}</caption><thead><tr>'
                   + "".join(f"<th>{_e(h)}</th>" for h in heads) + "</tr></thead><tbody>")
        out += ["<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows]
        out.append("</tbody></table>")
    elif not r.blocks:
        out.append("<p>No table: the folder holds neither comparisons.csv, metrics.csv nor spectra.</p>")
    out.append("<h2>Figures</h2>")
    for f in r.figures:
        data = base64.b64encode(f.png.read_bytes()).decode("ascii")
        out.append(f'<figure id="{_e(f.stem)}"><img alt="{_e(f.stem)}" src="data:image/png;base64,{data}">'
                   f"<figcaption><b>{_e(f.stem)}</b>. {_e(f.caption)}</figcaption></figure>")
    if not r.figures:
        out.append("<p>No figures: the folder supports none.</p>")
    if r.skipped:
        out.append("<p>Not drawn: " + "; ".join(_e(s) for s in r.skipped) + ".</p>")
    out.append('<h2>Provenance</h2><dl class="provenance">')
    out += [f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in r.provenance]
    out.append("</dl></body></html>")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------ Markdown
def _md(text: object) -> str:
    return str(text).replace("|", "\\|").replace("*", "\\*")


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(_md(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
            + ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows])


def markdown(r: Report) -> str:
    """The same content as the page, for a text editor (figures linked by file name, next to report.md)."""
    out = [f"# {r.title}", "", "## Question", "", r.question, "", "## Verdict", ""]
    out += [f"- {v}" for v in r.verdict] or ["No verdict: the folder holds no verdict.txt."]
    out += [""] + [f"- {n}" for n in r.notes] + ([""] if r.notes else []) + ["## Headline table", ""]
    for b in r.blocks:
        rows, _ = H.table(b)
        out += [f"**{b.name}** (Δ in {b.unit})", ""]
        out += _md_table(list(H.COLUMNS), [[c[k] for k in H.COLUMNS] for c in rows]) + [""]
    if r.blocks:
        out += [r.table_caption, ""]
    if r.summary is not None:
        out += _md_table(*r.summary) + ["", r.summary_caption, ""]
    out += ["## Figures", ""]
    for f in r.figures:
        out += [f"![{f.stem}]({f.png.name})", "", f"**{f.stem}**. {f.caption}", ""]
    if r.skipped:
        out += ["Not drawn: " + "; ".join(r.skipped) + ".", ""]
    out += ["## Provenance", ""] + [f"- **{k}**: {v}" for k, v in r.provenance]
    return "\n".join(out) + "\n"
