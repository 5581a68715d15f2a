"""Training-step benchmarks on flow-matching transformers (SD3, Flux): both adapters trained jointly in one
transformer pass vs separately, as test_bench_train.py does for the UNet.

One optimizer step (forward, backward, AdamW) on 4 preference pairs, rank-8 adapters "pos" and "neg" on the joint
attention of both streams (to_q/k/v/out.0, add_q/k/v_proj, to_add_out); sft and dpo+npo as in test_bench_train.py.
On CUDA (bf16 autocast): SD3-medium's transformer (24 joint blocks, width 1536) at 512^2 (1024 image tokens) and a
FLUX.1-shaped transformer at full width (3072, 24 heads) with 2 double + 4 single blocks (the 12B model's depth
does not change the ratio, only the time) at 512^2, T5 length 128 for both. On CPU: tiny transformers in fp32.
"""
from __future__ import annotations

import functools

import pytest
import torch

from bench_steps import time_train_step
from cgkernels.train import flow_matching
from cgkernels.train import trainer as T

CUDA = torch.cuda.is_available()
PAIRS, RANK = 4, 8
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def _transformer(family: str):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if family == "sd3":
        config = dict(sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                      attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                      caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192) if CUDA else \
            dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
                 num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64,
                 pos_embed_max_size=16)
        return SD3Transformer2DModel(**config)
    config = dict(in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128, num_attention_heads=24,
                  joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True) if CUDA else \
        dict(in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=4,
             joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    return FluxTransformer2DModel(**config)


@functools.lru_cache(maxsize=2)  # both families stay built: on CUDA each takes seconds
def _setup(family: str):
    device = torch.device("cuda" if CUDA else "cpu")
    weight_dtype = torch.bfloat16 if CUDA else torch.float32
    torch.manual_seed(0)
    model = _transformer(family).to(device, weight_dtype)
    model.requires_grad_(False)
    params = T.add_lora_adapters(model, ("pos", "neg"), rank=RANK, alpha=RANK, target_modules=TARGETS)
    with torch.no_grad():  # non-zero B so that every parameter gets a gradient, as after a few steps
        for name, p in params.items():
            if ".lora_B." in name:
                p.normal_(0.0, 0.01)
    model.train()
    g = torch.Generator(device).manual_seed(0)
    latent = (16, 64, 64) if CUDA else ((16, 16, 16) if family == "sd3" else (4, 16, 16))
    latents = {s: torch.randn(PAIRS, *latent, generator=g, device=device) for s in "wl"}
    cfg = model.config
    tokens = 128 if CUDA else 16
    hidden = torch.randn(PAIRS, tokens, cfg.joint_attention_dim, generator=g, device=device)
    pooled = torch.randn(PAIRS, cfg.pooled_projection_dim, generator=g, device=device)
    settings = flow_matching.FlowMatchingSettings(family, "logit_normal", guidance=3.5 if family == "flux" else None)
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    inputs = T.PairInputs(**flow_matching.flow_pair_inputs(scheduler, settings, latents, hidden, pooled, g,
                                                           weight_dtype))
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-6)
    return model, params, inputs, optimizer


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("objective", ["sft", "dpo+npo"])
@pytest.mark.parametrize("batching", ["separate", "joint"])
def test_train_step_flow(benchmark, family, objective, batching):
    model, params, inputs, optimizer = _setup(family)
    size = {"sd3": "SD3-medium 512^2", "flux": "FLUX.1 width, 2+4 blocks, 512^2"}[family] if CUDA \
        else "tiny, 16^2 latents"
    time_train_step(benchmark, model, params, inputs, optimizer, objective=objective, batching=batching,
                    group=f"train step {family} {objective} ({PAIRS} pairs, rank {RANK}, {size})")
