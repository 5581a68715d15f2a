"""A procedural text-to-image world: one coloured shape on a background, with a caption.

Captions name four attributes (size, colour, shape, position), e.g. "a large red circle at the top left", so a model
must read the prompt to draw the right image, and classifier-free guidance visibly sharpens prompt following.

Factors the caption leaves free vary inside every caption, and they are what the hidden "taste"
(cgkernels.demo.reward) judges besides prompt alignment:

* the background's tint, one of `BACKGROUNDS` drawn at random (a discrete style choice, like the finish or palette
  that real preference data selects among: the base model learns to draw every tint, each about as often);
* the shape's colour saturation, the background brightness and background clutter (smooth coloured blobs).

A base model trained on this world reproduces that spread, so two samples of one prompt differ in how much they
please, and the difference is a mode the model already draws: what preference tuning can select.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

SIZES = ("small", "large")
COLOURS = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.10, 0.80, 0.15),
    "blue": (0.12, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.10),
}
SHAPES = ("circle", "square", "triangle")
# Shape centre in units of the image side.
POSITIONS = {
    "at the top left": (0.28, 0.28),
    "at the top right": (0.72, 0.28),
    "at the bottom left": (0.28, 0.72),
    "at the bottom right": (0.72, 0.72),
    "in the center": (0.5, 0.5),
}
RADIUS = {"small": 0.15, "large": 0.25}
# Background tints (RGB at brightness 1), one drawn per image; no caption names them. Similar luminance, so the
# tint changes the look, not the shape's contrast.
BACKGROUNDS = {
    "slate": (0.55, 0.62, 0.95),
    "grey": (0.75, 0.75, 0.75),
    "moss": (0.60, 0.85, 0.45),
    "rust": (0.95, 0.62, 0.50),
}  # half the shape's extent, in units of the image side


@dataclass(frozen=True)
class Scene:
    size: str
    colour: str
    shape: str
    position: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {self.position}"


def all_scenes() -> list[Scene]:
    return [Scene(*combo) for combo in itertools.product(SIZES, COLOURS, SHAPES, POSITIONS)]


def caption_words() -> list[str]:
    """The closed vocabulary of every caption (for the offline tokenizer)."""
    words = {"a"}
    for caption in (scene.caption for scene in all_scenes()):
        words.update(caption.split())
    return sorted(words)


def split_prompts(seed: int, n_eval: int) -> tuple[list[str], list[str]]:
    """(preference prompts, held-out evaluation prompts): disjoint, fixed by `seed`.

    Evaluation prompts are never used to build preference pairs or to tune anything; the base model is trained on
    the whole world (it is the "pretrained" model the preference work starts from).
    """
    captions = [scene.caption for scene in all_scenes()]
    order = np.random.default_rng(seed).permutation(len(captions))
    held_out = [captions[i] for i in order[:n_eval]]
    preference = [captions[i] for i in order[n_eval:]]
    return preference, held_out


def _shape_mask(shape: str, cx: float, cy: float, radius: float, grid: np.ndarray) -> np.ndarray:
    ys, xs = grid
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
    if shape == "square":
        half = radius * 0.85  # same visual area as the circle, roughly
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    if shape == "triangle":  # upward, apex at the top
        top, bottom = cy - radius, cy + radius * 0.8
        inside_height = (ys >= top) & (ys <= bottom)
        half_width = (ys - top) / (bottom - top) * radius
        return inside_height & (np.abs(xs - cx) <= half_width)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: Scene, rng: np.random.Generator, resolution: int = 32, supersample: int = 4) -> np.ndarray:
    """Render one image as float32 [H, W, 3] in [0, 1] (anti-aliased by supersampling)."""
    side = resolution * supersample
    coords = (np.arange(side, dtype=np.float32) + 0.5) / side
    grid = np.meshgrid(coords, coords, indexing="ij")

    # Background: a tinted level plus smooth coloured clutter (low-resolution noise, bilinearly upsampled).
    tint = np.asarray(list(BACKGROUNDS.values())[rng.integers(len(BACKGROUNDS))], dtype=np.float32)
    level = tint * rng.uniform(0.2, 0.6)
    clutter_amount = rng.uniform(0.0, 0.3)
    coarse = rng.uniform(-1.0, 1.0, size=(5, 5, 3)).astype(np.float32)
    clutter = _upsample_bilinear(coarse, side) * clutter_amount
    image = np.clip(level + clutter, 0.0, 1.0)

    # Foreground: the named colour, desaturated towards its own luminance by a random amount.
    colour = np.asarray(COLOURS[scene.colour], dtype=np.float32)
    saturation = rng.uniform(0.3, 1.0)
    luminance = colour @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    colour = luminance + saturation * (colour - luminance)

    cx, cy = POSITIONS[scene.position]
    jitter = 0.05
    cx, cy = cx + rng.uniform(-jitter, jitter), cy + rng.uniform(-jitter, jitter)
    radius = RADIUS[scene.size] * rng.uniform(0.85, 1.15)
    mask = _shape_mask(scene.shape, cx, cy, radius, grid)
    image[mask] = colour

    image = image.reshape(resolution, supersample, resolution, supersample, 3).mean(axis=(1, 3))
    return image.astype(np.float32)


def _upsample_bilinear(coarse: np.ndarray, side: int) -> np.ndarray:
    n = coarse.shape[0]
    pos = np.linspace(0, n - 1, side, dtype=np.float32)
    lo = np.floor(pos).astype(int).clip(0, n - 2)
    frac = (pos - lo)[:, None]
    rows = coarse[lo] * (1 - frac[..., None]) + coarse[lo + 1] * frac[..., None]  # [side, n, 3]
    cols = rows[:, lo] * (1 - frac.T[..., None]) + rows[:, lo + 1] * frac.T[..., None]
    return cols


def make_dataset(n_images: int, seed: int, resolution: int = 32) -> tuple[np.ndarray, list[str]]:
    """`n_images` random scenes: uint8 images [N, H, W, 3] and their captions. Deterministic given `seed`."""
    rng = np.random.default_rng(seed)
    scenes = all_scenes()
    picks = rng.integers(0, len(scenes), size=n_images)
    images = np.empty((n_images, resolution, resolution, 3), dtype=np.uint8)
    captions = []
    for i, pick in enumerate(picks):
        images[i] = np.round(render(scenes[pick], rng, resolution) * 255).astype(np.uint8)
        captions.append(scenes[pick].caption)
    return images, captions
