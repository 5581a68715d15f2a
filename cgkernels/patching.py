"""`cgkernels.patch(pipe)`: every guidance branch of a Stable Diffusion (XL) pipeline in one batched UNet call.

The pipeline's `__call__` is untouched. The patch takes over `pipe.unet.forward` (an instance attribute, so
`unpatch` restores the original exactly). Each UNet call from the pipeline's loop carries the CFG batch
[uncond x B, cond x B] (or [cond x B] without CFG); the patched forward

1. expands it to the mode's branch rows (every batch-dim input is replicated: sample, a batched timestep,
   encoder_hidden_states, added_cond_kwargs such as SDXL's text_embeds/time_ids, timestep_cond, masks, ...),
2. runs ONE UNet call inside `segment_routing`, so every peft LoRA layer applies each row segment's adapter mix
   through `multi_lora_linear`,
3. merges the branch outputs with `guidance_merge` (g = pipe.guidance_scale, rescale phi = pipe.guidance_rescale),
4. returns [eps, eps] (or [eps]): the pipeline's own u + g(c - u) then yields eps, and its own
   rescale_noise_cfg(eps, eps, phi) leaves it unchanged (up to one rounding).

Steps outside [start, stop) run the pipeline's rows through the base model only. Steps are scheduler steps: the
loop index i of the pipeline (UNet calls since the scheduler's timesteps were last set, which every pipeline call
does) divided by `scheduler.order`, out of ceil(len(timesteps) / order). For first-order schedulers that is i of
len(timesteps) (img2img's shortened schedules included); for second-order ones (Heun, KDPM2) both UNet calls of one
step are guided alike.

Adapters. The positive / negative adapters enter every mode at their configured scale (lora_alpha / r), whatever
weights `set_adapters` holds and whichever adapters are active or disabled: `strength` is the knob. Mode "cfg" is
the exception: it runs the adapters active at patch time with their set_adapters weights, as the unpatched pipeline
would. The LoRA scale `cross_attention_kwargs={"scale": x}` multiplies every adapter delta of every branch (in the
unpatched pipeline it multiplies the active adapters). Adapters (and their weights) are read at patch time: patch
after loading them, and patch again after changing them. Only UNet adapters are branch-specific: LoRA layers on the
text encoders run as the user set them and feed the same prompt embeddings to every branch.

The patched UNet reads guidance_scale, guidance_rescale, do_classifier_free_guidance and the scheduler from the
pipeline that calls it: `pipe`, or another supported pipeline sharing the UNet (e.g. built from pipe.components);
direct UNet calls read them from `pipe`. Adapters changed, fused or deleted after patching, and unsupported
pipelines or dtypes, are refused with a ValueError (cgkernels.patch_guard).
"""
from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass, field

import torch

from cgkernels.guidance import USER, GuidanceConfig, RowPlan, is_guided_step, mode_mixes, row_plan
from cgkernels.lora_layers import attach_segmented_lora, loaded_adapters, lora_layers, segment_routing
from cgkernels.ops import guidance_merge
from cgkernels.patch_guard import AdapterGuard, calling_pipeline, check_dtype, check_pipeline, guidance_pipeline

__all__ = ["patch", "unpatch", "is_patched"]

_STATE_ATTR = "_cgkernels_patch"


@dataclass
class _PatchState:
    config: GuidanceConfig
    handle: object  # SegmentedLoraHandle or None when the mode needs no adapter
    user_mix: str | None
    had_instance_forward: bool
    previous_forward: object
    original_forward: object
    signature: inspect.Signature
    step: int = 0
    timesteps_ref: object = None
    plans: dict = field(default_factory=dict)


def is_patched(pipe) -> bool:
    return getattr(pipe, _STATE_ATTR, None) is not None


