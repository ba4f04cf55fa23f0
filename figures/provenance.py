"""What was run, read from a results folder's own records (config.json, manifest.json, runs/<key>/run.json,
comparisons.csv, metrics.csv): the question it answers and the provenance block of the report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .io import Results

MATCH_NAMES = {"fro": "M1, equal distortion ‖W′ − W‖_F = ‖E‖_F", "output": "M2, equal output distortion on "
               "calibration inputs", "stable-rank": "M3, equal stable rank", "none": "not matched"}
QUESTION = ("Does quantizing CLIP change its reliability because it damps the small singular directions of its "
            "weights, or because of something else quantization does (noise, clipping, rescaling)?")


def command(results: Results) -> str:
    """The command that made the (first) folder: config.json's, else manifest.json's, else ''."""
    cfg = results.config()
    if cfg.get("command"):
        return str(cfg["command"]).removeprefix("python -m ")
    for d in results.dirs:
        p = d / "manifest.json"
        if p.is_file():
            try:
                return str(json.loads(p.read_text()).get("command", "")).removeprefix("python -m ")
            except json.JSONDecodeError:
                return ""
    return ""


def question(results: Results, quants: list[str]) -> str:
    """The question the folder answers, in words: the referee question for comparisons, else what the command did."""
    cfg, cmd = results.config(), command(results)
    if quants:
        controls = cfg.get("controls")
        n = f" and {len(controls)} controls" if isinstance(controls, list) else " and its controls"
        match = cfg.get("match")
        how = f", matched by {match} ({match_name(match)})" if match else ""
        if cfg.get("dose"):
            how += f", with dose–response runs at δ = {', '.join(f'{d:g}' for d in cfg['dose'])} % (METHODS §3 e7)"
        return (f"{QUESTION} Here: {', '.join(quants)}{n}{how}, each evaluated on the same test images against "
                "full precision.")
    if results.has("spectra") and not results.has("metrics"):
        v = [x for x in results.table("spectra")["variant"].dropna().unique() if x != "fp"]
        return (f"What does {', '.join(map(str, v)) or 'full precision'} do to every weight matrix's spectrum "
                "(METHODS §4)? " + QUESTION)
    if results.has("metrics"):
        v = results.table("metrics")["variant"].dropna().unique()
        what = "full precision alone" if list(v) == ["fp"] else f"{len(v)} variants"
        return f"How reliable is the model ({what}; command {cmd or 'unknown'})? No paired comparisons in this folder."
    return f"What this folder holds (command {cmd or 'unknown'})."


def match_name(match: str) -> str:
    """What a matching criterion means, in words (a δ target `delta:X` included)."""
    name, _, value = str(match).partition(":")
    if name == "delta" and value:
        return f"δ target ‖W′ − W‖_F = {value}·‖W‖_F"
    return MATCH_NAMES.get(match, match)


def run_seconds(results: Results) -> tuple[int, float]:
    """(number of stored runs, their summed compute seconds) from runs/<key>/run.json."""
    n, total = 0, 0.0
    for d in results.dirs:
        for p in sorted(Path(d).glob("runs/*/run.json")):
            try:
                s = json.loads(p.read_text()).get("seconds")
            except (json.JSONDecodeError, OSError):
                continue
            if isinstance(s, (int, float)):
                n, total = n + 1, total + float(s)
    return n, total


def runs_table(results: Results) -> pd.DataFrame | None:
    """runs.csv of the first folder that has one (one row per stored run), else None."""
    for d in results.dirs:
        if (d / "runs.csv").is_file():
            try:
                return pd.read_csv(d / "runs.csv", dtype=str)
            except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError):
                return None
    return None


def _unique(df: pd.DataFrame | None, col: str) -> list[str]:
    if df is None or col not in df.columns:
        return []
    return [str(x) for x in dict.fromkeys(df[col].dropna()) if str(x) != ""]


def datasets(results: Results, comp: pd.DataFrame | None) -> str:
    """name (role, n images, K classes) per dataset: config.json's evaluation record, else comparisons' n."""
    cfg = results.config()
    rows = (cfg.get("evaluation") or {}).get("datasets") if isinstance(cfg.get("evaluation"), dict) else None
    if isinstance(rows, list) and rows:
        return "; ".join(f"{r.get('name')} ({r.get('role')}, n = {r.get('n')}"
                         + (f", {r.get('classes')} classes" if r.get("classes") else "") + ")" for r in rows)
    if comp is not None and "n" in comp.columns:
        n = comp.drop_duplicates("dataset").set_index("dataset")["n"]
        return "; ".join(f"{d} (n = {int(v)} in the comparison)" for d, v in n.items() if np.isfinite(v))
    if results.has("metrics"):
        m = results.table("metrics")
        return "; ".join(f"{d} ({r})" for d, r in m.drop_duplicates("dataset")[["dataset", "role"]].to_numpy())
    return "not recorded"


def corrections(comp: pd.DataFrame | None) -> str:
    """How p was adjusted, from comparisons.csv's adj_method and family_id columns."""
    if comp is None or "adj_method" not in comp.columns:
        return "not recorded" if comp is None else "p_adj as recorded (method not stated in comparisons.csv)"
    parts = []
    for method, name in (("holm", "Holm"), ("bh", "Benjamini–Hochberg")):
        sub = comp[comp["adj_method"] == method]
        if not sub.empty:
            fam = sub["family_id"].nunique() if "family_id" in sub.columns else 0
            parts.append(f"{name} ({len(sub)} records in {fam} famil{'y' if fam == 1 else 'ies'})")
    return "; ".join(parts) or "none"


def provenance(results: Results, comp: pd.DataFrame | None) -> list[tuple[str, str]]:
    """(field, value) pairs: model, checkpoint hash, code version, command, datasets, seeds, B, corrections,
    matching criterion, layers, wall time. 'not recorded' where the folder does not say."""
    cfg = results.config()
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {"name": cfg.get("model")}
    runs = runs_table(results)
    name = model.get("name") or next(iter(_unique(comp, "model") + _unique(runs, "model.name")), "not recorded")
    pretrained = model.get("pretrained") or next(iter(_unique(runs, "model.pretrained")), "")
    ckpt = model.get("checkpoint_hash") or next(iter(_unique(runs, "model.checkpoint_hash")), "not recorded")
    code = cfg.get("code_version") or ", ".join(_unique(runs, "code_version")) or "not recorded"
    seeds = cfg.get("seeds")
    b = _unique(comp, "B") or ([str(cfg["B"])] if cfg.get("B") else [])
    match = cfg.get("match") or ", ".join(_unique(comp, "match")) or ""
    n, secs = run_seconds(results)
    argv = cfg.get("argv")
    cmd = command(results) + (" " + " ".join(map(str, argv)) if isinstance(argv, list) else "")
    return [
        ("results", results.label),
        ("command", cmd.strip() or "not recorded"),
        ("model", f"{name}" + (f" ({pretrained})" if pretrained else "")),
        ("checkpoint hash", str(ckpt)),
        ("code version", str(code)),
        ("datasets", datasets(results, comp)),
        ("seeds", ", ".join(map(str, seeds)) if isinstance(seeds, list) else "not recorded"),
        ("bootstrap resamples B", ", ".join(b) or "not recorded"),
        ("multiplicity corrections", corrections(comp)),
        ("matching criterion", f"{match} ({match_name(match)})" if match else "not recorded"),
        ("layers", str(cfg.get("layers") or "not recorded")),
        ("wall time", f"{secs:.0f} s over {n} stored runs (runs/<key>/run.json)" if n else "not recorded"),
    ]
