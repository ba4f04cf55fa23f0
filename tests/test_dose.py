"""The δ target (`match=delta:X`, METHODS §3 e7) and the dose–response ablation (`--dose`): every family with a free
parameter reaches ‖W′ − W‖_F = X·‖W‖_F, families without one refuse it, specs round-trip, bad values are one-line
errors, the dose plan's size and names, doses kept out of the verdict, and a small end-to-end `--dose` ablation on the
embedded default with its figure."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from eval.errors import UserError
from interventions import dose as D
from interventions.grid import Grid, control_spec, expand
from interventions.matching import check_criterion, delta_criterion
from interventions.referee import verdict as V
from interventions.referee.compare import adjust
from interventions.registry import MatrixContext, parse_edit
from spectral.svd import SVDCache

CONTINUOUS = ("damping:tikhonov", "damping:soft", "damping:tail", "damping:tail@0.25", "topdamp", "noise:c1",
              "noise:c1-uniform", "noise:c1-group", "noise:c1-rel", "noise:c2", "noise:c3", "noise:c4",
              "randproj:delta")
NO_FREE_PARAMETER = ("damping:transplant", "damping:vectors", "damping:gains", "damping:residual", "clip", "round",
                     "deadzone", "scale", "rotquant", "randproj", "noise:c5", "lowrank:0.5", "damping:tikhonov=0.1",
                     "noise:c1,scale=0.1", "topdamp:0.9", "temperature")
QUANT = "int4-ch-mse"


def _matrix(seed: int = 0) -> torch.Tensor:
    """A 48×64 matrix with a decaying spectrum (σ over a decade), like a trained weight."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(64, 48, generator=g, dtype=torch.float64))
    return ((u * torch.logspace(0, -1, 48, dtype=torch.float64)) @ v.T).to(torch.float32)


def _delta(w: torch.Tensor, w_new: torch.Tensor) -> float:
    return float((w_new.double() - w.double()).norm() / w.double().norm())


def _with(spec: str, keys: str) -> str:
    return f"{spec}{',' if ':' in spec else ':'}{keys}"


# ------------------------------------------------------------------------------------ the δ target per family
@pytest.mark.parametrize("delta", [0.005, 0.05, 0.2])
@pytest.mark.parametrize("family", CONTINUOUS)
def test_continuous_families_reach_the_delta_target(family, delta):
    w = _matrix()
    edit = parse_edit(_with(family, f"q={QUANT},match={delta_criterion(delta)}"))
    out = edit.apply(w, MatrixContext("m", cache=SVDCache()))
    achieved = _delta(w, out.weight)
    assert abs(achieved - delta) / delta <= 1e-3, (family, achieved)
    f = out.fields
    assert f["match"] == delta_criterion(delta) and f["match_target"] == pytest.approx(delta, rel=1e-12)
    assert f["match_achieved"] == pytest.approx(achieved, rel=1e-4)  # the reported value is the edit's own δ
    assert f["match_reached"] and f["match_rel_err"] <= 1e-3 and not f["match_discrete"]


@pytest.mark.parametrize("delta", [0.005, 0.05, 0.2, 0.4])
def test_lowrank_takes_the_smallest_rank_within_the_target_and_reports_what_it_achieved(delta):
    w = _matrix(1)
    out = parse_edit(f"lowrank:match={delta_criterion(delta)}").apply(w, MatrixContext("m", cache=SVDCache()))
    s = torch.linalg.svdvals(w.double())
    k = out.fields["rank"]

    def tail(j: int) -> float:
        return float(s[j:].norm() / s.norm())

    assert tail(k) <= delta * (1 + 1e-9) and (k == 1 or tail(k - 1) > delta)  # closest rank on the allowed side
    assert out.fields["match_discrete"] and out.fields["match_target"] == pytest.approx(delta)
    assert out.fields["match_achieved"] == pytest.approx(tail(k), rel=1e-9)
    assert _delta(w, out.weight) == pytest.approx(out.fields["match_achieved"], rel=1e-4)
    assert out.fields["match_achieved_rank_minus_1"] == pytest.approx(tail(k - 1), rel=1e-9)


