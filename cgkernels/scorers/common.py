"""What the scorers share: the interface, and loading local files with errors that name the flag."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# OpenAI CLIP's normalisation: the image statistics every scorer here was trained with (CLIP-L, CLIP-H, BLIP).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ScorerInputError(ValueError):
    """The scorer cannot score these prompts (raised before any scoring)."""


class Scorer:
    """Maps (PIL images, prompts) to one float per image. `fingerprint` identifies the scorer and its weights
    (the score cache key); `check_prompts` refuses prompts the scorer cannot score before any work."""

    name = "scorer"

    def __init__(self):
        self.fingerprint = self.name

    def __call__(self, images, prompts) -> np.ndarray:
        raise NotImplementedError

    def check_prompts(self, prompts) -> None:
        return None


def require_path(path, scorer: str, option: str, what: str) -> Path:
    from cgkernels.scorers import flag

    if path is None:
        raise ValueError(f"scorer {scorer!r} needs {what}: pass {flag(scorer, option)} PATH (cgkernels never "
                         "downloads weights)")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path} (given as {flag(scorer, option)})")
    return path


def fingerprint(name: str, *paths: Path) -> str:
    """The scorer name and its weight files (path, size, mtime): a changed file invalidates cached scores."""
    digest = hashlib.sha256(name.encode())
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            stat = file.stat()
            digest.update(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"{name}-{digest.hexdigest()[:12]}"


def load_state_dict(path: Path) -> dict:
    """A state dict from .safetensors or a torch checkpoint (weights only; a {"state_dict": ...} wrapper, as the
    HPS checkpoints have, is unwrapped)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def clip_preprocess(image, side: int = 224) -> torch.Tensor:
    """OpenAI CLIP's pre-processing as torchvision runs it on a PIL image (clip.load, ImageReward, open_clip):
    Resize(side, bicubic) of the short side with the long side truncated, CenterCrop(side) with the offset
    rounded, [0, 1], CLIP mean/std. Returns a 3 x side x side float32 tensor."""
    image = image.convert("RGB")
    width, height = image.size
    size = (side, int(side * height / width)) if width <= height else (int(side * width / height), side)
    resized = image.resize(size, Image.BICUBIC)  # PIL returns a copy when the size is unchanged, as torchvision
    left, top = int(round((size[0] - side) / 2.0)), int(round((size[1] - side) / 2.0))
    pixels = np.asarray(resized.crop((left, top, left + side, top + side)), dtype=np.float32) / 255.0
    normalised = (pixels - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))
