"""GPTQ and AWQ (METHODS §2): known answers against RTN, the output error on the embedded model's real calibration
inputs, the grid, the specs, and the runner path (the quantizer cache, rotquant, edits.csv's q_out_err)."""
from __future__ import annotations

import math

import pytest
import torch

from eval.errors import UserError
from interventions.awq import ALPHAS, awq_search, channel_scales
from interventions.dataquant import output_error
from interventions.gptq import gptq_rounding, hessian
from interventions.quantizers import parse_int
from interventions.registry import MatrixContext, parse_edit

GRIDS = ("int4-g128", "int3-g64-asym", "int4-ch-mse", "int8-ch", "int2-g32")


@pytest.fixture(scope="module")
def captured():
    """The embedded model's selected matrices and their inputs on the embedded calibration split (real data)."""
    from interventions.grid import Grid
    from interventions.session import Session

    s = Session(Grid())
    x = s.calib_inputs(None)
    return {v.name: (v.get().to(torch.float32).clone(), x[v.name]) for v in s.views()}


@pytest.mark.parametrize("spec", GRIDS)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_identity_hessian_is_rtn_bit_for_bit(spec, act_order):
    torch.manual_seed(1)
    w = torch.randn(48, 160) * torch.rand(1, 160) * 3
    rtn = parse_int(spec)
    q_rtn, grid = rtn.quantize(w)
    q = gptq_rounding(w, torch.eye(160, dtype=torch.float64), grid.step, grid.n_lo, grid.n_hi, act_order=act_order,
                      block=32)
    assert torch.equal(q, q_rtn)


def test_hessian_damps_and_fixes_dead_inputs():
    x = torch.randn(30, 5, dtype=torch.float64)
    x[:, 2] = 0
    h = hessian(x, 0.01)
    ref = 2 * x.T @ x
    ref[2, 2] = 1.0
    ref += 0.01 * torch.diagonal(ref).mean() * torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(h, ref, rtol=0, atol=1e-12)


def _on_grid(q, grid) -> bool:
    k = q / grid.step
    return bool(torch.all((k - k.round()).abs() < 1e-3) and torch.all(k.round() >= grid.n_lo)
                and torch.all(k.round() <= grid.n_hi))


def test_gptq_lowers_output_error_on_real_inputs_and_stays_on_rtn_grid(captured):
    quant = parse_edit("gptq-int4-g128")
    rtn = parse_int("int4-g128")
    better, gains = 0, []
    for w, x in captured.values():
        q, grid = quant.quantize_in(w, x)
        q_rtn, _ = rtn.quantize(w)
        e_g, e_r = output_error(q, w, x), output_error(q_rtn, w, x)
        better += e_g <= e_r
        gains.append(e_r - e_g)
        assert _on_grid(q, grid)
        for st in grid.set_stats():  # at most 2^b levels per statistics set
            assert st["n_hi"].max() - st["n_lo"].min() + 1 <= 2**4
    assert better >= 0.95 * len(captured)
    assert torch.tensor(gains).median() > 0


def test_gptq_act_order_also_beats_rtn_in_median(captured):
    quant = parse_edit("gptq-int3-g64-actorder")
    rtn = parse_int("int3-g64")
    gains = [output_error(rtn.quantize(w)[0], w, x) - output_error(quant.quantize_in(w, x)[0], w, x)
             for w, x in list(captured.values())[:8]]
    assert torch.tensor(gains).median() > 0


def test_awq_with_unit_scales_is_rtn_and_never_worse_on_its_inputs(captured):
    rtn = parse_int("int4-g128")
    for w, x in list(captured.values())[:10]:
        q0, _, a0 = awq_search(w, x, rtn, alphas=(0.0,))
        assert a0 == 0.0 and torch.equal(q0, rtn.quantize(w)[0])  # s ≡ 1 exactly
        q, grid, alpha = awq_search(w, x, rtn)
        assert alpha in ALPHAS
        assert output_error(q, w, x) <= output_error(q0, w, x) + 1e-12
        # on the grid in scaled coordinates: Q(W·diag s) has ≤ 2^b levels per set
        k = q * grid.s / (grid.step * grid.s)
        assert torch.all((k - k.round()).abs() < 1e-3)


def test_awq_scales_follow_mean_abs_input():
    x = torch.tensor([[1.0, -4.0, 0.0], [3.0, 4.0, 0.0]])
    s = channel_scales(x, 0.5)
    m = torch.tensor([2.0, 4.0, 1e-4]).sqrt()
    torch.testing.assert_close(s, m / torch.sqrt(m.max() * m.min()))
    assert torch.equal(channel_scales(x, 0.0), torch.ones(3))


@pytest.mark.parametrize("spec", ["gptq-int4-g128", "gptq-int3-g64-asym", "gptq-int4-ch-actorder",
                                  "gptq-int4-g128-damp0.1", "awq-int4-g128", "awq-int3-g64-asym"])
def test_specs_round_trip(spec):
    q = parse_edit(spec)
    assert str(q) == spec and q.bits == int(spec.split("int")[1][0]) and q.data_dependent


