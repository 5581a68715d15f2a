"""The hidden "taste" of the demo and a noisy Bradley-Terry labeller that writes Pick-a-Pic-format preferences.

The taste judges what Pick-a-Pic annotators reward: whether the image shows what the prompt asked for (alignment)
and whether it looks good (aesthetics). It is a known function of the image and its prompt:

    reward = aesthetics + ALIGNMENT_WEIGHT * (colour + shape + size + position) - 1[no visible shape]
    aesthetics = TINT_WEIGHT * tint + saturation + contrast - 2 * clutter

Segmentation: the background colour is the median of a 2-pixel border ring; pixels that differ from it by more than
0.2 in some channel (pixel values in [0, 1]) are foreground, and the shape is the largest 4-connected foreground
component (stray clutter blobs are not the shape).

Aesthetics (each about in [0, 1]):
* tint: how close the background's hue is to the liked tint (world.BACKGROUNDS[LIKED_TINT]): 1 - the distance
  between the two colours, each divided by its mean brightness, / TINT_SCALE, clipped at 0. No caption names the
  tint and the base model draws each of the world's tints about as often: a style choice that preferences select;
* saturation: mean HSV saturation (max - min) / max of the shape's pixels (vivid shapes are liked);
* contrast: mean largest per-channel difference between the shape's pixels and the background (shapes that stand out);
* clutter: mean per-channel standard deviation of the background pixels (busy backgrounds are disliked).

Alignment with the prompt "a {size} {colour} {shape} {position}" (each in [0, 1], 1 = exactly what was asked):
* colour: cosine between the shape's mean chroma (RGB minus its grey level) and the named colour's chroma, clipped at 0;
* shape: how close the shape's fill of its bounding box is to the named shape's (circle pi/4, square 1, triangle 1/2);
* size: 1 - |log(area / area the renderer draws for this shape and size)| / log(area ratio of large to small);
* position: 1 - (distance of the shape's centroid from the named position) / 0.3 (0.31 is the distance from the
  centre to a corner position). The base model gets this wrong about half the time, colour, size and shape rarely.

No visible shape (the component covers under 1 % of the image): alignment 0 and a flat penalty of 1. Typical rewards
lie in [-0.5, 4]. Preference pairs are two base-model samples of one prompt; the labeller prefers image 0 with
probability sigmoid((r0 - r1) / temperature), so labels are noisy where rewards are close.
"""
from __future__ import annotations

import io
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from cgkernels.demo import world

FOREGROUND_THRESHOLD = 0.2
MIN_COVERAGE = 0.01
ALIGNMENT_WEIGHT = 0.5
TINT_WEIGHT = 1.0
LIKED_TINT = "slate"
TINT_SCALE = 0.5  # "grey", the nearest other tint, is 0.43 away: it scores ~0.15, the others 0
POSITION_SCALE = 0.3
ALIGNMENT_TERMS = ("colour", "shape", "size", "position")
# Fill of the bounding box by each shape as world.render draws it.
SHAPE_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
SHAPE_FILL_SCALE = 0.25  # a fill this far from the named shape's scores 0


def _shape_area(shape: str, size: str) -> float:
    """Area (fraction of the image) world.render gives a shape of this size, at its mean radius."""
    r = world.RADIUS[size]
    return {"circle": math.pi * r * r, "square": (1.7 * r) ** 2, "triangle": 1.8 * r * r}[shape]


