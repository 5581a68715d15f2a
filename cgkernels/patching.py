"""`cgkernels.patch(pipe)`: every guidance branch of a Stable Diffusion (XL), SD3 or Flux pipeline in one batched
denoiser (UNet or transformer) call.

The pipeline's `__call__` is untouched. The patch takes over `pipe.unet.forward` (an instance attribute, so
`unpatch` restores the original exactly). Each denoiser call from the pipeline's loop carries the CFG batch
[uncond x B, cond x B] (or [cond x B] without CFG); the patched forward

1. reads the call into a frozen `CallRecord` (cgkernels.call_record: guidance scale, rescale, CFG on / off, step,
   number of steps, which of Flux's two true-CFG calls, num_images_per_prompt) and takes the LoRA `scale` and the
   per-prompt adapter mixes (`adapters_per_prompt`) out of the attention kwargs,
2. builds (once per distinct value, cached) the `StepPlan` of (guidance, call record, batch, LoRA scale, per-prompt
   mixes): the Guidance compiles to its distinct branches, their row routing and the merge coefficients
   (cgkernels.guidance),
3. expands the batch to the plan's branch rows (every batch-dim input is replicated: sample, a batched timestep,
   encoder_hidden_states, added_cond_kwargs such as SDXL's text_embeds/time_ids, timestep_cond, masks, ...),
4. runs ONE denoiser call with the rows routed (the attach handle's router), so every peft LoRA layer applies each
   row segment's adapter mix through `multi_lora_linear`,
5. merges the branch outputs with `guidance_merge` and returns [eps, eps] (or [eps]): the pipeline's own
   u + g(c - u) then yields eps, and its own rescale_noise_cfg(eps, eps, phi) leaves it unchanged (up to one rounding).

Steps outside [start, stop) run the pipeline's rows through the base model plus each prompt's own mix. Steps are
scheduler steps: the denoiser calls since the scheduler's timesteps were last set (every pipeline call does) divided
by `scheduler.order`, out of ceil(len(timesteps) / order). For first-order schedulers that is i of len(timesteps)
(img2img's shortened schedules included); for second-order ones (Heun, KDPM2) both calls of one step are guided
alike.

Adapters. Branch adapters enter at their configured scale (lora_alpha / r) times their weight in the Guidance,
whatever weights `set_adapters` holds and whichever adapters are active or disabled. Mode "cfg" is the exception:
it runs the adapters active at patch time with their set_adapters weights, as the unpatched pipeline would. The LoRA
scale `cross_attention_kwargs={"scale": x}` multiplies every adapter delta of every branch. Adapters (and their
weights) are read at patch time: patch after loading them, and patch again after changing them. Only denoiser
adapters are branch- and prompt-specific: LoRA layers on the text encoders run as the user set them and feed the
same prompt embeddings to every branch; an adapter with text-encoder layers is refused in `adapters_per_prompt`.

torch.compile. The patched forward is an eager host function (the call record, the [start, stop) window, the step
plan, the routing) around a traceable core (expand, one denoiser call, merge): `torch.compile(pipe.unet,
fullgraph=True)` assigned back to `pipe.unet`, or `pipe.unet.compile()`, before or after `patch`, traces the core
without graph breaks, one graph per distinct step plan and input shape, and CUDA-graph replays never skip the
host's state updates. patch / unpatch act on the module under a compile wrapper. A replaced forward that keeps the
model's signature (`pipe.unet.forward = torch.compile(pipe.unet.forward)`) is called as the model's forward.

SD3 and Flux (one `Denoiser` record per family: attribute, latent input, output class, where the LoRA scale is
passed, inputs never replicated). SD3 is laid out like the UNet pipelines (one call per step over [uncond, cond],
joint_attention_kwargs); skip-layer guidance is refused. Flux is guidance-distilled: one call per step over the cond
rows, eps = cond + after, its guidance value replicated per branch like every batch-dim input, txt_ids / img_ids
shared. With true CFG the pipeline makes two separate calls per step (cond, then uncond) and mixes
neg + G (cond - neg) itself: the cond call returns cond + after_c / G, the uncond call uncond + after_u / (1 - G),
each in one batched pass.

The patched denoiser follows the pipeline that calls it: `pipe`, or another supported pipeline sharing it (e.g.
built from pipe.components); direct calls read the settings of `pipe`. Adapters changed, fused or deleted after
patching, and unsupported pipelines or dtypes, are refused with a ValueError (cgkernels.patch_guard).
"""
from __future__ import annotations

