"""Batched sampling of (prompt, seed) grids with the demo's settings: the one place every phase draws images.

Kept apart from the runner so that the preference pairs' cache key (which hashes this file) does not change when
unrelated demo code does.
"""
from __future__ import annotations

import numpy as np
import torch


def _generators(seeds) -> list[torch.Generator]:
    # CPU generators: the same seed gives the same initial noise on every device.
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def sample_images(pipe, prompts: list[str], seeds: list[int], config: DemoConfig, steps: int | None = None,
                  progress_bar=None) -> np.ndarray:
    """uint8 [N, H, W, 3], one image per (prompt, seed), batched."""
    images = []
    for start in range(0, len(prompts), config.sample_batch):
        chunk = slice(start, start + config.sample_batch)
        batch_prompts, batch_seeds = prompts[chunk], seeds[chunk]
        latents = torch.cat([
            torch.randn((1, 3, config.base.resolution, config.base.resolution), generator=g)
            for g in _generators(batch_seeds)
        ]).to(pipe.device)
        output = pipe(batch_prompts, num_inference_steps=steps or config.sample_steps,
                      guidance_scale=config.guidance_scale, latents=latents, output_type="np")
        images.append(np.round(output.images * 255).astype(np.uint8))
        if progress_bar is not None:
            progress_bar.update(len(batch_prompts))
    return np.concatenate(images)
