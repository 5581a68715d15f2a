"""UNet-level benchmarks of one guidance step: all branches in one batched pass vs the honest alternatives.

Per mode (contrastive: 6 rows, contrastive-cond: 4, npo: 2), batch 1, rank-8 adapters on to_q/to_k/to_v/to_out.0:
  (a) naive      one UNet call per branch, adapters switched with set_adapters / disable_lora, eager merge
  (b) peft-mixed one UNet call, peft's mixed-adapter batch (`adapter_names`, one adapter per row) + eager merge
  (c) cgkernels  the patched UNet: one call through the segmented multi-LoRA layers + fused merge
  (d) base-only  the UNet with LoRA disabled over the same number of rows (the limit; baseline)
Plus end-to-end denoising time of an SD1.5 pipeline (30 steps on CUDA, 3 on CPU): contrastive guidance patched vs
naive per-branch UNet calls (baseline) vs plain base CFG (2 rows: the floor), and peak CUDA memory per variant
(extra_info["peak_mem_gb"]).

peft's mixed batch is reached the way peft's own `LoraModel._enable_peft_forward_hooks` does it: a forward
pre-hook on every LoRA layer injects `adapter_names` (diffusers' UNet has no argument that forwards it).
NPO runs with merge_weight=1 and strength 1 here, so its unconditional branch is the single adapter "neg" and (b)
can express it (peft's mixed batch has one adapter per row, no weighted combinations).

Full SD1.5 (512^2) / SDXL (1024^2) UNet configs with random weights in fp16 on CUDA; reduced UNets in fp32 on CPU.
"""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch

import cgkernels
from bench_steps import peft_mixed_batch, time_denoiser_step
from cgkernels.testing import add_random_lora, tiny_sd_pipeline

CUDA = torch.cuda.is_available()
MODES = {  # mode: branches as (prompt half, adapter or None), in the patch's row order
    "contrastive": [(0, None), (1, None), (0, "pos"), (1, "pos"), (0, "neg"), (1, "neg")],
    "contrastive-cond": [(0, None), (1, None), (1, "pos"), (1, "neg")],
    "npo": [(0, "neg"), (1, "pos")],
}
GUIDANCE_SCALE, STRENGTH = 7.5, 1.0


def _unet_config(kind: str) -> dict:
    if kind == "sd15":
        if CUDA:
            return dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                        attention_head_dim=8, layers_per_block=2)
        return dict(sample_size=24, block_out_channels=(64, 128), cross_attention_dim=128, attention_head_dim=8,
                    layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32)
    xl = dict(addition_embed_type="text_time", use_linear_projection=True,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    if CUDA:
        return dict(xl, sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                    cross_attention_dim=2048, addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    return dict(xl, sample_size=32, block_out_channels=(32, 64, 128), layers_per_block=1,
                transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), cross_attention_dim=128,
                addition_time_embed_dim=16, projection_class_embeddings_input_dim=6 * 16 + 64, norm_num_groups=32)


@functools.lru_cache(maxsize=1)
def _setup(kind: str):
    """A pipeline object around a full-size (CUDA) / reduced (CPU) random UNet with adapters "pos" and "neg"."""
    from diffusers import UNet2DConditionModel

    device = torch.device("cuda" if CUDA else "cpu")
    dtype = torch.float16 if CUDA else torch.float32
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**_unet_config(kind)).to(device=device, dtype=dtype).eval()
    pipe = tiny_sd_pipeline(kind)  # tiny text encoders / VAE: the benchmarks feed embeddings directly
    pipe.register_modules(unet=unet)
    pipe.to(device)
    add_random_lora(pipe, "pos", rank=8, seed=1)
    add_random_lora(pipe, "neg", rank=8, seed=2)
    pipe.unet.set_adapters(["pos", "neg"])
    cfg = unet.config
    size, tokens = cfg.sample_size, 77
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, size, size, generator=gen).to(device, dtype)
    text = torch.randn(2, tokens, cfg.cross_attention_dim, generator=gen).to(device, dtype)
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {
            "text_embeds": torch.randn(2, pooled, generator=gen).to(device, dtype),
            "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 2).to(device, dtype),
        }
    return pipe, sample, text, added


def _rows(tensor, halves):
    return torch.cat([tensor[h:h + 1] for h in halves]) if tensor is not None else None


def _added_rows(added, halves):
    return None if added is None else {k: _rows(v, halves) for k, v in added.items()}


def _merge_eager(preds, mode):
    """The mode's arithmetic in eager torch (for the variants without the fused merge)."""
    g, s = GUIDANCE_SCALE, STRENGTH
    if mode == "contrastive":
        b_u, b_c, p_u, p_c, n_u, n_c = preds
        e_u, e_c = b_u + s * (p_u - n_u), b_c + s * (p_c - n_c)
        return e_u + g * (e_c - e_u)
    if mode == "contrastive-cond":
        b_u, b_c, p_c, n_c = preds
        return b_u + g * (b_c - b_u) + s * (p_c - n_c)
    m_u, q_c = preds
    return m_u + g * (q_c - m_u)


