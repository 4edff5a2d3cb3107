"""The shapes world: procedural clips of one shape moving over a plain background, and a detector.

`framecast-shapes` (configs/models/framecast-shapes.yaml) is a small CogVideoX trained on this
world (tools/train_shapes.py), so that framecast makes videos with content where no real weights
can be downloaded. Prompts follow one grammar:

    a {color} {shape} moving {direction} on a {background} background

`render` draws a clip of a prompt (numpy, seeded: the same seed gives the same clip), and
`detect` reads a clip back into the grammar's terms (color by hue and saturation, shape by the
width profile and fill of its bounding box, direction by the centroid's track). `adherence` compares the two: the
metric the clarity panel records for this model (`adherence/color`, `/shape`, `/direction`,
`/score`). The detector is tested on rendered ground truth (tests/test_shapes.py).
"""

from __future__ import annotations

import colorsys
import itertools
import re
from dataclasses import dataclass

import numpy as np

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y grows downward
BACKGROUNDS = {"black": (0, 0, 0), "gray": (128, 128, 128)}

FRAMES = 17
SIZE = 64  # height and width in pixels
# The ranges are narrow on purpose. A model trained for 90 minutes on 2 CPU cores draws close to
# the mean of a prompt's clips. With the shape anywhere in the frame (the first ranges: half-size
# 9-13, speed 1-2, any start) the mean clip reads as the prompt's shape for 18 of 40 prompts, and
# the model drew the held-out shapes right 10% of the time. With these, the mean clip reads right
# for 40 of 40 (48 clips each), and the same recipe's model for 50% (docs/models.md).
HALF_SIZE = (11.0, 13.0)  # the shape's half extent (circle radius, half the square's side), pixels
SPEED = (1.25, 1.75)  # pixels per frame
ACROSS_JITTER = 6.0  # pixels the path may lie off the frame's centre line, across the motion
ALONG_JITTER = 4.0  # pixels the path's midpoint may lie off the frame's centre, along the motion
SUPERSAMPLE = 4  # coverage is measured on a 4x finer grid, so edges are anti-aliased

GRAMMAR = (
    f"a {{{','.join(COLORS)}}} {{{','.join(SHAPES)}}} moving {{{','.join(DIRECTIONS)}}} "
    f"on a {{{','.join(BACKGROUNDS)}}} background"
)
PROMPT = re.compile(
    r"^a (?P<color>\w+) (?P<shape>\w+) moving (?P<direction>\w+) on a (?P<background>\w+) background$"
)

# Held out of training: every yellow triangle, the white square moving up, and two more.
HELD_OUT = tuple(
    [("yellow", "triangle", d, b) for d in DIRECTIONS for b in BACKGROUNDS]
    + [("white", "square", "up", b) for b in BACKGROUNDS]
    + [("green", "circle", "left", "gray"), ("blue", "square", "down", "black")]
)


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    direction: str
    background: str

    @property
    def prompt(self) -> str:
        return f"a {self.color} {self.shape} moving {self.direction} on a {self.background} background"

    @property
    def held_out(self) -> bool:
        return (self.color, self.shape, self.direction, self.background) in HELD_OUT


def all_scenes() -> list[Scene]:
    """Every prompt of the grammar (120), in a fixed order."""
    return [Scene(*terms) for terms in itertools.product(COLORS, SHAPES, DIRECTIONS, BACKGROUNDS)]


def parse_prompt(prompt: str) -> Scene | None:
    """The scene a prompt names, or None when it is not a sentence of the grammar."""
    match = PROMPT.match(" ".join(prompt.lower().split()))
    if not match:
        return None
    scene = Scene(**match.groupdict())
    known = (COLORS, SHAPES, DIRECTIONS, BACKGROUNDS)
    return scene if all(term in vocab for term, vocab in zip(match.groups(), known, strict=True)) else None