def test_a_delta_target_needs_no_quantizer_where_the_edit_does_not_use_one():
    assert str(parse_edit("lowrank:q=int8-ch,match=delta:0.05")) == "lowrank:match=delta:0.05"
    assert str(parse_edit("topdamp:match=delta:0.05")) == "topdamp:@0.5,match=delta:0.05"
    # matched noise is built from E (its shape), and e2δ's k is (a)'s matched to Q: those keep q=
    assert str(parse_edit("noise:c1,match=delta:0.05")) == "noise:c1,q=int4-g128-mse,match=delta:0.05"
    assert str(parse_edit("randproj:delta,q=int8-ch,match=delta:0.05")) == "randproj:delta,q=int8-ch,match=delta:0.05"
    out = parse_edit("lowrank:match=delta:0.05").apply(_matrix(), MatrixContext("m", cache=SVDCache()))
    assert out.fields["match_quant"] == ""


def test_e2delta_moves_along_one_direction_at_every_dose():
    w, ctx = _matrix(2), MatrixContext("m", cache=SVDCache())
    d = [parse_edit(f"randproj:delta,q={QUANT},match={delta_criterion(x)}").apply(w, ctx).weight - w
         for x in (0.01, 0.1)]
    cos = float((d[0].double() * d[1].double()).sum() / (d[0].double().norm() * d[1].double().norm()))
    assert cos == pytest.approx(1.0, abs=1e-5)  # same projection W·P·Pᵀ, only t changes


# ------------------------------------------------------------------------------------------ specs and errors
@pytest.mark.parametrize("spec", [
    "lowrank:match=delta:0.05", "damping:tikhonov,match=delta:0.005", "damping:soft,match=delta:0.4",
    "damping:tail@0.5,match=delta:0.1", "topdamp:@0.5,match=delta:0.02", "noise:c1,q=int4-g128-mse,match=delta:0.05",
    "noise:c1,dist=uniform,q=int4-g128-mse,match=delta:1", "noise:c1-group,group=128,q=int8-ch,match=delta:0.01",
    "noise:c4,q=nf4,match=delta:0.2", "randproj:delta,q=int4-g128-mse,match=delta:0.0123456789",
])
def test_delta_specs_round_trip(spec):
    assert str(parse_edit(spec)) == spec
    assert str(parse_edit(str(parse_edit(spec)))) == spec


def test_criterion_text_is_canonical():
    assert check_criterion("delta:0.050") == check_criterion("delta:5e-2") == "delta:0.05"
    assert delta_criterion(0.5 / 100) == "delta:0.005" and delta_criterion(40 / 100) == "delta:0.4"
    assert str(parse_edit("noise:c2,match=delta:0.050")) == "noise:c2,q=int4-g128-mse,match=delta:0.05"
    assert Grid(match=("delta:0.050", "fro")).match == ("delta:0.05", "fro")


@pytest.mark.parametrize("bad", ["delta:0", "delta:-1", "delta:abc", "delta:1.5", "delta", "delta:", "delta:nan"])
def test_bad_delta_values_are_one_line_errors(bad):
    for call in (lambda: check_criterion(bad), lambda: parse_edit(f"lowrank:match={bad}"),
                 lambda: Grid(match=(bad,))):
        with pytest.raises(UserError) as err:
            call()
        msg = str(err.value)
        assert "\n" not in msg and repr(bad) in msg and "delta:X" in msg and "(0, 1]" in msg, msg


