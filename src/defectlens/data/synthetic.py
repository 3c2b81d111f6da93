"""The embedded default dataset: synthetic defects on textures that scikit-image ships.

Deterministic for a seed, written in the MVTec AD layout, so the demo and the tests exercise the
same reader as real data. Train crops come from the left 60 % of each texture, test crops from the
right 40 %, so no test pixel was ever seen in training. Each defect's mask is exactly the pixels
the defect changed (soft defects: where their blend weight is at least one half).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from defectlens.errors import ParameterError

TEXTURES = ("brick", "gravel", "grass")
MIN_PASTE_SIZE = 64  # the smallest image side a defect is pasted on (sizes are drawn at 128)
DEFECTS = ("scratch", "spot", "hole", "patch", "smudge")


def load_texture(name: str) -> np.ndarray:
    """A grey texture from scikit-image as float in [0, 1]."""
    import skimage.data

    if name not in TEXTURES:
        raise ValueError(f"unknown texture {name!r}; choose from {', '.join(TEXTURES)}")
    image = getattr(skimage.data, name)()
    if image.ndim == 3:
        image = image.mean(axis=2)
    return image.astype(np.float64) / 255.0


def _crop(texture: np.ndarray, size: int, x_range: tuple[int, int], rng: np.random.Generator):
    h = texture.shape[0]
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(x_range[0], x_range[1] - size + 1))
    return texture[y : y + size, x : x + size].copy()


# The defect makers below draw sizes for a 128 px crop and scale them with the image (`_px`),
# so the same defect is as large relative to the part at any resolution. Each works on a grey
# (H, W) or colour (H, W, 3) float image in place and returns the defect's mask (H, W).


def _px(img: np.ndarray, pixels: float) -> int:
    """`pixels` at 128 px, in this image's pixels (at least 1)."""
    return max(1, round(pixels * img.shape[0] / 128))


def _blend(img: np.ndarray, alpha: np.ndarray, value: np.ndarray | float) -> None:
    """img <- img (1 - alpha) + value alpha, with alpha (H, W) broadcast over colour."""
    if img.ndim == 3:
        alpha = alpha[:, :, None]
    img[:] = img * (1 - alpha) + value * alpha


def _soft_ellipse(img: np.ndarray, rng: np.random.Generator, radius: tuple[int, int], blur: float):
    """A blurred filled ellipse (blend weight in [0, 1]) away from the border."""
    size = img.shape[0]
    ry, rx = (int(r) for r in rng.integers(_px(img, radius[0]), _px(img, radius[1]) + 1, size=2))
    margin = max(ry, rx) + _px(img, 4)
    cy, cx = (int(c) for c in rng.integers(margin, size - margin, size=2))
    yy, xx = np.mgrid[:size, :size]
    hard = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    blur = blur * size / 128
    return ndimage.gaussian_filter(hard.astype(np.float64), blur) if blur else hard * 1.0


def _scratch(img, rng, other):
    size = img.shape[0]
    canvas = Image.new("L", (size, size), 0)
    edge = _px(img, 8)
    points = [tuple(int(v) for v in rng.integers(edge, size - edge, size=2)) for _ in range(3)]
    width = int(rng.integers(_px(img, 2), _px(img, 4)))
    ImageDraw.Draw(canvas).line(points, fill=255, width=width)
    mask = np.asarray(canvas) > 0
    tone = 0.95 if img[mask].mean() < 0.5 else 0.05
    img[mask] = tone
    return mask


def _spot(img, rng, other):
    alpha = _soft_ellipse(img, rng, (5, 12), blur=2.0)
    tone = 0.0 if rng.random() < 0.5 else 1.0
    _blend(img, 0.8 * alpha, tone)
    return alpha >= 0.5


def _hole(img, rng, other):
    size = img.shape[0]
    r = int(rng.integers(_px(img, 4), _px(img, 9)))
    rim, margin = _px(img, 2), _px(img, 6)
    cy, cx = (int(c) for c in rng.integers(r + margin, size - r - margin, size=2))
    yy, xx = np.mgrid[:size, :size]
    dist = np.hypot(yy - cy, xx - cx)
    img[dist <= r + rim] = 0.85  # raised rim
    img[dist <= r] = 0.02
    return dist <= r + rim


def _patch(img, rng, other):
    size = img.shape[0]
    side = int(rng.integers(_px(img, 12), _px(img, 25)))
    edge = _px(img, 4)
    y, x = (int(c) for c in rng.integers(edge, size - side - edge, size=2))
    oy, ox = (int(c) for c in rng.integers(0, other.shape[0] - side, size=2))
    img[y : y + side, x : x + side] = other[oy : oy + side, ox : ox + side]
    mask = np.zeros(img.shape[:2], dtype=bool)
    mask[y : y + side, x : x + side] = True
    return mask


