"""Shared test setup: offline hub, headless matplotlib, runtime jaxtyping checks, small real models."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_config_path(tmp_path_factory) -> str:
    """A tiny open_clip ViT CLIP config file (real architecture, random init) for fast tests."""
    import json

    path = tmp_path_factory.mktemp("cfg") / "tiny_test_clip.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return str(path)


@pytest.fixture()
def tiny_clip(tiny_config_path):
    """A fresh tiny CLIP (LoadedModel) per test, so in-place edits never leak between tests."""
    from eval.loading import load_model

    return load_model(tiny_config_path)


@pytest.fixture(scope="session")
def embedded_clip():
    """The embedded default model (shared: do not edit it in place; deepcopy first)."""
    from eval.loading import load_model

    return load_model()


@pytest.fixture()
def pinned():
    """Run keys under a fixed code version, so a commit landing mid-test cannot change them."""
    from interventions import store

    store.set_code_version("test-pinned")
    yield "test-pinned"
    store.set_code_version(None)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded, and one BLAS thread: small matrices gain nothing from two, and oversubscribed LAPACK on a shared
    2-core machine ran ~20x slower. The thread count is restored after each test."""
    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
