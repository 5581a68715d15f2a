"""`cgkernels.patch(pipe)`: every guidance branch of a Stable Diffusion (XL), SD3 or Flux pipeline in one batched
denoiser (UNet or transformer) call.

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

SD3 and Flux (one `Denoiser` record per family: attribute, latent input, output class, where the LoRA scale is
passed, inputs never replicated, how a call maps onto the formula). SD3 is laid out like the UNet pipelines (one
call per step over [uncond, cond], joint_attention_kwargs' "scale"); skip-layer guidance is refused. Flux is
guidance-distilled: one call per step over the cond rows, eps = C + D (modes needing an unconditional prediction are
refused), its guidance value replicated per branch like every batch-dim input, txt_ids / img_ids shared. With true
CFG (true_cfg_scale > 1 and a negative prompt, locals of the pipeline's __call__, read from its frame) the pipeline
makes two separate calls per step and mixes neg + G (cond - neg) itself: the cond call (told apart by the identity
of its encoder_hidden_states, the frame's prompt_embeds) returns C + D / G, the uncond call U, each in one batched
pass; steps are counted on cond calls.

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

from cgkernels.guidance import (
    COND,
    NEEDS_UNCOND,
    UNCOND,
    USER,
    GuidanceConfig,
    RowPlan,
    is_guided_step,
    mode_mixes,
    row_plan,
    two_call_cfg_plan,
)
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
    calling_pipeline_locals,
    check_dtype,
    check_offload,
    check_pipeline,
    check_weight_hooks,
    guidance_pipeline,
)

__all__ = ["patch", "unpatch", "is_patched"]

_STATE_ATTR = "_cgkernels_patch"


def _unet_output(sample: torch.Tensor):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample)


def _transformer_output(sample: torch.Tensor):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=sample)


@dataclass(frozen=True)
class _CallLayout:
    """How one denoiser call of the pipeline maps onto the mode's formula eps = (1 - g) U + g C + D, decided on the
    host from the calling pipeline.

    kind: "cfg" (the batch is [uncond, cond], merged here), "cond" (cond rows only, eps = C + D), or one of the two
    calls of a pipeline that mixes separate uncond / cond calls itself (Flux true CFG): "two_call_uncond" (returns
    U), "two_call_cond" (returns C + D / g). starts_step: this call is the first denoiser call of its step."""

    kind: str
    guidance_scale: float = 1.0
    rescale: float = 0.0
    starts_step: bool = True

    @property
    def halves(self) -> int:
        return 2 if self.kind == "cfg" else 1


def _cfg_batch_layout(pipe, caller_locals, inputs: dict, config: GuidanceConfig) -> _CallLayout:
    """UNet and SD3 pipelines: one call per step over [uncond, cond] with CFG, over [cond] without."""
    if not pipe.do_classifier_free_guidance:
        return _CallLayout("cond")
    rescale = float(getattr(pipe, "_guidance_rescale", 0.0) or 0.0)
    return _CallLayout("cfg", float(pipe.guidance_scale), rescale)


def _sd3_layout(pipe, caller_locals, inputs: dict, config: GuidanceConfig) -> _CallLayout:
    # Skip-layer guidance adds a cond-only call through a transformer with some blocks skipped: not a branch the
    # patch can merge exactly. Refused at the first call when the pipeline's frame shows it, else at that call.
    skip = inputs.get("skip_layers")
    if skip is None and caller_locals is not None:
        skip = caller_locals.get("skip_guidance_layers")
    if skip is not None:
        raise ValueError("cgkernels.patch does not support SD3 skip-layer guidance (skip_guidance_layers="
                         f"{list(skip)}): call the pipeline with skip_guidance_layers=None")
    return _cfg_batch_layout(pipe, caller_locals, inputs, config)


def _flux_layout(pipe, caller_locals, inputs: dict, config: GuidanceConfig) -> _CallLayout:
    """Flux: one call per step over the cond rows (the distilled guidance value is an input, replicated per branch);
    with true CFG (true_cfg_scale > 1 and a negative prompt) a second, separate call per step over the negative
    prompt's rows, which the pipeline mixes as neg + G (cond - neg). Which call this is comes from the identity of
    its encoder_hidden_states: the pipeline passes the same prompt_embeds / negative_prompt_embeds tensors every
    step. A direct transformer call (no pipeline frame) is a cond call without true CFG."""
    if caller_locals is None or not _flux_true_cfg(caller_locals):
        if config.mode in NEEDS_UNCOND:
            raise ValueError(
                f"guidance={config.mode!r} needs an unconditional prediction, which a guidance-distilled Flux "
                "model has only under true CFG: call the pipeline with true_cfg_scale > 1 and a negative_prompt"
                + (" (without one, contrastive-cond is guidance='contrastive')"
                   if config.mode == "contrastive-cond" else ""))
        return _CallLayout("cond")
    g = float(caller_locals["true_cfg_scale"])
    text = inputs.get("encoder_hidden_states")
    is_cond = text is caller_locals.get("prompt_embeds")
    is_uncond = text is caller_locals.get("negative_prompt_embeds")
    if is_cond == is_uncond:
        raise ValueError("cannot tell the cond and uncond transformer calls of Flux true CFG apart: pass distinct "
                         "prompt_embeds and negative_prompt_embeds tensors (identical ones make true CFG a no-op)")
    return _CallLayout("two_call_cond" if is_cond else "two_call_uncond", g, starts_step=is_cond)


def _flux_true_cfg(caller_locals: dict) -> bool:
    if "do_true_cfg" not in caller_locals or "true_cfg_scale" not in caller_locals:
        raise ValueError("cgkernels.patch cannot read true CFG (do_true_cfg, true_cfg_scale) from this diffusers "
                         "version's Flux pipeline call; it supports the FluxPipeline loop of diffusers 0.42")
    return bool(caller_locals["do_true_cfg"])


@dataclass(frozen=True)
class Denoiser:
    """Where a pipeline keeps its denoiser, the name of its batched latent input, how it wraps its output, where
    diffusers passes the LoRA `scale`, which inputs are never batch-dim, and how a call maps onto the guidance
    formula: the one place a model family plugs in."""

    attr: str
    sample_arg: str
    make_output: Callable[[torch.Tensor], object]
    attention_kwargs_arg: str = "cross_attention_kwargs"
    static_args: tuple[str, ...] = ()  # not replicated per branch even if dim 0 happens to equal the batch
    layout: Callable[..., _CallLayout] = _cfg_batch_layout


UNET = Denoiser(attr="unet", sample_arg="sample", make_output=_unet_output)
SD3_TRANSFORMER = Denoiser(attr="transformer", sample_arg="hidden_states", make_output=_transformer_output,
                           attention_kwargs_arg="joint_attention_kwargs", layout=_sd3_layout)
# txt_ids [T, 3] / img_ids [N, 3]: position ids, shared by every row (T may equal the batch size).
FLUX_TRANSFORMER = Denoiser(attr="transformer", sample_arg="hidden_states", make_output=_transformer_output,
                            attention_kwargs_arg="joint_attention_kwargs", static_args=("txt_ids", "img_ids"),
                            layout=_flux_layout)
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
    """Make `pipe` run preference guidance in one batched UNet / transformer pass per step (per call of Flux's
    true CFG, which makes two). Returns `pipe`.

    guidance: "contrastive" | "contrastive-cond" | "contrastive-uncond" | "pgd" | "npo" | "merged" | "cfg" (see
        cgkernels.guidance).
    positive / negative: names of LoRA adapters loaded with pipe.load_lora_weights(..., adapter_name=...).
    strength s, guided window [start, stop) as fractions of the step count, NPO's merge_weight.
    Adapters enter at their configured scale (set_adapters weights are ignored, except by mode "cfg"), are read
    now (patch after loading them), and only UNet / transformer adapters are branch-specific: see the module
    docstring. The UNet / transformer may be compiled before or after patching (torch.compile(pipe.unet) or
    pipe.unet.compile()). Flux: guidance="npo" / "contrastive-cond" / "contrastive-uncond" need true CFG (a ValueError
    at the call says so).
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
    check_weight_hooks(module, denoiser.attr)
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
    check_dtype(module, denoiser.attr)
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
        guard=AdapterGuard(module, lora_layers(module), watch_user_settings=config.mode == "cfg", attr=denoiser.attr),
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
    core = _core_forward(state.original_forward, state.denoiser.static_args)

    dynamo_config = torch._dynamo.config

    @torch.compiler.disable(recursive=False)
    def patched_forward(*args, **kwargs):
        inputs, step_plan, return_dict = _prepare_call(pipe, state, args, kwargs)
        previous = router.current
        router.current = step_plan.routing
        # A step plan is host metadata: its merge coefficients, LoRA scale, batch and row offsets must reach a
        # compiled core as constants (one graph per plan, as a plan's own checks and tile schedules need). Dynamo's
        # automatic dynamic would instead turn a value that changed since the last compile (another guidance scale,
        # LoRA scale or batch) into a symbol and fail on those host checks under fullgraph=True. So the core is
        # compiled static, whatever the user's dynamic setting; eagerly these two attribute writes cost ~5 us.
        dynamic = (dynamo_config.automatic_dynamic_shapes, dynamo_config.assume_static_by_default)
        dynamo_config.automatic_dynamic_shapes, dynamo_config.assume_static_by_default = False, True
        try:
            eps = core(inputs, step_plan)
        finally:
            dynamo_config.automatic_dynamic_shapes, dynamo_config.assume_static_by_default = dynamic
            router.current = previous
        return _finish_call(state.denoiser, eps, return_dict)

    patched_forward._cgkernels_patched = True
    return patched_forward


