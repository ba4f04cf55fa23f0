"""LSQ (METHODS §2 QAT): specs, the distillation on real calibration images (tiny real-architecture CLIP), the grid
and its levels, `:0` = RTN min-max bit for bit, determinism, test images refused, and the runner path with controls
matched to it."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from eval.errors import UserError
from interventions.lsq import LSQQuantizer, distill_loss, parse_lsq
from interventions.quantizers import IntQuantizer, parse_int
from interventions.registry import list_edits, parse_edit

LAYERS = "scope=all;kind=q,k,v,out,fc,proj,head,patch_embed"


@pytest.fixture(scope="module")
def session(tiny_config_path):
    """A session on the tiny CLIP (random init, real architecture) with the embedded calibration split; selector
    every linear map, the transposed heads and the patch conv (fused q/k/v slices each get their own Δ); the token
    embedding (49408 rows) is left out only for speed."""
    from interventions.grid import Grid
    from interventions.session import Session

    return Session(Grid(model=tiny_config_path, layers=LAYERS))


def _edited(session, quant, states):
    """A copy of the session's model with quant.quantize_in applied to every selected matrix."""
    from spectral.selector import select
    from spectral.views import weight_views

    model = copy.deepcopy(session.model)
    for v in select(weight_views(model), session.grid.layers):
        v.set(quant.quantize_in(v.get().to(torch.float32), states[v.name])[0])
    return model


# ------------------------------------------------------------------------------------------------ specs
@pytest.mark.parametrize("spec", ["lsq-int4-ch:200", "lsq-int3-g64:100", "lsq-int2-g32:0", "lsq-int8-g128:100000"])
def test_specs_round_trip(spec):
    q = parse_edit(spec)
    assert isinstance(q, LSQQuantizer) and str(q) == spec and q.data_dependent
    assert q == parse_lsq(spec) and q.bits == int(spec[7])
    assert "lsq" in list_edits()


@pytest.mark.parametrize(("spec", "names"), [
    ("lsq-int9-ch:10", "9"), ("lsq-int4-t:10", "'t'"), ("lsq-int4-g48:10", "48"), ("lsq-int4-ch", "lsq-int4-ch"),
    ("lsq-int4-ch:-3", "'-3'"), ("lsq-int4-ch:010", "'lsq-int4-ch:10'"), ("lsq-int4-ch:100001", "100001"),
    ("lsq-intx-ch:5", "'x'"), ("lsq-int4-ch:2.5", "'2.5'"),
])
def test_bad_specs_are_one_line_errors_naming_the_value_and_the_grammar(spec, names):
    with pytest.raises(UserError) as exc:
        parse_edit(spec)
    msg = str(exc.value)
    assert "\n" not in msg and spec in msg and names in msg and "grammar: lsq-int<2-8>" in msg