@pytest.mark.parametrize("spec", ["gptq-int9-g128", "gptq-nf4", "gptq-int4-g128-damp0", "gptq-int4-g128-damp0.010",
                                  "awq-fp4", "awq-int4-g100", "gptq-int4-g128-actorder-damp2"])
def test_bad_specs_are_one_line_errors(spec):
    with pytest.raises(UserError) as exc:
        parse_edit(spec)
    assert "\n" not in str(exc.value) and spec in str(exc.value)


def test_quantize_without_calibration_data_is_refused():
    with pytest.raises(UserError, match="data-dependent"):
        parse_edit("gptq-int4-g128")(torch.randn(4, 8), MatrixContext(name="m"))


def test_a_matched_control_and_rotquant_read_gptq_through_the_source(tiny_config_path, tmp_path, pinned):
    """The runner gives GPTQ its inputs; a control matched to it reads the cached Ŵ (no second GPTQ pass); rotquant
    quantizes R1·W·R2 with inputs X·R2; every quantizer row reports its output error."""
    from interventions.grid import Grid
    from interventions.runner import run_plan
    from interventions.session import Session

    grid = Grid(model=tiny_config_path, controls=(), edits=("gptq-int4-g128", "int4-g128", "rotquant:q=gptq-int4-g128",
                                                            "noise:c1,q=gptq-int4-g128,match=fro"))
    session = Session(grid)
    summary = run_plan(session, tmp_path / "out", progress=False, verbose=False)
    edits = summary.tables["edits"]
    n = len(session.views())
    assert session.quant_cache.misses == 2 * n  # gptq and int4-g128 once per matrix, though three variants use gptq
    quant = edits[edits["family"] == "quant"]
    assert quant["q_out_err"].notna().all() and (quant["q_out_err"] > 0).all()
    by = quant.pivot(index="matrix", columns="variant", values="q_out_err")
    assert (by["gptq-int4-g128"] <= by["int4-g128"]).mean() >= 0.9
    noise = edits[edits["variant"].str.startswith("noise")]
    torch.testing.assert_close(torch.tensor(noise["delta"].to_numpy()),
                               torch.tensor(quant[quant["variant"] == "gptq-int4-g128"]["delta"].to_numpy()),
                               rtol=1e-4, atol=0)
    rot = edits[edits["variant"].str.startswith("rotquant")]
    assert len(rot) == n and (rot["delta"] > 0).all() and not math.isnan(rot["delta"].mean())


def _inputs(rows: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g, dtype=torch.float64) * torch.rand(1, n, generator=g, dtype=torch.float64) * 3
    x[:, 7] = 0  # a dead input
    return x


@pytest.mark.parametrize("act_order", [False, True])
def test_low_rank_factor_serves_the_dense_u(act_order):
    """With fewer rows than inputs, U comes from H = D + AᵀA without an n×n matrix: every diagonal block equals the
    dense U's, and the later columns receive exactly the dense update −U[b, >b]ᵀ·err."""
    from interventions.gptq import factor_of
    from interventions.gptq_factors import DenseFactor

    n, out, block = 200, 5, 64
    x = _inputs(40, n, 0).float()
    low, perm = factor_of(x, 0.01, act_order, torch.device("cpu"))
    h = hessian(x.double(), 0.01)  # the same H in float64
    if perm is not None:
        h = h[perm][:, perm]
    dense = DenseFactor(h, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    wt_low = torch.randn(n, out, generator=g)
    wt_dense = wt_low.clone()
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        u_low, u_dense = low.start(i1, i2, wt_low), dense.start(i1, i2, wt_dense)
        torch.testing.assert_close(u_low, u_dense, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(wt_low[i1:i2], wt_dense[i1:i2], rtol=1e-4, atol=1e-5)
        err = torch.randn(i2 - i1, out, generator=g)
        low.finish(i1, i2, err, wt_low)
        dense.finish(i1, i2, err, wt_dense)


def test_batched_matrices_equal_one_at_a_time_and_prepare_serves_the_unedited_matrix():
    from interventions.gptq import GPTQState, gptq_from_inputs, gptq_many

    rtn = parse_int("int4-g32")
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(24, 96, generator=g) for _ in range(4)]
    xs = [_inputs(30 + 20 * i, 96, i).float() for i in range(4)]  # low-rank and dense factors in one batch
    grids = [rtn.quantize(w)[1] for w in ws]
    many = gptq_many(ws, xs, grids)
    assert all(torch.equal(a, gptq_from_inputs(w, x, gr)) for a, w, x, gr in zip(many, ws, xs, grids))
    quant = parse_edit("gptq-int4-g32")
    ref = ws[0].clone()
    state = GPTQState(xs[0], ref, ref._version, many[0], grids[0])
    assert quant.quantize_in(ws[0], state)[0] is many[0]  # the prepared Ŵ, not recomputed
    other = ws[0] * 1.5
    again = gptq_from_inputs(other, xs[0], rtn.quantize(other)[1])
    torch.testing.assert_close(quant.quantize_in(other, state)[0], again)
    ref.mul_(2.0)  # the unedited weight changed in place: the prepared Ŵ no longer answers for it
    assert not state.answers(ref)