@pytest.mark.parametrize("control", NO_FREE_PARAMETER)
def test_families_without_a_free_parameter_refuse_a_delta_target(control):
    with pytest.raises(UserError) as err:
        control_spec(control, QUANT, "delta:0.05")
    msg = str(err.value)
    assert "\n" not in msg and "cannot be set to a δ target (delta:0.05)" in msg and "lowrank" in msg, msg
    assert control_spec(control, QUANT, "fro")  # the same family is fine under M1


# --------------------------------------------------------------------------------------------- the dose plan
def test_parse_doses():
    assert D.parse_doses(None) == ()
    assert D.parse_doses("all") == D.DOSE_GRID == (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0)
    assert D.parse_doses("20,1,5") == (1.0, 5.0, 20.0) and D.parse_doses("0.5") == (0.5,)
    for bad in ("3", "abc", "", "1,1", "0", "-5", "1,,5", "100"):
        with pytest.raises(UserError, match=r"--dose must be 'all' or a comma list of the doses in % from"):
            D.parse_doses(bad)


def test_dose_plan_expands_to_families_times_doses_times_seeds():
    items = ["lowrank", "noise:c1", "damping:gains", "randproj:delta", "damping:tikhonov", "clip", "temperature"]
    plan = D.dose_plan(items, QUANT, D.DOSE_GRID)
    assert plan.left_out == ("damping:gains", "clip", "temperature")
    takers = ["lowrank", "noise:c1", "randproj:delta", "damping:tikhonov"]
    assert len(plan.points) == len(takers) * 7 and len(set(plan.specs)) == len(plan.specs)
    grid = Grid(experiment="reliability", quant=(QUANT,), controls=("none", *items, *plan.specs), seeds=(0, 1, 2))
    points = [p for p in expand(grid) if p.match is not None and p.match.startswith("delta:")]
    stochastic = {"noise:c1", "randproj:delta"}
    assert len(points) == 7 * (2 + 3 * len(stochastic))  # deterministic once, stochastic once per seed
    names = [p.variant for p in points]
    assert len(set(names)) == len(names)
    for p in points:
        assert str(parse_edit(p.edit)) == p.edit and p.edit.endswith(f"match={p.match}")
        assert p.variant == p.edit + (f"#s{p.seed}" if p.stochastic else "")
    assert {p.match for p in points} == {delta_criterion(d / 100) for d in D.DOSE_GRID}
    with pytest.raises(UserError, match="none of the controls can be set to a δ target"):
        D.dose_plan(["clip", "scale"], QUANT, (5.0,))


def test_all_under_a_delta_target_keeps_the_families_with_a_free_parameter():
    from interventions.grid import left_out_of_all

    grid = Grid(experiment="reliability", controls=("all",), match=("delta:0.05",))
    families = {p.edit.split(":")[0].split(",")[0] for p in expand(grid) if p.edit}
    assert families == {"lowrank", "damping", "noise", "randproj", "topdamp"}
    assert {"clip", "scale", "rotquant", "randproj", "noise:c5", "temperature"} <= set(left_out_of_all(grid))
    with pytest.raises(UserError, match="clip cannot be set"):
        expand(Grid(experiment="reliability", controls=("clip",), match=("delta:0.05",)))


def _frame() -> pd.DataFrame:
    """Comparison records of one headline endpoint: the quantizer, two matched controls, three dose rows."""
    rows = []
    for control, p, dose, ratio in (("quant", 0.001, np.nan, np.nan), ("lowrank", 0.004, np.nan, 0.9),
                                    ("noise:c1", 0.03, np.nan, 0.1), ("lowrank", 0.0001, 0.05, 1.4),
                                    ("lowrank", 0.0002, 0.1, 1.2), ("noise:c1", 0.0003, 0.1, 0.95)):
        rows.append({"dataset": "id", "metric": "ece", "score": "", "severity": np.nan, "control": control,
                     "variant": f"{control}@{dose}", "diff": -0.02 * (ratio if np.isfinite(ratio) else 1),
                     "ci_lo": -0.03, "ci_hi": -0.01, "p": p, "family_id": "id:ece", "repro_ratio": ratio,
                     "repro_lo": ratio - 0.2, "repro_hi": ratio + 0.2, "match": "fro" if np.isnan(dose) else
                     delta_criterion(dose), "delta_ratio": 1.0 if np.isnan(dose) else dose / 0.1, "fieller": "",
                     "dose": dose})
    return pd.DataFrame(rows)


