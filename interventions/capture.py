"""M2's calibration inputs: the inputs X [rows, in] of each selected matrix, captured with forward hooks over
calibration images and prompts (`capture_inputs`; re-exported by `interventions.matching`)."""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from eval.errors import UserError
from interventions.actsites import SEPARATE_WEIGHTS, attention_before_out_proj, mha_arguments


class _FunctionCapture(torch.overrides.TorchFunctionMode):
    """Record the inputs no module hook sees: X of `X @ P` for the projections used as bare matrices (visual.proj,
    text_projection), and the inputs of weights handed to `F.multi_head_attention_forward` directly (open_clip's
    ResNet attention pool: q/k/v_proj read query/key/value; the output projection's input is recomputed with an
    identity output projection)."""

    def __init__(self, record: Callable[[int, Tensor], None], watched: set[int], linears: set[int]):
        super().__init__()
        self.record, self.watched, self.linears = record, watched, linears

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and len(args) == 2:
            x, w = args
            if isinstance(w, Tensor) and w.ndim == 2 and w.data_ptr() in self.watched:
                self.record(w.data_ptr(), x)
        elif func is F.multi_head_attention_forward and self.linears:
            a = mha_arguments(args, kwargs)
            if a.get("use_separate_proj_weight"):
                for wname, xname in SEPARATE_WEIGHTS:
                    if a[wname] is not None and a[wname].data_ptr() in self.linears:
                        self.record(a[wname].data_ptr(), a[xname])
            w_out = a.get("out_proj_weight")
            if w_out is not None and w_out.data_ptr() in self.linears:
                self.record(w_out.data_ptr(), attention_before_out_proj(a))
        return func(*args, **kwargs)


# nn.MultiheadAttention's weights and which input they read (None: the fused in_proj, rows split q, k, v)
MHA_WEIGHTS: dict[str, str | None] = {"in_proj_weight": None, "q_proj_weight": "q", "k_proj_weight": "k",
                                      "v_proj_weight": "v"}


