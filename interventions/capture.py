"""M2's calibration inputs: the inputs X [rows, in] of each selected matrix, captured with forward hooks over
calibration images and prompts (`capture_inputs`; re-exported by `interventions.matching`)."""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from eval.errors import UserError


class _MatmulCapture(torch.overrides.TorchFunctionMode):
    """Record X of `X @ P` for the projections used as bare matrices (visual.proj, text_projection)."""

    def __init__(self, record: Callable[[int, Tensor], None], watched: set[int]):
        super().__init__()
        self.record, self.watched = record, watched

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and len(args) == 2:
            x, w = args
            if isinstance(w, Tensor) and w.ndim == 2 and w.data_ptr() in self.watched:
                self.record(w.data_ptr(), x)
        return func(*args, **(kwargs or {}))


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

    Captured with forward hooks: nn.Linear inputs; nn.MultiheadAttention's input (q/k/v share it) and its
    out_proj input (recomputed by a twin whose out_proj is the identity, since the fused attention never calls
    out_proj's forward); `x @ P` projections by a torch-function mode. Rows are token vectors (text padding
    dropped), subsampled to at most `max_rows` per matrix.
    """
    modules = dict(model.named_modules())
    store: dict[int, list[Tensor]] = {}
    state: dict[str, Tensor | None] = {"mask": None}

    def record(key: int, x: Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        mask = state["mask"]
        if mask is not None and rows.shape[0] == mask.numel():
            rows = rows[mask]
        store.setdefault(key, []).append(rows.float().cpu())

    hooks, watched_mm, seen = [], set(), set()
    try:
        for v in views:
            key = v.param.data_ptr()
            if key in seen:  # q, k, v slices of one in_proj share its input
                continue
            seen.add(key)
            owner, _, leaf = v.param_name.rpartition(".")
            mod = modules.get(owner)
            if v.kind in ("patch_embed", "embed") or (mod is None and not v.transpose):
                raise UserError(f"--match output supports linear maps only; exclude {v.name} from --layers")
            if v.transpose or mod is None:
                watched_mm.add(key)
            elif isinstance(mod, torch.nn.MultiheadAttention) and leaf == "in_proj_weight":
                def pre(m, args, kwargs, key=key):  # noqa: ANN001
                    record(key, args[0] if args else kwargs["query"])

                hooks.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            elif (isinstance(modules.get(owner.rpartition(".")[0]), torch.nn.MultiheadAttention)
                  and owner.endswith("out_proj")):
                parent = modules[owner.rpartition(".")[0]]
                twin = _mha_without_out_proj(parent)

                def hook(m, args, kwargs, key=key, twin=twin):
                    record(key, twin(*args, **kwargs)[0])

                hooks.append(parent.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                hooks.append(mod.register_forward_pre_hook(lambda m, args, key=key: record(key, args[0])))
        mode = _MatmulCapture(record, watched_mm) if watched_mm else contextlib.nullcontext()
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
        chunks = store.get(v.param.data_ptr())
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
