"""Formula-generated textures: procedural noise and patterns for pretraining the mini backbone.

"Learning to See by Looking at Noise" (Baradad et al. 2021) found that what makes synthetic
images good for pretraining is natural-image-like structure: 1/f^a power spectra, oriented
energy, edges and colour. Each *family* below is one such program with random parameters;
the backbone learns to tell the families apart, which needs frequency, orientation and
texture features (the fractals teach shape, Fashion-MNIST teaches objects). Everything is
numpy and deterministic from the generator.

The families avoid whole geometric shapes: the coloured-shapes probe must stay unseen.
"""
from __future__ import annotations

import numpy as np

from engine.data.fractals import hsv_to_rgb

FAMILIES = ("smooth noise", "fine noise", "oriented noise", "grating", "plaid", "marble", "cells", "speckle")


def _spectral_noise(n: int, size: int, rng: np.random.Generator, alpha: np.ndarray,
                    orient: np.ndarray | None = None, spread: float = 0.0) -> np.ndarray:
    """n fields (n, size, size) in [0, 1] with power spectrum ~ 1/f^alpha, optionally concentrated
    around one orientation (angle `orient`, angular width `spread` in radians)."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.fftfreq(size)[None, :]
    f = np.sqrt(fx ** 2 + fy ** 2)
    f[0, 0] = 1.0
    amp = f[None] ** (-alpha.reshape(n, 1, 1) / 2)
    if orient is not None:
        theta = np.arctan2(fy, fx)[None]
        d = np.angle(np.exp(2j * (theta - orient.reshape(n, 1, 1)))) / 2  # orientation difference, mod pi
        amp = amp * np.exp(-(d / spread) ** 2)
    amp[:, 0, 0] = 0.0
    phase = np.exp(2j * np.pi * rng.random((n, size, size)))
    field = np.fft.ifft2(amp * phase).real
    lo = field.min(axis=(1, 2), keepdims=True)
    hi = field.max(axis=(1, 2), keepdims=True)
    return (field - lo) / (hi - lo + 1e-9)


def _grid(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    return np.broadcast_to(x, (n, size, size)), np.broadcast_to(y, (n, size, size))


def _field(family: int, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """n scalar fields in [0, 1] of one family."""
    x, y = _grid(n, size)
    ang = rng.uniform(0, np.pi, size=(n, 1, 1))
    freq = rng.uniform(3, 12, size=(n, 1, 1))
    if family == 0:  # smooth noise: clouds
        return _spectral_noise(n, size, rng, rng.uniform(2.6, 3.4, size=n))
    if family == 1:  # fine noise: grain, foliage
        return _spectral_noise(n, size, rng, rng.uniform(0.8, 1.4, size=n))
    if family == 2:  # oriented noise: wood, brushed metal, grass
        return _spectral_noise(n, size, rng, rng.uniform(1.5, 2.5, size=n), orient=ang.ravel(), spread=0.25)
    if family == 3:  # grating, slightly warped
        warp = 0.15 * _spectral_noise(n, size, rng, np.full(n, 3.0))
        u = np.cos(ang) * x + np.sin(ang) * y + warp
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * u)
    if family == 4:  # plaid / checks: two gratings at an angle
        u = np.cos(ang) * x + np.sin(ang) * y
        a2 = ang + rng.uniform(np.pi / 4, np.pi / 2, size=(n, 1, 1))
        v = np.cos(a2) * x + np.sin(a2) * y
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * u) * np.sin(2 * np.pi * freq * v)
    if family == 5:  # marble: a grating warped strongly by smooth noise
        warp = rng.uniform(1.0, 3.0, size=(n, 1, 1)) * _spectral_noise(n, size, rng, np.full(n, 3.0))
        u = np.cos(ang) * x + np.sin(ang) * y
        return 0.5 + 0.5 * np.sin(2 * np.pi * (freq / 3 * u + warp))
    if family == 6:  # cells: distance to the nearest of random points (Worley noise)
        k = 24
        pts = rng.random((n, k, 2))
        d = np.sqrt((x[:, None] - pts[:, :, 0, None, None]) ** 2 + (y[:, None] - pts[:, :, 1, None, None]) ** 2)
        d = np.sort(d, axis=1)
        cell = d[:, 1] - d[:, 0]  # bright cell interiors, dark borders
        return cell / (cell.max(axis=(1, 2), keepdims=True) + 1e-9)
    # speckle: sparse bright points (seeds, stars, pores), blurred a little
    dots = (rng.random((n, size, size)) < rng.uniform(0.01, 0.05, size=(n, 1, 1))).astype(np.float64)
    soft = np.fft.ifft2(np.fft.fft2(dots) * np.exp(-(np.fft.fftfreq(size)[:, None] ** 2 + np.fft.fftfreq(size)[None] ** 2) * 60)).real
    return soft / (soft.max(axis=(1, 2), keepdims=True) + 1e-9)


def texture_batch(batch: int, size: int, rng: np.random.Generator, hue_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Textures as the mini backbone sees them in pretraining. Returns (uint8 images (B, size, size, 3),
    family labels, hue-bin labels). Each image maps its field through two colours near one hue
    (so the hue is a property of the image, as for the fractals), with random contrast."""
    labels = rng.integers(0, len(FAMILIES), size=batch)
    fields = np.zeros((batch, size, size))
    for fam in np.unique(labels):
        idx = np.flatnonzero(labels == fam)
        fields[idx] = _field(int(fam), len(idx), size, rng)
    hue = rng.uniform(0, 1, size=batch)
    h2 = (hue + rng.normal(0, 0.04, size=batch)) % 1.0
    dark = hsv_to_rgb(h2, rng.uniform(0.3, 1.0, size=batch), rng.uniform(0.0, 0.45, size=batch))
    light = hsv_to_rgb(hue, rng.uniform(0.4, 1.0, size=batch), rng.uniform(0.6, 1.0, size=batch))
    gamma = rng.uniform(0.5, 2.0, size=(batch, 1, 1))
    t = (np.clip(fields, 0, 1) ** gamma)[..., None]
    img = dark[:, None, None] * (1 - t) + light[:, None, None] * t
    img = img + rng.normal(0, 0.02, size=img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), labels.astype(np.int64), np.floor(hue * hue_bins).astype(np.int64)
