"""`cgkernels.patch(pipe)`: every guidance branch of a Stable Diffusion (XL) pipeline in one batched UNet call.

The pipeline's `__call__` is untouched. The patch takes over `pipe.unet.forward` (an instance attribute, so
`unpatch` restores the original exactly). Each UNet call from the pipeline's loop carries the CFG batch
[uncond x B, cond x B] (or [cond x B] without CFG); the patched forward

1. expands it to the mode's branch rows (every batch-dim input is replicated: sample, a batched timestep,
   encoder_hidden_states, added_cond_kwargs such as SDXL's text_embeds/time_ids, timestep_cond, masks, ...),
2. runs ONE UNet call with the rows routed (the attach handle's router), so every peft LoRA layer applies each row
   segment's adapter mix through `multi_lora_linear`,
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

torch.compile. The patched forward is an eager host function (step counting, the [start, stop) window, the step
plan, the routing) around a traceable core (expand, one UNet call, merge): `torch.compile(pipe.unet, fullgraph=True)`
or `pipe.unet.compile()`, before or after `patch`, traces the core without graph breaks, one graph per distinct step
plan and input shape, and CUDA-graph replays never skip the host's state updates. patch / unpatch act on the module
under a compile wrapper. The denoiser's attribute and input names live in one `Denoiser` record.

The patched UNet reads guidance_scale, guidance_rescale, do_classifier_free_guidance and the scheduler from the
pipeline that calls it: `pipe`, or another supported pipeline sharing the UNet (e.g. built from pipe.components);
direct UNet calls read them from `pipe`. Adapters changed, fused or deleted after patching, and unsupported
pipelines or dtypes, are refused with a ValueError (cgkernels.patch_guard).
"""
from __future__ import annotations

import inspect
import math
import numbers
import types
from dataclasses import dataclass, field
from typing import Callable

import torch

from cgkernels.guidance import USER, GuidanceConfig, RowPlan, is_guided_step, mode_mixes, row_plan
from cgkernels.lora_layers import (
    SegmentRouter,
    SegmentRouting,
    attach_segmented_lora,
    loaded_adapters,
    lora_layers,
    unwrap_model,
)
from cgkernels.ops import guidance_merge
from cgkernels.patch_guard import (
    AdapterGuard,
    calling_pipeline,
    check_dtype,
    check_offload,
    check_pipeline,
    guidance_pipeline,
)

__all__ = ["patch", "unpatch", "is_patched"]

_STATE_ATTR = "_cgkernels_patch"


def _unet_output(sample: torch.Tensor):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample)


@dataclass(frozen=True)
class Denoiser:
    """Where a pipeline keeps its denoiser, the name of its batched latent input and how it wraps its output: the
    one place another model family (e.g. an SD3/Flux `transformer` taking `hidden_states`) plugs in."""

    attr: str
    sample_arg: str
    make_output: Callable[[torch.Tensor], object]


UNET = Denoiser(attr="unet", sample_arg="sample", make_output=_unet_output)


def _denoiser_of(pipe) -> Denoiser:
    return UNET  # every supported pipeline class is UNet-based


@dataclass(frozen=True)
class _StepPlan:
    """What the compiled core does in one UNet call, decided on the host. Frozen and cached per distinct value:
    torch.compile guards on these fields, so each distinct plan (and input shape) is one graph."""

    routing: SegmentRouting  # the rows each adapter mix serves
    batch: int  # B, the pipeline's batch per CFG half
    halves: int  # 2 with CFG ([uncond, cond]), else 1
    blocks: tuple[int, ...] | None  # per branch: which B-row block of the input feeds it; None = not guided
    coeffs: tuple[float, ...] = ()
    ref_coeffs: tuple[float, ...] = ()
    rescale: float = 0.0