def conv_rows(conv: torch.nn.modules.conv._ConvNd, x: Tensor) -> Float[Tensor, "rows in"]:
    """The inputs of a conv as rows of its out×(in·kh·kw) view: one unfolded patch per output position, in the
    weight's (channel, kh, kw) order, so X @ Wᵀ is the conv's output (without bias) position by position."""
    pad = conv.padding if not isinstance(conv.padding, str) else None
    if pad is None:  # 'same'/'valid': the padding unfold needs
        pad = tuple(0 if conv.padding == "valid" else d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
    cols = torch.nn.functional.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=pad, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _mha_without_out_proj(mha: torch.nn.MultiheadAttention) -> torch.nn.MultiheadAttention:
    """A copy of `mha` whose out_proj is the identity: its output is exactly out_proj's input."""
    twin = copy.deepcopy(mha)
    twin._forward_pre_hooks.clear()
    twin._forward_hooks.clear()
    with torch.no_grad():
        twin.out_proj.weight.copy_(torch.eye(mha.embed_dim))
        if twin.out_proj.bias is not None:
            twin.out_proj.bias.zero_()
    return twin


def _check_capturable(v: Any, mod: torch.nn.Module | None) -> None:
    """One line naming a selected matrix whose inputs form no single X [rows, in]."""
    if v.kind in ("patch_embed", "embed") or (mod is None and not v.transpose):
        raise UserError(f"calibration inputs (--match output, data-dependent quantizers) exist for linear maps and "
                        f"plain convs only; {v.name} is a {v.kind}: leave it out, "
                        f"e.g. --layers 'core;exclude={v.name}'")
    if isinstance(mod, torch.nn.modules.conv._ConvNd) and (
            not isinstance(mod, torch.nn.Conv2d) or mod.groups != 1 or mod.padding_mode != "zeros"):
        leaf = v.name.rsplit(".", 1)[-1]
        raise UserError(f"calibration inputs of {v.name}: only 2-D convs with groups=1 and zero padding have one input "
                        f"matrix; leave grouped/depthwise convs out, e.g. --layers 'core;exclude=*.{leaf}'")


def check_capturable(model: torch.nn.Module, views: list[Any]) -> None:
    """Refuse, before anything runs or is written, a selection with a matrix `capture_inputs` cannot serve."""
    modules = dict(model.named_modules())
    for v in views:
        _check_capturable(v, modules.get(v.param_name.rpartition(".")[0]))


def capturable_views(model: torch.nn.Module, views: list[Any]) -> list[Any]:
    """The views `capture_inputs` can serve (the others have no single input matrix: a quantizer's output-error
    report is NaN for them, and what needs their inputs was refused by `check_capturable`)."""
    modules = dict(model.named_modules())
    keep = []
    for v in views:
        try:
            _check_capturable(v, modules.get(v.param_name.rpartition(".")[0]))
        except UserError:
            continue
        keep.append(v)
    return keep


@torch.no_grad()
def capture_inputs(
    model: torch.nn.Module,
    views: list[Any],
    images: Float[Tensor, "n c h w"] | None = None,
    tokens: Tensor | None = None,
    *,
    max_rows: int = 1024,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Inputs X [rows, in] of each selected matrix over calibration images (vision) and prompts (text), for M2.

    Captured with forward hooks: nn.Linear inputs; 2-D conv inputs unfolded into patches (`conv_rows`);
    nn.MultiheadAttention's query, key and value for its q, k and v rows (one input for self-attention; a
    cross-attention pool's k/v see the tokens, its q the queries) and its out_proj input (recomputed by a twin whose
    out_proj is the identity, since the fused attention never calls out_proj's forward); `x @ P` projections by a
    torch-function mode. Rows are token vectors (text padding dropped), subsampled to at most `max_rows` per matrix.
    """
    modules = dict(model.named_modules())
    store: dict[Any, list[Tensor]] = {}
    state: dict[str, Tensor | None] = {"mask": None}

    def rows_of(x: Tensor) -> Tensor:
        rows = x.detach().reshape(-1, x.shape[-1])
        mask = state["mask"]
        if mask is not None and rows.shape[0] == mask.numel():
            rows = rows[mask]
        return rows.float().cpu()

    def record(key: Any, x: Tensor) -> None:
        store.setdefault(key, []).append(rows_of(x))

    def record_mha(key: int, query: Tensor, k_in: Tensor, v_in: Tensor, only: str | None) -> None:
        if only is not None:  # separate q/k/v_proj_weight (kdim/vdim ≠ embed_dim): one input per parameter
            record(key, {"q": query, "k": k_in, "v": v_in}[only])
            return
        done: dict[int, Tensor] = {}
        for part, x in (("q", query), ("k", k_in), ("v", v_in)):
            rows = done.setdefault(id(x), rows_of(x))  # self-attention: one copy serves q, k and v
            store.setdefault((key, part), []).append(rows)

    hooks, watched_mm, linears, seen = [], set(), set(), set()
    try:
        for v in views:
            key = v.param.data_ptr()
            if key in seen:  # q, k, v slices of one in_proj share its input
                continue
            seen.add(key)
            owner, _, leaf = v.param_name.rpartition(".")
            mod = modules.get(owner)
            _check_capturable(v, mod)
            if v.transpose or mod is None:
                watched_mm.add(key)
            elif isinstance(mod, torch.nn.MultiheadAttention) and leaf in MHA_WEIGHTS:
                def pre(m, args, kwargs, key=key, only=MHA_WEIGHTS[leaf]):  # noqa: ANN001
                    names = ("query", "key", "value")
                    q, k_in, v_in = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
                    record_mha(key, q, k_in, v_in, only)

                hooks.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            elif (isinstance(modules.get(owner.rpartition(".")[0]), torch.nn.MultiheadAttention)
                  and owner.endswith("out_proj")):
                parent = modules[owner.rpartition(".")[0]]
                twin = _mha_without_out_proj(parent)

                def hook(m, args, kwargs, key=key, twin=twin):
                    record(key, twin(*args, **kwargs)[0])

                hooks.append(parent.register_forward_pre_hook(hook, with_kwargs=True))
            elif isinstance(mod, torch.nn.modules.conv._ConvNd):
                hooks.append(mod.register_forward_pre_hook(lambda m, args, key=key: record(key, conv_rows(m, args[0]))))
            else:
                hooks.append(mod.register_forward_pre_hook(lambda m, args, key=key: record(key, args[0])))
                if isinstance(mod, torch.nn.Linear):  # also reached when handed to F.multi_head_attention_forward
                    linears.add(key)
        mode = _FunctionCapture(record, watched_mm, linears) if watched_mm or linears else contextlib.nullcontext()
        with mode:
            if images is not None and any(v.tower == "visual" for v in views):
                model.encode_image(images)
            if tokens is not None and any(v.tower == "text" for v in views):
                state["mask"] = (tokens != 0).reshape(-1)
                model.encode_text(tokens)
    finally:
        for h in hooks:
            h.remove()
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for v in views:
        chunks = store.get((v.param.data_ptr(), v.kind)) or store.get(v.param.data_ptr())
        if not chunks:
            raise UserError(f"no calibration inputs reached {v.name}; "
                            "--match output needs images/prompts for its tower")
        x = torch.cat(chunks)
        width = v.shape[1]
        if x.shape[1] != width:
            raise UserError(f"captured inputs of {v.name} have width {x.shape[1]}, expected {width}")
        if x.shape[0] > max_rows:
            x = x[torch.randperm(x.shape[0], generator=gen)[:max_rows]]
        out[v.name] = x
    return out
