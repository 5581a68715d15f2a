"""Per-branch float64 reference for any `cgkernels.Guidance` (and per-prompt adapter mixes) on SD1.5, SDXL, SD3 and
Flux pipelines.

`GuidanceReference` wraps the denoiser's forward: every denoiser call the pipeline makes is answered by one call of
the unpatched denoiser per (branch, prompt), with the adapters set through diffusers' `set_adapters` (base model:
`disable_lora`) to the branch's adapters plus that prompt's mix, and the guidance formula evaluated in float64
straight from the Guidance's terms:

    with CFG     eps = (1 - g) * uncond + g * cond + after   (rescale: rescale_noise_cfg(eps, cond + after, phi))
    without      eps = cond + after
    Flux true CFG: the pipeline makes a cond call then an uncond call per step and mixes them as U' + G (C' - U');
                 the reference keeps the cond call's inputs and returns 0 from it, then evaluates every branch at
                 its own prompt's inputs in the uncond call and returns eps / (1 - G).

It never calls cgkernels' compile_merge, routing or merge. Steps are counted with callback_on_step_end; outside the
[start, stop) window each prompt's rows run the base model plus that prompt's mix, and the pipeline does its own CFG.
"""
from __future__ import annotations

import inspect

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from cgkernels import Guidance, branch

# Inputs shared by every row even when dim 0 happens to equal the batch (Flux position ids).
STATIC_INPUTS = ("txt_ids", "img_ids")


def denoiser_attr(pipe) -> str:
    return "unet" if hasattr(pipe, "unet") else "transformer"


def is_flux(pipe) -> bool:
    return type(getattr(pipe, "transformer", None)).__name__ == "FluxTransformer2DModel"


