"""`python -m figures DIR --report`: report.html rendered in headless Chromium (no console errors, every image
decoded, the verdict shown, a screenshot), every headline-table number in report.html and tables.tex checked against
comparisons.csv at its printed precision, tables.tex compiled with pdflatex, and folders without comparisons."""
from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from figures.__main__ import main
from tests.figures_synthetic import cached_results, derive

PROPORTIONS = {"top1", "top5", "ece", "ece_ts", "auroc", "fpr95", "wga"}  # drawn in percentage points
VERDICT_LINE = "fmnist ece: inconclusive — quant Δ = {d}pp, the CI excludes 0 but not after Holm (test line)"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The synthetic ablation-like folder plus a verdict.txt in the ablation's layout (table, blank line, lines)."""
    d = derive(cached_results(tmp_path_factory), tmp_path_factory.mktemp("rep") / "abl")
    comp = pd.read_csv(d / "comparisons.csv")
    q = comp[(comp["variant"] == "int4") & (comp["metric"] == "ece")].iloc[0]
    (d / "verdict.txt").write_text("variant  ece@fmnist\nquant  +0.00\n\n"
                                   + VERDICT_LINE.format(d=f"{100 * q['diff']:+.2f}") + "\n")
    return d


@pytest.fixture(scope="module")
def report(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rep") / "out"
    assert main([str(folder), "--report", "--out", str(out)]) == 0
    return out


# ------------------------------------------------------------------------------------- reading what was printed
class Tables(HTMLParser):
    """The headline tables of report.html: [(table attrs, [(row attrs, {cell class: text})])]."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[tuple[dict, list[tuple[dict, dict[str, str]]]]] = []
        self._cell: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "table" and a.get("class") == "headline":
            self.tables.append((a, []))
        elif tag == "tr" and self.tables and "data-variant" in a:
            self.tables[-1][1].append((a, {}))
        elif tag == "td" and self.tables and self.tables[-1][1]:
            self._cell = a.get("class")
            self.tables[-1][1][-1][1][self._cell] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None
        if tag == "table" and self.tables and self.tables[-1][0].get("_done") is None:
            self.tables[-1][0]["_done"] = "1"

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self.tables[-1][1][-1][1][self._cell] += data


def _close(printed: str, true: float, factor: float = 1.0) -> None:
    """A printed fixed-point number equals `true × factor` at its printed precision (half a unit of its last digit)."""
    dec = len(printed.split(".")[1]) if "." in printed else 0
    assert abs(float(printed) - factor * true) <= 0.5 * 10.0**-dec + 1e-9, (printed, true)


def _close_sig(printed: str, true: float) -> None:
    """A number printed to 3 significant digits (p values)."""
    if printed.startswith("<"):
        assert true == 0 and float(printed[1:]) > 0, (printed, true)
        return
    v = float(printed)
    if true == 0:
        assert v == 0
        return
    unit = 10.0 ** (math.floor(math.log10(abs(true))) - 2)
    assert abs(v - true) <= 0.5 * unit * 1.0001, (printed, true)


def _stars(p: float) -> str:
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""


def _check_row(cells: dict[str, str], row: pd.Series, qrow: pd.Series, metric: str) -> None:
    """Every printed cell of one headline row against its comparisons.csv record."""
    k = 100.0 if metric in PROPORTIONS else 1.0
    diff = cells["diff"]
    stars = re.sub(r"[^*]", "", diff)
    assert stars == _stars(row["p_adj"]), (diff, row["p_adj"])
    _close(diff.rstrip("*"), row["diff"], k)
    lo, hi = cells["ci"].strip("[]").split(", ")
    _close(lo, row["ci_lo"], k)
    _close(hi, row["ci_hi"], k)
    _close_sig(cells["padj"], row["p_adj"])
    if row["variant"] == qrow["variant"]:
        assert cells["dratio"] == "1" and cells["ratio"] == ""
        return
    dr = row["delta_median"] / qrow["delta_median"]
    assert cells["dratio"].endswith("†") == (abs(dr - 1) > 0.1), (cells["dratio"], dr)
    _close(cells["dratio"].rstrip("†"), dr)
    if np.isnan(row["repro_ratio"]):
        assert cells["ratio"] == "n/a"
        return
    _close(cells["ratio"], row["repro_ratio"])
    rlo, rhi = cells["ratioci"].strip("[]").split(", ")
    for printed, true in ((rlo, row["repro_lo"]), (rhi, row["repro_hi"])):
        if printed == "unbounded":
            assert not np.isfinite(true)
        else:
            _close(printed, true)


def _endpoint_rows(comp: pd.DataFrame, quant: str, dataset: str, metric: str, score: str) -> pd.DataFrame:
    sc = comp["score"].fillna("").astype(str)
    return comp[((comp["variant"] == quant) | (comp["quant"] == quant)) & (comp["dataset"] == dataset)
                & (comp["metric"] == metric) & (sc == score) & comp["severity"].isna()]


# ------------------------------------------------------------------------------------------------------ tests
def test_report_files_are_written_and_self_contained(report):
    for name in ("report.html", "report.md", "tables.tex"):
        assert (report / name).stat().st_size > 1000, name
    page = (report / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the page must not reach the network"
    assert page.count("data:image/png;base64,") == len(list(report.glob("*.png")))
    for section in ("Question", "Verdict", "Headline table", "Figures", "Provenance"):
        assert f"<h2>{section}</h2>" in page
    md = (report / "report.md").read_text()
    for png in report.glob("*.png"):
        assert f"]({png.name})" in md  # the text version links every figure the page shows


def test_every_headline_number_in_the_html_equals_comparisons_csv(report, folder):
    comp = pd.read_csv(folder / "comparisons.csv")
    parser = Tables()
    parser.feed((report / "report.html").read_text())
    assert parser.tables, "no headline table in report.html"
    checked = 0
    for attrs, rows in parser.tables:
        q, d, m, s = (attrs[f"data-{k}"] for k in ("quant", "dataset", "metric", "score"))
        want = _endpoint_rows(comp, q, d, m, s)
        assert sorted(a["data-variant"] for a, _ in rows) == sorted(want["variant"]), (q, d, m)
        qrow = want[want["variant"] == q].iloc[0]
        for a, cells in rows:
            _check_row(cells, want[want["variant"] == a["data-variant"]].iloc[0], qrow, m)
            checked += 1
    quants = [v for v in comp["quant"].dropna().unique() if (comp["variant"] == v).any()]
    assert {t[0]["data-quant"] for t in parser.tables} == set(quants)
    assert checked >= 40


def _tex_rows(text: str) -> list[tuple[dict[str, str], str, list[str]]]:
    """(endpoint, variant, cells) of every tables.tex row, from its `% endpoint:` and trailing `% variant` comments."""
    out, ep = [], {}
    for line in text.splitlines():
        if line.startswith("% endpoint:"):
            ep = dict(kv.split("=", 1) for kv in line.removeprefix("% endpoint:").split())
            ep.setdefault("score", "")
        elif re.search(r"\\\\ % ", line):
            body, variant = line.split(r" \\ % ", 1)
            out.append((dict(ep), variant, [c.strip() for c in body.split(" & ")]))
    return out


def _tex_number(cell: str) -> tuple[str, str, bool]:
    """(number, significance stars, dagger) of a tables.tex number cell such as `$-0.24^{**}$\\dag{}`."""
    m = re.fullmatch(r"\$([+-]?[\d.e+-]+)(?:\^\{(\**)\})?\$(\\dag\{\})?", cell)
    assert m, cell
    return m.group(1), m.group(2) or "", bool(m.group(3))


def test_tables_tex_numbers_equal_comparisons_csv(report, folder):
    comp = pd.read_csv(folder / "comparisons.csv")
    rows = _tex_rows((report / "tables.tex").read_text())
    assert len(rows) >= 40
    for ep, variant, c in rows:
        want = _endpoint_rows(comp, ep["quant"], ep["dataset"], ep["metric"], ep["score"])
        row, qrow = want[want["variant"] == variant].iloc[0], want[want["variant"] == ep["quant"]].iloc[0]
        num, stars, _ = _tex_number(c[3])
        lo, hi = (_tex_number(x)[0] for x in c[4].strip("[]").split(", "))
        dr = "1" if variant == ep["quant"] else ("{}{}".format(*_tex_number(c[2])[::2]).replace("True", "†")
                                                 .replace("False", ""))
        ratio = c[6] if c[6] in ("", "n/a") else _tex_number(c[6])[0]
        rci = "" if c[7] == "" else "[" + ", ".join(x if x == "unbounded" else _tex_number(x)[0]
                                                    for x in c[7].strip("[]").split(", ")) + "]"
        padj = "<" + c[5][2:-1] if c[5].startswith("$<") else _tex_number(c[5])[0]
        cells = {"diff": num + stars, "ci": f"[{lo}, {hi}]", "padj": padj, "dratio": dr, "ratio": ratio,
                 "ratioci": rci}
        _check_row(cells, row, qrow, ep["metric"])


def test_tables_tex_compiles_with_pdflatex(report, tmp_path):
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex is not installed (apt-get install texlive-latex-base texlive-latex-recommended)")
    shutil.copy(report / "tables.tex", tmp_path / "tables.tex")
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                                      "\\input{tables.tex}\n\\end{document}\n")
    p = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000
    assert "Missing character" not in (tmp_path / "doc.log").read_text(errors="replace")


PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(
  String(e.message || (e.target && (e.target.src || '').slice(0, 60)) || 'error')), true);
const __ce = console.error; console.error = (...a) => { window.__errors.push(a.join(' ')); __ce(...a); };
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const out = {errors: window.__errors, images: imgs.map(i => [i.alt, i.complete, i.naturalWidth]),
               text: document.body.innerText};
  const pre = document.createElement('pre'); pre.id = '__probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")


def test_report_renders_in_headless_chromium(report, tmp_path):
    exe = _chromium()
    page = (report / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    p = subprocess.run(flags + ["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    m = re.search(r'<pre id="__probe">(.*?)</pre>', p.stdout, re.S)
    assert m, "the probe did not run: " + p.stdout[-500:]
    got = json.loads(html.unescape(m.group(1)))
    assert got["errors"] == []
    assert not [ln for ln in p.stderr.splitlines() if "CONSOLE" in ln], "console messages from the page"
    n_png = len(list(report.glob("*.png")))
    assert len(got["images"]) == n_png > 0
    assert all(complete and width > 0 for _, complete, width in got["images"]), got["images"]
    assert "fmnist ece: inconclusive" in got["text"] and "Provenance" in got["text"]
    shot = tmp_path / "report.png"
    p = subprocess.run(flags + ["--hide-scrollbars", "--window-size=1100,2400", f"--screenshot={shot}",
                                (report / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and shot.stat().st_size > 10_000, p.stderr[-2000:]
    from matplotlib.image import imread

    img = imread(shot)
    assert img.shape[:2] == (2400, 1100) and img[..., :3].std() > 0.05


def test_default_figures_are_grids_and_per_variant_ones_come_with_all(folder, tmp_path):
    assert main([str(folder), "--out", str(tmp_path / "a"), "--only", "reliability,ood"]) == 0
    assert sorted(p.stem for p in (tmp_path / "a").glob("*.png")) == ["ood_kmnist", "ood_mnist", "reliability_fmnist"]
    assert main([str(folder), "--out", str(tmp_path / "b"), "--only", "reliability,ood", "--all"]) == 0
    stems = {p.stem for p in (tmp_path / "b").glob("*.png")}
    assert {"reliability_fmnist", "ood_mnist", "reliability_fmnist_int4", "ood_int4", "ood_fp"} <= stems


@pytest.mark.parametrize("keep,expect", [
    (["metrics.csv", "samples", "config.json"], "Point values from metrics.csv"),
    (["spectra.csv", "spectra"], "Medians over the weight matrices"),
])
def test_folders_without_comparisons_get_a_report(folder, tmp_path, keep, expect):
    d = derive(folder, tmp_path / "d", keep=keep)
    out = tmp_path / "out"
    assert main([str(d), "--report", "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert expect in page and "No verdict" in page and 'class="summary"' in page
    assert "\\begin{tabular}" in (out / "tables.tex").read_text()


def test_report_on_a_broken_comparisons_table_is_one_line_and_writes_nothing(folder, tmp_path, capsys):
    d = derive(folder, tmp_path / "d", drop_columns={"comparisons": ["ci_lo"]})
    out = tmp_path / "out"
    rc = main([str(d), "--report", "--out", str(out), "--only", "dose"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "ci_lo" in err
    assert not out.exists() or not any(out.iterdir())


def test_report_imports_no_model_code(folder, tmp_path):
    from tests.test_figures_cli import _run_cli

    p = _run_cli([str(folder), "--report", "--only", "forest", "--out", str(tmp_path / "out")])
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out" / "report.html").is_file()
