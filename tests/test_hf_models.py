"""Hugging Face CLIPModel / SiglipModel as first-class models (eval/hf.py, eval/hf_model.py, eval/hf_preprocess.py,
spectral/hf_views.py): the same zero-shot logits as the open_clip twin through one Evaluator, the processor's own
preprocessing and tokenizer, weight views named by tower/block/kind, and one-line errors (exit 2)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from eval.datasets import ArrayImageDataset
from eval.evaluator import Evaluator
from eval.loading import load_model
from spectral.selector import select
from spectral.views import weight_views
from tests.hf_fixtures import hf_clip_twin, save_tiny

pytest.importorskip("transformers")

FAMILIES = ("clip", "siglip")
CLASSES = ("shirt", "shoe", "bag", "dress", "coat")
TEMPLATES = ("a photo of a {}.", "a blurry photo of the {}.")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf")
    return {f: str(save_tiny(f, root / f)) for f in FAMILIES}


def _images(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def _dataset(name: str, pixels: np.ndarray) -> ArrayImageDataset:
    n = len(pixels)
    return ArrayImageDataset(name=name, role="id", class_names=CLASSES, templates=TEMPLATES,
                             labels=np.arange(n) % len(CLASSES), ids=np.array([f"{name}-{i}" for i in range(n)]),
                             pixels=pixels)


# ---------------------------------------------------------------------------------------------- the open_clip twin
@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """open_clip's ViT-B-32-quickgelu (full size, random init, seed 0) and the HF CLIPModel holding its weights."""
    import open_clip

    oc = load_model("ViT-B-32-quickgelu")
    cfg = open_clip.get_model_config("ViT-B-32-quickgelu")
    hf = load_model(str(hf_clip_twin(oc.model, cfg, tmp_path_factory.mktemp("twin") / "vit-b-32-quickgelu")))
    return oc, hf


def _max_dlogit(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k].logits.astype(np.float64) - b[k].logits.astype(np.float64)).max()) for k in a)


@pytest.mark.slow
def test_twin_gives_the_same_zero_shot_logits(twin, capsys):
    oc, hf = twin
    assert hf.info.source == "hf" and hf.info.context_length == 77 and hf.info.image_size == (224, 224)
    assert hf.info.logit_scale == pytest.approx(oc.info.logit_scale, rel=1e-7)
    sets = [_dataset("grey", _images(6, (28, 28))), _dataset("rgb", _images(6, (30, 40, 3), seed=1))]
    kw = dict(progress=False, noise_severities=(0.26,), noise_subset=3, mcm_templates="single", batch_size=4)
    # one evaluator (open_clip's preprocessing and tokenizer), both models
    shared = Evaluator.from_loaded(oc, sets, **kw)
    a, b = shared.run("oc", oc.model), shared.run("hf", hf.model)
    one = _max_dlogit(a, b)
    # each loader's own evaluator: the HF processor's transform and the HF tokenizer
    own = _max_dlogit(a, Evaluator.from_loaded(hf, sets, **kw).run("hf", hf.model))
    with capsys.disabled():
        print(f"\nmax |Δlogit| open_clip vs HF twin: one evaluator {one:.2e}, own evaluators {own:.2e}")
    assert one < 1e-4 and own < 1e-4
    assert float(np.abs(a["grey"].logits).max()) > 0.1  # random-init cosines are small, but not a degenerate 0 == 0
    # the tokenizers agree up to the end-of-text token (padding differs: 0 vs <|endoftext|>, masked either way)
    texts = ["a photo of a shirt.", "A Blurry photo of the Ankle boot!"]
    t_oc, t_hf = oc.tokenizer(texts), hf.tokenizer(texts)
    for r_oc, r_hf in zip(t_oc, t_hf):
        n = int(r_oc.argmax()) + 1
        assert torch.equal(r_oc[:n], r_hf[:n])


