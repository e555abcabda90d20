"""Formula-generated images: colour IFS fractals (pretraining) and coloured shapes (probes, benchmarks, tests).

Fractals follow FractalDB (Kataoka et al. 2020): a *class* is one iterated function system (IFS),
2-4 random contractive affine maps  x -> A x + b. Its attractor is drawn with the "chaos game":
start many points, repeatedly apply a randomly chosen map (chosen with probability ~ |det A|),
and splat the visited points into the image. Images of one class share the maps (the shape) and
differ in small parameter jitter, rotation, flip, scale, palette and background, so the network
has to learn geometry, not colour. Everything is numpy and deterministic from the seed.

Shapes: circles/squares/triangles/... in random colours, sizes and positions on random
backgrounds; the class is the shape. A small held-out task nothing was pretrained on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

MAX_MAPS = 4


# ----------------------------------------------------------------------------- IFS systems
def _random_map(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One affine map with singular values in a range that gives detailed, non-degenerate attractors."""
    # A = R(theta) diag(s1, s2 * sign) R(phi): control the contraction directly through the singular values.
    s1 = rng.uniform(0.35, 0.9)
    s2 = rng.uniform(0.15, s1)
    t, p = rng.uniform(0, 2 * np.pi, size=2)
    rot = lambda a: np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])  # noqa: E731
    flip = np.diag([1.0, rng.choice([-1.0, 1.0])])
    A = rot(t) @ np.diag([s1, s2]) @ flip @ rot(p)
    b = rng.uniform(-1, 1, size=2)
    return A, b


def random_system(rng: np.random.Generator) -> dict:
    """A class: n maps (2..4), padded to MAX_MAPS with zero-probability maps."""
    n = int(rng.integers(2, MAX_MAPS + 1))
    A = np.zeros((MAX_MAPS, 2, 2))
    b = np.zeros((MAX_MAPS, 2))
    for i in range(n):
        A[i], b[i] = _random_map(rng)
    det = np.abs(np.linalg.det(A[:n]))
    p = np.zeros(MAX_MAPS)
    p[:n] = det / det.sum()
    return {"A": A, "b": b, "p": p, "n": n}


def _coverage(system: dict, rng: np.random.Generator) -> float:
    """Fraction of a 32x32 grid the attractor touches (rejects systems that collapse to a line/point)."""
    img = render_batch([system], size=32, rng=rng, colour=False)[0]
    return float((img > 0).mean())


def make_systems(n_classes: int, seed: int) -> list[dict]:
    """n_classes distinct IFS systems, deterministic from the seed."""
    rng = np.random.default_rng([seed, 7919])
    systems = []
    while len(systems) < n_classes:
        s = random_system(rng)
        if 0.08 < _coverage(s, rng) < 0.7:
            systems.append(s)
    return systems


