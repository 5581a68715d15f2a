"""Transformer-level benchmarks of one contrastive guidance step on SD3 and Flux: all branches in one batched pass
vs the honest alternatives (compare benchmarks/test_bench_unet.py for UNets).

Per family, batch 1, rank-8 adapters "pos" / "neg" on the transformer's attention and MLP projections (both
streams, cgkernels.testing's SD3 / FLUX LoRA targets):
  (a) naive      one transformer call per branch, adapters switched with set_adapters / disable_lora, eager merge
  (b) peft-mixed one transformer call, peft's mixed-adapter batch (`adapter_names`, one adapter per row) + eager merge
  (c) cgkernels  the patched transformer: one call through the segmented multi-LoRA layers + fused merge
  (d) base-only  the transformer with LoRA disabled over the same number of rows (the limit; baseline)
SD3 contrastive with CFG: 6 rows b, p, n at [uncond, cond]. Flux (guidance-distilled, no true CFG): 3 rows b, p, n
on the conditional row (eps = b + s (p - n)).

Shapes: SD3-medium at 1024^2 (4096 image + 333 text tokens, 24 layers, width 1536) and
FLUX.1-dev (4096 image + 512 text tokens, 19 + 38 blocks, width 3072) with random weights in bf16 on CUDA;
reduced transformers in fp32 on CPU.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch

import cgkernels
from bench_steps import peft_mixed_batch, time_denoiser_step
from cgkernels.testing import (
    FLUX_LORA_TARGETS,
    SD3_LORA_TARGETS,
    add_random_lora,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
)

CUDA = torch.cuda.is_available()
GUIDANCE_SCALE, STRENGTH = 7.0, 1.0
ADAPTER_TARGETS = {"sd3": SD3_LORA_TARGETS, "flux": FLUX_LORA_TARGETS}
# branches in the patch's row order: (prompt half, adapter or None)
BRANCHES = {
    "sd3": [(0, None), (1, None), (0, "pos"), (1, "pos"), (0, "neg"), (1, "neg")],
    "flux": [(0, None), (0, "pos"), (0, "neg")],
}


@dataclass(frozen=True)
class Shapes:
    model: dict  # the transformer's config
    image_tokens: int  # Flux: packed latent tokens; SD3: latent side = sqrt(4 * image_tokens)
    text_tokens: int


def _shapes(family: str) -> Shapes:
    if family == "sd3":
        if CUDA:  # SD3-medium
            return Shapes(dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                               attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                               caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192),
                          image_tokens=4096, text_tokens=333)
        return Shapes(dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                           attention_head_dim=32, num_attention_heads=4, joint_attention_dim=128,
                           caption_projection_dim=128, pooled_projection_dim=64, pos_embed_max_size=32),
                      image_tokens=256, text_tokens=93)
    if CUDA:  # FLUX.1-dev
        return Shapes(dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                           num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                           guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
                      image_tokens=4096, text_tokens=512)
    return Shapes(dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32,
                       num_attention_heads=4, joint_attention_dim=128, pooled_projection_dim=64, guidance_embeds=True,
                       axes_dims_rope=(8, 12, 12)),
                  image_tokens=256, text_tokens=64)


@functools.lru_cache(maxsize=1)
def _setup(family: str):
    """A pipeline object around a full-size (CUDA) / reduced (CPU) random transformer with adapters, and the
    transformer inputs of one step (SD3: the CFG batch [uncond, cond]; Flux: the cond row)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    device = torch.device("cuda" if CUDA else "cpu")
    dtype = torch.bfloat16 if CUDA else torch.float32
    shapes = _shapes(family)
    torch.manual_seed(0)
    model_cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    transformer = model_cls(**shapes.model).to(device=device, dtype=dtype).eval()
    pipe = tiny_sd3_pipeline() if family == "sd3" else tiny_flux_pipeline()  # the benchmarks feed embeddings
    pipe.register_modules(transformer=transformer)
    for name in ("pos", "neg"):
        add_random_lora(pipe, name, rank=8, seed=1 if name == "pos" else 2, target_modules=ADAPTER_TARGETS[family])
    transformer.set_adapters(["pos", "neg"])
    cfg = transformer.config
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    rows = 2 if family == "sd3" else 1
    inputs = dict(encoder_hidden_states=rand(rows, shapes.text_tokens, cfg.joint_attention_dim),
                  pooled_projections=rand(rows, cfg.pooled_projection_dim))
    if family == "sd3":
        side = int((4 * shapes.image_tokens) ** 0.5)
        inputs.update(hidden_states=rand(rows, cfg.in_channels, side, side),
                      timestep=torch.full((rows,), 500.0, device=device, dtype=dtype))
    else:
        inputs.update(hidden_states=rand(rows, shapes.image_tokens, cfg.in_channels),
                      timestep=torch.full((rows,), 0.5, device=device, dtype=dtype),
                      guidance=torch.full((rows,), 3.5, device=device, dtype=torch.float32),
                      txt_ids=torch.zeros(shapes.text_tokens, 3, device=device, dtype=dtype),
                      img_ids=torch.randint(0, 64, (shapes.image_tokens, 3), generator=gen).to(device, dtype))
    return pipe, inputs