def test_twin_views_have_open_clip_names_and_values(twin):
    oc, hf = twin
    table = {v.name: (v.tower, v.block, v.kind, v.shape, v.core) for v in weight_views(oc.model)}
    hf_views = {v.name: v for v in weight_views(hf.model)}
    assert {k: (v.tower, v.block, v.kind, v.shape, v.core) for k, v in hf_views.items()} == table
    for v in weight_views(oc.model):
        assert torch.equal(v.get(), hf_views[v.name].get()), v.name


# ---------------------------------------------------------------------------------------------- model interface
@pytest.mark.parametrize("family", FAMILIES)
def test_encode_is_transformers_get_features(hf_dirs, family):
    import transformers

    loaded = load_model(hf_dirs[family])
    cls = transformers.CLIPModel if family == "clip" else transformers.SiglipModel
    ref = cls.from_pretrained(hf_dirs[family], dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dirs[family])
    texts = ["a photo of a shirt.", "a bag", "a blurry photo of the dress on a big coat"]
    x = torch.randn(3, 3, 32, 32)
    length = 16 if family == "clip" else 64
    enc = tok(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    ids = loaded.tokenizer(texts)
    assert torch.equal(ids, enc["input_ids"]) and ids.shape == (3, length)
    with torch.no_grad():
        img, txt = loaded.model.encode_image(x), loaded.model.encode_text(ids)
        ref_img = ref.get_image_features(pixel_values=x).pooler_output
        mask = {"attention_mask": enc["attention_mask"]} if family == "clip" else {}  # SigLIP: no mask (its processor)
        ref_txt = ref.get_text_features(input_ids=enc["input_ids"], **mask).pooler_output
        out = ref(input_ids=enc["input_ids"], pixel_values=x, **mask)
    assert torch.equal(img, ref_img) and torch.equal(txt, ref_txt)
    # METHODS §5: z = s·cos + b with the checkpoint's own s and b (SigLIP's bias) is the model's own logits
    f = torch.nn.functional.normalize
    z = loaded.model.logit_scale.exp() * f(img, dim=-1) @ f(txt, dim=-1).T
    z = z + (loaded.model.logit_bias if family == "siglip" else 0.0)
    torch.testing.assert_close(z, out.logits_per_image, rtol=1e-5, atol=1e-5)
    assert {n.split(".")[0] for n, _ in loaded.model.named_parameters()} == (
        {"visual", "text", "logit_scale"} | ({"logit_bias"} if family == "siglip" else set()))
    assert "visual.vision_model.encoder.layers.0.self_attn.q_proj.weight" in dict(loaded.model.named_parameters())


def test_clip_attention_mask_stops_at_first_eos(hf_dirs):
    loaded = load_model(hf_dirs["clip"])
    ids = loaded.tokenizer(["a bag", "a photo of a shirt."])
    mask = loaded.model.text_attention_mask(ids)
    eos = 49407
    for row, m in zip(ids, mask):
        first = int((row == eos).nonzero()[0])
        assert m[: first + 1].all() and not m[first + 1:].any()
    assert (ids[0] == eos).sum() > 1  # padding is <|endoftext|> too: the first one is the pooled position


# ---------------------------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("family", FAMILIES)
def test_preprocess_is_the_processors_own(tmp_path, family):
    """The rebuilt transform equals transformers' PIL-backend processor, including a crop window where
    torchvision's rounded offsets would be one pixel off, and a non-default rescale factor."""
    import transformers
    from torchvision import transforms as T

    from eval.hf_preprocess import hf_transform
    from eval.preprocess import split_preprocess

    if family == "clip":
        settings = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        pil_cls = transformers.CLIPImageProcessorPil
    else:
        settings = dict(size={"height": 24, "width": 40}, rescale_factor=1 / 127.5, image_mean=[1.0, 0.5, 0.0],
                        image_std=[2.0, 1.0, 0.5])
        pil_cls = transformers.SiglipImageProcessorPil
    ref = pil_cls(**settings)
    pre = hf_transform(ref, "test")
    pixels = _images(3, (37, 50, 3))  # resize -> 32×43: 11 columns to crop (11 ≡ 3 mod 4)
    for arr in pixels:
        img = Image.fromarray(arr)
        want = torch.as_tensor(np.asarray(ref(img, return_tensors="np")["pixel_values"][0]))
        torch.testing.assert_close(pre(img), want, rtol=0, atol=2e-6)
    if family == "clip":
        moved = T.Compose([*pre.transforms[:2], T.CenterCrop(32), *pre.transforms[3:]])
        assert not torch.allclose(moved(Image.fromarray(pixels[0])), pre(Image.fromarray(pixels[0])))
    split = split_preprocess(pre)
    assert split.tensor_path is not None  # uint8 arrays take the batched path, with the same crop offsets
    batch = split.pil_batch([Image.fromarray(a) for a in pixels])
    assert torch.equal(split.tensor_path(pixels), batch)
    torch.testing.assert_close(split.normalize(batch)[0], pre(Image.fromarray(pixels[0])), rtol=0, atol=2e-6)


# ---------------------------------------------------------------------------------------------- weight views
def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_views_roundtrip_bit_identical(hf_dirs, family):
    loaded = load_model(hf_dirs[family])
    model = loaded.model
    views = weight_views(model)
    before = _state(model)
    x = torch.rand(2, 3, 32, 32)
    ids = loaded.tokenizer(["a photo of a cat.", "a dog"])
    with torch.no_grad():
        out = (model.encode_image(x), model.encode_text(ids))
    for v in views:
        w = v.get().clone()
        v.set(w)
        assert torch.equal(v.get(), w), v.name
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), out[0]) and torch.equal(model.encode_text(ids), out[1])
    q = next(v for v in views if v.name == "text.blocks.1.attn.q")
    q.set(torch.zeros(q.shape))
    changed = [k for k in before if not torch.equal(before[k], model.state_dict()[k])]
    assert changed == ["text.text_model.encoder.layers.1.self_attn.q_proj.weight"]