def patch(
    pipe,
    guidance: str = "contrastive",
    positive: str | None = "pos",
    negative: str | None = "neg",
    strength: float = 1.0,
    start: float = 0.0,
    stop: float = 1.0,
    merge_weight: float = 0.0,
):
    """Make `pipe` run preference guidance in one batched UNet pass per step. Returns `pipe`.

    guidance: "contrastive" | "contrastive-cond" | "pgd" | "npo" | "merged" | "cfg" (see cgkernels.guidance).
    positive / negative: names of LoRA adapters loaded with pipe.load_lora_weights(..., adapter_name=...).
    strength s, guided window [start, stop) as fractions of the step count, NPO's merge_weight.
    Adapters enter at their configured scale (set_adapters weights are ignored, except by mode "cfg"), are read
    now (patch after loading them), and only UNet adapters are branch-specific: see the module docstring.
    """
    check_pipeline(pipe)
    if is_patched(pipe):
        raise ValueError("this pipeline is already patched; call cgkernels.unpatch(pipe) first")
    config = GuidanceConfig(guidance, positive, negative, strength, start, stop, merge_weight)
    config.validate()
    unet = pipe.unet
    check_dtype(unet)
    if "forward" in unet.__dict__ and getattr(unet.forward, "_cgkernels_patched", False):
        raise ValueError("pipe.unet is already patched (shared with another pipeline?); unpatch that one first")
    loaded = loaded_adapters(unet)
    for adapter in config.adapters_used():
        if adapter not in loaded:
            raise ValueError(f"adapter {adapter!r} is not loaded on pipe.unet; loaded adapters: {loaded}")

    mixes = mode_mixes(config)
    user_mix = None
    if config.mode == "cfg":
        active = _user_active_adapters(unet)
        if active:
            mixes[USER], user_mix = {a: 1.0 for a in active}, USER
    handle = attach_segmented_lora(unet, mixes, user_weighted=[USER] if user_mix else ()) if mixes else None

    original_forward = unet.forward
    state = _PatchState(
        config=config,
        handle=handle,
        user_mix=user_mix,
        had_instance_forward="forward" in unet.__dict__,
        previous_forward=unet.__dict__.get("forward"),
        original_forward=original_forward,
        signature=inspect.signature(original_forward),
    )

    guard = AdapterGuard(unet, lora_layers(unet), watch_user_settings=config.mode == "cfg")

    def patched_forward(*args, **kwargs):
        caller = calling_pipeline()
        guard.check(caller)
        return _guided_forward(guidance_pipeline(pipe, caller), state, args, kwargs)

    patched_forward._cgkernels_patched = True
    unet.forward = patched_forward
    setattr(pipe, _STATE_ATTR, state)
    return pipe


def unpatch(pipe):
    """Restore the pipeline's UNet forward and its peft LoRA layers exactly as they were before `patch`."""
    state = getattr(pipe, _STATE_ATTR, None)
    if state is None:
        raise ValueError("this pipeline is not patched")
    unet = pipe.unet
    if state.had_instance_forward:
        unet.forward = state.previous_forward
    else:
        unet.__dict__.pop("forward", None)
    if state.handle is not None:
        state.handle.detach()
    delattr(pipe, _STATE_ATTR)
    return pipe


def _user_active_adapters(unet) -> list[str]:
    """Adapters active in the UNet's LoRA layers at patch time (none if LoRA is disabled)."""
    for _, layer in lora_layers(unet):
        if layer.disable_adapters:
            return []
        loaded = loaded_adapters(unet)
        return [a for a in layer.active_adapters if a in loaded]
    return []


# --------------------------------------------------------------------------------------------------------------------
# The patched forward
# --------------------------------------------------------------------------------------------------------------------
def _current_step(pipe, state: _PatchState) -> tuple[int, int | None]:
    """(k, N): the scheduler step of this UNet call and the pipeline's number of scheduler steps.

    A scheduler of order 2 (Heun, KDPM2) makes two UNet calls per step, and its timesteps list holds them all."""
    timesteps = getattr(pipe.scheduler, "timesteps", None)
    if timesteps is not state.timesteps_ref:  # a new pipeline call set new timesteps
        state.timesteps_ref = timesteps  # keeping the reference also keeps its id from being reused
        state.step = 0
    call = state.step
    state.step += 1
    order = int(getattr(pipe.scheduler, "order", 1) or 1)
    num_calls = getattr(pipe, "_num_timesteps", None)
    return call // order, None if num_calls is None else -(-num_calls // order)