def shape_mask(shape: str, cx: float, cy: float, half: float, size: int = SIZE) -> np.ndarray:
    """Coverage (0..1) of a shape centred at (cx, cy) on a size x size grid, anti-aliased."""
    mask = np.zeros((size, size))
    # Only the pixels around the shape are measured on the finer grid.
    x0, x1 = max(int(cx - half) - 1, 0), min(int(cx + half) + 2, size)
    y0, y1 = max(int(cy - half) - 1, 0), min(int(cy + half) + 2, size)
    xs = x0 + (np.arange((x1 - x0) * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    ys = y0 + (np.arange((y1 - y0) * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    dx, dy = xs[None, :] - cx, ys[:, None] - cy
    if shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "triangle":  # apex up, base down, as wide as it is tall
        inside = (dy <= half) & (dy >= -half) & (np.abs(dx) <= (dy + half) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mask[y0:y1, x0:x1] = inside.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))
    return mask


def render(scene: Scene, seed: int, frames: int = FRAMES, size: int = SIZE) -> np.ndarray:
    """A clip of the scene as uint8 (frames, size, size, 3). Size, speed and the path's position are
    drawn from the seed within fixed ranges: the path runs through the frame's centre, give or take
    ALONG_JITTER and ACROSS_JITTER pixels, and the shape stays wholly inside every frame."""
    rng = np.random.default_rng(seed)
    half = rng.uniform(*HALF_SIZE)
    speed = rng.uniform(*SPEED)
    travel = speed * (frames - 1)
    dx, dy = DIRECTIONS[scene.direction]
    start = []
    for step in (dx, dy):
        if step == 0:
            start.append(size / 2 + rng.uniform(-ACROSS_JITTER, ACROSS_JITTER))
        else:  # the path's midpoint near the centre, so it starts half its travel behind
            start.append(size / 2 - step * travel / 2 + rng.uniform(-ALONG_JITTER, ALONG_JITTER))
    color = np.array(COLORS[scene.color], np.float32)
    background = np.array(BACKGROUNDS[scene.background], np.float32)
    clip = np.empty((frames, size, size, 3), np.uint8)
    for f in range(frames):
        cover = shape_mask(scene.shape, start[0] + dx * speed * f, start[1] + dy * speed * f, half, size)[..., None]
        clip[f] = np.round(background + cover * (color - background)).astype(np.uint8)
    return clip


@dataclass(frozen=True)
class Detection:
    """What the detector read from a clip; None where it found nothing it could name."""

    color: str | None
    shape: str | None
    direction: str | None
    found_frames: int


MIN_DISTANCE = 60.0  # RGB distance from the background that counts as the object
MIN_AREA = 12  # pixels: smaller blobs are not an object
MIN_TRAVEL = 3.0  # pixels the centroid must move, first to last, to have a direction


def _object(frame: np.ndarray) -> np.ndarray | None:
    """The largest connected region that differs from the background (the frame's median colour)."""
    import cv2

    pixels = frame.reshape(-1, 3).astype(np.float32)
    background = np.median(pixels, axis=0)
    distance = np.linalg.norm(frame.astype(np.float32) - background, axis=-1)
    count, labels, stats, _ = cv2.connectedComponentsWithStats((distance > MIN_DISTANCE).astype(np.uint8), 8)
    if count < 2:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[largest, cv2.CC_STAT_AREA] < MIN_AREA:
        return None
    return labels == largest


def _color(pixels: np.ndarray) -> str:
    """Name the mean colour of the object's pixels by hue, or white by low saturation."""
    r, g, b = (np.median(pixels, axis=0) / 255.0).tolist()
    hue, saturation, value = colorsys.rgb_to_hsv(r, g, b)
    if saturation < 0.3:
        return "white"
    hue *= 360
    if hue < 25 or hue >= 320:
        return "red"
    if hue < 80:
        return "yellow"
    if hue < 170:
        return "green"
    return "blue"


# Shape by two measures of the object's bounding box, chosen to hold on soft, rounded edges (a
# VAE's reconstruction) as well as on sharp ones. A triangle (apex up) is half as wide a quarter
# down from its top as a quarter up from its bottom (ground truth: 0.35; blurred: up to 0.75);
# circles and squares are about as wide (0.84 and more). A square fills its box (ground truth
# 1.0, rounded: 0.83 and more), a circle pi/4 (0.78, blurred: up to 0.83).
TRIANGLE_BELOW = 0.8  # width a quarter from the top / a quarter from the bottom
SQUARE_ABOVE = 0.84  # the mask's share of its bounding box


def _shape(mask: np.ndarray) -> str:
    """Triangle, square or circle, from the mask's width profile and how much of its box it fills."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h = len(box)
    widths = box.sum(axis=1)
    top = widths[int(0.15 * h) : max(int(0.35 * h), int(0.15 * h) + 1)].mean()
    bottom = widths[int(0.65 * h) : max(int(0.85 * h), int(0.65 * h) + 1)].mean()
    if top / bottom < TRIANGLE_BELOW:
        return "triangle"
    return "square" if box.mean() > SQUARE_ABOVE else "circle"


def detect(clip: np.ndarray) -> Detection:
    """Read colour, shape and direction from a clip (frames, height, width, 3) of uint8 RGB.
    Colour and shape are voted over the frames where an object is found; direction is the
    dominant axis and sign of the centroid's travel from its first to its last sighting."""
    colors, shapes, centroids = [], [], []
    for frame in clip:
        mask = _object(frame)
        if mask is None:
            continue
        colors.append(_color(frame[mask].astype(np.float32)))
        shapes.append(_shape(mask))
        ys, xs = np.nonzero(mask)
        centroids.append((xs.mean(), ys.mean()))
    if not centroids:
        return Detection(None, None, None, 0)
    direction = None
    if len(centroids) >= 2:
        dx, dy = np.subtract(centroids[-1], centroids[0])
        if max(abs(dx), abs(dy)) >= MIN_TRAVEL:
            if abs(dx) >= abs(dy):
                direction = "right" if dx > 0 else "left"
            else:
                direction = "down" if dy > 0 else "up"
    return Detection(_vote(colors), _vote(shapes), direction, len(centroids))


def _vote(names: list[str]) -> str:
    values, counts = np.unique(names, return_counts=True)
    return str(values[int(np.argmax(counts))])


def adherence(prompt: str, clip: np.ndarray) -> dict[str, float] | None:
    """How well a clip follows its prompt: 0 or 1 for colour, shape and direction, and their mean
    as `score`. None when the prompt is not a sentence of the shapes grammar (nothing to check)."""
    scene = parse_prompt(prompt)
    if scene is None:
        return None
    found = detect(clip)
    scores = {
        "color": float(found.color == scene.color),
        "shape": float(found.shape == scene.shape),
        "direction": float(found.direction == scene.direction),
    }
    return {**scores, "score": sum(scores.values()) / 3}