def test_bad_spec_exits_2_from_the_command(capsys):
    from interventions.quantize import main

    assert main(["--spec", "lsq-int4-t:5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "granularity 't'" in err


@pytest.mark.parametrize("kw", [{"bits": 1}, {"bits": 4, "granularity": "tensor"}, {"bits": 4, "steps": -1},
                                {"bits": 4, "granularity": "group", "group": 0}, {"bits": 4, "group": 32},
                                {"bits": 4, "steps": True}])
def test_config_is_validated_on_construction(kw):
    with pytest.raises(UserError):
        LSQQuantizer(**kw)


# ------------------------------------------------------------------------------------------------ training
def test_distillation_lowers_the_loss_and_the_edited_model_has_the_reported_loss(session):
    quant = parse_edit("lsq-int3-ch:15")
    states = quant.prepare(session.source(None))
    names = [v.name for v in session.views()]
    assert list(states) == names
    st = states[names[0]]
    assert len(st.curve) == 15 and all(s.loss_last == st.loss_last for s in states.values())
    assert st.loss_last < 0.5 * st.loss_first  # meaningfully, on the whole calibration split
    moved = [not torch.equal(a, b) for s in states.values() for a, b in zip(s.step, s.init)]
    assert all(moved)
    # the training forward (fused in_proj rebuilt from per-view slices) is the model the edit produces
    cal = session.calibration(None)
    edited = _edited(session, quant, states)
    with torch.no_grad():
        f = [torch.nn.functional.normalize(m.encode_image(cal.images).float(), dim=-1) for m in (edited, session.model)]
        g = [torch.nn.functional.normalize(m.encode_text(cal.tokens).float(), dim=-1) for m in (edited, session.model)]
    assert float(distill_loss([f[0], g[0]], [f[1], g[1]])) == pytest.approx(st.loss_last, rel=1e-3)
    # q, k and v of one in_proj are separate matrices with their own learned Δ
    q, k = states["visual.blocks.0.attn.q"].step[0], states["visual.blocks.0.attn.k"].step[0]
    assert q.shape == k.shape and not torch.equal(q, k)


def test_outputs_lie_on_their_grid_with_at_most_2b_levels_per_set(session):
    quant = parse_edit("lsq-int3-g32:4")
    states = session.prepared(quant, None)
    for v in session.views():
        w = v.get().to(torch.float32)
        q, grid = quant.quantize_in(w, states[v.name])
        k = q / grid.step
        assert torch.all((k - k.round()).abs() < 1e-4) and torch.all(k.round().abs() <= 3)
        from interventions.fakequant import split_sets

        for part in split_sets(q, "group", 32):
            assert max(len(torch.unique(row)) for row in part) <= 2**3
        torch.testing.assert_close(grid.hi, 3 * grid.step, rtol=1e-6, atol=0)
        torch.testing.assert_close(grid.lo, -grid.hi, rtol=0, atol=0)
        st = states[v.name]
        torch.testing.assert_close(grid.set_stats()[0]["a"], st.step[0] / st.init[0], rtol=0, atol=0)
        assert grid.info == {"lsq_loss_first": st.loss_first, "lsq_loss_last": st.loss_last}


@pytest.mark.parametrize("spec", ["lsq-int4-ch:0", "lsq-int3-g64:0", "lsq-int4-g128:0"])
def test_zero_steps_is_rtn_minmax_bit_for_bit(session, spec):
    quant = parse_edit(spec)
    rtn = quant.with_range(1.0)
    assert isinstance(rtn, IntQuantizer) and rtn == parse_int(spec[4:].split(":")[0])
    states = quant.prepare(session.source(None))
    for v in session.views():
        w = v.get().to(torch.float32)
        (q, grid), (q_r, grid_r) = quant.quantize_in(w, states[v.name]), rtn.quantize(w)
        assert torch.equal(q, q_r)
        for key in ("lo", "hi", "step", "a", "n_lo", "n_hi"):
            assert torch.equal(getattr(grid, key), getattr(grid_r, key)), key
        assert grid.clipped_fraction(w) == 0.0
    st = next(iter(states.values()))
    assert st.curve == () and st.loss_first == st.loss_last > 0


def test_same_spec_twice_gives_identical_weights(session):
    quant = parse_edit("lsq-int4-g64:3")
    a, b = quant.prepare(session.source(None)), quant.prepare(session.source(None))
    assert a[next(iter(a))].curve == b[next(iter(b))].curve
    for v in session.views():
        w = v.get().to(torch.float32)
        assert torch.equal(quant.quantize_in(w, a[v.name])[0], quant.quantize_in(w, b[v.name])[0])


def test_calibration_that_holds_test_images_is_refused(tiny_config_path):
    from interventions.grid import Grid
    from interventions.session import Session

    s = Session(Grid(model=tiny_config_path))
    cal = s.calibration(None)
    s._calibration["embedded"] = dataclasses.replace(cal, keys=[cal.test_keys[0], *cal.keys[1:]])
    quant = parse_edit("lsq-int4-ch:1")
    with pytest.raises(UserError, match="calibration images are test images"):
        quant.prepare(s.source(None))

    class Plain:  # a QuantSource that is not a session's: the calibration's own keys are checked
        key = "embedded"
        model = s.model
        views = staticmethod(s.views)
        calibration = staticmethod(lambda: s.calibration(None))
        has_calibration = staticmethod(lambda: True)
        inputs = staticmethod(dict)
        state = staticmethod(lambda quant: {})

    with pytest.raises(UserError, match="calibration images are test images"):
        quant.prepare(Plain())


# ------------------------------------------------------------------------------------------------ runner
def test_runner_reports_losses_and_controls_read_the_lsq_grid(tiny_config_path, tmp_path, pinned):
    """Through the one experiment path: LSQ trained once per plan, the losses in edits.csv, and the controls that
    read Q's grid (clip, deadzone, round) or its error (noise) matched to it."""
    from interventions.grid import Grid
    from interventions.runner import run_plan
    from interventions.session import Session

    spec = "lsq-int4-ch:8"
    grid = Grid(model=tiny_config_path, controls=(), edits=(spec, f"clip:q={spec}", f"deadzone:q={spec}",
                                                            f"round:q={spec}", f"noise:c1,q={spec},match=fro"))
    session = Session(grid)
    edits = run_plan(session, tmp_path / "out", progress=False, verbose=False).tables["edits"]
    assert len(session._prepared) == 1  # one training for the quantizer and its four controls
    lsq = edits[edits["variant"] == spec]
    assert len(lsq) == len(session.views())
    assert (lsq["lsq_loss_last"] < lsq["lsq_loss_first"]).all() and lsq["q_out_err"].notna().all()
    noise = edits[edits["variant"].str.startswith("noise")]
    torch.testing.assert_close(torch.tensor(noise["delta"].to_numpy()), torch.tensor(lsq["delta"].to_numpy()),
                               rtol=1e-4, atol=0)
    rnd = edits[edits["variant"].str.startswith("round")]
    rtn = session.quant_cache
    assert rtn.misses == 2 * len(session.views())  # LSQ and its RTN min-max grid (round), once per matrix
    assert (rnd["delta"] > 0).all() and (edits[edits["variant"].str.startswith("deadzone")]["delta"] > 0).all()


def test_step_gradient_is_lsqs_with_its_gradient_scale():
    """∂Ŵ/∂Δ = round(w/Δ) − w/Δ inside the range, ±q_max outside (STE), times g = 1/√(N·q_max) (METHODS §2)."""
    from interventions.lsq import lsq_fake_quant

    x = torch.tensor([[0.26, -0.74, 1.9, -5.0, 0.0, 0.49]])
    init = torch.tensor([[0.5]])
    theta = torch.zeros(1, 1, requires_grad=True)
    q = lsq_fake_quant(x, init, theta, 3)
    torch.testing.assert_close(q, torch.tensor([[0.5, -0.5, 1.5, -1.5, 0.0, 0.5]]))
    q.sum().backward()
    v = x / 0.5
    d_step = torch.where(v.abs() > 3, 3 * v.sign(), v.round() - v).sum()
    g = 1 / (6 * 3) ** 0.5
    torch.testing.assert_close(theta.grad, (g * 0.5 * d_step).reshape(1, 1))  # ∂Δ/∂θ = Δ