import dataclasses
import inspect
import types
from dataclasses import dataclass, field
from typing import Callable

import torch

from cgkernels.call_record import CallRecord, StepCounter, calling_pipeline, flux_negative_inputs, read_call
from cgkernels.guidance import (
    ACTIVE_ADAPTERS as ACTIVE,
    NEEDS_UNCOND,
    Guidance,
    GuidanceConfig,
    Mix,
    StepPlan,
    as_real,
    build_step_plan,
    guides_each_call_alone,
    is_guided_step,
    mix_of,
)
from cgkernels.lora_layers import attach_segmented_lora, loaded_adapters, lora_layers, unwrap_model
from cgkernels.ops import guidance_merge
from cgkernels.patch_guard import (
    AdapterGuard,
    check_dtype,
    check_offload,
    check_pipeline,
    check_weight_hooks,
    guidance_pipeline,
)

__all__ = ["patch", "unpatch", "is_patched", "PER_PROMPT_KEY"]

_STATE_ATTR = "_cgkernels_patch"
# The call-time key of per-prompt adapter mixes in cross_attention_kwargs (UNet) / joint_attention_kwargs (SD3, Flux).
PER_PROMPT_KEY = "adapters_per_prompt"


def _unet_output(sample: torch.Tensor):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample)


def _transformer_output(sample: torch.Tensor):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=sample)


@dataclass(frozen=True)
class Denoiser:
    """Where a pipeline keeps its denoiser, the name of its batched latent input, how it wraps its output, where
    diffusers passes the LoRA `scale`, which inputs are never batch-dim, and the family whose calls
    cgkernels.call_record reads: the one place a model family plugs in."""

    attr: str
    sample_arg: str
    make_output: Callable[[torch.Tensor], object]
    family: str
    attention_kwargs_arg: str = "cross_attention_kwargs"
    static_args: tuple[str, ...] = ()  # not replicated per branch even if dim 0 happens to equal the batch


UNET = Denoiser(attr="unet", sample_arg="sample", make_output=_unet_output, family="unet")
SD3_TRANSFORMER = Denoiser(attr="transformer", sample_arg="hidden_states", make_output=_transformer_output,
                           family="sd3", attention_kwargs_arg="joint_attention_kwargs")
# txt_ids [T, 3] / img_ids [N, 3]: position ids, shared by every row (T may equal the batch size).
FLUX_TRANSFORMER = Denoiser(attr="transformer", sample_arg="hidden_states", make_output=_transformer_output,
                            family="flux", attention_kwargs_arg="joint_attention_kwargs",
                            static_args=("txt_ids", "img_ids"))
_TRANSFORMER_DENOISERS = {"SD3Transformer2DModel": SD3_TRANSFORMER, "FluxTransformer2DModel": FLUX_TRANSFORMER}


def _denoiser_of(pipe) -> Denoiser:
    """check_pipeline has accepted the class: UNet pipelines, or SD3 / Flux ones (told apart by their transformer)."""
    if hasattr(pipe, "unet"):
        return UNET
    model = unwrap_model(pipe.transformer)
    denoiser = _TRANSFORMER_DENOISERS.get(type(model).__name__)
    if denoiser is None:
        raise ValueError(f"cgkernels.patch supports SD3 and Flux transformers; pipe.transformer is a "
                         f"{type(model).__name__}")
    return denoiser


