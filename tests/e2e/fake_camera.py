"""A fake camera for Chromium: a Y4M video (`--use-file-for-fake-video-capture`) that shows one image,
then another, each for `seconds`, looping."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_y4m(images: list[Path], out: Path, size: int = 160, fps: int = 10, seconds: float = 2.0) -> Path:
    frames = []
    for path in images:
        rgb = np.asarray(Image.open(path).convert("RGB").resize((size, size)), np.float32)
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        y = 0.299 * r + 0.587 * g + 0.114 * b  # BT.601 full range, as C420jpeg means
        u = (b - y) * 0.564 + 128
        v = (r - y) * 0.713 + 128
        sub = lambda c: c.reshape(size // 2, 2, size // 2, 2).mean((1, 3))  # noqa: E731 - 4:2:0 chroma
        planes = b"".join(np.clip(p, 0, 255).astype(np.uint8).tobytes() for p in (y, sub(u), sub(v)))
        frames += [planes] * int(fps * seconds)
    with open(out, "wb") as f:
        f.write(f"YUV4MPEG2 W{size} H{size} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for planes in frames:
            f.write(b"FRAME\n" + planes)
    return out