def _smudge(img, rng, other):
    alpha = _soft_ellipse(img, rng, (8, 16), blur=3.0)
    sigma = 4.0 * img.shape[0] / 128
    smeared = ndimage.gaussian_filter(img, (sigma, sigma, 0)[: img.ndim])
    _blend(img, alpha, np.clip(smeared * 0.7 + 0.3 * img.mean() + 0.15, 0, 1))
    return alpha >= 0.5


# Defects made of the image's own texture (CutPaste, Li et al. CVPR 2021; DRAEM's Perlin-noise
# shapes, Zavrtanik et al. ICCV 2021): the pasted content has the part's own grain and colour,
# only moved, turned, and a little lighter or darker, so they are as subtle as real defects
# often are -- the drawn defects above are far easier than real ones (BENCHMARKS.md, issue 15).


def _perlin(size: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Gradient (Perlin) noise, (size, size) in about [-0.7, 0.7], `cells` lattice cells a
    side: a smooth random field whose thresholded shape looks like a stain or a worn area."""
    angles = rng.uniform(0.0, 2.0 * np.pi, (cells + 1, cells + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    t = np.arange(size) * cells / size
    i, f = t.astype(int), t - t.astype(int)
    fade = f * f * f * (f * (f * 6 - 15) + 10)
    corners = []
    for dy in (0, 1):
        for dx in (0, 1):
            g = grads[(i + dy)[:, None], (i + dx)[None, :]]
            corners.append(g[..., 0] * (f - dy)[:, None] + g[..., 1] * (f - dx)[None, :])
    top = corners[0] + fade[None, :] * (corners[1] - corners[0])
    bottom = corners[2] + fade[None, :] * (corners[3] - corners[2])
    return top + fade[:, None] * (bottom - top)


def _perlin_blob(img: np.ndarray, rng: np.random.Generator, radius: tuple[int, int]) -> np.ndarray:
    """An irregular blob (bool): Perlin noise thresholded inside a soft ellipse window, so the
    shape is ragged but stays one defect of bounded size."""
    window = _soft_ellipse(img, rng, radius, blur=3.0)
    cells = int(rng.choice([4, 8, 16]))
    field = window * (0.6 + _perlin(img.shape[0], cells, rng))
    mask = field > 0.5
    return mask if mask.sum() >= _px(img, 4) ** 2 else window > 0.5


def _elsewhere(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image's own texture from another place (shifted by at least an eighth of the side,
    half the time also turned by 90 degrees or mirrored), with its brightness and contrast
    jittered: content for a self-texture defect."""
    side = img.shape[0]
    source = np.rot90(img, int(rng.integers(1, 4))) if rng.random() < 0.5 else img[:, ::-1]
    if rng.random() < 0.5:
        source = img
    low = _px(img, 16)
    shift = [int(rng.integers(low, side - low + 1)) for _ in range(2)]
    source = np.roll(source, shift, axis=(0, 1))
    mean = source.mean()
    contrast = rng.uniform(0.8, 1.2)
    brightness = _towards_room(mean, rng) * rng.uniform(0.03, 0.12)
    return (source - mean) * contrast + mean + brightness


def _towards_room(mean: float, rng: np.random.Generator) -> float:
    """+1 (lighter) or -1 (darker): random for a mid-grey image, towards the middle for a very
    light or dark one, where the other way would be clipped away (white PCB board)."""
    if mean > 0.65:
        return -1.0
    if mean < 0.35:
        return 1.0
    return float(rng.choice([-1.0, 1.0]))


def _cutpaste(img, rng, other):
    size = img.shape[0]
    area = rng.uniform(0.02, 0.15) * size * size
    aspect = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
    h = int(np.clip(np.sqrt(area / aspect), _px(img, 4), size // 2))
    w = int(np.clip(np.sqrt(area * aspect), _px(img, 4), size // 2))
    edge = _px(img, 4)
    y = int(rng.integers(edge, size - h - edge + 1))
    x = int(rng.integers(edge, size - w - edge + 1))
    mask = np.zeros(img.shape[:2], dtype=bool)
    mask[y : y + h, x : x + w] = True
    img[mask] = _elsewhere(img, rng)[mask]
    return mask


def _scar(img, rng, other):
    size = img.shape[0]
    length, width = rng.uniform(_px(img, 10), _px(img, 26)), rng.uniform(_px(img, 2), _px(img, 5))
    angle = rng.uniform(0.0, np.pi)
    margin = length / 2 + _px(img, 4)
    cy, cx = rng.uniform(margin, size - margin, size=2)
    along = np.array([np.cos(angle), np.sin(angle)])
    across = np.array([-along[1], along[0]])
    centre = np.array([cx, cy])
    corners = [
        tuple(centre + a * along * length / 2 + b * across * width / 2)
        for a, b in ((-1, -1), (1, -1), (1, 1), (-1, 1))
    ]
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(corners, fill=255)
    mask = np.asarray(canvas) > 0
    img[mask] = _elsewhere(img, rng)[mask]
    return mask


def _blob(img, rng, other):
    mask = _perlin_blob(img, rng, (8, 20))
    alpha = rng.uniform(0.6, 1.0) * mask
    _blend(img, alpha, _elsewhere(img, rng))
    return mask


def _stain(img, rng, other):
    mask = _perlin_blob(img, rng, (8, 24))
    alpha = ndimage.gaussian_filter(mask.astype(np.float64), 1.5 * img.shape[0] / 128)
    shift = _towards_room(float(img[mask].mean()), rng) * rng.uniform(0.08, 0.2)
    _blend(img, alpha, np.clip(img + shift, 0, 1))
    return alpha >= 0.5


_MAKERS: dict[str, Callable] = {
    "scratch": _scratch,
    "spot": _spot,
    "hole": _hole,
    "patch": _patch,
    "smudge": _smudge,
    "cutpaste": _cutpaste,
    "scar": _scar,
    "blob": _blob,
    "stain": _stain,
}
SELF_TEXTURE_DEFECTS = ("cutpaste", "scar", "blob", "stain")
ALL_DEFECTS = DEFECTS + SELF_TEXTURE_DEFECTS  # a new kind goes last: the others' seeds stay


DEFECT_GROUPS = {"drawn": DEFECTS, "self": SELF_TEXTURE_DEFECTS, "all": ALL_DEFECTS}


def defect_kinds(names: Sequence[str]) -> tuple[str, ...]:
    """Defect kinds from names of kinds or groups (`DEFECT_GROUPS`), in the generator's
    order; an unknown name is a one-line error that lists the choices."""
    chosen: set[str] = set()
    for name in names:
        key = name.strip().lower()
        if key in DEFECT_GROUPS:
            chosen.update(DEFECT_GROUPS[key])
        elif key in ALL_DEFECTS:
            chosen.add(key)
        else:
            raise ParameterError(
                f"unknown defect kind {name!r}; choose from {', '.join(ALL_DEFECTS)} "
                f"or the groups {', '.join(DEFECT_GROUPS)}"
            )
    if not chosen:
        raise ParameterError("no defect kind given")
    return tuple(k for k in ALL_DEFECTS if k in chosen)


def paste_defect(
    image: np.ndarray, rng: np.random.Generator, kinds: Sequence[str] = DEFECTS
) -> tuple[np.ndarray, np.ndarray]:
    """A copy of `image` (H, H) or (H, H, 3), float in [0, 1], with one random defect of
    `kinds` pasted in, and its mask (H, H) bool: labelled anomalies for a method that learns
    from some (Neural Batch Sampling) when the user has none. Sizes scale with the image;
    "patch" pastes a piece of another texture."""
    if (
        image.ndim not in (2, 3)
        or image.shape[0] != image.shape[1]
        or image.shape[0] < MIN_PASTE_SIZE
    ):
        raise ValueError(
            f"paste_defect needs a square image of at least {MIN_PASTE_SIZE} px, not {image.shape}"
        )
    img = np.array(image, dtype=np.float64)
    kind = kinds[int(rng.integers(len(kinds)))]
    texture = load_texture(TEXTURES[int(rng.integers(len(TEXTURES)))])
    if min(texture.shape) < img.shape[0]:  # a larger image than the texture: enlarge it
        texture = ndimage.zoom(texture, img.shape[0] / min(texture.shape) + 1e-3, order=1)
    other = _crop(texture, img.shape[0], (0, texture.shape[1]), rng)
    if img.ndim == 3:
        other = np.repeat(other[:, :, None], img.shape[2], axis=2)
    mask = _MAKERS[kind](img, rng, other)
    return np.clip(img, 0.0, 1.0), mask


def with_synthetic_defects(
    images: np.ndarray, rng: np.random.Generator, kinds: Sequence[str] = DEFECTS
) -> tuple[np.ndarray, np.ndarray]:
    """Normal images (N, 3, S, S) float32 in [0, 1] -> each twice, as it is and then with one
    `paste_defect` defect of `kinds`, (2N, 3, S, S), with the masks (2N, S, S) float32 (zero
    for the clean copies). Labelled anomalies made from normal images only: what Neural
    Batch Sampling learns from. (`defectlens select` pastes every kind on every image
    instead: `selection.make_task`.)"""
    defective, masks = [], []
    for image in images:
        pasted, mask = paste_defect(image.transpose(1, 2, 0), rng, kinds)
        defective.append(pasted.transpose(2, 0, 1).astype(np.float32))
        masks.append(mask.astype(np.float32))
    clean = np.zeros((len(images), *images.shape[-2:]), np.float32)
    return (
        np.concatenate([images, np.stack(defective)]),
        np.concatenate([clean, np.stack(masks)]),
    )


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] (values outside are clipped) as uint8, rounded."""
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(array)).save(path)


def make_category(
    root: str | Path,
    texture: str,
    n_train: int = 60,
    n_test_good: int = 20,
    n_test_per_defect: int = 6,
    crop: int = 128,
    seed: int = 0,
    defects: Sequence[str] = DEFECTS,
) -> Path:
    """Write one texture category in MVTec layout under `root/texture`; return that folder."""
    out = Path(root) / texture
    rng = np.random.default_rng([seed, TEXTURES.index(texture)])
    image = load_texture(texture)
    others = [load_texture(t) for t in TEXTURES if t != texture]
    split = int(image.shape[1] * 0.6)
    for i in range(n_train):
        _save(_crop(image, crop, (0, split), rng), out / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        _save(
            _crop(image, crop, (split, image.shape[1]), rng), out / "test" / "good" / f"{i:03d}.png"
        )
    for defect in defects:
        for i in range(n_test_per_defect):
            img = _crop(image, crop, (split, image.shape[1]), rng)
            mask = _MAKERS[defect](img, rng, others[i % len(others)])
            _save(img, out / "test" / defect / f"{i:03d}.png")
            _save(mask.astype(np.float64), out / "ground_truth" / defect / f"{i:03d}_mask.png")
    return out


def make_dataset(root: str | Path, textures: Sequence[str] = TEXTURES, **kwargs) -> list[Path]:
    """Write every requested texture category; return their folders."""
    return [make_category(root, t, **kwargs) for t in textures]


# Sample images bundled with scikit-image whose documentation releases them into the public
# domain or under CC0: the shipped registration model is trained on these alone.
POSE_SOURCES = (
    "astronaut", "camera", "cat", "clock", "coffee", "coins", "horse", "rocket", "text",
    "cell", "microaneurysms", "immunohistochemistry", "brick", "gravel", "grass",
)  # fmt: skip


def load_sample(name: str) -> np.ndarray:
    """A scikit-image sample image as RGB float in [0, 1], centre-cropped to a square."""
    import skimage.data

    if name not in POSE_SOURCES:
        raise ValueError(f"unknown sample {name!r}; choose from {', '.join(POSE_SOURCES)}")
    image = getattr(skimage.data, name)().astype(np.float64) / 255.0
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = image[:, :, :3]
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top : top + side, left : left + side]


def make_pose_category(
    root: str | Path,
    name: str,
    n: int = 48,
    size: int = 256,
    max_angle: float = 30.0,
    max_shift: float = 0.1,
    seed: int = 0,
) -> Path:
    """One object seen in `n` poses (rotation up to `max_angle` degrees, shift up to
    `max_shift` of the side, scale 0.9-1.1, small brightness/contrast changes and noise),
    written as `root/name/train/good/NNN.png`: a category whose images differ by the pose a
    registration network learns to undo."""
    out = Path(root) / name / "train" / "good"
    rng = np.random.default_rng([seed, POSE_SOURCES.index(name)])
    image = load_sample(name)
    zoom = size / image.shape[0]
    base = np.stack([ndimage.zoom(image[:, :, c], zoom, order=1) for c in range(3)], axis=2)
    base = base[:size, :size]
    centre = (np.array(base.shape[:2]) - 1) / 2.0
    for i in range(n):
        angle = np.deg2rad(rng.uniform(-max_angle, max_angle))
        scale = rng.uniform(0.9, 1.1)
        shift = rng.uniform(-max_shift, max_shift, 2) * size
        cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
        matrix = np.array([[cos, -sin], [sin, cos]])
        offset = centre - matrix @ (centre + shift)
        posed = np.stack(
            [
                ndimage.affine_transform(base[:, :, c], matrix, offset, order=1, mode="reflect")
                for c in range(3)
            ],
            axis=2,
        )
        posed = (posed - 0.5) * rng.uniform(0.9, 1.1) + 0.5 + rng.uniform(-0.05, 0.05)
        posed = posed + rng.normal(0.0, 0.01, posed.shape)
        _save(posed, out / f"{i:03d}.png")
    return out.parent.parent