@dataclass
class _PatchState:
    guidance: Guidance
    config: GuidanceConfig  # the [start, stop) window (and, for a mode string, the mode)
    denoiser: Denoiser
    module: torch.nn.Module  # the denoiser itself (under any torch.compile wrapper): what patch / unpatch change
    handle: object  # the SegmentedLoraHandle of the module's LoRA layers
    own_forward: object  # the instance-level forward the patch displaced (None: the class's forward), to restore
    original_forward: object
    signature: inspect.Signature
    guard: AdapterGuard
    loaded: tuple[str, ...]  # the denoiser's adapters at patch time
    text_encoder_adapters: dict  # adapter -> the text encoders holding LoRA layers of that name
    patched_forward: object = None
    counter: StepCounter = field(default_factory=StepCounter)
    pending: torch.Tensor | None = None  # Flux joint true CFG: the uncond call's half of the step's one call
    step_plans: dict = field(default_factory=dict)


def is_patched(pipe) -> bool:
    return getattr(pipe, _STATE_ATTR, None) is not None


def patch(
    pipe,
    guidance: str | Guidance = "contrastive",
    positive: str | None = "pos",
    negative: str | None = "neg",
    strength: float = 1.0,
    start: float = 0.0,
    stop: float = 1.0,
    merge_weight: float = 0.0,
):
    """Make `pipe` run guidance in one batched UNet / transformer pass per step (per call of Flux's true CFG,
    which makes two). Returns `pipe`.

    guidance: a `cgkernels.Guidance(uncond, cond, after)` built from `cgkernels.branch(prompt, **adapter_weights)`
        terms, or a preset mode string: "contrastive" | "contrastive-cond" | "contrastive-uncond" | "pgd" | "npo" |
        "merged" | "cfg" (see cgkernels.guidance), with:
    positive / negative: names of LoRA adapters loaded with pipe.load_lora_weights(..., adapter_name=...);
        positive=None in "npo" runs the base model on the cond branch (an NPO adapter alone).
    strength s (any finite real scalar: Python, NumPy or 0-d torch), NPO's merge_weight.
    start, stop: the guided window [start, stop) as fractions of the step count (all guidance forms).
    Adapters enter at their configured scale (set_adapters weights are ignored, except by mode "cfg"), are read
    now (patch after loading them), and only UNet / transformer adapters are branch-specific: see the module
    docstring. Per prompt at call time: cross_attention_kwargs (UNet) / joint_attention_kwargs (SD3, Flux)
    {"adapters_per_prompt": [{adapter: weight}, ...]}. The denoiser may be compiled before or after patching, in
    any form (torch.compile(pipe.unet) assigned back, pipe.unet.compile(), a compiled forward).
    """
    check_pipeline(pipe)
    if is_patched(pipe):
        raise ValueError("this pipeline is already patched; call cgkernels.unpatch(pipe) first")
    if isinstance(guidance, Guidance):
        ignored = [name for name, value, default in (("strength", strength, 1.0), ("merge_weight", merge_weight, 0.0))
                   if not (isinstance(value, (int, float)) and value == default)]
        if ignored:
            raise ValueError(f"{', '.join(ignored)} set the mode strings' presets; with a cgkernels.Guidance write "
                             "the weights into its terms instead")
        config = GuidanceConfig("cfg", None, None, 1.0, start, stop).validate()
        plan_guidance = guidance
    elif isinstance(guidance, str):
        config = GuidanceConfig(guidance, positive, negative, strength, start, stop, merge_weight).validate()
        plan_guidance = config.guidance()
    else:
        raise TypeError(f"guidance must be a mode string or a cgkernels.Guidance, got {type(guidance).__name__}")
    denoiser = _denoiser_of(pipe)
    module = unwrap_model(getattr(pipe, denoiser.attr))  # the original module under a torch.compile wrapper
    if any(getattr(module.__dict__.get(slot), "_cgkernels_patched", False) for slot in ("forward", _HOOKED_SLOT)):
        raise ValueError(f"pipe.{denoiser.attr} is already patched (shared with another pipeline?); unpatch that one "
                         "first")
    check_offload(module, denoiser.attr)
    check_weight_hooks(module, denoiser.attr)
    slot = _forward_slot(module)
    # The module's own forward: under accelerate's offload hook that is the one the hook calls, not the hook. A
    # forward the user replaced (e.g. pipe.unet.forward = torch.compile(pipe.unet.forward)) is called as it is,
    # provided it keeps the model's signature.
    original_forward = module.__dict__[slot] if slot == _HOOKED_SLOT else module.forward
    signature = inspect.signature(original_forward)
    if denoiser.sample_arg not in signature.parameters:
        raise ValueError(
            f"pipe.{denoiser.attr}.forward{signature} does not take `{denoiser.sample_arg}`: it was replaced by a "
            "wrapper that hides the model's signature. Restore the model's own forward before cgkernels.patch; "
            f"to compile, compile the module (torch.compile(pipe.{denoiser.attr}) or pipe.{denoiser.attr}.compile()), "
            "before or after patching"
        )
    check_dtype(module, denoiser.attr)
    loaded = loaded_adapters(module)
    for adapter in plan_guidance.adapters():
        if adapter not in loaded and adapter != ACTIVE:
            hint = (" (positive=None runs the base model on the cond branch, for an NPO adapter alone)"
                    if isinstance(guidance, str) and guidance == "npo" and adapter == positive else "")
            raise ValueError(f"adapter {adapter!r} is not loaded on pipe.{denoiser.attr}; loaded adapters: "
                             f"{loaded}{hint}")
    # The guidance's own branch mixes are stacked (and their adapters checked: DoRA, fused, ...) now; per-prompt mixes
    # are added at the call that first uses them.
    branch_mixes = {b.adapters: dict(b.adapters) for term in (plan_guidance.uncond, plan_guidance.cond,
                                                              plan_guidance.after) for b in term.branches() if b.adapters}
    handle = attach_segmented_lora(module, branch_mixes)
    state = _PatchState(
        guidance=plan_guidance,
        config=config,
        denoiser=denoiser,
        module=module,
        handle=handle,
        own_forward=module.__dict__.get(slot),
        original_forward=original_forward,
        signature=signature,
        guard=AdapterGuard(module, lora_layers(module), watch_user_settings=ACTIVE in plan_guidance.adapters(),
                           attr=denoiser.attr),
        loaded=tuple(loaded),
        text_encoder_adapters=_text_encoder_adapters(pipe),
    )
    state.patched_forward = _host_forward(pipe, state)
    setattr(module, slot, state.patched_forward)
    setattr(pipe, _STATE_ATTR, state)
    return pipe