@pytest.mark.parametrize("family", FAMILIES)
def test_views_named_by_tower_block_kind(hf_dirs, family):
    model = load_model(hf_dirs[family]).model
    views = weight_views(model)
    layers = 2
    blocks = {f"{t}.blocks.{i}.{k}" for t in ("visual", "text") for i in range(layers)
              for k in ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.fc", "mlp.proj")}
    assert {v.name for v in views if v.core} == blocks
    assert {v.name for v in select(views, "vision-only")} == {n for n in blocks if n.startswith("visual.")}
    assert {v.name for v in select(views, "text-only")} == {n for n in blocks if n.startswith("text.")}
    assert {v.kind for v in select(views, "attention-only")} == {"q", "k", "v", "out"}
    q = select(views, "kind=q")
    assert {v.name for v in q} == {f"{t}.blocks.{i}.attn.q" for t in ("visual", "text") for i in range(layers)}
    assert all(v.param_name.endswith("self_attn.q_proj.weight") for v in q)
    assert {(v.name, v.kind) for v in select(views, "mlp-only;tower=text;block=1")} == {
        ("text.blocks.1.mlp.fc", "fc"), ("text.blocks.1.mlp.proj", "proj")}
    optional = {v.name: v.kind for v in views if not v.core}
    expected = {"visual.conv1": "patch_embed", "text.token_embedding": "embed", "text.proj": "head"}
    if family == "clip":
        expected["visual.proj"] = "head"
    else:  # SigLIP: the attention-pool head is never core; the text head is the text projection
        expected.update({"visual.head.probe": "other", "visual.head.attn.q": "head", "visual.head.attn.k": "head",
                         "visual.head.attn.v": "head", "visual.head.attn.out": "head",
                         "visual.head.mlp.fc": "head", "visual.head.mlp.proj": "head"})
    assert optional == expected
    everything = select(views, "all")
    assert not any("position" in v.param_name for v in everything)  # position embeddings are never a view
    assert not any(n.startswith("visual.head") for n in (v.name for v in q))
    # raw transformers models (not wrapped) get the same towers and kinds
    import transformers

    cls = transformers.CLIPModel if family == "clip" else transformers.SiglipModel
    raw = weight_views(cls.from_pretrained(hf_dirs[family], dtype=torch.float32))
    assert {(v.name, v.tower, v.kind) for v in raw} == {(v.name, v.tower, v.kind) for v in views}