def _variant_fn(variant, mode, pipe, sample, text, added):
    unet = pipe.unet
    branches = MODES[mode]
    halves = [h for h, _ in branches]
    t = torch.tensor(500, device=sample.device)

    if variant == "naive":
        def run():
            preds = []
            for half, adapter in branches:
                if adapter is None:
                    unet.disable_lora()
                else:
                    unet.enable_lora()
                    unet.set_adapters([adapter])
                preds.append(unet(_rows(sample, [half]), t, _rows(text, [half]),
                                  added_cond_kwargs=_added_rows(added, [half]), return_dict=False)[0])
            return _merge_eager(preds, mode)
        return run, None

    x, e, a = _rows(sample, halves), _rows(text, halves), _added_rows(added, halves)
    if variant == "peft-mixed":
        names = [adapter or "__base__" for _, adapter in branches]
        unet.enable_lora()

        def run():
            with peft_mixed_batch(unet, names):
                out = unet(x, t, e, added_cond_kwargs=a, return_dict=False)[0]
            return _merge_eager(out.chunk(len(branches)), mode)
        return run, None

    if variant == "base-only":
        unet.disable_lora()
        return (lambda: unet(x, t, e, added_cond_kwargs=a, return_dict=False)[0]), (lambda: unet.enable_lora())

    # cgkernels: the patched UNet fed the pipeline's CFG batch [uncond, cond]
    unet.enable_lora()
    pipe._guidance_scale, pipe._guidance_rescale = GUIDANCE_SCALE, 0.0
    cgkernels.patch(pipe, guidance=mode, strength=STRENGTH, merge_weight=1.0)
    return (lambda: unet(sample, t, text, added_cond_kwargs=added, return_dict=False)[0]), (
        lambda: cgkernels.unpatch(pipe))


VARIANTS = ["naive", "peft-mixed", "cgkernels", "base-only"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_unet_step(benchmark, kind, mode, variant):
    pipe, sample, text, added = _setup(kind)
    run, cleanup = _variant_fn(variant, mode, pipe, sample, text, added)
    try:
        time_denoiser_step(benchmark, run, cleanup, group=f"unet-step {kind} {mode} ({len(MODES[mode])} rows)",
                           variant=variant, baseline=variant == "base-only")
    finally:
        pipe.unet.enable_lora()
        pipe.unet.set_adapters(["pos", "neg"])


@contextlib.contextmanager
def _naive_contrastive_unet(pipe):
    """The pipeline's UNet replaced by per-branch calls (b, p, n at uncond and cond) with an eager merge."""
    unet = pipe.unet
    original = unet.forward

    def forward(sample, t, encoder_hidden_states, **kwargs):
        kwargs.pop("return_dict", None)
        batch = sample.shape[0] // 2
        preds = []
        for adapter in (None, "pos", "neg"):
            for half in (0, 1):
                if adapter is None:
                    unet.disable_lora()
                else:
                    unet.enable_lora()
                    unet.set_adapters([adapter])
                rows = slice(half * batch, (half + 1) * batch)
                preds.append(original(sample[rows], t, encoder_hidden_states[rows], return_dict=False, **kwargs)[0])
        b_u, b_c, p_u, p_c, n_u, n_c = preds
        eps = _merge_eager([b_u, b_c, p_u, p_c, n_u, n_c], "contrastive")
        return (torch.cat([eps, eps]),)

    unet.forward = forward
    try:
        yield
    finally:
        del unet.__dict__["forward"]
        unet.enable_lora()
        unet.set_adapters(["pos", "neg"])


@pytest.mark.parametrize("variant", ["base-cfg", "naive-contrastive", "cgkernels-contrastive"])
def test_end_to_end_sampling(benchmark, variant):
    pipe, _, text, _ = _setup("sd15")
    steps = 30 if CUDA else 3
    call = dict(prompt_embeds=text[1:], negative_prompt_embeds=text[:1], num_inference_steps=steps,
                guidance_scale=GUIDANCE_SCALE, output_type="latent")
    benchmark.group = f"end-to-end sd15 {steps} steps"
    benchmark.extra_info["variant"] = variant
    benchmark.extra_info["baseline"] = variant == "naive-contrastive"
    context = _naive_contrastive_unet(pipe) if variant == "naive-contrastive" else contextlib.nullcontext()
    if variant == "base-cfg":
        pipe.unet.disable_lora()
    elif variant == "cgkernels-contrastive":
        cgkernels.patch(pipe, guidance="contrastive", strength=STRENGTH)
    try:
        with context:
            pipe(**call)  # warm-up
            if CUDA:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            benchmark.pedantic(lambda: pipe(**call), rounds=3 if CUDA else 1, iterations=1)
            if CUDA:
                benchmark.extra_info["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    finally:
        if variant == "base-cfg":
            pipe.unet.enable_lora()
        elif variant == "cgkernels-contrastive":
            cgkernels.unpatch(pipe)
