"""Rectified-flow (flow-matching) training inputs for SD3 and Flux transformers.

As diffusers' train_dreambooth_lora_sd3.py / train_dreambooth_lora_flux.py build them: a training sigma is drawn
by `compute_density_for_timestep_sampling` (logit-normal, mode or uniform) and looked up in the scheduler's
training schedule (SD3: shifted sigmas; Flux with dynamic shifting: unshifted), x_t = (1 - σ)·x0 + σ·noise, the
target is the velocity noise − x0 (no output preconditioning), and each sample's squared error is weighted by
`compute_loss_weighting_for_sd3` (sigma_sqrt, cosmap, or 1). Flux latents are packed 2x2 into tokens, with image
and text position ids, and a guidance-distilled transformer (FLUX.1-dev) gets the guidance value as an input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

FLOW_FAMILIES = ("sd3", "flux")
WEIGHTING_SCHEMES = ("logit_normal", "mode", "sigma_sqrt", "cosmap", "none")
# The diffusers training scripts' defaults, per family.
DEFAULT_WEIGHTING = {"sd3": "logit_normal", "flux": "none"}
DEFAULT_FLUX_GUIDANCE = 3.5
# The pipelines' own __call__ defaults: training sees the T5 sequence length that inference will use.
DEFAULT_MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}


@dataclass(frozen=True)
class FlowMatchingSettings:
    family: str  # "sd3" or "flux"
    weighting_scheme: str
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance: Optional[float] = None  # Flux guidance-distilled transformers only
    max_sequence_length: int = 256


def sample_sigmas(scheduler, n: int, settings: FlowMatchingSettings, generator: torch.Generator):
    """(timesteps [n], sigmas [n]) drawn as the diffusers scripts do, from the scheduler's training schedule (the
    scheduler as constructed, before any set_timesteps). Timesteps are what the SD3 transformer takes (σ·1000)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(
        weighting_scheme=settings.weighting_scheme, batch_size=n, logit_mean=settings.logit_mean,
        logit_std=settings.logit_std, mode_scale=settings.mode_scale, device=generator.device, generator=generator,
    )
    steps = scheduler.config.num_train_timesteps
    # u can reach 1.0 (sigmoid rounding, or "mode" at u = 0): clamp to the last index instead of reading past it.
    indices = (u * steps).long().clamp_(0, steps - 1).cpu()
    return scheduler.timesteps[indices].to(generator.device), scheduler.sigmas[indices].to(generator.device)


def loss_weights(settings: FlowMatchingSettings, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample weight of the squared error, fp32 [n]."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(settings.weighting_scheme, sigmas=sigmas.float()).float()


def pack_flux_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 · W/2, 4C], the FluxPipeline's token layout."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux packs latents 2x2: latent height and width must be even, got {h}x{w}")
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def flux_image_ids(latents: torch.Tensor) -> torch.Tensor:
    """Position ids of the packed image tokens, [H/2 · W/2, 3] (a non-batch input of the transformer)."""
    from diffusers import FluxPipeline

    _, _, h, w = latents.shape
    return FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, latents.device, latents.dtype)


def flow_pair_inputs(scheduler, settings: FlowMatchingSettings, latents: dict, hidden: torch.Tensor,
                     pooled: torch.Tensor, generator: torch.Generator, dtype: torch.dtype) -> dict:
    """Noised latents of both images of each pair (one noise draw and one sigma per pair), their velocity targets,
    the loss weights, and the transformer inputs split into batch-dim and non-batch ones.

    Returns the fields of trainer.PairInputs: noisy, target, timesteps, encoder_hidden_states, transformer_inputs
    (batch-dim: pooled_projections, guidance), static_inputs (non-batch: txt_ids, img_ids), loss_weights.
    """
    x0 = latents["w"]
    n = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    timesteps, sigmas = sample_sigmas(scheduler, n, settings, generator)
    sigma = sigmas.view(n, *([1] * (x0.ndim - 1))).float()
    noisy = {s: ((1.0 - sigma) * latents[s] + sigma * noise) for s in "wl"}
    target = {s: noise - latents[s] for s in "wl"}
    batch_inputs = {"pooled_projections": pooled.to(dtype)}
    static_inputs = {}
    if settings.family == "flux":
        static_inputs = {"img_ids": flux_image_ids(x0).to(dtype),
                         "txt_ids": torch.zeros(hidden.shape[1], 3, device=x0.device, dtype=dtype)}
        noisy = {s: pack_flux_latents(v) for s, v in noisy.items()}
        target = {s: pack_flux_latents(v) for s, v in target.items()}
        timesteps = timesteps / 1000.0  # the Flux transformer scales by 1000 itself (FluxPipeline passes t / 1000)
        if settings.guidance is not None:
            batch_inputs["guidance"] = torch.full((n,), settings.guidance, device=x0.device, dtype=torch.float32)
    return dict(
        noisy={s: v.to(dtype) for s, v in noisy.items()},
        target=target,
        timesteps=timesteps,
        encoder_hidden_states=hidden.to(dtype),
        transformer_inputs=batch_inputs,
        static_inputs=static_inputs,
        loss_weights=loss_weights(settings, sigmas),
    )


def transformer_rows(model, noisy: dict, timesteps, encoder_hidden_states, batch_inputs: dict, static_inputs: dict,
                     sides: list[str]) -> torch.Tensor:
    """One transformer call over the rows [side_0 pairs, side_1 pairs, ...]: every batch-dim input is repeated
    per side block, the non-batch ones (position ids) are passed once."""
    k = len(sides)

    def tile(t: torch.Tensor) -> torch.Tensor:
        return t.repeat(k, *([1] * (t.ndim - 1)))

    return model(
        hidden_states=torch.cat([noisy[s] for s in sides]),
        timestep=tile(timesteps),
        encoder_hidden_states=tile(encoder_hidden_states),
        **{name: tile(t) for name, t in batch_inputs.items()},
        **static_inputs,
        return_dict=False,
    )[0]
