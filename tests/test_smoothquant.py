"""SmoothQuant (METHODS §2 W·A·): migration is exact in full precision; the toolkit's variant (effective weights
Q(W·diag s)·diag s⁻¹, scaled activation sites) equals the migrated model quantized in migrated coordinates; s ≡ 1 is
plain W8A8 bit for bit (α = 0 is not); ≤ 2^b levels in the scaled coordinates; calibration images only."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from eval.errors import UserError
from interventions.actquant import quantize_activations
from interventions.grid import Grid, Point, points_of
from interventions.registry import apply_edit, parse_edit
from interventions.runner import EXPERIMENTS, Planned, Runner
from interventions.session import Calibration, Session
from interventions.smoothquant import SmoothQuant, channel_absmax, migrate, smoothing_scales
from interventions.store import ResultsStore
from spectral.views import weight_views

SPEC = "smoothquant-w8a8:0.5"


def _perturb(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial LayerNorm affines and attention biases, so every fold (γ, β, V rows and bias) is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.MultiheadAttention):
                m.in_proj_bias.copy_(0.05 * torch.randn(m.in_proj_bias.shape, generator=g))


@pytest.fixture(scope="module")
def session(tiny_config_path, tmp_path_factory) -> Session:
    s = Session(Grid(model=tiny_config_path, quant=(SPEC,)))
    s._test_store = ResultsStore(tmp_path_factory.mktemp("sq-store"))  # Runner.edited writes nothing there
    _perturb(s.model)  # before anything is cached: the session's unedited model
    return s


@pytest.fixture(scope="module")
def probe(session):
    """Evaluated inputs: random images (not the calibration split) and a few prompts."""
    g = torch.Generator().manual_seed(1)
    images = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    return images, session.loaded.tokenizer(["a photo of a shirt.", "a boot", "a bag on a table", "a dress"])


@torch.no_grad()
def _logits(model: nn.Module, probe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    img, txt = model.encode_image(probe[0]), model.encode_text(probe[1])
    logits = 100 * nn.functional.normalize(img, dim=-1) @ nn.functional.normalize(txt, dim=-1).T
    return img, txt, logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _edited(session: Session, point: Point) -> nn.Module:
    return Runner(session, session._test_store, verbose=False).edited(point)[0]


@dataclass(frozen=True)
class _Source:
    """A QuantSource over a given calibration (for the overlap check)."""

    model: nn.Module
    views_: list
    cal: Calibration
    key: str = "test"

    def views(self) -> list:
        return self.views_

    def calibration(self) -> Calibration:
        return self.cal

    def inputs(self) -> dict:
        raise AssertionError("not needed")

    def has_calibration(self) -> bool:
        return True

    def state(self, quant) -> dict:  # noqa: ANN001
        return quant.prepare(self)


PLAIN_W8A8 = Point("int8-ch+a8", "quant", "int8-ch", "int8-ch", None, 0, None, False, "a8")


def test_specs_canonical_and_bad():
    q = parse_edit("smoothquant-w8a8")
    assert isinstance(q, SmoothQuant) and str(q) == SPEC and q.act_spec == "a8" and q.alpha == 0.5
    assert str(parse_edit("smoothquant-w4a8:0.25")) == "smoothquant-w4a8:0.25"
    assert str(parse_edit("smoothquant-w6a8:0")) == "smoothquant-w6a8:0" and parse_edit("smoothquant-w8a8:1").alpha == 1
    for bad, why in [("smoothquant-w8a8:1.5", "in \\[0, 1\\]"), ("smoothquant-w8a8:-0.1", "in \\[0, 1\\]"),
                     ("smoothquant-w8a8:nan", "in \\[0, 1\\]"), ("smoothquant-w8a8:x", "not a number"),
                     ("smoothquant-w5a8:0.5", "weight bits"), ("smoothquant-w8a4:0.5", "activation bits"),
                     ("smoothquant-w8a8:0.50", "write it as 'smoothquant-w8a8:0.5'"), ("smoothquant-w8", "form")]:
        with pytest.raises(UserError, match=why) as exc:
            parse_edit(bad)
        assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match="data-dependent"):
        q.quantize(torch.ones(2, 2))


@torch.no_grad()
def test_migration_leaves_full_precision_outputs_unchanged(session, probe):
    model = copy.deepcopy(session.model)
    views = session.views(model)
    g = torch.Generator().manual_seed(2)

    def rand(n: int) -> torch.Tensor:  # log-uniform in [1/8, 8]
        return torch.exp((torch.rand(n, generator=g) * 2 - 1) * math.log(8))

    by_input = {v.param_name: rand(v.shape[1]) for v in views}  # one s per input (q/k/v share theirs)
    scales = {v.name: by_input[v.param_name] for v in views}
    fp = _logits(session.model, probe)
    rows = migrate(model, scales)
    where = {r["matrices"].split(",")[-1].rsplit(".", 1)[-1]: r["inverse_scale"] for r in rows}
    assert where["v"].endswith("ln_1") and where["out"].endswith("(v rows)") and where["fc"].endswith("ln_2")
    assert where["proj"].endswith("(explicit input scale)")
    ln_1 = model.transformer.resblocks[0].ln_1.weight
    assert not torch.equal(ln_1, session.model.transformer.resblocks[0].ln_1.weight)
    for a, b in zip(_logits(model, probe), fp):
        assert _rel(a, b) <= 1e-5
    # the projections too (ln_post, ln_final), selected with scope=all
    heads = [v for v in weight_views(model) if v.kind == "head"]
    hs = {v.name: rand(v.shape[1]) for v in heads}
    assert {r["inverse_scale"] for r in migrate(model, hs)} == {"visual.ln_post", "ln_final"}
    for a, b in zip(_logits(model, probe), fp):
        assert _rel(a, b) <= 1e-5


@torch.no_grad()
def test_toolkit_variant_equals_migrated_model_quantized(session, probe):
    """Q_a(X·s⁻¹)·Q_w(W·s)ᵀ two ways: effective Ŵ + scaled sites (the runner) vs the migrated model's int8-ch + a8."""
    quant = parse_edit(SPEC)
    toolkit = _edited(session, points_of(SPEC, session.grid, None, SPEC, None)[0])
    scales = session.prepared(quant, None)
    migrated = session.copy()
    migrate(migrated, scales)
    apply_edit(migrated, "int8-ch", session.grid.layers)
    c = session.calibration(None)
    quantize_activations(migrated, "a8", session.grid.layers, images=c.images, texts=c.tokens)
    plain = _edited(session, PLAIN_W8A8)
    t, m, p, fp = (_logits(x, probe) for x in (toolkit, migrated, plain, session.model))
    for a, b, ref, f in zip(t, m, p, fp):
        gap = _rel(a, b)
        assert gap <= 1e-5, gap  # measured ~1e-6: float rounding of x·s⁻¹ vs the folded LayerNorm, nothing more
        assert gap < 0.02 * min(_rel(ref, b), _rel(f, b))  # far below what separates it from plain W8A8 or FP
    # the effective weight in migrated coordinates is the migrated weight's quantization (q/k: no row fold)
    w_eff = dict((v.name, v.get()) for v in session.views(toolkit))
    for v in session.views(migrated):
        if v.kind in ("q", "k", "fc"):
            torch.testing.assert_close(w_eff[v.name] * scales[v.name], v.get(), rtol=1e-6, atol=1e-7)