class GuidanceReference:
    """Context manager; pass `callback_on_step_end=ref.callback` to the pipeline call.

    prompt_mixes: one {adapter: weight} per prompt (None: no per-prompt mixes). true_cfg_scale: Flux only, the value
    of the call (None: no true CFG)."""

    def __init__(self, pipe, guidance, *, start: float = 0.0, stop: float = 1.0, prompt_mixes=None,
                 true_cfg_scale: float | None = None):
        self.pipe, self.guidance, self.start, self.stop = pipe, guidance, start, stop
        self.prompt_mixes = prompt_mixes
        self.attr = denoiser_attr(pipe)
        self.model = getattr(pipe, self.attr)
        self.true_cfg = true_cfg_scale if is_flux(pipe) and (true_cfg_scale or 0) > 1 else None
        self.step, self.calls_in_step = 0, 0
        self.calls, self.branch_scale = 0, 0.0  # what the fp32 rounding bound of a comparison scales with

    def __enter__(self):
        self.original = self.model.forward
        self.signature = inspect.signature(self.original)
        self.active = list(self.model.active_adapters()) if hasattr(self.model, "active_adapters") else []
        self.model.forward = self.forward
        return self

    def __exit__(self, *exc):
        del self.model.__dict__["forward"]
        self.model.enable_lora()
        if self.active:
            self.model.set_adapters(self.active)

    def callback(self, pipe, i, t, kwargs):
        self.step, self.calls_in_step = i + 1, 0
        return {}

    # -- one branch ----------------------------------------------------------------------------------------------
    def _set_adapters(self, weights: dict, lora_scale: float):
        weights = {a: w for a, w in weights.items() if w != 0.0}
        if not weights:
            self.model.disable_lora()
            return
        self.model.enable_lora()
        self.model.set_adapters(list(weights), [w * lora_scale for w in weights.values()])

    def _evaluate(self, inputs: dict, rows: slice, total: int, weights: dict, lora_scale: float):
        self._set_adapters(weights, lora_scale)
        cut = {k: v if k in STATIC_INPUTS else rows_of(v, rows, total) for k, v in inputs.items()}
        out = self.original(**cut, return_dict=False)[0]
        self.branch_scale = max(self.branch_scale, out.abs().max().item())
        return out.double()

    # -- the wrapped forward ---------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        inputs = dict(self.signature.bind(*args, **kwargs).arguments)
        inputs.pop("return_dict", None)
        attention_arg = "cross_attention_kwargs" if self.attr == "unet" else "joint_attention_kwargs"
        attention = dict(inputs.get(attention_arg) or {})
        lora_scale = float(attention.pop("scale", 1.0))
        attention.pop("adapters_per_prompt", None)
        inputs[attention_arg] = attention or None
        sample = inputs["sample" if self.attr == "unet" else "hidden_states"]
        total = sample.shape[0]
        self.calls += 1
        self.calls_in_step += 1
        pipe = self.pipe
        n_steps = pipe.num_timesteps // getattr(pipe.scheduler, "order", 1)
        guided = int(self.start * n_steps) <= self.step // getattr(pipe.scheduler, "order", 1) < int(
            self.stop * n_steps)
        if self.true_cfg is not None:
            if self.calls_in_step % 2 == 1:  # the cond call: answered after the uncond call brings its inputs
                self.cond_inputs = inputs
                return (torch.zeros_like(sample),)
            layout = "uncond_call"
        elif not is_flux(pipe) and pipe.do_classifier_free_guidance:
            layout = "cfg"
        else:
            layout = "cond"
        halves = 2 if layout == "cfg" else 1
        batch = total // halves
        mixes = self.prompt_mixes or [{}]
        per_prompt = batch // len(mixes)
        out = torch.empty((total, *sample.shape[1:]), dtype=torch.float64)
        for p, mix in enumerate(mixes):
            def rows_at(half):  # the rows of prompt p in CFG half `half` (0 uncond, 1 cond)
                block = half if halves == 2 else 0
                return slice(block * batch + p * per_prompt, block * batch + (p + 1) * per_prompt)

            def ev_term(term):
                total_value = 0.0
                for branch, coeff in term.items():
                    weights = dict(mix)
                    for adapter, w in branch.adapters:
                        weights[adapter] = weights.get(adapter, 0.0) + w
                    half = 0 if branch.prompt == "uncond" else 1
                    # Flux true CFG: the uncond call's inputs hold the negative prompt, the cond call's the prompt
                    source = self.cond_inputs if layout == "uncond_call" and half == 1 else inputs
                    total_value = total_value + coeff * self._evaluate(source, rows_at(half), total, weights,
                                                                       lora_scale)
                return total_value

            guidance = self.guidance if guided else None
            if guidance is None and layout == "uncond_call":  # unguided: plain true CFG with the prompt's mix
                guidance = Guidance(branch("uncond"), branch("cond"))
            elif guidance is None:
                for half in range(halves):
                    out[rows_at(half)] = self._evaluate(inputs, rows_at(half), total, dict(mix), lora_scale)
                continue
            if layout == "cfg":
                g = pipe.guidance_scale
                cond = ev_term(guidance.cond) + ev_term(guidance.after)
                eps = (1 - g) * ev_term(guidance.uncond) + g * ev_term(guidance.cond) + ev_term(guidance.after)
                phi = float(getattr(pipe, "guidance_rescale", 0.0) or 0.0)
                if phi > 0:
                    eps = rescale_noise_cfg(eps, cond, phi)
                out[rows_at(0)], out[rows_at(1)] = eps, eps
            elif layout == "cond":
                out[rows_at(1)] = ev_term(guidance.cond) + ev_term(guidance.after)
            else:  # Flux true CFG's uncond call: eps / (1 - G), after the cond call returned 0
                g = self.true_cfg
                eps = (1 - g) * ev_term(guidance.uncond) + g * ev_term(guidance.cond) + ev_term(guidance.after)
                out[rows_at(1)] = eps / (1 - g)
        return (out.to(sample.dtype),)


def rows_of(value, rows: slice, total: int):
    """`value` with every tensor whose dim 0 is the denoiser batch cut to `rows` (through dicts, lists and tuples:
    added_cond_kwargs, IP-Adapter image embeds, ControlNet residuals)."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() > 0 and value.shape[0] == total else value
    if isinstance(value, dict):
        return {k: rows_of(v, rows, total) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(rows_of(v, rows, total) for v in value)
    return value


def merge_l1(guidance, g: float, cfg: bool) -> list[float]:
    """|coefficients| of the formula per term (for fp32_merge_atol): (1 - g) * uncond, g * cond, after."""
    weights = ((1 - g, guidance.uncond), (g, guidance.cond), (1.0, guidance.after)) if cfg else (
        (1.0, guidance.cond), (1.0, guidance.after))
    return [w * c for w, term in weights for _, c in term.items()]