def _text_encoder_adapters(pipe) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        encoder = getattr(pipe, name, None)
        if isinstance(encoder, torch.nn.Module):
            for adapter in loaded_adapters(encoder):
                found.setdefault(adapter, []).append(name)
    return found


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


# --------------------------------------------------------------------------------------------------------------------
# The patched forward: an eager host part around a traceable core
# --------------------------------------------------------------------------------------------------------------------
# torch.compile of the patched UNet (either form) reaches `module.forward`, the host function. It is excluded from
# tracing (`disable(recursive=False)`: this frame only), so step counting, the [start, stop) window, plan selection
# and setting the router run eagerly on every call, CUDA-graph replays included. Its one traced callee is the core,
# which reads only its arguments and the router: one graph per distinct step plan and input shape (and, for Flux's
# joint true CFG, `_pending_half`, a one-view graph of the second call). The host frame calls nothing else that is
# not itself disabled (a callee frame would be traced and guard on the step counter).
def _host_forward(pipe, state: _PatchState):
    router = state.handle.router
    core = _core_forward(state.original_forward, state.denoiser.static_args)

    dynamo_config = torch._dynamo.config

    @torch.compiler.disable(recursive=False)
    def patched_forward(*args, **kwargs):
        inputs, step_plan, return_dict, layout = _prepare_call(pipe, state, args, kwargs)
        if layout == "joint_uncond":  # Flux true CFG's second call: its half of the step's one batched call
            eps, state.pending = state.pending, None
            return _finish_call(state.denoiser, _pending_half(eps), return_dict)
        previous = router.current
        router.current = step_plan.routing
        # A step plan is host metadata: its merge coefficients, LoRA scale, batch and row offsets must reach a
        # compiled core as constants (one graph per plan, as a plan's own checks and tile schedules need). Dynamo's
        # automatic dynamic would instead turn a value that changed since the last compile (another guidance scale,
        # LoRA scale or batch) into a symbol and fail on those host checks under fullgraph=True. So the core is
        # compiled static, whatever the user's dynamic setting; eagerly these attribute writes cost a few us.
        # Every plan is one compile of the core's code object, shared by every patch of this process: a few guidance
        # scales, batches or per-prompt mixes (two plans each with a window), or patching again, pass dynamo's
        # default of 8 compiles per code object, after which the core would run eagerly (fullgraph=True: raise
        # FailOnRecompileLimitHit). The limit is raised for this call to _CORE_RECOMPILE_LIMIT.
        saved = (dynamo_config.automatic_dynamic_shapes, dynamo_config.assume_static_by_default,
                 dynamo_config.recompile_limit)
        dynamo_config.automatic_dynamic_shapes, dynamo_config.assume_static_by_default = False, True
        dynamo_config.recompile_limit = max(saved[2], _CORE_RECOMPILE_LIMIT)
        try:
            eps = core(inputs, step_plan)
        finally:
            (dynamo_config.automatic_dynamic_shapes, dynamo_config.assume_static_by_default,
             dynamo_config.recompile_limit) = saved
            router.current = previous
        if layout == "joint_cond":  # [uncond half, cond half]: eps twice on guided steps, the base rows otherwise
            state.pending, eps = eps.chunk(2)
        return _finish_call(state.denoiser, eps, return_dict)

    patched_forward._cgkernels_patched = True
    return patched_forward