def _core_forward(original_forward, static_args: tuple[str, ...]):
    """The traceable part: expand the CFG batch to the branch rows, one denoiser call, merge the branches."""

    def core(inputs: dict, plan: _StepPlan) -> torch.Tensor:
        if plan.blocks is None:  # unguided step: the pipeline's rows through the base model
            return original_forward(**inputs, return_dict=False)[0]
        rows = plan.batch * plan.halves
        expanded = {k: v if k in static_args else _expand(v, rows, plan.batch, plan.blocks)
                    for k, v in inputs.items()}
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
    """Host bookkeeping of one denoiser call: refuse adapters changed since patch time, find the pipeline whose
    guidance settings apply (`pipe` or another pipeline sharing the denoiser), bind the inputs, tell what the call
    is (the family's layout), count the step, choose the plan."""
    check_offload(state.module, state.denoiser.attr)
    caller, caller_locals = calling_pipeline_locals()
    state.guard.check(caller)
    pipe = guidance_pipeline(pipe, caller)
    denoiser = state.denoiser
    inputs = dict(state.signature.bind(*args, **kwargs).arguments)
    return_dict = inputs.pop("return_dict", True)
    lora_scale = _pop_lora_scale(inputs, denoiser.attention_kwargs_arg)
    if caller is None:
        _check_direct_call(pipe, state)
    call = denoiser.layout(pipe, caller_locals, inputs, state.config)
    rows = inputs[denoiser.sample_arg].shape[0]
    if rows % call.halves:
        raise ValueError(f"{denoiser.attr} batch of {rows} rows cannot be the pipeline's CFG batch [uncond, cond]")
    batch = rows // call.halves

    if caller is None:  # a direct call: every one is guided (_check_direct_call made sure the window is [0, 1))
        guided = True
    else:
        step, num_steps = _current_step(pipe, state, call.starts_step)
        guided = num_steps is None or is_guided_step(step, num_steps, state.config.start, state.config.stop)
    key = ("base", rows) if not guided else (call, batch, lora_scale)
    step_plan = state.step_plans.get(key)
    if step_plan is None:
        if not guided:
            step_plan = _StepPlan(state.router.plan([(rows, None)]), batch, call.halves, None)
        else:
            step_plan = _guided_step_plan(state, call, batch, lora_scale)
        state.step_plans[key] = step_plan
    return inputs, step_plan, return_dict


