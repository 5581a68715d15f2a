"""Preference-adapter training loop (🤗 accelerate): SFT (cPGD modules), Diffusion-DPO, Diffusion-NPO, DPO+NPO.

Model families: SD1.5 and SDXL UNets (DDPM noise schedule, the scheduler's prediction_type) and SD3 and Flux
transformers (rectified flow: velocity target, the diffusers scripts' sigma sampling and loss weighting; see
cgkernels.train.flow_matching). "UNet" below stands for either denoiser.

All adapters of an objective train in one UNet pass over the frozen base: the batch rows are segments routed to
their adapter by cgkernels' segmented LoRA layers (winners -> pos and losers -> neg for sft; [x_w, x_l] -> pos and
[x_w, x_l] -> neg for dpo+npo). The DPO reference is the frozen base, evaluated once per step under no_grad.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from cgkernels.lora_layers import attach_segmented_lora, segment_routing
from cgkernels.train import flow_matching
from cgkernels.train.config import OBJECTIVE_ADAPTERS, SFT_OBJECTIVES, TrainConfig
from cgkernels.train.data import PairTransform, PreferenceBatches, open_pair_source
from cgkernels.train.flow_matching import FlowMatchingSettings
from cgkernels.train.losses import dpo_loss, sft_loss

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# The transformer classes of the flow-matching families (as named in a pipeline's model_index.json).
TRANSFORMER_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


# ---------------------------------------------------------------------------------------------------------------------
# Model loading
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class DiffusionComponents:
    denoiser: torch.nn.Module  # the UNet (sd15, sdxl) or the transformer (sd3, flux)
    vae: Optional[torch.nn.Module]  # None for a pixel-space model
    text_encoders: list
    tokenizers: list
    noise_scheduler: object
    is_sdxl: bool
    # SDXL pipelines with force_zeros_for_empty_prompt (the default) feed the UNet zeros, not the encoded "", as
    # their unconditional branch; prompt dropout must train on what inference will use.
    zero_empty_prompt: bool = False
    empty_prompt: Optional[tuple] = None  # (hidden [1, T, D], pooled [1, P] or None), encoded once on first use
    family: str = "sd15"  # "sd15", "sdxl", "sd3" or "flux"
    flow: Optional[FlowMatchingSettings] = None  # set for the flow-matching families
    # sd3/flux: the pipeline's own encode_prompt (prompts -> (hidden, pooled)), so training conditions exactly as
    # inference does (CLIP + T5 layout, zero T5 states when the pipeline has no T5 encoder).
    prompt_encoder: Optional[Callable] = None


def check_model_source(model: str) -> None:
    """A local folder must be a diffusers pipeline folder; anything else that is not a hub id is an error."""
    path = Path(model).expanduser()
    if path.exists():
        if not any((path / sub / "config.json").is_file() for sub in ("unet", "transformer")):
            raise ValueError(f"model folder {model} has no unet/config.json or transformer/config.json: expected a "
                             "diffusers pipeline folder (unet/ or transformer/, vae/, text_encoder/, tokenizer/, "
                             "scheduler/)")
        for sub in ("text_encoder", "tokenizer", "scheduler"):
            if not (path / sub).is_dir():
                raise ValueError(f"model folder {model} has no {sub}/ folder")
    elif model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ValueError(f"model {model!r} is neither an existing folder nor a hub id (owner/name)")


def _has_subfolder(model: str, sub: str) -> bool:
    path = Path(model).expanduser()
    if path.exists():
        return (path / sub).is_dir()
    from huggingface_hub import file_exists  # hub id, passed explicitly by the user

    return file_exists(model, f"{sub}/config.json")


def _pipeline_config(model: str) -> dict:
    path = Path(model).expanduser()
    if path.exists():
        index = path / "model_index.json"
        return json.loads(index.read_text()) if index.is_file() else {}
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(model)


def model_family(model: str) -> str:
    """"sd15" / "sdxl" (UNet pipelines) or "sd3" / "flux" (by the transformer class in model_index.json)."""
    if not _has_subfolder(model, "transformer"):
        return "sdxl" if _has_subfolder(model, "text_encoder_2") else "sd15"
    entry = _pipeline_config(model).get("transformer") or [None, None]
    family = TRANSFORMER_FAMILIES.get(entry[-1])
    if family is None:
        raise ValueError(f"{model}: transformer class {entry[-1]!r} is not supported for training; supported: "
                         f"{', '.join(TRANSFORMER_FAMILIES)} (or a UNet pipeline)")
    return family


def load_components(model: str, device: torch.device, weight_dtype: torch.dtype,
                    config: Optional[TrainConfig] = None) -> DiffusionComponents:
    """The frozen model parts, on `device`. `config` supplies the flow-matching options (defaults when None) and
    is checked against the family: options of the flow-matching families are refused for UNet models."""
    family = model_family(model)
    if family in flow_matching.FLOW_FAMILIES:
        return _load_flow_components(model, family, device, weight_dtype, config)
    if config is not None:
        set_flow_options = [name for name in FLOW_OPTIONS if getattr(config, name) is not None]
        if set_flow_options:
            raise ValueError(f"{', '.join(set_flow_options)} apply to flow-matching models (SD3, Flux) only; "
                             f"{model} is a {family} UNet pipeline")
    return _load_unet_components(model, device, weight_dtype)


def _load_unet_components(model: str, device: torch.device, weight_dtype: torch.dtype) -> DiffusionComponents:
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    is_sdxl = _has_subfolder(model, "text_encoder_2")
    # SDXL's VAE overflows in fp16; keep it in fp32 then.
    vae_dtype = torch.float32 if (is_sdxl and weight_dtype == torch.float16) else weight_dtype
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=weight_dtype)
    vae = None
    if _has_subfolder(model, "vae"):
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=vae_dtype)
    text_encoders, tokenizers = [], []
    for suffix in ("", "_2") if is_sdxl else ("",):
        config = transformers.AutoConfig.from_pretrained(model, subfolder=f"text_encoder{suffix}")
        encoder_cls = getattr(transformers, (config.architectures or ["CLIPTextModel"])[0])
        text_encoders.append(encoder_cls.from_pretrained(model, subfolder=f"text_encoder{suffix}", dtype=weight_dtype))
        tokenizers.append(transformers.CLIPTokenizer.from_pretrained(model, subfolder=f"tokenizer{suffix}"))
    # The training noise schedule: the pipeline's scheduler config read as DDPM (as diffusers' training scripts do).
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    if noise_scheduler.config.prediction_type not in PREDICTION_TYPES:  # fail before any latent is cached
        raise ValueError(f"{model}: unsupported scheduler prediction_type {noise_scheduler.config.prediction_type!r}; "
                         f"expected one of {', '.join(PREDICTION_TYPES)}")
    zero_empty_prompt = is_sdxl and bool(_pipeline_config(model).get("force_zeros_for_empty_prompt", True))
    for module in [unet, vae, *text_encoders]:
        if module is not None:
            module.requires_grad_(False)
    if vae is not None:
        vae.to(device).eval()
    for encoder in text_encoders:
        encoder.to(device).eval()
    unet.to(device)
    return DiffusionComponents(unet, vae, text_encoders, tokenizers, noise_scheduler, is_sdxl, zero_empty_prompt,
                               family="sdxl" if is_sdxl else "sd15")


# TrainConfig options that only the flow-matching families use (None = the family's default).
FLOW_OPTIONS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "guidance_scale", "max_sequence_length")


def flow_settings(family: str, transformer, config: Optional[TrainConfig]) -> FlowMatchingSettings:
    """The flow-matching settings: the config's options, else the diffusers training scripts' defaults."""
    options = {name: None if config is None else getattr(config, name) for name in FLOW_OPTIONS}
    guidance_embeds = bool(getattr(transformer.config, "guidance_embeds", False))
    guidance = options["guidance_scale"]
    if guidance is not None and not guidance_embeds:
        raise ValueError(f"guidance_scale={guidance} is an input of guidance-distilled Flux transformers only; this "
                         f"{family} transformer has no guidance embedding")
    if guidance is None and guidance_embeds:
        guidance = flow_matching.DEFAULT_FLUX_GUIDANCE
    defaults = FlowMatchingSettings(family, flow_matching.DEFAULT_WEIGHTING[family])
    scheme = options["weighting_scheme"] or defaults.weighting_scheme
    # Options of another sampling scheme would be silently ignored: refuse them.
    for name, used_by in (("logit_mean", "logit_normal"), ("logit_std", "logit_normal"), ("mode_scale", "mode")):
        if options[name] is not None and scheme != used_by:
            raise ValueError(f"{name} applies to weighting_scheme={used_by!r}; this run samples with {scheme!r}")
    return FlowMatchingSettings(
        family=family,
        weighting_scheme=scheme,
        logit_mean=defaults.logit_mean if options["logit_mean"] is None else options["logit_mean"],
        logit_std=defaults.logit_std if options["logit_std"] is None else options["logit_std"],
        mode_scale=defaults.mode_scale if options["mode_scale"] is None else options["mode_scale"],
        guidance=guidance,
        max_sequence_length=options["max_sequence_length"] or flow_matching.DEFAULT_MAX_SEQUENCE_LENGTH[family],
    )


def _load_flow_components(model: str, family: str, device, weight_dtype, config) -> DiffusionComponents:
    """SD3 / Flux: the pipeline is loaded whole, so prompts are encoded by its own encode_prompt."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    pipeline_cls = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[family]
    optional = {}
    if family == "sd3" and not _has_subfolder(model, "text_encoder_3"):  # SD3 without T5: zero T5 states
        optional = dict(text_encoder_3=None, tokenizer_3=None)
    pipe = pipeline_cls.from_pretrained(model, dtype=weight_dtype, **optional)
    if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        raise ValueError(f"{model}: {family} training needs a FlowMatchEulerDiscreteScheduler, the pipeline has "
                         f"{type(pipe.scheduler).__name__}")
    # The training schedule is the scheduler as constructed (the scripts copy it before any set_timesteps).
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    settings = flow_settings(family, pipe.transformer, config)
    text_encoders = [e for e in (pipe.text_encoder, pipe.text_encoder_2, getattr(pipe, "text_encoder_3", None)) if e]
    tokenizers = [t for t in (pipe.tokenizer, pipe.tokenizer_2, getattr(pipe, "tokenizer_3", None)) if t]
    for module in [pipe.transformer, pipe.vae, *text_encoders]:
        module.requires_grad_(False)
    pipe.vae.to(device).eval()
    for encoder in text_encoders:
        encoder.to(device).eval()
    pipe.transformer.to(device)

    def encode(prompts: list[str]):
        if family == "sd3":
            hidden, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                      do_classifier_free_guidance=False,
                                                      max_sequence_length=settings.max_sequence_length)
        else:
            hidden, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                   max_sequence_length=settings.max_sequence_length)
        return hidden, pooled

    return DiffusionComponents(pipe.transformer, pipe.vae, text_encoders, tokenizers, noise_scheduler, is_sdxl=False,
                               family=family, flow=settings, prompt_encoder=encode)


