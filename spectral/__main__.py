"""`python -m spectral`: list a model's weight views, or measure its spectra (METHODS §4, §8)."""
from __future__ import annotations

import sys
from typing import Sequence

from eval.cli import ArgumentParser, add_model_args, check_device, cli_main
from spectral.selector import select
from spectral.views import total_parameters, weight_views


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m spectral", description=__doc__)
    add_model_args(p)
    p.add_argument("--layers", default=None, help="selector: preset (core, all, vision-only, text-only, attention-only, "
                   "mlp-only, early, late) and/or key=value clauses joined by ';' (tower, kind, block, part, name, scope)")
    p.add_argument("--list", action="store_true", help="print the weight-view table and the selected parameter fraction")
    return p


def list_views(model, layers: str | None) -> str:
    views = weight_views(model)
    chosen = select(views, layers)
    names = {v.name for v in chosen}
    lines = [f"{'name':<40} {'tower':<7} {'block':>5} {'kind':<12} {'shape':>13} {'params':>11} sel"]
    for v in views:
        blk = "" if v.block is None else str(v.block)
        lines.append(f"{v.name:<40} {v.tower:<7} {blk:>5} {v.kind:<12} {f'{v.shape[0]}x{v.shape[1]}':>13} {v.numel:>11,} "
                     f"{'*' if v.name in names else ''}")
    total = total_parameters(model)
    sel = sum(v.numel for v in chosen)
    lines.append(f"{len(chosen)} of {len(views)} matrices selected: {sel:,} of {total:,} parameters ({100 * sel / total:.2f}%)")
    return "\n".join(lines)


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_device(args.device)
    from eval.loading import load_model

    loaded = load_model(args.model, args.pretrained, device=args.device)
    if args.list:
        print(list_views(loaded.model, args.layers))
        return 0
    raise NotImplementedError("spectral analysis: see the spectral issue")


if __name__ == "__main__":
    sys.exit(main())