BATCH_INPUTS = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections", "guidance")


def _rows(inputs: dict, halves: list[int]) -> dict:
    return {k: torch.cat([v[h:h + 1] for h in halves]) if k in BATCH_INPUTS else v for k, v in inputs.items()}


def _merge_eager(preds, family):
    s = STRENGTH
    if family == "flux":
        b, p, n = preds
        return b + s * (p - n)
    b_u, b_c, p_u, p_c, n_u, n_c = preds
    e_u, e_c = b_u + s * (p_u - n_u), b_c + s * (p_c - n_c)
    return e_u + GUIDANCE_SCALE * (e_c - e_u)


def _variant_fn(variant, family, pipe, inputs):
    model = pipe.transformer
    branches = BRANCHES[family]
    halves = [h for h, _ in branches]

    if variant == "naive":
        def run():
            preds = []
            for half, adapter in branches:
                if adapter is None:
                    model.disable_lora()
                else:
                    model.enable_lora()
                    model.set_adapters([adapter])
                preds.append(model(**_rows(inputs, [half]), return_dict=False)[0])
            return _merge_eager(preds, family)
        return run, None

    stacked = _rows(inputs, halves)
    if variant == "peft-mixed":
        names = [adapter or "__base__" for _, adapter in branches]
        model.enable_lora()

        def run():
            with peft_mixed_batch(model, names):
                out = model(**stacked, return_dict=False)[0]
            return _merge_eager(out.chunk(len(branches)), family)
        return run, None

    if variant == "base-only":
        model.disable_lora()
        return (lambda: model(**stacked, return_dict=False)[0]), (lambda: model.enable_lora())

    # cgkernels: the patched transformer fed what the pipeline passes (a direct call reads `pipe`'s settings)
    model.enable_lora()
    pipe._guidance_scale = GUIDANCE_SCALE
    cgkernels.patch(pipe, guidance="contrastive", strength=STRENGTH)
    return (lambda: model(**inputs, return_dict=False)[0]), (lambda: cgkernels.unpatch(pipe))


VARIANTS = ["naive", "peft-mixed", "cgkernels", "base-only"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_transformer_step(benchmark, family, variant):
    pipe, inputs = _setup(family)
    run, cleanup = _variant_fn(variant, family, pipe, inputs)
    try:
        time_denoiser_step(benchmark, run, cleanup,
                           group=f"transformer-step {family} contrastive ({len(BRANCHES[family])} rows)",
                           variant=variant, baseline=variant == "base-only")
    finally:
        pipe.transformer.enable_lora()
        pipe.transformer.set_adapters(["pos", "neg"])