def _check_direct_call(pipe, state: _PatchState) -> None:
    """A call of the patched denoiser from the user's own loop, not from a pipeline call: steps are counted per
    pipeline call, so such a call cannot place itself in a narrower [start, stop) window, and the guidance settings
    it uses are the pipeline's (set by its last call)."""
    attr, config = state.denoiser.attr, state.config
    if (config.start, config.stop) != (0.0, 1.0):
        raise ValueError(
            f"pipe.{attr} was called directly, not from a pipeline call: only a pipeline call counts the steps of the "
            f"[start, stop) = [{config.start}, {config.stop}) window. Call the pipeline, or patch with start=0, stop=1 "
            "to guide every direct call"
        )
    if getattr(pipe, "_guidance_scale", None) is None:
        raise ValueError(
            f"pipe.{attr} was called directly before any call of the pipeline: a direct call uses the pipeline's "
            "guidance settings (guidance_scale, and CFG on when it is > 1), set by a pipeline call (or by "
            "pipe._guidance_scale = g)"
        )


def _guided_step_plan(state: _PatchState, call: _CallLayout, batch: int, lora_scale: float) -> _StepPlan:
    plan = _row_plan(state, call.kind, call.guidance_scale)
    return _StepPlan(
        routing=state.router.plan(plan.routing(batch), lora_scale),
        batch=batch,
        halves=call.halves,
        blocks=tuple(plan.input_blocks(call.kind == "cfg")),
        coeffs=tuple(plan.coeffs),
        ref_coeffs=tuple(plan.ref_coeffs),
        rescale=call.rescale if call.kind == "cfg" else 0.0,
    )