@torch.no_grad()
def test_unit_scales_are_plain_w8a8_bit_for_bit_and_alpha_zero_is_not(session, probe):
    spec = "smoothquant-w8a8:1"  # its prepared state replaced by s ≡ 1 for this test only
    key = (spec, "embedded")
    session._prepared[key] = {v.name: torch.ones(v.shape[1]) for v in session.views()}
    try:
        ones = _edited(session, points_of(spec, session.grid, None, spec, None)[0])
    finally:
        del session._prepared[key]
        session.quant_cache.clear()
    plain = _edited(session, PLAIN_W8A8)
    for (k, a), b in zip(ones.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(_logits(ones, probe), _logits(plain, probe)):
        assert torch.equal(a, b)
    # METHODS' "α = 0 equals plain W8A8 on weights" does not hold: α = 0 gives s_j = 1/max|W_{:,j}| (X-independent),
    # every column of W·diag s has absmax 1, and Ŵ differs from RTN's
    views = session.views()
    xmax = channel_absmax(session.model, views, session.calibration(None).images, session.calibration(None).tokens)
    s0 = smoothing_scales(views, xmax, 0.0)
    s0_other = smoothing_scales(views, {k: 7 * x + 1 for k, x in xmax.items()}, 0.0)
    fc = next(v for v in views if v.kind == "fc")
    w = fc.get().float()
    assert torch.equal(s0[fc.name], s0_other[fc.name])
    torch.testing.assert_close((w * s0[fc.name]).abs().amax(0), torch.ones(w.shape[1]))
    w_hat0, _ = SmoothQuant(8, 8, 0.0).quantize_in(w, s0[fc.name])
    rtn, _ = parse_edit("int8-ch").quantize(w)
    assert (w_hat0 != rtn).float().mean() > 0.1


def test_at_most_2b_levels_in_scaled_coordinates(session, probe):
    views = session.views()
    for spec, bits in (("smoothquant-w4a8:0.5", 4), (SPEC, 8)):
        quant = parse_edit(spec)
        scales = session.prepared(quant, None)
        for v in views[:6]:
            s = scales[v.name]
            w_hat, grid = quant.quantize_in(v.get().float(), s)
            scaled = w_hat * s  # back in the coordinates that were quantized: one grid per output channel
            step = grid.step * s
            codes = scaled / step
            torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)
            assert codes.round().abs().max() <= 2 ** (bits - 1) - 1
            assert max(torch.unique(row.round()).numel() for row in codes) <= 2**bits
            torch.testing.assert_close(step, step[:, :1].expand_as(step))
    # activations: the site hands on Q_a(x·s⁻¹)·s, so x̂·s⁻¹ has ≤ 2^8 levels on its calibrated per-tensor grid
    model = _edited(session, points_of(SPEC, session.grid, None, SPEC, None)[0])
    fc = model.visual.transformer.resblocks[1].mlp.c_fc
    seen: list[torch.Tensor] = []
    hook = fc.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))  # runs after the site's
    with torch.no_grad():
        model.encode_image(probe[0])
    hook.remove()
    s = session.prepared(parse_edit(SPEC), None)["visual.blocks.1.mlp.fc"]
    x = seen[0] / s
    absmax = float(channel_absmax(model, [v for v in session.views(model) if v.name == "visual.blocks.1.mlp.fc"],
                                  session.calibration(None).images, None)["visual.blocks.1.mlp.fc"].div(s).max())
    codes = x / (absmax / 127)  # the range was calibrated on x·s⁻¹ of the (weight-quantized) model
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)
    assert codes.round().abs().max() <= 127 and torch.unique(codes.round()).numel() <= 2**8
    assert not torch.allclose(seen[0] / (seen[0].abs().max() / 127), (seen[0] / (seen[0].abs().max() / 127)).round(),
                              atol=1e-2)  # in x's own coordinates the values are not on one grid


