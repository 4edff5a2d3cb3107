"""Clarity metrics on the luma (Y) plane of frames.

These two are the first of the panel: focus (variance of the Laplacian) and frame-to-frame
instability (mean absolute difference of consecutive frames). Keys match MLflow's `clarity/`.
"""

from __future__ import annotations

import numpy as np


def luma(frames: np.ndarray) -> np.ndarray:
    """(frames, H, W, 3) uint8 RGB -> (frames, H, W) float64 Y in [0, 255], BT.601 (as ffmpeg's yuv420p)."""
    rgb = frames.astype(np.float64)
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def laplacian_variance(y: np.ndarray) -> np.ndarray:
    """Per frame: variance of the 4-neighbour Laplacian over the interior pixels."""
    lap = y[:, :-2, 1:-1] + y[:, 2:, 1:-1] + y[:, 1:-1, :-2] + y[:, 1:-1, 2:] - 4.0 * y[:, 1:-1, 1:-1]
    return lap.reshape(len(y), -1).var(axis=1)


def frame_differences(y: np.ndarray) -> np.ndarray:
    """Per consecutive pair (t-1, t): mean |Y_t - Y_{t-1}|."""
    return np.abs(np.diff(y, axis=0)).reshape(len(y) - 1, -1).mean(axis=1)


def clarity_summary(frames: np.ndarray) -> dict[str, float]:
    y = luma(frames)
    sharpness = laplacian_variance(y)
    flicker = frame_differences(y) if len(y) > 1 else np.zeros(1)
    return {
        "clarity/sharpness_laplacian_var": float(sharpness.mean()),
        "clarity/flicker_mae": float(flicker.mean()),
    }