def _core_forward(original_forward, static_args: tuple[str, ...]):
    """The traceable part: expand the CFG batch to the branch rows, one denoiser call, merge the branches."""

    def core(inputs: dict, plan: StepPlan) -> torch.Tensor:
        if plan.blocks is None:  # unguided step: the pipeline's rows (each prompt's own adapter mix only)
            return original_forward(**inputs, return_dict=False)[0]
        rows = plan.batch * plan.halves
        expanded = {k: v if k in static_args else _expand(v, rows, plan.batch, plan.blocks)
                    for k, v in inputs.items()}
        out = original_forward(**expanded, return_dict=False)[0]
        preds = out.view(len(plan.blocks), plan.batch, *out.shape[1:])
        eps = guidance_merge(preds, plan.coeffs, rescale=plan.rescale, ref_coeffs=plan.ref_coeffs)
        return torch.cat([eps] * plan.halves) if plan.halves > 1 else eps

    return core


def _pending_half(eps: torch.Tensor) -> torch.Tensor:
    """Traced (a one-view graph): a compiled denoiser's call must compile something under fullgraph=True."""
    return eps.view(eps.shape)


@torch.compiler.disable
def _finish_call(denoiser: Denoiser, eps: torch.Tensor, return_dict: bool):
    return denoiser.make_output(eps) if return_dict else (eps,)


_STEP_PLAN_CACHE_SIZE = 256
# Compiles of the traced core allowed per code object (dynamo's default recompile_limit is 8): one per step plan and
# input shape. Dynamo's accumulated_recompile_limit (256 by default) still bounds the total.
_CORE_RECOMPILE_LIMIT = 128


