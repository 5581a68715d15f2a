"""Training-step benchmarks: both preference adapters trained jointly in one UNet pass vs separately.

One optimizer step (forward, backward, AdamW) on a batch of 4 preference pairs, rank-8 adapters "pos" and "neg" on
to_q/to_k/to_v/to_out.0 of a random-weight UNet:
  sft      joint: one pass over [winners -> pos, losers -> neg] (segmented LoRA layers)
           separate (baseline): one pass per adapter (plain peft layers, the other adapter inactive)
  dpo+npo  joint: one no_grad reference pass over [x_w, x_l] + one pass over [x_w, x_l] -> pos, [x_w, x_l] -> neg
           separate (baseline): per adapter its own reference pass and its own policy pass
Compute-bound limits: sft 1.0 (the gain is batching), dpo+npo 14/16 (one of two reference passes saved).
SD1.5's UNet at 512^2 (64^2 latents) in bf16 autocast on CUDA, peak memory in extra_info["peak_mem_gb"]; a reduced
UNet in fp32 on CPU.
"""
from __future__ import annotations

import functools

import pytest
import torch

from bench_steps import time_train_step
from cgkernels.train import trainer as T

CUDA = torch.cuda.is_available()
PAIRS, RANK = 4, 8


def _unet_config() -> dict:
    if CUDA:  # Stable Diffusion 1.5
        return dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                    attention_head_dim=8, layers_per_block=2)
    return dict(sample_size=16, block_out_channels=(64, 128), cross_attention_dim=128, attention_head_dim=8,
                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32)


@functools.lru_cache(maxsize=1)
def _setup():
    from diffusers import UNet2DConditionModel

    device = torch.device("cuda" if CUDA else "cpu")
    weight_dtype = torch.bfloat16 if CUDA else torch.float32
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**_unet_config()).to(device, weight_dtype)
    unet.requires_grad_(False)
    params = T.add_lora_adapters(unet, ("pos", "neg"), rank=RANK, alpha=RANK,
                                 target_modules=("to_q", "to_k", "to_v", "to_out.0"))
    with torch.no_grad():  # non-zero B so that every parameter gets a gradient, as after a few steps
        for name, p in params.items():
            if ".lora_B." in name:
                p.normal_(0.0, 0.01)
    unet.train()
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    shape = (PAIRS, cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def randn(*size):
        return torch.randn(*size, generator=g).to(device)

    inputs = T.PairInputs(
        noisy={s: randn(*shape).to(weight_dtype) for s in "wl"},
        target={s: randn(*shape) for s in "wl"},
        timesteps=torch.randint(0, 1000, (PAIRS,), generator=g).to(device),
        encoder_hidden_states=randn(PAIRS, 77, cfg.cross_attention_dim).to(weight_dtype),
    )
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-6)
    return unet, params, inputs, optimizer


@pytest.mark.parametrize("objective", ["sft", "dpo+npo"])
@pytest.mark.parametrize("batching", ["separate", "joint"])
def test_train_step(benchmark, objective, batching):
    unet, params, inputs, optimizer = _setup()
    size = "SD1.5 512^2" if CUDA else "reduced UNet, 16^2 latents"
    time_train_step(benchmark, unet, params, inputs, optimizer, objective=objective, batching=batching,
                    group=f"train step {objective} ({PAIRS} pairs, rank {RANK}, {size})")
