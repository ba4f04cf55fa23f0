"""`tables.tex`: the headline table as booktabs LaTeX (no siunitx; `\\usepackage{booktabs}` in a plain `article`),
one table per pre-registered endpoint with significance marks and a caption saying what the CIs are and how p was
adjusted. The numbers are `figures.headline`'s printed cells, so they match report.html and report.md."""
from __future__ import annotations

import re

from . import headline as H
from .report import Report

SPECIAL = {"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "_": r"\_", "#": r"\#", "%": r"\%", "&": r"\&",
           "$": r"\$", "^": r"\^{}", "~": r"\~{}"}
UNICODE = {"Δ": r"$\Delta$", "δ": r"$\delta$", "−": r"$-$", "–": "--", "—": "---", "†": r"\dag{}", "±": r"$\pm$",
           "‖": r"$\|$", "′": "'", "×": r"$\times$", "≥": r"$\geq$", "≤": r"$\leq$", "≈": r"$\approx$", "·": r"$\cdot$",
           "§": r"\S{}", "²": r"$^2$", "→": r"$\to$", "<": "$<$", ">": "$>$"}
NUMBER = re.compile(r"^([+-]?\d+(?:\.\d+)?(?:e[+-]?\d+)?)(\**)(†?)$")
ALIGN = "lrrrcrrc"
DAGGER = r"\dag{}"


def tex(text: object) -> str:
    """Plain text as LaTeX: specials escaped, the few non-ASCII symbols the report uses as commands."""
    out = []
    for ch in str(text):
        out.append(SPECIAL.get(ch) or UNICODE.get(ch) or (ch if ord(ch) < 128 else "?"))
    return "".join(out)


def tex_cell(cell: str) -> str:
    """A printed number in math mode (minus signs, significance marks as superscripts); text stays text."""
    m = NUMBER.match(cell)
    if m:
        num, stars, dagger = m.groups()
        marks = "^{" + stars + "}" if stars else ""
        return f"${num}{marks}$" + (DAGGER if dagger else "")
    if cell.startswith("<") and NUMBER.match(cell[1:]):  # a bootstrap p of 0: its bound
        return f"$<{cell[1:]}$"
    ci = re.match(r"^\[(.+), (.+)\]$", cell)
    if ci:
        return f"[{tex_cell(ci.group(1))}, {tex_cell(ci.group(2))}]"
    return tex(cell)


HEADERS = ("Variant", "$N$", r"$\delta$ ratio", r"$\Delta$", r"95\% CI", r"$p_\mathrm{adj}$", "$r$",
           r"$r$ 95\% CI")


def tables_tex(r: Report) -> str:
    """One booktabs table per headline endpoint (or the summary table where the folder has no comparisons)."""
    out = ["% tables.tex written by `python -m figures --report`; needs \\usepackage{booktabs}.",
           "% Each row ends with a comment naming its comparisons.csv variant."]
    first = ""
    for i, b in enumerate(r.blocks):
        rows, src = H.table(b)
        label = re.sub(r"[^A-Za-z0-9]+", "-", f"{b.quant}-{b.name}").strip("-")
        first = label if i == 0 else first
        what = tex(r.table_caption) if i == 0 else rf"Columns as in Table~\ref{{tab:{first}}}."
        out += [f"% endpoint: quant={b.quant} dataset={b.dataset} metric={b.metric} score={b.score}",
                r"\begin{table}[htbp]", r"\centering", r"\scriptsize", r"\setlength{\tabcolsep}{2pt}",
                rf"\caption{{{tex(b.name)} ($\Delta$ in {tex(b.unit)}). {what}}}",
                rf"\label{{tab:{label}}}", rf"\begin{{tabular}}{{{ALIGN}}}", r"\toprule",
                " & ".join(HEADERS) + r" \\", r"\midrule"]
        for cells, row in zip(rows, src):
            line = " & ".join(tex_cell(cells[c]) if c != "variant" else tex(cells[c]) for c in H.COLUMNS)
            out.append(f"{line} \\\\ % {row['variant']}")
            if row["variant"] == b.quant:
                out.append(r"\midrule")
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    if not r.blocks and r.summary is not None:
        heads, rows = r.summary
        out += [r"\begin{table}[htbp]", r"\centering", r"\footnotesize", rf"\caption{{{tex(r.summary_caption)}}}",
                rf"\begin{{tabular}}{{l{'r' * (len(heads) - 1)}}}", r"\toprule",
                " & ".join(tex(h) for h in heads) + r" \\", r"\midrule"]
        out += [" & ".join([tex(row[0])] + [tex_cell(c) for c in row[1:]]) + r" \\" for row in rows]
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out) + "\n"
