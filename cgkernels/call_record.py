"""What one denoiser call of a patched pipeline is, read once on the host into a small frozen `CallRecord`.

The patched denoiser decides everything about a call from this record (and the guidance, batch and LoRA scale):
guidance scale, rescale, whether the call runs CFG over [uncond, cond] rows, which scheduler step of how many it
belongs to, which of Flux's two true-CFG calls it is, and the calling pipeline's num_images_per_prompt. Nothing else
reads pipeline state.

Where the values come from:

- The calling pipeline: the nearest diffusers pipeline method up the stack (`self` of its frame). That is how a
  pipeline sharing the patched denoiser (built from `pipe.components`) uses its own settings, and how a direct call
  (the user's own loop) is told apart. The whole stack is searched, so any number of wrapper frames between the
  pipeline and the denoiser (a torch.compile wrapper assigned to `pipe.unet`, offload hooks, forward hooks) is fine.
- Guidance settings: the pipeline's public properties (guidance_scale, guidance_rescale, do_classifier_free_guidance,
  num_timesteps, scheduler.order).
- Flux true CFG (true_cfg_scale > 1 with a negative prompt): a local of the pipeline's `__call__` (`do_true_cfg`,
  `true_cfg_scale`), stored nowhere else. Its two calls per step come in the loop's order, cond then uncond, so the
  k-th transformer call of a pipeline call is step k // 2's cond (k even) or uncond (k odd) call. By default both
  prompts' branches run in the FIRST call ("joint_cond": its inputs are the prompt's, the negative prompt's embeddings
  are the locals negative_prompt_embeds / negative_pooled_prompt_embeds), and the second call
  ("joint_uncond") returns its half of that result without running the transformer. Where that is not possible (the
  negative locals missing, text ids of another shape, IP-Adapter embeds) the two calls run their own branches
  ("two_call_cond", "two_call_uncond").
- Steps: denoiser calls since the scheduler's timesteps object changed (every pipeline call sets new timesteps),
  divided by the scheduler's order (Heun / KDPM2 make two calls per step).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

__all__ = ["CallRecord", "StepCounter", "calling_pipeline", "read_call"]

LAYOUTS = ("cfg", "cond", "two_call_uncond", "two_call_cond", "joint_cond", "joint_uncond")
JOINT_TRUE_CFG = True  # Flux true CFG in one batched call per step where possible (tests switch it off)
_MAX_STACK = 1000  # frames searched for the calling pipeline (a guard against pathological stacks only)


@dataclass(frozen=True)
class CallRecord:
    """layout: "cfg" (one call over [uncond x B, cond x B], merged here), "cond" (cond rows only, eps = cond + after),
    or one of Flux true CFG's two calls: "joint_cond" (runs both prompts' branches) / "joint_uncond" (returns its
    half of that), or "two_call_cond" / "two_call_uncond" (each runs its own prompt's branches).
    step, num_steps: the scheduler step of this call and the pipeline's step count; step None for a direct call
    (not from a pipeline call: guided whenever the window is [0, 1)). images_per_prompt: the pipeline call's
    num_images_per_prompt (None when unknown: a direct call)."""

    layout: str
    guidance_scale: float = 1.0
    rescale: float = 0.0
    step: int | None = None
    num_steps: int | None = None
    images_per_prompt: int | None = None

    @property
    def halves(self) -> int:
        return 2 if self.layout == "cfg" else 1

    @property
    def direct(self) -> bool:
        return self.step is None


class StepCounter:
    """Denoiser calls since the calling pipeline last set its scheduler's timesteps (one per patch)."""

    def __init__(self):
        self.timesteps = None
        self.calls = 0
        self.joint = None  # Flux true CFG: whether this pipeline call runs both prompts in one call (decided once)

    def next_call(self, pipe) -> int:
        timesteps = getattr(pipe.scheduler, "timesteps", None)
        if timesteps is not self.timesteps:  # a new pipeline call set new timesteps
            self.timesteps = timesteps  # keeping the reference also keeps its id from being reused
            self.calls = 0
            self.joint = None
        call = self.calls
        self.calls += 1
        return call


def calling_pipeline():
    """(pipeline, its calling method's local variables) for the nearest diffusers pipeline method up the stack, or
    (None, None) for a call that no pipeline made."""
    from diffusers import DiffusionPipeline

    frame = sys._getframe(1)
    for _ in range(_MAX_STACK):
        if frame is None:
            break
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            owner = frame.f_locals.get("self")
            if isinstance(owner, DiffusionPipeline):
                return owner, frame.f_locals
        frame = frame.f_back
    return None, None


def read_call(pipe, caller_locals, family: str, counter: StepCounter, inputs: dict, *, direct: bool) -> CallRecord:
    """The record of one denoiser call. pipe: the pipeline whose settings apply (the caller, or the patched one for
    a direct call); family: "unet", "sd3" or "flux"; inputs: the call's bound arguments."""
    if family == "sd3":
        _refuse_skip_layer_guidance(caller_locals, inputs)
    if family == "flux":
        return _flux_record(pipe, caller_locals, counter, inputs, direct=direct)
    if direct:
        _require_settings(pipe)
    if not pipe.do_classifier_free_guidance:
        layout, g, rescale = "cond", float(pipe.guidance_scale), 0.0
    else:
        layout, g = "cfg", float(pipe.guidance_scale)
        rescale = float(getattr(pipe, "guidance_rescale", 0.0) or 0.0)  # img2img pipelines have none
    if direct:
        return CallRecord(layout, g, rescale)
    order = int(getattr(pipe.scheduler, "order", 1) or 1)
    return CallRecord(layout, g, rescale, counter.next_call(pipe) // order, _num_steps(pipe, order),
                      _images_per_prompt(caller_locals))


def _flux_record(pipe, caller_locals, counter: StepCounter, inputs: dict, *, direct: bool) -> CallRecord:
    """Flux is guidance-distilled: one call per step over the cond rows (its guidance value is an input); with true
    CFG a second call per step over the negative prompt's rows, which the pipeline mixes as neg + G (cond - neg)."""
    if direct:
        return CallRecord("cond")
    if "do_true_cfg" not in caller_locals or "true_cfg_scale" not in caller_locals:
        raise ValueError("cgkernels.patch cannot read true CFG (do_true_cfg, true_cfg_scale) from this diffusers "
                         "version's Flux pipeline call; it supports the FluxPipeline loop of diffusers 0.42")
    call = counter.next_call(pipe)
    num_steps, per_prompt = _num_steps(pipe, 1), _images_per_prompt(caller_locals)
    if not caller_locals["do_true_cfg"]:
        return CallRecord("cond", step=call, num_steps=num_steps, images_per_prompt=per_prompt)
    if counter.joint is None:
        counter.joint = JOINT_TRUE_CFG and _can_join(caller_locals, inputs)
    layout = ("joint_" if counter.joint else "two_call_") + ("cond" if call % 2 == 0 else "uncond")
    return CallRecord(layout, float(caller_locals["true_cfg_scale"]), step=call // 2, num_steps=num_steps,
                      images_per_prompt=per_prompt)


_FLUX_NEGATIVE_LOCALS = {"encoder_hidden_states": "negative_prompt_embeds",
                         "pooled_projections": "negative_pooled_prompt_embeds"}


def flux_negative_inputs(caller_locals) -> dict:
    """The negative prompt's batch-dim transformer inputs of a Flux true-CFG call (what its uncond call passes)."""
    return {arg: caller_locals[name] for arg, name in _FLUX_NEGATIVE_LOCALS.items()}


def _can_join(caller_locals, inputs: dict) -> bool:
    """Both prompts fit one batch: the negative locals exist with the prompt's shapes; the text position ids, shared
    by every row of a call (zeros in diffusers 0.42; FluxImg2ImgPipeline passes the prompt's to both calls), have
    the same shape; and no IP-Adapter embeds differ per call."""
    import torch

    negative = {arg: caller_locals.get(name) for arg, name in _FLUX_NEGATIVE_LOCALS.items()}
    negative_ids = caller_locals.get("negative_text_ids")
    if negative_ids is not None:
        negative["txt_ids"] = negative_ids
    attention = inputs.get("joint_attention_kwargs") or {}
    return "ip_adapter_image_embeds" not in attention and all(
        isinstance(value, torch.Tensor) and isinstance(inputs.get(arg), torch.Tensor)
        and value.shape == inputs[arg].shape for arg, value in negative.items())


def _refuse_skip_layer_guidance(caller_locals, inputs: dict) -> None:
    # Skip-layer guidance adds a cond-only call through a transformer with some blocks skipped: not a branch the
    # patch can merge exactly. Refused at the first call when the pipeline's frame shows it, else at that call.
    skip = inputs.get("skip_layers")
    if skip is None and caller_locals is not None:
        skip = caller_locals.get("skip_guidance_layers")
    if skip is not None:
        raise ValueError("cgkernels.patch does not support SD3 skip-layer guidance (skip_guidance_layers="
                         f"{list(skip)}): call the pipeline with skip_guidance_layers=None")


def _require_settings(pipe) -> None:
    if getattr(pipe, "guidance_scale", None) is None:
        raise ValueError(
            "the patched denoiser was called directly before any call of the pipeline: a direct call uses the "
            "pipeline's guidance settings (guidance_scale, and CFG on when it is > 1), set by a pipeline call (or by "
            "pipe._guidance_scale = g)")


def _num_steps(pipe, order: int) -> int | None:
    num_calls = getattr(pipe, "num_timesteps", None)
    return None if num_calls is None else -(-num_calls // order)


def _images_per_prompt(caller_locals) -> int | None:
    value = None if caller_locals is None else caller_locals.get("num_images_per_prompt")
    return value if isinstance(value, int) and value > 0 else None