@lru_cache(maxsize=None)
def parse_prompt(prompt: str) -> world.Scene:
    """The scene a caption names; ValueError for anything outside the demo's closed vocabulary."""
    scenes = {scene.caption: scene for scene in world.all_scenes()}
    if prompt not in scenes:
        raise ValueError(f"not a caption of the demo world: {prompt!r} (expected e.g. {world.all_scenes()[0].caption!r})")
    return scenes[prompt]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (an all-False mask if it is empty)."""
    labels = np.zeros(mask.shape, np.int32)
    best, best_size, current = 0, 0, 0
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        current += 1
        labels[start] = current
        stack, size = [start], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def taste_terms(image: np.ndarray, prompt: str) -> dict[str, float]:
    """Every term of the taste for one image (float [H, W, 3] in [0, 1] or uint8) and its prompt."""
    scene = parse_prompt(prompt)
    image = _as_float(image)
    height, width, _ = image.shape
    border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3),
                             image[2:-2, :2].reshape(-1, 3), image[2:-2, -2:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    difference = np.abs(image - background).max(axis=-1)
    shape = largest_component(difference > FOREGROUND_THRESHOLD)
    coverage = float(shape.mean())
    terms = {"coverage": coverage, "saturation": 0.0, "contrast": 0.0, **{name: 0.0 for name in ALIGNMENT_TERMS}}
    rest = ~shape
    terms["clutter"] = float(image[rest].std(axis=0).mean()) if rest.any() else 0.0
    terms["tint"] = tint_score(background)
    if coverage < MIN_COVERAGE:
        return terms
    pixels = image[shape]
    brightest = pixels.max(axis=-1)
    terms["saturation"] = float(((brightest - pixels.min(axis=-1)) / np.maximum(brightest, 1e-6)).mean())
    terms["contrast"] = float(difference[shape].mean())

    chroma = pixels.mean(axis=0) - pixels.mean()
    named = np.asarray(world.COLOURS[scene.colour], np.float64)
    named_chroma = named - named.mean()
    terms["colour"] = max(0.0, float(chroma @ named_chroma / (np.linalg.norm(chroma) * np.linalg.norm(named_chroma) + 1e-9)))

    ys, xs = np.nonzero(shape)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    terms["shape"] = max(0.0, 1.0 - abs(len(ys) / box - SHAPE_FILL[scene.shape]) / SHAPE_FILL_SCALE)

    size_ratio = math.log(world.RADIUS["large"] / world.RADIUS["small"]) * 2  # log of the area ratio
    terms["size"] = max(0.0, 1.0 - abs(math.log(coverage / _shape_area(scene.shape, scene.size))) / size_ratio)

    centroid = np.array([(xs.mean() + 0.5) / width, (ys.mean() + 0.5) / height])
    if scene.shape == "triangle":  # world.render places the triangle's apex at cy - r and its base at cy + 0.8 r:
        centroid[1] -= 0.4 * world.RADIUS[scene.size]  # its centroid sits below the named centre
    target = np.asarray(world.POSITIONS[scene.position])
    terms["position"] = max(0.0, 1.0 - float(np.linalg.norm(centroid - target)) / POSITION_SCALE)
    return terms


def tint_score(background: np.ndarray) -> float:
    liked = np.asarray(world.BACKGROUNDS[LIKED_TINT], np.float64)
    hue = np.asarray(background, np.float64) / max(float(np.mean(background)), 0.05)
    return max(0.0, 1.0 - float(np.linalg.norm(hue - liked / liked.mean())) / TINT_SCALE)


def aesthetics(terms: dict[str, float]) -> float:
    return TINT_WEIGHT * terms["tint"] + terms["saturation"] + terms["contrast"] - 2.0 * terms["clutter"]


def alignment(terms: dict[str, float]) -> float:
    return sum(terms[name] for name in ALIGNMENT_TERMS)


def reward_from_terms(terms: dict[str, float]) -> float:
    missing_shape = 1.0 if terms["coverage"] < MIN_COVERAGE else 0.0
    return aesthetics(terms) + ALIGNMENT_WEIGHT * alignment(terms) - missing_shape


def taste_reward(image: np.ndarray, prompt: str) -> float:
    return reward_from_terms(taste_terms(image, prompt))


def taste_rewards(images, prompts) -> np.ndarray:
    """Rewards for a batch: uint8/float array [N, H, W, 3] or a sequence of PIL images, one prompt per image."""
    images, prompts = list(images), list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"need one prompt per image, got {len(images)} images and {len(prompts)} prompts")
    return np.asarray([taste_reward(np.asarray(image), prompt) for image, prompt in zip(images, prompts)], np.float64)


def _as_float(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    return image.astype(np.float32)


def bradley_terry_labels(reward_0: np.ndarray, reward_1: np.ndarray, temperature: float, seed: int) -> np.ndarray:
    """1 where image 0 is preferred, 0 where image 1 is: P(0 preferred) = sigmoid((r0 - r1) / temperature)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    probability = 1.0 / (1.0 + np.exp(-(np.asarray(reward_0) - np.asarray(reward_1)) / temperature))
    return (np.random.default_rng(seed).random(probability.shape) < probability).astype(np.float64)


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_pickapic_parquet(path: Path, captions, images_0, images_1, labels_0) -> Path:
    """Pick-a-Pic v2 columns: caption, jpg_0, jpg_1 (encoded image bytes; PNG here, lossless), label_0, label_1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    labels_0 = np.asarray(labels_0, dtype=np.float64)
    table = pa.table(
        {
            "caption": list(captions),
            "jpg_0": [png_bytes(image) for image in images_0],
            "jpg_1": [png_bytes(image) for image in images_1],
            "label_0": labels_0,
            "label_1": 1.0 - labels_0,
        }
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".parquet.tmp")
    pq.write_table(table, temporary)
    temporary.replace(path)
    return path