@torch.compiler.disable
def _prepare_call(pipe, state: _PatchState, args, kwargs) -> tuple[dict, StepPlan | None, bool, str]:
    """Host bookkeeping of one denoiser call: refuse adapters changed since patch time, read the call into a
    CallRecord (the calling pipeline's settings and step), take the per-prompt mixes and LoRA scale out of the
    attention kwargs, choose the step plan. Returns (inputs, plan, return_dict, the call's layout)."""
    check_offload(state.module, state.denoiser.attr)
    caller, caller_locals = calling_pipeline()
    state.guard.check(caller)
    denoiser = state.denoiser
    inputs = dict(state.signature.bind(*args, **kwargs).arguments)
    return_dict = inputs.pop("return_dict", True)
    lora_scale, requested = _pop_call_options(inputs, denoiser.attention_kwargs_arg)
    if caller is None:
        _check_direct_call(state)
    record = read_call(guidance_pipeline(pipe, caller), caller_locals, denoiser.family, state.counter, inputs,
                       direct=caller is None)
    layout = record.layout
    if layout == "joint_uncond":
        _check_pending(state, inputs[denoiser.sample_arg])
        return inputs, None, return_dict, layout
    if layout == "joint_cond":  # Flux true CFG: both prompts' rows in this call, as a CFG batch [uncond, cond]
        inputs = _joint_inputs(inputs, flux_negative_inputs(caller_locals), denoiser)
        record = dataclasses.replace(record, layout="cfg")
    rows = inputs[denoiser.sample_arg].shape[0]
    if rows % record.halves:
        raise ValueError(f"{denoiser.attr} batch of {rows} rows cannot be the pipeline's CFG batch [uncond, cond]")
    batch = rows // record.halves
    prompt_mixes = _prompt_mixes(state, requested, batch, record)
    guided = record.direct or record.num_steps is None or is_guided_step(
        record.step, record.num_steps, state.config.start, state.config.stop)
    key = (record.layout, record.direct, record.guidance_scale, record.rescale, guided, batch, lora_scale,
           prompt_mixes)  # direct: a Flux direct call refuses guidance its pipeline's calls can run
    step_plan = state.step_plans.get(key)
    if step_plan is None:
        step_plan = _step_plan(state, record, guided, batch, lora_scale, prompt_mixes)
        if len(state.step_plans) >= _STEP_PLAN_CACHE_SIZE:
            state.step_plans.clear()
        state.step_plans[key] = step_plan
    return inputs, step_plan, return_dict, layout


def _joint_inputs(inputs: dict, negative: dict, denoiser: Denoiser) -> dict:
    """The cond call's inputs as the CFG batch [uncond x B, cond x B]: the negative prompt's embeddings on the
    uncond rows, every other batch-dim input (latents, timestep, guidance) twice; position ids stay shared."""
    rows = inputs[denoiser.sample_arg].shape[0]
    joint = {}
    for name, value in inputs.items():
        if name in denoiser.static_args or not isinstance(value, torch.Tensor) or value.dim() == 0 or (
                value.shape[0] != rows):
            joint[name] = value
        else:
            joint[name] = torch.cat([negative.get(name, value), value])
    return joint


def _check_pending(state: _PatchState, sample: torch.Tensor) -> None:
    pending = state.pending
    if pending is None or pending.shape != sample.shape:
        raise ValueError("a Flux true-CFG uncond transformer call came without the step's cond call before it (or "
                         "with other inputs); cgkernels runs both in the cond call and expects the FluxPipeline loop")


def _step_plan(state: _PatchState, record: CallRecord, guided: bool, batch: int, lora_scale: float,
               prompt_mixes: tuple[Mix, ...]) -> StepPlan:
    """The plan of one kind of call (built once per distinct key: _prepare_call caches them). Guidance that a call
    cannot run is refused whether or not its step is in the window: outside it the call would silently differ."""
    guidance = state.guidance
    if state.denoiser.family == "flux" and record.layout == "cond" and guidance.name in NEEDS_UNCOND:
        raise ValueError(
            f"guidance={guidance.name!r} needs an unconditional prediction, which a guidance-distilled Flux "
            "model has only under true CFG: call the pipeline with true_cfg_scale > 1 and a negative_prompt"
            + (" (without one, contrastive-cond is guidance='contrastive')"
               if guidance.name == "contrastive-cond" else ""))
    if state.denoiser.family == "flux" and record.direct and not guides_each_call_alone(guidance):
        # The user's own loop may run true CFG as two calls (prompt, then negative prompt) and mix them itself:
        # each call sees one prompt's rows, so only a Guidance that guides each call alone comes out as written.
        raise ValueError(
            f"{guidance.name}: a direct call of the patched Flux transformer (your own loop) sees one prompt's rows "
            "per call, which guides this Guidance correctly only if its uncond term is its cond term at the negative "
            "prompt and it has no after term; call the pipeline (true CFG runs both prompts in one batched call) or "
            "use such a Guidance")
    guided_plan = build_step_plan(guidance, record.layout, record.guidance_scale, record.rescale, batch,
                                  lora_scale, prompt_mixes)
    plan = guided_plan if guided else build_step_plan(None, record.layout, record.guidance_scale, record.rescale,
                                                      batch, lora_scale, prompt_mixes)
    state.handle.add_mixes(plan.routing.mixes)  # stacked on the host, before any traced call routes to them
    return dataclasses.replace(plan, routing=state.handle.router.intern(plan.routing))


