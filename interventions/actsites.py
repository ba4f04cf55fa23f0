"""Where activation fake-quant intercepts an input that no forward hook can reach (METHODS §2 W·A·): bare
projection Parameters used as `x @ P` / `F.linear(x, P)` (swapped for a same-storage subclass that passes the other
operand through its site), and `nn.MultiheadAttention`, whose forward is replaced on the instance by an equivalent
one that passes the in- and out-projection inputs through their sites (torch's MHA never calls `out_proj.forward`);
with separate q/k/v weights (kdim/vdim ≠ embed_dim) each weight is a swapped Parameter whose F.linear quantizes its
own input (queries for q, tokens for k and v).
A *site* is any callable x -> x̂ (`interventions.actquant.Site`); every patch returns a function that restores
the exact original module.
"""
from __future__ import annotations

import inspect
import math
import types
from typing import Any, Callable

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d
from torch import Tensor, nn

from eval.errors import UserError


# ------------------------------------------------------------------------------ bare-parameter interception
class _QuantOperandParameter(nn.Parameter):
    """A Parameter sharing the original's storage whose uses `x @ P` and `F.linear(x, P)` quantize x first."""

    _MATMULS = (torch.Tensor.__matmul__, torch.matmul, torch.Tensor.matmul, torch.mm, torch.Tensor.mm)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        kwargs = kwargs or {}
        args = list(args)
        site = None
        if func in cls._MATMULS and len(args) == 2 and isinstance(args[1], cls):
            site = getattr(args[1], "_aq_site", None)
        elif func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(weight, cls):
                site = getattr(weight, "_aq_site", None)
        with torch._C.DisableTorchFunctionSubclass():
            if site is not None:
                args[0] = site(args[0])
            return func(*args, **kwargs)


def swap_parameter(module: nn.Module, name: str, site: Callable[[Tensor], Tensor]) -> Callable[[], None]:
    original = module._parameters[name]
    replacement = _QuantOperandParameter(original.data, original.requires_grad)
    replacement._aq_site = site
    module._parameters[name] = replacement

    def restore() -> None:
        module._parameters[name] = original

    return restore


# --------------------------------------------------------------------------------- multi-head attention
def _attention_mask(
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, n: int, heads: int, l_q: int, l_k: int,
    dtype: torch.dtype,
) -> Tensor | None:
    """nn.MultiheadAttention's masks (bool: True = blocked; float: added) as one additive float mask
    [n, heads, L, S]."""
    mask = None

    def additive(m: Tensor) -> Tensor:
        if m.dtype != torch.bool:
            return m.to(dtype)
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))

    if attn_mask is not None:
        m = additive(attn_mask)
        mask = m.view(1, 1, l_q, l_k) if m.dim() == 2 else m.view(n, heads, l_q, l_k)
    if key_padding_mask is not None:
        kp = additive(key_padding_mask).view(n, 1, 1, l_k)
        mask = kp if mask is None else mask + kp
    return mask


def _mha_forward(
    self: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """nn.MultiheadAttention.forward with the in-/out-projection inputs passed through their sites."""
    sites: dict[str, Any] = self._aq_sites
    # which input each projection reads (self-attention: one tensor, observed and quantized once)
    source = {"q": "q", "k": "q" if key is query else "k",
              "v": "q" if value is query else ("k" if value is key else "v")}
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    if self.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    l_q, n, e = query.shape
    l_k = key.shape[0]
    h, hd = self.num_heads, e // self.num_heads
    b = self.in_proj_bias
    if self._qkv_same_embed_dim:
        ws = [self.in_proj_weight[j * e : (j + 1) * e] for j in range(3)]
    else:  # kdim/vdim ≠ embed_dim (a cross-attention pool): separate weights, each its own (swapped) Parameter site
        ws = [self.q_proj_weight, self.k_proj_weight, self.v_proj_weight]
    site_in, roles = sites.get("in"), sites.get("roles", ())
    raw, quantized, inputs = {"q": query, "k": key, "v": value}, {}, []
    for j, role in enumerate(("q", "k", "v")):
        x = raw[role]
        if site_in is not None and role in roles:
            src = source[role]
            if src not in quantized:
                quantized[src] = site_in(raw[src])
            x = quantized[src]
        inputs.append(F.linear(x, ws[j], None if b is None else b[j * e : (j + 1) * e]))
    q, k, v = (t.reshape(t.shape[0], n * h, hd).transpose(0, 1).reshape(n, h, t.shape[0], hd) for t in inputs)
    mask = _attention_mask(attn_mask, key_padding_mask, n, h, l_q, l_k, q.dtype)
    dropout = self.dropout if self.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                         is_causal=is_causal and mask is None)
    out = out.permute(2, 0, 1, 3).reshape(l_q, n, e)
    site_out = sites.get("out")
    out = F.linear(site_out(out) if site_out is not None else out, self.out_proj.weight, self.out_proj.bias)
    weights = None
    if need_weights:
        logits = q @ k.transpose(-2, -1) / math.sqrt(hd)
        weights = torch.softmax(logits if mask is None else logits + mask, dim=-1)
        weights = weights.mean(dim=1) if average_attn_weights else weights
        weights = weights.squeeze(0) if unbatched else weights
    if self.batch_first:
        out = out.transpose(0, 1)
    return (out.squeeze(1) if unbatched else out), weights