def _guided_forward(pipe, state: _PatchState, args, kwargs):
    bound = state.signature.bind(*args, **kwargs)
    inputs = dict(bound.arguments)
    return_dict = inputs.pop("return_dict", True)
    lora_scale = _pop_lora_scale(inputs)
    rows = inputs["sample"].shape[0]
    cfg = bool(pipe.do_classifier_free_guidance)
    halves = 2 if cfg else 1
    if rows % halves:
        raise ValueError(f"UNet batch of {rows} rows cannot be the pipeline's CFG batch [uncond, cond]")
    batch = rows // halves

    step, num_steps = _current_step(pipe, state)
    guided = num_steps is None or is_guided_step(step, num_steps, state.config.start, state.config.stop)
    if not guided:
        with segment_routing([(rows, None)]):
            return state.original_forward(**inputs, return_dict=return_dict)

    guidance_scale = float(pipe.guidance_scale)
    plan = _plan(state, cfg, guidance_scale)
    blocks = plan.input_blocks(cfg)
    expanded = {k: _expand(v, rows, batch, blocks) for k, v in inputs.items()}
    with segment_routing(plan.routing(batch), lora_scale=lora_scale):
        result = state.original_forward(**expanded, return_dict=False)
    out = result[0]
    preds = out.view(len(plan.branches), batch, *out.shape[1:])
    rescale = float(getattr(pipe, "_guidance_rescale", 0.0) or 0.0) if cfg else 0.0
    eps = guidance_merge(preds, list(plan.coeffs), rescale=rescale, ref_coeffs=list(plan.ref_coeffs))
    eps = torch.cat([eps] * halves) if halves > 1 else eps
    if return_dict:
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=eps)
    return (eps,)


def _pop_lora_scale(inputs: dict) -> float:
    """Take diffusers' LoRA `scale` out of cross_attention_kwargs: the segmented layers apply it per routing,
    and the UNet's own handling would rewrite peft's `scaling` of the active adapters during the call."""
    kwargs = inputs.get("cross_attention_kwargs")
    if not kwargs or "scale" not in kwargs:
        return 1.0
    kwargs = dict(kwargs)
    scale = kwargs.pop("scale")
    inputs["cross_attention_kwargs"] = kwargs
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"cross_attention_kwargs['scale'] must be a finite number, got {scale!r}")
    return float(scale)


def _plan(state: _PatchState, cfg: bool, guidance_scale: float) -> RowPlan:
    key = (cfg, guidance_scale)
    plan = state.plans.get(key)
    if plan is None:
        plan = row_plan(state.config, cfg=cfg, guidance_scale=guidance_scale, user_mix=state.user_mix)
        state.plans[key] = plan
    return plan


def _expand(value, rows: int, batch: int, blocks: list[int]):
    """Replicate every tensor whose dim 0 is the pipeline's batch into the plan's row blocks (recursing into
    dicts, lists and tuples, e.g. added_cond_kwargs, ControlNet residuals)."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] != rows:
            return value  # e.g. a scalar timestep
        halves = rows // batch
        repeats, leftover = divmod(len(blocks), halves)
        if leftover == 0 and blocks == list(range(halves)) * repeats:  # the whole batch, repeated
            return torch.cat([value] * repeats)
        return torch.cat([value[b * batch:(b + 1) * batch] for b in blocks])
    if isinstance(value, dict):
        return {k: _expand(v, rows, batch, blocks) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_expand(v, rows, batch, blocks) for v in value)
    return value