def _current_step(pipe, state: _PatchState, starts_step: bool = True) -> tuple[int, int | None]:
    """(k, N): the scheduler step of this denoiser call and the pipeline's number of scheduler steps.

    A scheduler of order 2 (Heun, KDPM2) makes two UNet calls per step, and its timesteps list holds them all.
    starts_step=False: a second call of the same step (Flux true CFG's uncond call) is not counted again."""
    timesteps = getattr(pipe.scheduler, "timesteps", None)
    if timesteps is not state.timesteps_ref:  # a new pipeline call set new timesteps
        state.timesteps_ref = timesteps  # keeping the reference also keeps its id from being reused
        state.step = 0
    if not starts_step:
        if state.step == 0:
            raise ValueError("a Flux true-CFG uncond transformer call came before the step's cond call")
        return _step_of(pipe, state.step - 1)
    call = state.step
    state.step += 1
    return _step_of(pipe, call)


def _step_of(pipe, call: int) -> tuple[int, int | None]:
    order = int(getattr(pipe.scheduler, "order", 1) or 1)
    num_calls = getattr(pipe, "_num_timesteps", None)
    return call // order, None if num_calls is None else -(-num_calls // order)


def _pop_lora_scale(inputs: dict, arg: str) -> float:
    """Take diffusers' LoRA `scale` out of cross_attention_kwargs (UNet) / joint_attention_kwargs (SD3, Flux): the
    segmented layers apply it per routing, and the model's own handling would rewrite peft's `scaling` of the
    active adapters during the call."""
    kwargs = inputs.get(arg)
    if not kwargs or "scale" not in kwargs:
        return 1.0
    kwargs = dict(kwargs)
    scale = kwargs.pop("scale")
    inputs[arg] = kwargs
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"{arg}['scale'] must be a finite number, got {scale!r}")
    return float(scale)


def _row_plan(state: _PatchState, kind: str, guidance_scale: float) -> RowPlan:
    """The mode's branches and merge coefficients for one kind of call (built once per step plan: _prepare_call
    caches the step plans)."""
    if kind in ("cfg", "cond"):
        return row_plan(state.config, cfg=kind == "cfg", guidance_scale=guidance_scale, user_mix=state.user_mix)
    prompt = COND if kind == "two_call_cond" else UNCOND
    return two_call_cfg_plan(state.config, prompt=prompt, guidance_scale=guidance_scale, user_mix=state.user_mix)


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