def _check_direct_call(state: _PatchState) -> None:
    """A call of the patched denoiser from the user's own loop, not from a pipeline call: steps are counted per
    pipeline call, so such a call cannot place itself in a narrower [start, stop) window."""
    attr, config = state.denoiser.attr, state.config
    if (config.start, config.stop) != (0.0, 1.0):
        raise ValueError(
            f"pipe.{attr} was called directly, not from a pipeline call: only a pipeline call counts the steps of the "
            f"[start, stop) = [{config.start}, {config.stop}) window. Call the pipeline, or patch with start=0, stop=1 "
            "to guide every direct call"
        )


def _pop_call_options(inputs: dict, arg: str) -> tuple[float, object]:
    """Take diffusers' LoRA `scale` and the per-prompt adapter mixes out of cross_attention_kwargs (UNet) /
    joint_attention_kwargs (SD3, Flux), before any attention processor sees them: the segmented layers apply both
    per routing, and the model's own handling of `scale` would rewrite peft's `scaling` during the call."""
    kwargs = inputs.get(arg)
    if not kwargs or ("scale" not in kwargs and PER_PROMPT_KEY not in kwargs):
        return 1.0, None
    kwargs = dict(kwargs)
    scale = kwargs.pop("scale", 1.0)
    requested = kwargs.pop(PER_PROMPT_KEY, None)
    inputs[arg] = kwargs
    try:
        return as_real(scale, f"{arg}['scale']"), requested
    except TypeError as error:
        raise ValueError(str(error)) from None


def _prompt_mixes(state: _PatchState, requested, batch: int, record: CallRecord) -> tuple[Mix, ...]:
    """The adapter mix of each prompt of this call, from adapters_per_prompt ([{adapter: weight}, ...], one per
    prompt; each prompt owns batch / len consecutive rows of every CFG half, its num_images_per_prompt images)."""
    if requested is None:
        return ((),)
    where = f"{state.denoiser.attention_kwargs_arg}[{PER_PROMPT_KEY!r}]"
    if not isinstance(requested, (list, tuple)):
        raise ValueError(f"{where} must be a list with one {{adapter: weight}} dict per prompt, got "
                         f"{type(requested).__name__}")
    per_prompt = record.images_per_prompt
    prompts = batch // per_prompt if per_prompt and batch % per_prompt == 0 else None
    if not requested or (prompts is not None and len(requested) != prompts) or batch % len(requested):
        expected = f"{prompts} (one per prompt)" if prompts is not None else f"a divisor of the batch {batch}"
        raise ValueError(f"{where} has {len(requested)} entries; this call needs {expected}")
    mixes = []
    for i, weights in enumerate(requested):
        name = f"{where}[{i}]"
        if not isinstance(weights, dict):
            raise ValueError(f"{name} must be a dict {{adapter: weight}}, got {type(weights).__name__}")
        for adapter in weights:
            if adapter not in state.loaded:
                raise ValueError(f"{name} names adapter {adapter!r}, which is not loaded on "
                                 f"pipe.{state.denoiser.attr}; loaded adapters: {list(state.loaded)}")
            if adapter in state.text_encoder_adapters:
                raise ValueError(
                    f"{name} names adapter {adapter!r}, which also has LoRA layers on "
                    f"{', '.join(state.text_encoder_adapters[adapter])}: one text-encoder pass cannot run a "
                    "different adapter per prompt, so per-prompt mixes support denoiser adapters only. Load the "
                    "adapter without its text-encoder part, or run its prompts in a call of their own")
        try:
            mixes.append(mix_of(weights, name))
        except TypeError as error:
            raise ValueError(str(error)) from None
    return tuple(mixes)


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