def test_dose_rows_change_neither_the_matched_p_adj_nor_the_verdict():
    heads = [("id", "ece", "")]
    comp = _frame()
    plain = comp[comp["dose"].isna()]
    with_doses = adjust(D.own_family(comp), heads)
    without = adjust(plain, heads)
    got = with_doses[with_doses["dose"].isna()]
    np.testing.assert_allclose(got["p_adj"].to_numpy(), without["p_adj"].to_numpy())
    assert not np.allclose(adjust(comp, heads).loc[plain.index, "p_adj"], without["p_adj"])  # BH would change them
    assert (with_doses.loc[with_doses["dose"].notna(), "family_id"] == "id:ece/dose").all()
    v_plain = V.verdicts(without, "id", None, "quant", [], None)
    v_dose = V.verdicts(D.matched_rows(with_doses), "id", None, "quant", [], None)
    assert v_dose == v_plain
    # … and a dose within ±10 % of Q's δ that reproduces is said in a note, never silently counted
    notes = D.notes(with_doses, heads)
    assert len(notes) == 2 and "not read by the verdict" in notes[0]
    assert "lowrank at δ 10 %" in notes[1] and "noise:c1 at δ 10 %" in notes[1] and "δ 5 %" not in notes[1]


# --------------------------------------------------------------------------------------------- end to end
def test_bad_delta_and_dose_values_through_the_clis(tmp_path, tiny_config_path, capsys):
    from interventions import ablation, edit, lowrank, sweep

    out = tmp_path / "o"
    cases = [(lowrank.main, ["--match", bad], bad) for bad in ("delta:0", "delta:-1", "delta:abc", "delta:1.5")]
    cases += [(ablation.main, ["--match", "delta:0"], "delta:0"), (sweep.main, ["--match", "delta:abc"], "delta:abc"),
              (ablation.main, ["--dose", "3"], "'3'"), (ablation.main, ["--dose", "1,x"], "'1,x'"),
              (ablation.main, ["--controls", "clip", "--match", "delta:0.05"], "clip cannot be set"),
              (ablation.main, ["--controls", "clip", "scale", "--dose"], "none of the controls"),
              (edit.main, ["--spec", "damping:gains", "--match", "delta:0.05"], "damping:gains cannot be set")]
    for main, args, needle in cases:
        assert main(["--model", tiny_config_path, "--out", str(out), *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], (args, err)
        assert not out.exists(), args


def test_dose_ablation_end_to_end_on_the_embedded_default(tmp_path, pinned, capsys):
    """2 families × 2 doses, 2 seeds for the noise family, on the embedded model's smallest comparable set."""
    from figures.dose import jobs
    from figures.io import Results
    from figures.layout import Options
    from figures.style import tag
    from interventions import ablation as A

    out = tmp_path / "abl"
    argv = ["--controls", "lowrank", "noise:c1", "damping:gains", "--dose", "5,20", "--seeds", "2",
            "--datasets", "fmnist-sketch", "--B", "200", "--out", str(out)]
    assert A.main(argv) == 0
    printed = capsys.readouterr().out
    assert "dose–response: 2 families (lowrank, noise:c1) at δ = 5, 20 %" in printed
    assert "left out (no free parameter): damping:gains" in printed
    assert "12 ran" in printed  # fp, Q, lowrank, 2 × noise, gains; 2 lowrank doses, 2 × 2 noise doses

    comp = pd.read_csv(out / "comparisons.csv")
    dose = comp[comp["dose"].notna()]
    assert set(zip(dose["control"], dose["dose"])) == {(c, d) for c in ("lowrank", "noise:c1") for d in (0.05, 0.2)}
    n_endpoints = len(comp[comp["control"] == "quant"])
    assert len(dose) == 4 * n_endpoints and (dose["family_id"].str.endswith("/dose")).all()
    for (control, d), rows in dose.groupby(["control", "dose"]):
        assert rows["match"].unique().tolist() == [delta_criterion(d)]
        tol = 1e-3 if control == "noise:c1" else 0.1  # continuous vs discrete rank (on the allowed side)
        assert abs(rows["delta_median"].iloc[0] - d) / d <= tol, (control, d)
        assert (rows["seeds"] == (2 if control == "noise:c1" else 1)).all()
    assert comp.loc[comp["dose"].isna(), "family_id"].map(lambda f: not f.endswith("/dose")).all()
    edits = pd.read_csv(out / "edits.csv")
    lo = edits[edits["variant"] == "noise:c1,q=int4-g128-mse,match=delta:0.05#s1"]
    assert len(lo) and np.allclose(lo["match_target"], 0.05) and np.allclose(lo["delta"], 0.05, rtol=1e-3)
    np.testing.assert_allclose(lo["match_achieved"], lo["delta"], rtol=1e-4)
    assert json.loads((out / "config.json").read_text())["dose"] == [5.0, 20.0]
    # --stats-only reads the dose plan back from config.json: the same records
    before = (out / "comparisons.csv").read_bytes()
    assert A.main(["--stats-only", "--out", str(out), "--B", "200"]) == 0
    assert (out / "comparisons.csv").read_bytes() == before
    # the report's headline table holds the quantizer and its matched controls, not the doses
    from figures.headline import headline

    blocks = headline(comp)
    assert blocks and all(b.rows["dose"].isna().all() and len(b.rows) == 4 for b in blocks)

    # the matched controls' records are those of the same ablation without doses (same stored runs, nothing rerun)
    plain = tmp_path / "plain"
    import shutil

    shutil.copytree(out, plain)
    assert A.main([a if a != str(out) else str(plain) for a in argv if a not in ("--dose", "5,20")]) == 0
    assert "no edit and no forward pass" in capsys.readouterr().out
    again = pd.read_csv(plain / "comparisons.csv")
    keys = ["dataset", "metric", "score", "variant"]
    m = comp[comp["dose"].isna()].merge(again, on=keys, suffixes=("", "_plain"))
    assert len(m) == len(again)
    for c in ("diff", "ci_lo", "ci_hi", "p_adj", "repro_ratio"):
        np.testing.assert_allclose(m[c], m[f"{c}_plain"], equal_nan=True)
    verdict_plain = (plain / "verdict.txt").read_text().splitlines()
    assert [ln for ln in (out / "verdict.txt").read_text().splitlines() if not ln.startswith("dose")] == verdict_plain

    # the dose figure: a complete lowrank curve (2 doses + the matched run) and the quantizer at its own δ
    (job,) = jobs(Results([out]), Options())
    fig = job.build()
    ax = fig.axes[0]
    curve = [ln for ln in ax.lines if ln.get_gid() == tag("lowrank", "lowrank") and len(ln.get_xdata()) >= 3]
    assert curve, [ln.get_gid() for ln in ax.lines]
    lr = comp[(comp["control"] == "lowrank") & (comp["metric"] == "top1")]["delta_median"]
    assert np.allclose(sorted(curve[0].get_xdata()), 100 * np.sort(lr.to_numpy()), rtol=0.05)
    q = comp.loc[comp["control"] == "quant", "delta_median"].iloc[0]
    vlines = [ln for ln in ax.lines if ln.get_gid() == tag("quant", "int4-g128-mse@delta")]
    assert vlines and math.isclose(vlines[0].get_xdata()[0], 100 * q, rel_tol=1e-9)
