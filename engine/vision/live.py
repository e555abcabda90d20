"""Live classification of a video stream: frames in, the latest top-k (and an optional heatmap) out.

The video arrives at 15-30 frames per second; a CPU classifies a few per second. So each frame
is passed through untouched (or with the last heatmap blended in) and a new prediction starts
only when the previous one is `every_s` old: the picture stays fluid, the bars update several
times a second, and nothing queues up. Thread-safe: frames come from the video thread, the
page reads `latest()` from its own.
"""
from __future__ import annotations

import threading
import time

import numpy as np
from PIL import Image

from engine.vision import heatmaps, inference


class Classifier:
    def __init__(self, loaded, top_k: int = 3, every_s: float = 0.2, heat: bool = False):
        self.loaded, self.top_k, self.every_s, self.heat = loaded, top_k, every_s, heat
        self._lock = threading.Lock()
        self._top: list[tuple[str, float]] = []
        self._overlay: np.ndarray | None = None
        self._last = 0.0
        self._times: list[float] = []
        self.frames = 0
        self.predictions = 0

    def process(self, rgb: np.ndarray) -> np.ndarray:
        """One video frame (H, W, 3) uint8 -> the frame to show."""
        self.frames += 1
        now = time.time()
        if now - self._last >= self.every_s:
            self._last = now
            image = Image.fromarray(rgb)
            top = inference.predict(self.loaded, [image], top_k=self.top_k)[0]
            overlay = heatmaps.explain(self.loaded, [image])[0].heat if self.heat else None
            with self._lock:
                self._top, self.predictions = top, self.predictions + 1
                self._times = (self._times + [time.time()])[-10:]
                self._overlay = overlay
        with self._lock:
            heat = self._overlay
        if heat is None:
            return rgb
        # the heat belongs to the centre crop the model sees (shorter side scaled to pp.resize, then the
        # centre pp.image_size): stretch it back over that square of the frame
        pp = self.loaded.preprocessing
        h, w = rgb.shape[:2]
        side = max(1, round(min(h, w) * pp.image_size / pp.resize))
        top, left = (h - side) // 2, (w - side) // 2
        big = np.asarray(Image.fromarray((heat * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR), np.float32) / 255
        out = rgb.copy()
        out[top:top + side, left:left + side] = heatmaps.blend(rgb[top:top + side, left:left + side], big)
        return out

    def latest(self) -> tuple[list[tuple[str, float]], float]:
        """(the latest top-k, predictions per second over the last few)."""
        with self._lock:
            t = self._times
            rate = (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else 0.0
            return list(self._top), rate