@dataclass
class _PatchState:
    config: GuidanceConfig
    denoiser: Denoiser
    module: torch.nn.Module  # the denoiser itself (under any torch.compile wrapper): what patch / unpatch change
    handle: object  # SegmentedLoraHandle or None when the mode needs no adapter
    router: SegmentRouter
    user_mix: str | None
    own_forward: object  # the instance-level forward the patch displaced (None: the class's forward), to restore
    original_forward: object
    signature: inspect.Signature
    guard: AdapterGuard
    patched_forward: object = None
    step: int = 0
    timesteps_ref: object = None
    plans: dict = field(default_factory=dict)
    step_plans: dict = field(default_factory=dict)


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
    The UNet may be compiled before or after patching (torch.compile(pipe.unet) or pipe.unet.compile()).
    """
    check_pipeline(pipe)
    if is_patched(pipe):
        raise ValueError("this pipeline is already patched; call cgkernels.unpatch(pipe) first")
    config = GuidanceConfig(guidance, positive, negative, strength, start, stop, merge_weight)
    config.validate()
    denoiser = _denoiser_of(pipe)
    module = unwrap_model(getattr(pipe, denoiser.attr))  # the original module under a torch.compile wrapper
    if any(getattr(module.__dict__.get(slot), "_cgkernels_patched", False) for slot in ("forward", _HOOKED_SLOT)):
        raise ValueError(f"pipe.{denoiser.attr} is already patched (shared with another pipeline?); unpatch that one "
                         "first")
    check_offload(module, denoiser.attr)
    slot = _forward_slot(module)
    # The module's own forward: under accelerate's offload hook that is the one the hook calls, not the hook.
    original_forward = module.__dict__[slot] if slot == _HOOKED_SLOT else module.forward
    signature = inspect.signature(original_forward)
    if denoiser.sample_arg not in signature.parameters:
        raise ValueError(
            f"pipe.{denoiser.attr}.forward{signature} does not take `{denoiser.sample_arg}`: it was replaced by a "
            "wrapper that hides the model's signature. Restore the model's own forward before cgkernels.patch; "
            f"to compile, compile the module (torch.compile(pipe.{denoiser.attr}) or pipe.{denoiser.attr}.compile()), "
            "before or after patching"
        )
    check_dtype(module)
    loaded = loaded_adapters(module)
    for adapter in config.adapters_used():
        if adapter not in loaded:
            raise ValueError(f"adapter {adapter!r} is not loaded on pipe.{denoiser.attr}; loaded adapters: {loaded}")

    mixes = mode_mixes(config)
    user_mix = None
    if config.mode == "cfg":
        active = _user_active_adapters(module)
        if active:
            mixes[USER], user_mix = {a: 1.0 for a in active}, USER
    handle = attach_segmented_lora(module, mixes, user_weighted=[USER] if user_mix else ()) if mixes else None

    state = _PatchState(
        config=config,
        denoiser=denoiser,
        module=module,
        handle=handle,
        router=handle.router if handle is not None else SegmentRouter(),
        user_mix=user_mix,
        own_forward=module.__dict__.get(slot),
        original_forward=original_forward,
        signature=signature,
        guard=AdapterGuard(module, lora_layers(module), watch_user_settings=config.mode == "cfg"),
    )
    state.patched_forward = _host_forward(pipe, state)
    setattr(module, slot, state.patched_forward)
    setattr(pipe, _STATE_ATTR, state)
    return pipe


def unpatch(pipe):
    """Restore the pipeline's UNet forward and its peft LoRA layers exactly as they were before `patch`.

    Acts on the UNet module itself: a torch.compile wrapper made before or after patching keeps working (it
    compiles the original forward again on its next call)."""
    state = getattr(pipe, _STATE_ATTR, None)
    if state is None:
        raise ValueError("this pipeline is not patched")
    module = state.module
    slot = next((name for name in ("forward", _HOOKED_SLOT) if module.__dict__.get(name) is state.patched_forward),
                None)
    if slot is None:
        raise ValueError(
            f"pipe.{state.denoiser.attr}.forward was replaced after cgkernels.patch; restore the patched forward "
            "(or reload the pipeline) before unpatching"
        )
    if state.own_forward is not None:
        setattr(module, slot, state.own_forward)
    elif slot == "forward":
        del module.__dict__["forward"]
    else:  # patched before accelerate hooked the module: the hook is to call the class's forward from now on
        setattr(module, slot, types.MethodType(type(module).forward, module))
    if state.handle is not None:
        state.handle.detach()
    delattr(pipe, _STATE_ATTR)
    return pipe


# accelerate's hooks (diffusers' enable_model_cpu_offload) keep the module's own forward in `_old_forward` and install
# a wrapper as `forward` that calls it. diffusers removes and re-adds those hooks after every pipeline call
# (maybe_free_model_hooks): removal writes `_old_forward` back into `forward`, re-adding saves `forward` again. So
# the patch lives where the module's own forward lives, `_old_forward` under a hook: it then survives those cycles
# in either order of patch and offload, and unpatch restores it in whichever slot it is found.
_HOOKED_SLOT = "_old_forward"


def _forward_slot(module) -> str:
    return _HOOKED_SLOT if "_hf_hook" in module.__dict__ and _HOOKED_SLOT in module.__dict__ else "forward"


def _user_active_adapters(unet) -> list[str]:
    """Adapters active in the UNet's LoRA layers at patch time (none if LoRA is disabled)."""
    for _, layer in lora_layers(unet):
        if layer.disable_adapters:
            return []
        loaded = loaded_adapters(unet)
        return [a for a in layer.active_adapters if a in loaded]
    return []


