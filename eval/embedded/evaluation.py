"""The embedded model's headline figures (written into fmnist_clip_record.json): zero-shot accuracy (METHODS §7),
MCM AUROC per OOD set, worst-group accuracy on the tint set, accuracy under the sketch shift (METHODS §5).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from jaxtyping import Float
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from eval.datasets import ImageDataset
from eval.embedded import EMBEDDED_CHECKPOINT
from eval.embedded.data import embedded_datasets
from eval.loading import LoadedModel, load_model
from eval.preprocess import array_source, split_preprocess
from eval.zeroshot import logit_scale_of, resolve_templates, zero_shot_weights


@torch.no_grad()
def image_features(model: nn.Module, preprocess: Callable, ds: ImageDataset, batch_size: int = 500) -> Float[Tensor, "n dim"]:
    """Unit-norm image features (float32) through the model's own preprocessing; batched tensor path for arrays."""
    split = split_preprocess(preprocess)
    src = array_source(ds)
    feats = []
    for start in range(0, len(ds), batch_size):
        rows = np.arange(start, min(start + batch_size, len(ds)))
        if src is not None and split.tensor_path is not None:
            pixels, index = src
            x = split.tensor_path(pixels[rows if index is None else index[rows]])
        else:
            x = split.pil_batch([ds.image(int(i)) for i in rows])
        f = model.encode_image(split.normalize(x)).float()
        feats.append(f / f.norm(dim=-1, keepdim=True))
    return torch.cat(feats)


def class_weights(loaded: LoadedModel, ds: ImageDataset, template_set: str = "dataset") -> Float[Tensor, "dim classes"]:
    """Zero-shot class matrix W from the dataset's own templates (or a named template set)."""
    return zero_shot_weights(loaded.model, loaded.tokenizer, ds.class_names, resolve_templates(template_set, ds.templates))


def zero_shot_accuracy(loaded: LoadedModel, ds: ImageDataset) -> float:
    """Top-1 accuracy of logits s·cos(f, w_c) (METHODS §7), in [0, 1]."""
    cos = image_features(loaded.model, loaded.preprocess, ds) @ class_weights(loaded, ds)
    return float((cos.argmax(dim=1).numpy() == ds.labels).mean())


def mcm_scores(cos: Float[Tensor, "n classes"], tau: float = 1.0) -> np.ndarray:
    """MCM: max softmax of cosines / τ (METHODS §5), in float64."""
    return torch.softmax(cos.double() / tau, dim=1).max(dim=1).values.numpy()


def evaluate_embedded(checkpoint: Path | str = EMBEDDED_CHECKPOINT) -> dict:
    """Every headline figure for a checkpoint of the embedded architecture (accuracies in %, AUROC in %)."""
    loaded = load_model(None, None if Path(checkpoint) == EMBEDDED_CHECKPOINT else str(checkpoint))
    loaded.model.eval()
    sets = {ds.name: ds for ds in embedded_datasets()}
    idd = sets["fmnist"]
    weights = {"dataset": class_weights(loaded, idd), "single": class_weights(loaded, idd, "single")}
    scale = logit_scale_of(loaded.model)
    feats = {name: image_features(loaded.model, loaded.preprocess, ds) for name, ds in sets.items()}
    pct = lambda v: round(100.0 * float(v), 3)  # noqa: E731
    out: dict = {"logit_scale": round(scale, 4), "templates": "dataset (the 8 training templates) unless noted",
                 "accuracy_top1_pct": {}, "mcm_auroc_pct": {}, "mcm_auroc_single_template_pct": {}}
    for name, ds in sets.items():
        if ds.role != "ood":
            pred = (feats[name] @ weights["dataset"]).argmax(dim=1).numpy()
            out["accuracy_top1_pct"][name] = pct((pred == ds.labels).mean())
    id_scores = {k: mcm_scores(feats["fmnist"] @ w) for k, w in weights.items()}
    for name, ds in sets.items():
        if ds.role == "ood":
            for key, field in (("dataset", "mcm_auroc_pct"), ("single", "mcm_auroc_single_template_pct")):
                ood = mcm_scores(feats[name] @ weights[key])
                y = np.r_[np.ones(len(id_scores[key])), np.zeros(len(ood))]
                out[field][name] = pct(roc_auc_score(y, np.r_[id_scores[key], ood]))
    tint = sets["fmnist-tint"]
    hit = (feats["fmnist-tint"] @ weights["dataset"]).argmax(dim=1).numpy() == tint.labels
    group_acc = {tint.group_names[g]: pct(hit[tint.groups == g].mean()) for g in np.unique(tint.groups)}
    conflicting = tint.groups % 2 == 1
    out["spurious"] = {
        "dataset": "fmnist-tint", "avg_acc_pct": pct(hit.mean()), "worst_group_acc_pct": min(group_acc.values()),
        "worst_group": min(group_acc, key=group_acc.get),
        "aligned_acc_pct": pct(hit[~conflicting].mean()), "conflicting_acc_pct": pct(hit[conflicting].mean()),
        "group_acc_pct": group_acc,
    }
    plain = (feats["fmnist"] @ weights["dataset"]).argmax(dim=1).numpy() == idd.labels
    out["fmnist_per_class_acc_pct"] = {c: pct(plain[idd.labels == k].mean()) for k, c in enumerate(idd.class_names)}
    tint_src = np.array([int(s.split("-")[2]) for s in tint.ids])
    out["spurious"]["same_images_untinted_acc_pct"] = pct(plain[tint_src].mean())
    out["shift_gap_pp"] = round(out["accuracy_top1_pct"]["fmnist"] - out["accuracy_top1_pct"]["fmnist-sketch"], 3)
    return out