# ----------------------------------------------------------------------------- rendering
def render_batch(systems: list[dict], size: int, rng: np.random.Generator, colour: bool = True,
                 jitter: float = 0.0, chains: int = 384, iters: int = 34, burn: int = 6,
                 hue: np.ndarray | None = None, background: np.ndarray | None = None,
                 scale: np.ndarray | None = None) -> np.ndarray:
    """Render one image per system with the chaos game, vectorised over images and chains.

    Returns uint8 (B, size, size, 3) if colour else float coverage counts (B, size, size).
    Optional per image: `hue` (palette around that hue instead of random colours), `background`
    (float (B, size, size, 3) in [0,1] to draw on) and `scale` (fraction of the frame the
    attractor spans, placed at a random position).
    """
    B = len(systems)
    A = np.stack([s["A"] for s in systems])  # (B, 4, 2, 2)
    b = np.stack([s["b"] for s in systems])  # (B, 4, 2)
    p = np.stack([s["p"] for s in systems])  # (B, 4)
    if jitter:
        # intra-class variation: scale each map's parameters a little (FractalDB's "weights")
        A = A * (1 + jitter * rng.uniform(-1, 1, size=(B, MAX_MAPS, 1, 1)))
        b = b + jitter * rng.uniform(-1, 1, size=b.shape)
    cum = np.cumsum(p, axis=1)
    cum[:, -1] = 1.0 + 1e-9
    # one row of 6 numbers per map (a00 a01 a10 a11 b0 b1): a single gather per step
    M = np.concatenate([A.reshape(B, MAX_MAPS, 4), b], axis=-1).astype(np.float32)
    x0, x1 = rng.uniform(-1, 1, size=(2, B, chains)).astype(np.float32)
    pts, which = [], []
    rows = np.arange(B)[:, None]
    for t in range(iters):
        k = (rng.random((B, chains, 1), dtype=np.float32) > cum[:, None, :]).sum(-1)  # map index per point (B, chains)
        m = M[rows, k]  # (B, chains, 6)
        x0, x1 = m[..., 0] * x0 + m[..., 1] * x1 + m[..., 4], m[..., 2] * x0 + m[..., 3] * x1 + m[..., 5]
        if t >= burn:
            pts.append(np.stack([x0, x1], -1))
            which.append(k)
    P = np.stack(pts, 1).reshape(B, -1, 2).astype(np.float64)  # (B, N, 2)
    K = np.stack(which, 1).reshape(B, -1)
    if colour:
        # random rotation / flip of the whole attractor (per image)
        ang = rng.uniform(0, 2 * np.pi, size=B)
        R = np.stack([np.cos(ang), -np.sin(ang), np.sin(ang), np.cos(ang)], -1).reshape(B, 2, 2)
        R[:, :, 0] *= rng.choice([-1.0, 1.0], size=(B, 1))
        P = np.einsum("bij,bnj->bni", R, P)
    # fit the attractor in the frame (robust bounds), with a random margin
    sub = P[:, :: max(1, P.shape[1] // 2048)]  # robust bounds from a subsample (quantiles sort)
    lo = np.quantile(sub, 0.005, axis=1, keepdims=True)
    hi = np.quantile(sub, 0.995, axis=1, keepdims=True)
    span = (hi - lo).max(-1, keepdims=True) + 1e-6
    margin = rng.uniform(0.05, 0.2, size=(B, 1, 1)) if colour else 0.05
    centre = (lo + hi) / 2
    if scale is None:
        uv = (P - centre) / span * (1 - 2 * margin) + 0.5  # in [0, 1]
    else:
        sc = np.asarray(scale, dtype=np.float64).reshape(B, 1, 1)
        offset = sc / 2 + rng.uniform(0, 1, size=(B, 1, 2)) * (1 - sc)  # anywhere it fits
        uv = (P - centre) / span * sc + offset
    ij = np.clip((uv * size).astype(np.int64), 0, size - 1)
    flat = rows * size * size + ij[..., 1] * size + ij[..., 0]  # (B, N)
    counts = np.bincount(flat.ravel(), minlength=B * size * size).reshape(B, size, size).astype(np.float32)
    if not colour:
        return counts
    # colour each point by the map that placed it: a random palette per image
    if hue is None:
        pal = rng.uniform(0, 1, size=(B, MAX_MAPS, 3))
    else:  # colours near one hue per image (the hue is a learnable property of the image)
        h = (np.asarray(hue).reshape(B, 1) + rng.normal(0, 0.03, size=(B, MAX_MAPS))) % 1.0
        pal = hsv_to_rgb(h, rng.uniform(0.55, 1.0, size=(B, MAX_MAPS)), rng.uniform(0.65, 1.0, size=(B, MAX_MAPS)))
    cols = pal[rows, K]  # (B, N, 3)
    img = np.zeros((B * size * size, 3), np.float32)
    for c in range(3):
        img[:, c] = np.bincount(flat.ravel(), weights=cols[..., c].ravel(), minlength=B * size * size)
    img = img.reshape(B, size, size, 3) / np.maximum(counts, 1)[..., None]
    # density -> opacity; bright points on a random (mostly dark) background
    alpha = 1 - np.exp(-counts / rng.uniform(1.0, 4.0, size=(B, 1, 1)))
    if background is None:
        bg = rng.uniform(0, 1, size=(B, 1, 1, 3)) * rng.choice([0.25, 1.0], size=(B, 1, 1, 1), p=[0.7, 0.3])
    else:
        bg = background
    out = bg * (1 - alpha[..., None]) + img * alpha[..., None]
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, all in [0, 1]; returns shape h.shape + (3,)."""
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    choices = [np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]
    out = np.zeros(h.shape + (3,))
    for k in range(6):
        out = np.where((i == k)[..., None], choices[k], out)
    return out


def clutter(batch: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Busy backgrounds, float (B, size, size, 3) in [0,1]: a colour gradient, a few soft blobs, noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(0, 1, size=(2, batch, 1, 1, 3)) * rng.uniform(0.2, 1.0, size=(2, batch, 1, 1, 1))
    ang = rng.uniform(0, 2 * np.pi, size=(batch, 1, 1, 1))
    t = ((np.cos(ang) * x[None, ..., None] + np.sin(ang) * y[None, ..., None]) + 1.5) / 3
    bg = c0 * (1 - t) + c1 * t
    for _ in range(3):
        on = rng.random((batch, 1, 1, 1)) < 0.6
        cx, cy = rng.uniform(0, 1, size=(2, batch, 1, 1, 1))
        r = rng.uniform(0.1, 0.35, size=(batch, 1, 1, 1))
        d = np.sqrt((x[None, ..., None] - cx) ** 2 + (y[None, ..., None] - cy) ** 2)
        a = on * rng.uniform(0.2, 0.6, size=(batch, 1, 1, 1)) * np.clip((r - d) / (0.3 * r) + 0.5, 0, 1)
        bg = bg * (1 - a) + rng.uniform(0, 1, size=(batch, 1, 1, 3)) * a
    bg = bg + rng.normal(0, rng.uniform(0, 0.05), size=bg.shape)
    return np.clip(bg, 0, 1)


def pretrain_fractals(systems: list[dict], batch: int, size: int, rng: np.random.Generator,
                      hue_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fractals as the mini backbone sees them in pretraining: any scale and position, on cluttered
    backgrounds, coloured around one hue. Returns (uint8 images, class labels, hue-bin labels)."""
    labels = rng.integers(0, len(systems), size=batch)
    hue = rng.uniform(0, 1, size=batch)
    imgs = render_batch([systems[i] for i in labels], size=size, rng=rng, jitter=0.08, hue=hue,
                        background=clutter(batch, size, rng), scale=rng.uniform(0.35, 0.95, size=batch))
    return imgs, labels.astype(np.int64), np.floor(hue * hue_bins).astype(np.int64)


def fractal_batch(systems: list[dict], batch: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random batch: labels uniform over the systems; returns (uint8 images (B,H,W,3), int64 labels)."""
    labels = rng.integers(0, len(systems), size=batch)
    imgs = render_batch([systems[i] for i in labels], size=size, rng=rng, jitter=0.08)
    return imgs, labels.astype(np.int64)


# ----------------------------------------------------------------------------- coloured shapes
SHAPES = ("circle", "square", "triangle", "cross", "ring")


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, ang: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    c, s = np.cos(ang), np.sin(ang)
    u, v = c * dx + s * dy, -s * dx + c * dy  # rotated coordinates
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if shape == "square":
        return (np.abs(u) <= 0.8 * r) & (np.abs(v) <= 0.8 * r)
    if shape == "cross":
        return ((np.abs(u) <= 0.3 * r) & (np.abs(v) <= r)) | ((np.abs(v) <= 0.3 * r) & (np.abs(u) <= r))
    if shape == "triangle":
        # equilateral triangle: inside all three half-planes
        ok = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = ang + k * 2 * np.pi / 3
            ok &= (np.cos(a) * dx + np.sin(a) * dy) <= 0.5 * r
        return ok
    raise ValueError(shape)


def shape_images(shape: str, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """n uint8 images (n, size, size, 3) of one shape, random colour/size/position/background/noise."""
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        r = rng.uniform(0.18, 0.32) * size
        cx, cy = rng.uniform(r, size - r, size=2)
        bg, fg = rng.uniform(0, 1, size=3), rng.uniform(0, 1, size=3)
        while np.abs(bg - fg).sum() < 0.6:  # keep the shape visible
            fg = rng.uniform(0, 1, size=3)
        m = _shape_mask(shape, size, cx, cy, r, rng.uniform(0, 2 * np.pi))[..., None]
        img = np.where(m, fg, bg) + rng.normal(0, 0.04, size=(size, size, 3))
        out[i] = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return out


def write_shapes_dataset(folder: Path, n_per_class: int, size: int = 64, seed: int = 0,
                         shapes: tuple[str, ...] = SHAPES[:3]) -> Path:
    """A folder of class subfolders of PNGs (the format the app imports); returns the folder."""
    from PIL import Image

    folder = Path(folder)
    rng = np.random.default_rng([seed, 31337])
    for shape in shapes:
        d = folder / shape
        d.mkdir(parents=True, exist_ok=True)
        for i, arr in enumerate(shape_images(shape, n_per_class, size, rng)):
            Image.fromarray(arr).save(d / f"{shape}_{i:04d}.png")
    return folder