# --------------------------------------------------------------------------------------------------------------------
# The patched forward: an eager host part around a traceable core
# --------------------------------------------------------------------------------------------------------------------
# torch.compile of the patched UNet (either form) reaches `module.forward`, the host function. It is excluded from
# tracing (`disable(recursive=False)`: this frame only), so step counting, the [start, stop) window, plan selection
# and setting the router run eagerly on every call, CUDA-graph replays included. Its one traced callee is the core,
# which reads only its arguments and the router: one graph per distinct step plan and input shape. The host frame
# calls nothing else that is not itself disabled (a callee frame would be traced and guard on the step counter).
def _host_forward(pipe, state: _PatchState):
    router = state.router
    core = _core_forward(state.original_forward)

    @torch.compiler.disable(recursive=False)
    def patched_forward(*args, **kwargs):
        inputs, step_plan, return_dict = _prepare_call(pipe, state, args, kwargs)
        previous = router.current
        router.current = step_plan.routing
        try:
            eps = core(inputs, step_plan)
        finally:
            router.current = previous
        return _finish_call(state.denoiser, eps, return_dict)

    patched_forward._cgkernels_patched = True
    return patched_forward


def _core_forward(original_forward):
    """The traceable part: expand the CFG batch to the branch rows, one denoiser call, merge the branches."""

    def core(inputs: dict, plan: _StepPlan) -> torch.Tensor:
        if plan.blocks is None:  # unguided step: the pipeline's rows through the base model
            return original_forward(**inputs, return_dict=False)[0]
        rows = plan.batch * plan.halves
        expanded = {k: _expand(v, rows, plan.batch, plan.blocks) for k, v in inputs.items()}
        out = original_forward(**expanded, return_dict=False)[0]
        preds = out.view(len(plan.blocks), plan.batch, *out.shape[1:])
        eps = guidance_merge(preds, plan.coeffs, rescale=plan.rescale, ref_coeffs=plan.ref_coeffs)
        return torch.cat([eps] * plan.halves) if plan.halves > 1 else eps

    return core


@torch.compiler.disable
def _finish_call(denoiser: Denoiser, eps: torch.Tensor, return_dict: bool):
    return denoiser.make_output(eps) if return_dict else (eps,)


@torch.compiler.disable
def _prepare_call(pipe, state: _PatchState, args, kwargs) -> tuple[dict, _StepPlan, bool]:
    """Host bookkeeping of one UNet call: refuse adapters changed since patch time, find the pipeline whose guidance
    settings apply (`pipe` or another pipeline sharing the UNet), bind the inputs, count the step, choose the plan."""
    check_offload(state.module, state.denoiser.attr)
    caller = calling_pipeline()
    state.guard.check(caller)
    pipe = guidance_pipeline(pipe, caller)
    inputs = dict(state.signature.bind(*args, **kwargs).arguments)
    return_dict = inputs.pop("return_dict", True)
    lora_scale = _pop_lora_scale(inputs)
    rows = inputs[state.denoiser.sample_arg].shape[0]
    cfg = bool(pipe.do_classifier_free_guidance)
    halves = 2 if cfg else 1
    if rows % halves:
        raise ValueError(f"UNet batch of {rows} rows cannot be the pipeline's CFG batch [uncond, cond]")
    batch = rows // halves

    step, num_steps = _current_step(pipe, state)
    guided = num_steps is None or is_guided_step(step, num_steps, state.config.start, state.config.stop)
    if not guided:
        key = ("base", rows)
    else:
        guidance_scale = float(pipe.guidance_scale)
        rescale = float(getattr(pipe, "_guidance_rescale", 0.0) or 0.0) if cfg else 0.0
        key = (cfg, guidance_scale, rescale, batch, lora_scale)
    step_plan = state.step_plans.get(key)
    if step_plan is None:
        if not guided:
            step_plan = _StepPlan(state.router.plan([(rows, None)]), batch, halves, None)
        else:
            step_plan = _guided_step_plan(state, cfg, guidance_scale, rescale, batch, lora_scale)
        state.step_plans[key] = step_plan
    return inputs, step_plan, return_dict


def _guided_step_plan(state: _PatchState, cfg: bool, guidance_scale: float, rescale: float, batch: int,
                      lora_scale: float) -> _StepPlan:
    plan = _plan(state, cfg, guidance_scale)
    halves = 2 if cfg else 1
    return _StepPlan(
        routing=state.router.plan(plan.routing(batch), lora_scale),
        batch=batch,
        halves=halves,
        blocks=tuple(plan.input_blocks(cfg)),
        coeffs=tuple(plan.coeffs),
        ref_coeffs=tuple(plan.ref_coeffs),
        rescale=rescale,
    )


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


def _expand(value, rows: int, batch: int, blocks: tuple[int, ...]):
    """Replicate every tensor whose dim 0 is the pipeline's batch into the plan's row blocks (recursing into
    dicts, lists and tuples, e.g. added_cond_kwargs, ControlNet residuals)."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] != rows:
            return value  # e.g. a scalar timestep
        halves = rows // batch
        repeats, leftover = divmod(len(blocks), halves)
        if leftover == 0 and blocks == tuple(range(halves)) * repeats:  # the whole batch, repeated
            return torch.cat([value] * repeats)
        return torch.cat([value[b * batch:(b + 1) * batch] for b in blocks])
    if isinstance(value, dict):
        return {k: _expand(v, rows, batch, blocks) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_expand(v, rows, batch, blocks) for v in value)
    return value

