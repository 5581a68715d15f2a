"""Tiny offline diffusion pipelines (SD1.5, SDXL, SD3, Flux), offline CLIP and T5 tokenizers, random LoRA adapters
for tests and demos.

Nothing here downloads anything: every component is built from a small config with fixed seeds.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch

__all__ = [
    "build_clip_tokenizer", "build_t5_tokenizer", "tiny_sd_pipeline", "tiny_sd3_pipeline", "tiny_flux_pipeline",
    "tiny_controlnet", "add_random_ip_adapter", "add_random_lora", "save_lora", "denoiser", "DEFAULT_WORDS",
    "SD3_LORA_TARGETS", "FLUX_LORA_TARGETS", "FP32_UNET_REL", "fp32_merge_atol",
]

# One fp32 forward of the tiny test UNets (with or without LoRA, batch 2 or 6) differs from the same forward in
# float64 by at most 1e-6 of the output's largest magnitude: measured 6.4e-7 .. 9.7e-7 for SD1.5- and SDXL-shaped
# UNets under ATEN_CPU_CAPABILITY=default, avx2 and avx512. The bound below leaves a 10x margin for other CPUs and
# BLAS blockings; it is what fp32 comparisons between two computation orders in the tests are derived from.
FP32_UNET_REL = 1e-5


def fp32_merge_atol(coeffs, branch_scale: float, *, rescale: float = 0.0, rel: float = FP32_UNET_REL) -> float:
    """Largest |difference| to expect between two fp32 evaluations of a guidance merge sum_k coeffs[k] * branch_k
    computed in different orders (one batched UNet call vs one call per branch, other kernels or thread counts).

    Each evaluation's branch k is off from float64 by at most rel * branch_scale (branch_scale: the largest
    |branch output|), the merge weighs those errors by |coeffs[k]|, and the two evaluations' errors may add. Guidance
    rescale multiplies the merged prediction by phi * std(ref) / std(eps) + (1 - phi), whose own rounding is of the
    same order: allow (1 + rescale) times more.
    """
    return 2.0 * rel * float(branch_scale) * sum(abs(float(c)) for c in coeffs) * (1.0 + float(rescale))


DEFAULT_WORDS = (
    "a an the photo of large small red green blue yellow white black circle square triangle on at in top bottom "
    "left right center background shape with and two one dog cat tree house"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_clip_tokenizer(words, save_dir, *, model_max_length: int = 77):
    """A CLIP BPE tokenizer whose vocabulary is the byte alphabet plus `words`, written to `save_dir` and loaded.

    CLIP's BPE appends '</w>' to a word's last symbol and applies merges by rank. For each word we first run the
    merges made so far (earlier words may already split it, e.g. "right"'s r+i inside "triangle"), then add merges
    that join the resulting pieces left to right, so each listed word becomes exactly one token and any other text
    still tokenizes (into byte-level pieces).
    """
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    vocab_tokens = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    merge_rank: dict[tuple[str, str], int] = {}
    seen_tokens = set(vocab_tokens)
    for word in dict.fromkeys(w.lower() for w in words):
        encoded = "".join(_bytes_to_unicode()[b] for b in word.encode("utf-8"))
        pieces = _apply_bpe(list(encoded[:-1]) + [encoded[-1] + "</w>"], merge_rank)
        prefix = pieces[0]
        for piece in pieces[1:]:
            pair = (prefix, piece)
            prefix = prefix + piece
            merge_rank[pair] = len(merges)
            merges.append(pair)
            if prefix not in seen_tokens:
                seen_tokens.add(prefix)
                vocab_tokens.append(prefix)
        if prefix not in seen_tokens:  # a one-symbol word
            seen_tokens.add(prefix)
            vocab_tokens.append(prefix)
    vocab = {token: i for i, token in enumerate(vocab_tokens)}
    os.makedirs(save_dir, exist_ok=True)
    with open(os.path.join(save_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(save_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    return CLIPTokenizer.from_pretrained(save_dir, model_max_length=model_max_length)


def _apply_bpe(symbols: list[str], merge_rank: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly join the adjacent pair with the lowest merge rank."""
    while len(symbols) > 1:
        ranked = [(merge_rank.get(pair, len(merge_rank)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(ranked)
        if rank == len(merge_rank):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def _text_encoder(vocab_size: int, *, with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        hidden_act="gelu",
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model_cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_cls(config).eval()


def _unet(kind: str, seed: int, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    common = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
    )
    torch.manual_seed(seed)
    if kind == "sd15":
        return UNet2DConditionModel(**common, cross_attention_dim=32, attention_head_dim=8)
    # SDXL: two text encoders (32 + 32 wide), pooled text embeds and size/crop micro-conditioning.
    return UNet2DConditionModel(
        **common,
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )


def _vae(seed: int, **overrides):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    config = dict(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )
    config.update(overrides)
    return AutoencoderKL(**config)


def tiny_sd_pipeline(kind: str = "sd15", *, dtype: torch.dtype = torch.float32, seed: int = 0, words=DEFAULT_WORDS,
                     unet_in_channels: int = 4):
    """A StableDiffusionPipeline ("sd15") or StableDiffusionXLPipeline ("sdxl") with tiny random components.

    Latents are 4x16x16 (images 32x32). The pipeline round-trips through save_pretrained / from_pretrained.
    unet_in_channels=9 makes the UNet an inpainting UNet (latents + mask + masked-image latents), for building the
    inpainting pipelines from `pipe.components`.
    """
    from diffusers import (
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    if kind not in ("sd15", "sdxl"):
        raise ValueError(f"kind must be 'sd15' or 'sdxl', got {kind!r}")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_clip_tokenizer(words, tmp)
    vocab_size = len(tokenizer)
    unet, vae = _unet(kind, seed, unet_in_channels), _vae(seed + 1)
    if kind == "sd15":
        scheduler = PNDMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
            steps_offset=1, set_alpha_to_one=False,
        )
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=_text_encoder(vocab_size, with_projection=False, seed=seed + 2),
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )
    else:
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            timestep_spacing="leading",
        )
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=_text_encoder(vocab_size, with_projection=False, seed=seed + 2),
            text_encoder_2=_text_encoder(vocab_size, with_projection=True, seed=seed + 3),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
            image_encoder=None,
            feature_extractor=None,
            force_zeros_for_empty_prompt=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


# What LoRA files for these transformers typically target (diffusers' train_dreambooth_lora_sd3.py / _flux.py with
# their MLP options on): joint attention incl. the context stream (add_*_proj, to_add_out), the MLPs of both streams,
# and for Flux the single blocks' proj_mlp / proj_out (a suffix that also matches the final proj_out).
SD3_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)
FLUX_LORA_TARGETS = SD3_LORA_TARGETS + ("proj_mlp", "proj_out")


def build_t5_tokenizer(words=DEFAULT_WORDS, *, model_max_length: int = 512):
    """A T5 (Unigram, sentencepiece-style) tokenizer built in code: "▁word" for each listed word, the letters and
    digits as fall-back pieces, ids 0/1/2 = <pad>/</s>/<unk> as in T5, no sentinel tokens."""
    from transformers import T5Tokenizer

    pieces = dict.fromkeys("▁" + w.lower() for w in words)
    chars = dict.fromkeys(sorted(set("".join(words).lower()) | set("abcdefghijklmnopqrstuvwxyz0123456789")))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(piece, -1.0) for piece in pieces] + [(c, -5.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _t5_encoder(vocab_size: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def _clip_tokenizer(words):
    with tempfile.TemporaryDirectory() as tmp:
        return build_clip_tokenizer(words, tmp)


def tiny_sd3_pipeline(*, img2img: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0,
                      words=DEFAULT_WORDS):
    """A StableDiffusion3Pipeline (or its img2img variant) with tiny random components and no T5 encoder.

    SD3.5-style transformer: two joint blocks (the second one context_pre_only, so both context-block kinds occur),
    a dual-attention (attn2) first block, RMS qk-norm, patch size 2. Two CLIP encoders with projection (pooled
    projections 32 + 32 = 64), text_encoder_3=None (the pipeline feeds zeros as T5 states). VAE with 16 latent
    channels and SD3's shift/scaling factors; latents 16x16x16 for 32x32 images (height/width must be multiples
    of 4). The prompt sequence is 77 CLIP tokens + max_sequence_length zero T5 tokens: pass a small
    max_sequence_length (e.g. 8) to keep calls fast.
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Img2ImgPipeline,
        StableDiffusion3Pipeline,
    )

    tokenizer = _clip_tokenizer(words)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    vae = _vae(seed + 1, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
               shift_factor=0.0609, scaling_factor=1.5035)
    pipeline_cls = StableDiffusion3Img2ImgPipeline if img2img else StableDiffusion3Pipeline
    pipe = pipeline_cls(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=_text_encoder(len(tokenizer), with_projection=True, seed=seed + 2),
        tokenizer=tokenizer,
        text_encoder_2=_text_encoder(len(tokenizer), with_projection=True, seed=seed + 3),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    return _finish(pipe, dtype)


def tiny_flux_pipeline(*, img2img: bool = False, guidance_embeds: bool = True, dtype: torch.dtype = torch.float32,
                       seed: int = 0, words=DEFAULT_WORDS):
    """A FluxPipeline (or FluxImg2ImgPipeline) with tiny random components, a tiny T5 encoder and offline tokenizers.

    guidance_embeds=True is FLUX.1-dev-shaped (guidance-distilled: the guidance value is a transformer input),
    False FLUX.1-schnell-shaped. One double-stream and one single-stream block; VAE with 4 latent channels, packed
    2x2 into 16 transformer channels, so a 32x32 image is 8x8 = 64 image tokens (height/width: multiples of 4).
    Pass a small max_sequence_length (e.g. 8) to keep calls fast.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxPipeline, FluxTransformer2DModel

    tokenizer = _clip_tokenizer(words)
    t5_tokenizer = build_t5_tokenizer(words)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
    )
    vae = _vae(seed + 1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
               scaling_factor=0.3611)
    # FLUX.1's scheduler: resolution-dependent (dynamic) shift of the sigmas.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipeline_cls = FluxImg2ImgPipeline if img2img else FluxPipeline
    pipe = pipeline_cls(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=_text_encoder(len(tokenizer), with_projection=False, seed=seed + 2),
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(len(t5_tokenizer), seed=seed + 3),
        tokenizer_2=t5_tokenizer,
    )
    return _finish(pipe, dtype)


def _finish(pipe, dtype: torch.dtype):
    pipe.set_progress_bar_config(disable=True)
    # The components are built in float32; casting only when asked avoids diffusers' keep-in-fp32 warnings.
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def denoiser(pipe) -> torch.nn.Module:
    """The pipeline's denoising network: pipe.unet (SD1.5/SDXL) or pipe.transformer (SD3, Flux)."""
    for name in ("unet", "transformer"):
        model = getattr(pipe, name, None)
        if model is not None:
            return model
    raise TypeError(f"{type(pipe).__name__} has neither a unet nor a transformer")


def tiny_controlnet(kind: str = "sd15", *, seed: int = 0, init_scale: float = 0.05):
    """A ControlNetModel for tiny_sd_pipeline(kind) (conditioning images 32x32, as the pipeline's images), made from
    a tiny UNet of that kind; its zero-initialised output convolutions are made random, so that its residuals
    visibly change the UNet output."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(_unet(kind, seed), conditioning_embedding_out_channels=(16, 32))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            for param in module.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * init_scale)
    return controlnet.eval()


def add_random_ip_adapter(pipe, *, image_embed_dim: int = 16, seed: int = 0, init_scale: float = 0.2):
    """Load an IP-Adapter (the basic one: a linear image projection to 4 tokens, and to_k_ip / to_v_ip in every
    cross-attention) with random weights into pipe.unet, as pipe.load_ip_adapter would from a file. Call the
    pipeline with ip_adapter_image_embeds=[tensor of shape (2 * batch, 1, image_embed_dim)] (negative, positive):
    no image encoder is needed."""
    unet = pipe.unet
    cross_dim = unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(shape, generator=generator) * (init_scale / shape[-1] ** 0.5)

    image_proj = {"proj.weight": rand(4 * cross_dim, image_embed_dim), "proj.bias": rand(4 * cross_dim),
                  "norm.weight": 1.0 + rand(cross_dim), "norm.bias": rand(cross_dim)}
    ip_layers, key_id = {}, 1  # diffusers numbers the cross-attention processors 1, 3, 5, ...
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = unet.get_submodule(name[: -len(".processor")]).to_k.out_features  # nn.Linear or peft's wrapper
        ip_layers[f"{key_id}.to_k_ip.weight"] = rand(hidden, cross_dim) * cross_dim**0.5
        ip_layers[f"{key_id}.to_v_ip.weight"] = rand(hidden, cross_dim) * cross_dim**0.5
        key_id += 2
    unet._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": ip_layers}], low_cpu_mem_usage=False)
    unet.to(pipe.dtype)
    return pipe


def add_random_lora(
    pipe,
    adapter_name: str,
    *,
    rank: int = 4,
    target_modules=("to_q", "to_k", "to_v", "to_out.0"),
    seed: int = 0,
    init_scale: float = 0.1,
    lora_alpha: float | None = None,
    **lora_config_kwargs,
):
    """Inject a peft LoRA adapter into the pipeline's UNet or transformer (as pipe.load_lora_weights would) with random
    non-zero A and B.

    A ~ N(0, init_scale^2 / fan_in)-ish and B ~ N(0, init_scale^2): large enough that every adapter visibly changes
    the UNet output, so exactness tests cannot pass by accident.
    """
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    config = LoraConfig(
        r=rank,
        lora_alpha=rank if lora_alpha is None else lora_alpha,
        target_modules=list(target_modules),
        init_lora_weights=False,
        **lora_config_kwargs,
    )
    model = denoiser(pipe)
    model.add_adapter(config, adapter_name=adapter_name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in sorted(model.named_modules(), key=lambda item: item[0]):
            if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
                continue
            for factor in (layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight):
                fan_in = factor[0].numel()
                values = torch.randn(factor.shape, generator=generator) * (init_scale * 4.0 / fan_in**0.5)
                factor.copy_(values.to(factor.dtype))
    return pipe


def save_lora(pipe, adapter_name: str, out_dir) -> str:
    """Write one adapter of the pipeline's UNet or transformer in the diffusers LoRA format
    (OUT/pytorch_lora_weights.safetensors), so pipe.load_lora_weights(out_dir, adapter_name=...) reads it back."""
    from peft.utils import get_peft_model_state_dict

    model = denoiser(pipe)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    prefix = "unet" if model is getattr(pipe, "unet", None) else "transformer"
    # The adapter's config travels as metadata, so lora_alpha (peft's scaling) survives the round trip.
    metadata = model.peft_config[adapter_name].to_dict()
    layers = {f"{prefix}_lora_layers": state, f"{prefix}_lora_adapter_metadata": metadata}
    type(pipe).save_lora_weights(out_dir, **layers, safe_serialization=True)
    return os.path.join(str(out_dir), "pytorch_lora_weights.safetensors")