def check_resolution(components: DiffusionComponents, resolution: int) -> None:
    """Training images must give latents the transformer can patch (SD3: patch_size; Flux: 2x2 packing)."""
    if components.flow is None or components.vae is None:
        return
    downsampling = 2 ** (len(components.vae.config.block_out_channels) - 1)
    patch = 2 if components.family == "flux" else int(components.denoiser.config.patch_size)
    if resolution % (downsampling * patch):
        raise ValueError(f"resolution {resolution} must be a multiple of {downsampling * patch} for this "
                         f"{components.family} model (VAE downsampling {downsampling} x patch {patch})")


def add_lora_adapters(unet, adapters, *, rank: int, alpha: float, target_modules) -> dict[str, torch.nn.Parameter]:
    """Inject one peft LoRA adapter per name (peft's default init: B = 0, so every adapter starts as the base);
    returns the trainable parameters by name, kept in fp32 whatever the base dtype."""
    from peft import LoraConfig

    for name in adapters:
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=list(target_modules))
        with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the intent
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            unet.add_adapter(config, adapter_name=name)
    unet.set_adapter(list(adapters))
    params = {n: p for n, p in unet.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    if not params:
        raise ValueError(f"no module of the {type(unet).__name__} matches target_modules {list(target_modules)}")
    for p in params.values():
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


# ---------------------------------------------------------------------------------------------------------------------
# One training step
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class PairInputs:
    """Noised latents of both images of each pair (same noise and timestep), their targets and the conditioning."""

    noisy: dict  # {"w": [B, C, H, W] (Flux: packed [B, N, 4C]), "l": ...}
    target: dict
    timesteps: torch.Tensor  # [B]
    encoder_hidden_states: torch.Tensor  # [B, T, D]
    added_cond: Optional[dict] = None  # SDXL: {"w": {"text_embeds", "time_ids"}, "l": {...}}
    # sd3/flux: the other batch-dim transformer inputs (pooled_projections, guidance) and the non-batch ones
    # (Flux txt_ids / img_ids); None for UNets.
    transformer_inputs: Optional[dict] = None
    static_inputs: Optional[dict] = None
    loss_weights: Optional[torch.Tensor] = None  # [B] per-pair weight of the squared errors; None = 1

    @property
    def batch_size(self) -> int:
        return self.timesteps.shape[0]


def encode_prompts(components: DiffusionComponents, prompts: list[str]):
    """Text conditioning: (encoder_hidden_states, pooled text embeds or None), as the pipelines do."""
    if components.prompt_encoder is not None:
        return components.prompt_encoder(prompts)
    hidden, pooled = [], None
    for tokenizer, encoder in zip(components.tokenizers, components.text_encoders):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(encoder.device)
        if components.is_sdxl:
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
        else:
            hidden.append(encoder(ids)[0])
    return torch.cat(hidden, dim=-1), pooled


def empty_prompt_embeddings(components: DiffusionComponents):
    """The unconditional (∅) branch exactly as the pipeline builds it at inference: the encoded "" (zeros for
    SDXL with force_zeros_for_empty_prompt). Encoded once and reused by every step."""
    if components.empty_prompt is None:
        hidden, pooled = encode_prompts(components, [""])
        if components.zero_empty_prompt:
            hidden, pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
        components.empty_prompt = (hidden, pooled)
    return components.empty_prompt


def prompt_conditioning(components: DiffusionComponents, prompts: list[str], drop: list[bool]):
    """(encoder_hidden_states [B, T, D], pooled [B, P] or None): each prompt's embeddings, or the ∅ branch's where
    `drop` is set; only the kept prompts go through the text encoders."""
    empty_hidden, empty_pooled = empty_prompt_embeddings(components)
    hidden = empty_hidden.repeat(len(prompts), 1, 1)
    pooled = None if empty_pooled is None else empty_pooled.repeat(len(prompts), 1)
    kept = [i for i, dropped in enumerate(drop) if not dropped]
    if kept:
        kept_hidden, kept_pooled = encode_prompts(components, [prompts[i] for i in kept])
        hidden[kept] = kept_hidden
        if pooled is not None:
            pooled[kept] = kept_pooled
    return hidden, pooled


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict under the scheduler's prediction_type."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")


def _encode_pixels(components: DiffusionComponents, pixels: torch.Tensor, generator) -> torch.Tensor:
    vae = components.vae
    if vae is None:
        return pixels
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample(generator=generator)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


@torch.no_grad()
def prepare_inputs(components, batch: dict, generator: torch.Generator, *, prompt_dropout: float,
                   device, dtype) -> PairInputs:
    if "latents_w" in batch:
        latents = {s: batch[f"latents_{s}"].to(device, torch.float32) for s in "wl"}
    else:
        latents = {s: _encode_pixels(components, batch[f"pixels_{s}"].to(device), generator).float() for s in "wl"}
    n = latents["w"].shape[0]
    # The dropout mask decides which prompts to encode, so it is drawn on the host (reading a device draw back would
    # synchronize every micro-step); it is seeded from the micro-step's generator, so resume stays exact.
    host_generator = torch.Generator().manual_seed(generator.initial_seed())
    drop = (torch.rand(n, generator=host_generator) < prompt_dropout).tolist()
    hidden, pooled = prompt_conditioning(components, list(batch["prompts"]), drop)
    scheduler = components.noise_scheduler
    if components.flow is not None:
        return PairInputs(**flow_matching.flow_pair_inputs(scheduler, components.flow, latents, hidden, pooled,
                                                           generator, dtype))
    noise = torch.randn(latents["w"].shape, generator=generator, device=device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator, device=device)
    target = {s: training_target(scheduler, latents[s], noise, timesteps) for s in "wl"}
    noisy = {s: scheduler.add_noise(latents[s], noise, timesteps).to(dtype) for s in "wl"}
    added = None
    if components.is_sdxl:
        added = {s: {"text_embeds": pooled.to(dtype), "time_ids": batch[f"time_ids_{s}"].to(device, dtype)} for s in "wl"}
    return PairInputs(noisy, target, timesteps, hidden.to(dtype), added)


def _unet_rows(unet, inputs: PairInputs, sides: list[str]) -> torch.Tensor:
    """One UNet (or transformer) call over the rows [side_0 pairs, side_1 pairs, ...] ("w"/"l" per block of B rows)."""
    if inputs.transformer_inputs is not None:
        return flow_matching.transformer_rows(unet, inputs.noisy, inputs.timesteps, inputs.encoder_hidden_states,
                                              inputs.transformer_inputs, inputs.static_inputs, sides)
    sample = torch.cat([inputs.noisy[s] for s in sides])
    kwargs = {}
    if inputs.added_cond is not None:
        kwargs["added_cond_kwargs"] = {
            k: torch.cat([inputs.added_cond[s][k] for s in sides]) for k in ("text_embeds", "time_ids")
        }
    return unet(
        sample,
        inputs.timesteps.repeat(len(sides)),
        inputs.encoder_hidden_states.repeat(len(sides), 1, 1),
        return_dict=False,
        **kwargs,
    )[0]


def _adapter_dpo(adapter: str, pred_w, pred_l, ref_w, ref_l, inputs: PairInputs, beta: float):
    """DPO for pos; NPO (winner and loser swapped) for neg."""
    tw, tl, weights = inputs.target["w"], inputs.target["l"], inputs.loss_weights
    if adapter == "pos":
        return dpo_loss(pred_w, pred_l, ref_w, ref_l, tw, tl, beta, weights=weights, return_metrics=True)
    return dpo_loss(pred_l, pred_w, ref_l, ref_w, tl, tw, beta, weights=weights, return_metrics=True)


def _collect(per_adapter: dict[str, tuple]) -> tuple[torch.Tensor, dict]:
    loss = sum(loss for loss, _ in per_adapter.values())
    metrics = {"loss": loss.detach()}
    for adapter, (adapter_loss, extra) in per_adapter.items():
        metrics[f"loss_{adapter}"] = adapter_loss.detach()
        for key, value in extra.items():
            metrics[f"{key}_{adapter}"] = value
    accuracies = [m for k, m in metrics.items() if k.startswith("accuracy_")]
    if accuracies:
        metrics["accuracy"] = torch.stack(accuracies).mean()
        metrics["reward_margin"] = torch.stack([m for k, m in metrics.items() if k.startswith("reward_margin_")]).mean()
    return loss, metrics


SFT_SIDE = {"pos": "w", "neg": "l"}  # SFT: the positive module imitates the winners, the negative the losers


def joint_step(unet, reference_unet, inputs: PairInputs, objective: str, beta: float, backward: Callable):
    """All adapters of the objective in one UNet pass (segmented LoRA layers); backward runs inside the routing
    context so gradient-checkpoint recomputation sees the same routing. Returns (loss, metrics)."""
    b = inputs.batch_size
    adapters = OBJECTIVE_ADAPTERS[objective]
    if objective in SFT_OBJECTIVES:
        sides = [SFT_SIDE[a] for a in adapters]
        with segment_routing(unet, [(b, a) for a in adapters]):
            pred = _unet_rows(unet, inputs, sides)
            per_adapter = {a: (sft_loss(pred[i * b:(i + 1) * b], inputs.target[side], inputs.loss_weights), {})
                           for i, (a, side) in enumerate(zip(adapters, sides))}
            loss, metrics = _collect(per_adapter)
            backward(loss)
        return loss, metrics
    with torch.no_grad(), segment_routing(reference_unet, [(2 * b, None)]):
        ref = _unet_rows(reference_unet, inputs, ["w", "l"]).float()
    with segment_routing(unet, [(2 * b, a) for a in adapters]):
        pred = _unet_rows(unet, inputs, ["w", "l"] * len(adapters))
        per_adapter = {}
        for i, adapter in enumerate(adapters):
            pred_w, pred_l = pred[2 * i * b : (2 * i + 1) * b], pred[(2 * i + 1) * b : (2 * i + 2) * b]
            per_adapter[adapter] = _adapter_dpo(adapter, pred_w, pred_l, ref[:b], ref[b:], inputs, beta)
        loss, metrics = _collect(per_adapter)
        backward(loss)
    return loss, metrics


def _activate(unet, adapter: Optional[str], lora_params) -> None:
    """Plain peft switching for the separate path; peft turns requires_grad off for inactive adapters, so restore."""
    if adapter is None:
        unet.disable_adapters()
    else:
        unet.enable_adapters()
        unet.set_adapter(adapter)
    for p in lora_params:
        p.requires_grad_(True)


def separate_step(unet, inputs: PairInputs, objective: str, beta: float, backward: Callable, lora_params):
    """The naive way: one UNet call per adapter, and per adapter its own reference call (plain peft layers)."""
    per_adapter = {}
    for adapter in OBJECTIVE_ADAPTERS[objective]:
        if objective in SFT_OBJECTIVES:
            side = SFT_SIDE[adapter]
            _activate(unet, adapter, lora_params)
            pred = _unet_rows(unet, inputs, [side])
            per_adapter[adapter] = (sft_loss(pred, inputs.target[side], inputs.loss_weights), {})
        else:
            _activate(unet, None, lora_params)
            with torch.no_grad():
                ref = _unet_rows(unet, inputs, ["w", "l"]).float()
            _activate(unet, adapter, lora_params)
            pred = _unet_rows(unet, inputs, ["w", "l"])
            b = inputs.batch_size
            per_adapter[adapter] = _adapter_dpo(adapter, pred[:b], pred[b:], ref[:b], ref[b:], inputs, beta)
        backward(per_adapter[adapter][0])
    return _collect(per_adapter)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints (atomic: written into a temporary folder, then renamed)
# ---------------------------------------------------------------------------------------------------------------------
def _checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": _to_json(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def _to_json(value):
    return [_to_json(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value


def run_record(config: TrainConfig, source) -> dict:
    """What a checkpoint must share with the run that resumes it: the data order and the meaning of a step depend on
    these, so resuming under other values would silently train on another sequence than the one checkpointed."""
    layout = hashlib.sha256(json.dumps([list(g) for g in source.groups]).encode()).hexdigest()[:16]
    return {
        "objective": config.objective,
        "batch_size": int(config.batch_size),
        "grad_accum": int(config.grad_accum),
        "seed": int(config.seed),
        "dataset": str(Path(config.dataset).resolve()),
        "dataset_format": config.dataset_format,
        "image_root": None if config.image_root is None else str(Path(config.image_root).resolve()),
        "keep_ties": bool(config.keep_ties),
        "dataset_pairs": int(source.num_pairs),
        "dataset_layout": layout,  # files, row groups and rows per group
    }


def check_run_record(checkpoint: Path, saved: Optional[dict], run: dict) -> None:
    """Raise a ValueError naming every setting in which the resuming run differs from the checkpoint's run."""
    if saved is None:
        raise ValueError(f"{checkpoint} records no run settings (written by an older cgkernels): cannot check that "
                         "batch size, gradient accumulation, objective and dataset match; start a new run")
    differ = [f"{key}: checkpoint {saved.get(key)!r}, now {value!r}" for key, value in run.items()
              if saved.get(key) != value]
    if differ:
        raise ValueError(f"{checkpoint} was written by a run with other settings ({'; '.join(differ)}); resume with "
                         "the checkpoint's settings, or train into another output_dir")


def save_checkpoint(accelerator, output_dir: Path, step: int, lora_params: dict, optimizer, lr_scheduler,
                    batches: PreferenceBatches, history: list, keep: int, *, run: dict) -> Path:
    from safetensors.torch import save_file

    root = output_dir / "checkpoints"
    final, temp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    rank_state = {"data": batches.state_dict(), "rng": _rng_state()}
    (temp / f"rank{rank}.json").write_text(json.dumps(rank_state))
    torch_rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        torch_rng["cuda"] = torch.cuda.get_rng_state()
    save_file(torch_rng, str(temp / f"rank{rank}_torch_rng.safetensors"))
    if accelerator.is_main_process:
        save_file({n: p.detach().float().cpu().contiguous() for n, p in lora_params.items()}, str(temp / "adapters.safetensors"))
        torch.save(optimizer.state_dict(), temp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), temp / "lr_scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), temp / "scaler.pt")
        (temp / "state.json").write_text(json.dumps({"step": step, "history": history, "run": run}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(temp, final)
        for old in _checkpoint_dirs(output_dir)[:-keep] if keep else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: Path, lora_params: dict, optimizer, lr_scheduler,
                    batches: PreferenceBatches, *, run: dict) -> tuple[int, list]:
    """Restore a checkpoint written by a run with the same `run_record` (else a ValueError names what differs)."""
    from safetensors.torch import load_file

    state = json.loads((checkpoint / "state.json").read_text())
    check_run_record(checkpoint, state.get("run"), run)

    rank_file = checkpoint / f"rank{accelerator.process_index}.json"
    # Each process resumes its own data position: any other process count would silently re-split the data.
    written_by = len(list(checkpoint.glob("rank*.json")))
    if written_by != accelerator.num_processes or not rank_file.is_file():
        raise ValueError(f"{checkpoint} was written by {written_by} process(es); resume it with the same number "
                         f"(now {accelerator.num_processes})")
    saved = load_file(str(checkpoint / "adapters.safetensors"))
    missing = sorted(set(lora_params) - set(saved))
    if missing:
        raise ValueError(f"{checkpoint} lacks adapter weights {missing[:3]}...: different rank/targets/objective?")
    reshaped = [n for n, p in lora_params.items() if saved[n].shape != p.shape]
    if reshaped:
        raise ValueError(f"{checkpoint}: adapter weight {reshaped[0]} has shape {tuple(saved[reshaped[0]].shape)}, "
                         f"the model's has {tuple(lora_params[reshaped[0]].shape)}: a different LoRA rank?")
    with torch.no_grad():
        for name, param in lora_params.items():
            param.copy_(saved[name])
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(checkpoint / "lr_scheduler.pt", weights_only=True))
    if accelerator.scaler is not None and (checkpoint / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(checkpoint / "scaler.pt", weights_only=True))
    rank_state = json.loads(rank_file.read_text())
    batches.load_state_dict(rank_state["data"])
    random.setstate(_to_tuple(rank_state["rng"]["python"]))
    name, keys, *rest = rank_state["rng"]["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch_rng = load_file(str(checkpoint / f"rank{accelerator.process_index}_torch_rng.safetensors"))
    torch.set_rng_state(torch_rng["cpu"])
    if "cuda" in torch_rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch_rng["cuda"])
    return int(state["step"]), list(state["history"])


# ---------------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------------
def save_adapters(unet, adapters, output_dir: Path, family: str) -> dict[str, str]:
    """OUT/<adapter>/pytorch_lora_weights.safetensors in diffusers' LoRA format (as its training scripts write),
    through the family's pipeline class (unet_lora_layers / transformer_lora_layers)."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    pipeline_name, prefix = {
        "sd15": ("StableDiffusionPipeline", "unet"), "sdxl": ("StableDiffusionXLPipeline", "unet"),
        "sd3": ("StableDiffusion3Pipeline", "transformer"), "flux": ("FluxPipeline", "transformer"),
    }[family]
    pipeline_cls = getattr(diffusers, pipeline_name)
    paths = {}
    for adapter in adapters:
        state = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(unet, adapter_name=adapter).items()}
        if prefix == "unet":  # as train_text_to_image_lora(_sdxl).py; the SD3/Flux scripts save peft's names as is
            state = _diffusers_names_if_complete(state, convert_state_dict_to_diffusers(state))
        folder = output_dir / adapter
        pipeline_cls.save_lora_weights(
            folder,
            **{f"{prefix}_lora_layers": state, f"{prefix}_lora_adapter_metadata": unet.peft_config[adapter].to_dict()},
            safe_serialization=True,
        )
        paths[adapter] = str(folder / LORA_WEIGHT_NAME)
    return paths


def _diffusers_names_if_complete(peft_state: dict, converted: dict) -> dict:
    """diffusers' converter renames only attention projections (to_q ... to_out.0). A file that mixes its names with
    peft's (convolutions, time_emb_proj targeted) is read by load_lora_weights as peft's, which then drops every
    renamed key with only a warning: such adapters are saved with peft's names throughout, which it loads whole."""
    mixed = any(".lora_A." in name or ".lora_B." in name for name in converted)
    return peft_state if mixed else converted


def adapter_fingerprints(lora_params: dict, adapters) -> dict[str, str]:
    """sha256 of each adapter's parameters (fp32 bytes in name order): equal across ranks after DDP training."""
    prints = {}
    for adapter in adapters:
        digest = hashlib.sha256()
        for name in sorted(n for n in lora_params if f".{adapter}." in n):
            digest.update(lora_params[name].detach().float().cpu().contiguous().numpy().tobytes())
        prints[adapter] = digest.hexdigest()
    return prints


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------
def _make_optimizer(config: TrainConfig, params):
    optimizer_cls = torch.optim.AdamW
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("use_8bit_adam needs the bitsandbytes package (pip install bitsandbytes)") from error
        optimizer_cls = bnb.optim.AdamW8bit
    return optimizer_cls(params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                         weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)


def _step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    # Noise, timesteps and prompt dropout of a micro-step depend only on these, so a resumed run replays them.
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0])


def _make_batches(config: TrainConfig, source, components, accelerator, output_dir: Path) -> PreferenceBatches:
    transform = PairTransform(config.resolution, config.random_crop, config.random_flip)
    cache = None
    if config.cache_latents:
        from cgkernels.train.latent_cache import LatentCache, build_latent_cache

        cache_dir = Path(config.latent_cache_dir or output_dir / "latent_cache")
        fingerprint = {"model": str(config.model), "dataset": str(Path(config.dataset).resolve()),
                       "dataset_format": config.dataset_format, "resolution": config.resolution,
                       "keep_ties": config.keep_ties}
        generator = torch.Generator(accelerator.device).manual_seed(config.seed)

        def encode(pixels):
            with torch.no_grad():
                return _encode_pixels(components, pixels.to(accelerator.device), generator)

        if accelerator.is_main_process and (config.random_crop or config.random_flip):
            print("cache_latents: latents are cached from centre crops without flips; random_crop/random_flip are ignored")
        build_latent_cache(source, encode, str(cache_dir), resolution=config.resolution, fingerprint=fingerprint,
                           rank=accelerator.process_index, world_size=accelerator.num_processes,
                           progress=config.progress and accelerator.is_main_process)
        accelerator.wait_for_everyone()
        cache = LatentCache(str(cache_dir))
    return PreferenceBatches(source, transform, seed=config.seed, shuffle=config.shuffle,
                             rank=accelerator.process_index, world_size=accelerator.num_processes, latent_cache=cache)


def _mean_metrics(micro_metrics: list[dict], accelerator) -> dict[str, float]:
    keys = sorted(micro_metrics[0])
    stacked = torch.stack([torch.stack([m[k].float() for k in keys]) for m in micro_metrics]).mean(0)
    stacked = accelerator.reduce(stacked.to(accelerator.device), reduction="mean")
    return {k: float(v) for k, v in zip(keys, stacked.tolist())}


def train(config: TrainConfig) -> dict:
    """Train the objective's adapters and write OUT/<adapter>/pytorch_lora_weights.safetensors.

    Returns the final metrics: step, loss, losses (one per optimizer step, averaged over accumulation and
    processes), lr, accuracy / reward_margin for the DPO objectives, skipped_pairs (unreadable images, all
    processes), adapters (paths of the written LoRA files), adapter_sha256, output_dir, seconds.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, is_initialized

    started = time.perf_counter()
    config.validate()
    check_model_source(config.model)
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ImportError("tensorboard=True needs the tensorboard package (pip install tensorboard)")
    source = open_pair_source(config.dataset, config.dataset_format, image_root=config.image_root,
                              keep_ties=config.keep_ties)
    output_dir = Path(config.output_dir)
    earlier = _checkpoint_dirs(output_dir)
    if earlier and not config.resume:  # a fresh run would prune its own new checkpoints and a resume pick stale ones
        raise ValueError(f"{output_dir} holds checkpoints of an earlier run (newest {earlier[-1].name}): resume it "
                         "(resume=True, --resume) or train into another or an emptied output_dir")
    owns_accelerate_state = not is_initialized()
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),  # lets torchrun / accelerate launch run CPU processes with gloo
        gradient_accumulation_steps=config.grad_accum,
        mixed_precision=config.mixed_precision,
        log_with="tensorboard" if config.tensorboard else None,
        project_dir=str(output_dir),
    )
    try:
        return _train(config, accelerator, source, output_dir, started)
    finally:
        # accelerate keeps its settings in process-wide singletons: release the ones this call created (the process
        # group stays) so that a later train() in this process may use other settings, e.g. another mixed precision.
        if owns_accelerate_state:
            AcceleratorState._reset_state(reset_partial_state=False)
            GradientState._reset_state()


def _train(config: TrainConfig, accelerator, source, output_dir: Path, started: float) -> dict:
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    if config.batching == "separate" and accelerator.num_processes > 1:
        raise ValueError("batching='separate' is a single-process reference path; use batching='joint'")
    set_seed(config.seed)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[accelerator.mixed_precision]

    components = load_components(config.model, accelerator.device, weight_dtype, config)
    check_resolution(components, config.resolution)
    unet = components.denoiser
    lora_params = add_lora_adapters(unet, config.adapters, rank=config.rank, alpha=config.lora_alpha,
                                    target_modules=config.target_modules)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    handle = None
    if config.batching == "joint":
        handle = attach_segmented_lora(unet, {a: {a: 1.0} for a in config.adapters}, trainable=True)
    optimizer = _make_optimizer(config, list(lora_params.values()))
    # accelerate steps a prepared scheduler once per process per optimizer step.
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=config.max_steps * accelerator.num_processes)
    train_unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    batches = _make_batches(config, source, components, accelerator, output_dir)

    step, history = 0, []
    run = run_record(config, source)
    checkpoints = _checkpoint_dirs(output_dir)
    if config.resume and checkpoints:
        step, history = load_checkpoint(accelerator, checkpoints[-1], lora_params, optimizer, lr_scheduler, batches,
                                        run=run)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=1, default=str))
    if config.tensorboard:  # accelerate keeps the trackers on the main process only
        accelerator.init_trackers("cgkernels-train", config={k: str(v) for k, v in config.to_dict().items()})

    logs: dict[str, float] = {}
    progress = tqdm(total=config.max_steps, initial=step, desc=f"train {config.objective}",
                    disable=not (config.progress and accelerator.is_main_process))
    while step < config.max_steps:
        micro_metrics = []
        for micro in range(config.grad_accum):
            batch = batches.next_batch(config.batch_size)
            generator = torch.Generator(accelerator.device).manual_seed(
                _step_seed(config.seed, step, micro, accelerator.process_index))
            with accelerator.accumulate(train_unet):
                inputs = prepare_inputs(components, batch, generator, prompt_dropout=config.prompt_dropout,
                                        device=accelerator.device, dtype=weight_dtype)
                with accelerator.autocast():
                    if config.batching == "joint":
                        _, metrics = joint_step(train_unet, unet, inputs, config.objective, config.beta, accelerator.backward)
                    else:
                        _, metrics = separate_step(unet, inputs, config.objective, config.beta, accelerator.backward,
                                                   list(lora_params.values()))
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(list(lora_params.values()), config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro_metrics.append(metrics)
        step += 1
        logs = _mean_metrics(micro_metrics, accelerator)
        logs["lr"] = lr_scheduler.get_last_lr()[0]
        history.append(logs["loss"])
        progress.update(1)
        progress.set_postfix({k: f"{logs[k]:.4g}" for k in ("loss", "accuracy", "lr") if k in logs})
        if config.tensorboard:
            accelerator.log(logs, step=step)
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            save_checkpoint(accelerator, output_dir, step, lora_params, optimizer, lr_scheduler, batches, history,
                            config.checkpoints_to_keep, run=run)
    progress.close()

    skipped = accelerator.reduce(torch.tensor(float(batches.skipped), device=accelerator.device), reduction="sum")
    accelerator.wait_for_everyone()
    if handle is not None:
        handle.detach()
    paths = {a: str(output_dir / a / LORA_WEIGHT_NAME) for a in config.adapters}
    if accelerator.is_main_process:
        paths = save_adapters(unet, config.adapters, output_dir, components.family)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    result = {
        "step": step,
        "loss": history[-1] if history else math.nan,
        "losses": history,
        **{k: v for k, v in logs.items() if k != "loss"},
        "skipped_pairs": int(skipped.item()),
        "adapters": paths,
        "adapter_sha256": adapter_fingerprints(lora_params, config.adapters),
        "output_dir": str(output_dir),
        "seconds": time.perf_counter() - started,
    }
    return result