def patch_mha(mha: nn.MultiheadAttention, sites: dict[str, Any]) -> Callable[[], None]:
    """Route `mha`'s projection inputs through `sites` ("in", "out", "roles"); returns the restore function."""
    if mha.bias_k is not None or mha.add_zero_attn:
        raise UserError("activation fake-quant supports nn.MultiheadAttention without bias_k/v and add_zero_attn")
    had_own = "forward" in mha.__dict__
    previous = mha.__dict__.get("forward")
    mha._aq_sites = sites
    mha.forward = types.MethodType(_mha_forward, mha)

    def restore() -> None:
        del mha.forward
        if had_own:
            mha.forward = previous
        del mha._aq_sites

    return restore


# ------------------------------------------------------------------ weights handed to the functional MHA
MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
SEPARATE_WEIGHTS = (("q_proj_weight", "query"), ("k_proj_weight", "key"), ("v_proj_weight", "value"))
# Modules whose forward hands their child Linears' weights to F.multi_head_attention_forward (so no hook on the
# Linears fires): open_clip's ResNet attention pool.
FUNCTIONAL_MHA_OWNERS: tuple[type[nn.Module], ...] = (AttentionPool2d,)


def mha_arguments(args: tuple, kwargs: dict) -> dict[str, Any]:
    """The named arguments of one F.multi_head_attention_forward call."""
    return dict(MHA_SIGNATURE.bind(*args, **kwargs).arguments)


def attention_before_out_proj(a: dict[str, Any]) -> Tensor:
    """The attention output that the call's output projection reads: the same call with an identity projection."""
    w = a["out_proj_weight"]
    eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    return F.multi_head_attention_forward(**{**a, "out_proj_weight": eye, "out_proj_bias": None,
                                             "need_weights": False})[0]


class _FunctionalMHASites(torch.overrides.TorchFunctionMode):
    """Route F.multi_head_attention_forward's query/key/value (separate q/k/v weights) and its output projection's
    input through the sites of the weights it is handed ({weight data_ptr: site})."""

    def __init__(self, sites: dict[int, Callable[[Tensor], Tensor]]):
        super().__init__()
        self.sites = sites

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        kwargs = kwargs or {}
        if func is not F.multi_head_attention_forward:
            return func(*args, **kwargs)
        a = mha_arguments(args, kwargs)
        if a.get("use_separate_proj_weight"):
            for wname, xname in SEPARATE_WEIGHTS:
                site = self.sites.get(a[wname].data_ptr()) if a[wname] is not None else None
                if site is not None:
                    a[xname] = site(a[xname])
        out_site = self.sites.get(a["out_proj_weight"].data_ptr())
        if out_site is None:
            return func(**a)
        attn = attention_before_out_proj(a)
        return F.linear(out_site(attn), a["out_proj_weight"], a["out_proj_bias"]), None


def patch_functional_mha(module: nn.Module, sites: dict[int, Callable[[Tensor], Tensor]]) -> Callable[[], None]:
    """Run `module.forward` (a `FUNCTIONAL_MHA_OWNERS` instance) under `_FunctionalMHASites`; returns the restore."""
    had_own, previous = "forward" in module.__dict__, module.__dict__.get("forward")
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        with _FunctionalMHASites(sites):
            return original(*args, **kwargs)

    module.forward = forward

    def restore() -> None:
        del module.forward
        if had_own:
            module.forward = previous

    return restore