@torch.no_grad()
def test_calibration_only_and_act_not_twice(session):
    views = session.views()
    c = session.calibration(None)
    assert not set(c.keys) & set(c.test_keys)
    leaky = Calibration(c.images, c.tokens, c.dataset, c.keys, [c.keys[3], "other"])
    with pytest.raises(UserError, match="1 calibration images are test images"):
        parse_edit(SPEC).prepare(_Source(session.model, views, leaky))
    # max|X_j| is over exactly the calibration split's tokens (here: the visual fc input of block 0)
    captured: list[torch.Tensor] = []
    fc = session.model.visual.transformer.resblocks[0].mlp.c_fc
    hook = fc.register_forward_pre_hook(lambda _m, args: captured.append(args[0].clone()))
    for i in range(0, len(c.images), 64):
        session.model.encode_image(c.images[i : i + 64])
    hook.remove()
    expected = torch.cat([x.reshape(-1, x.shape[-1]) for x in captured]).abs().amax(0)
    xmax = channel_absmax(session.model, views, c.images, c.tokens)
    torch.testing.assert_close(xmax["visual.blocks.0.mlp.fc"], expected, rtol=1e-6, atol=0)  # MHA re-implemented: ulps
    assert all(type(p) is nn.Parameter for p in session.model.parameters())  # sites removed
    # the quantizer quantizes its own activations: --act on top of it is refused before any work
    p = Point(SPEC + "+a8", "quant", SPEC, SPEC, None, 0, None, False, "a8")
    with pytest.raises(UserError, match="quantizes its own activations"):
        EXPERIMENTS["edit"].validate(session, [Planned("k", p, {})])
