"""Per-branch float64 reference for preference guidance on transformer pipelines (SD3, Flux), for the patch tests.

`TransformerReference` wraps `pipe.transformer.forward` the way tests/test_patch.py's `Reference` wraps the UNet:
every transformer call the pipeline makes is answered by one transformer call per branch, with peft adapters
switched through diffusers' `set_adapters` / `disable_lora` (never cgkernels' routing), and the branches are
combined in float64 with each mode's formula written out here. Steps are counted with `callback_on_step_end`.

What the pipelines (diffusers 0.42.1) pass to the transformer, per call:

- StableDiffusion3Pipeline / Img2Img: ONE call per step over 2B rows [uncond; cond] when guidance_scale > 1 (B
  rows otherwise). Batch-dim: hidden_states [2B, C, H, W], timestep [2B] (t.expand), encoder_hidden_states
  [2B, 77 + T5, D], pooled_projections [2B, P]. Non-batch: joint_attention_kwargs (LoRA "scale"; IP-Adapter
  embeds would be batch-dim inside it). Skip-layer guidance adds a second, cond-only call with `skip_layers`.
- FluxPipeline / Img2Img: ONE call per step over B cond rows. Batch-dim: hidden_states [B, N, 4C] (packed),
  timestep [B] (t / 1000), encoder_hidden_states [B, T, D], pooled_projections [B, P], guidance [B] (None for
  models without guidance embeds). Non-batch: txt_ids [T, 3], img_ids [N, 3], joint_attention_kwargs. True CFG
  (true_cfg_scale > 1 and a negative prompt) makes a SECOND call per step, not a batched one: first the cond call,
  then the uncond call with the negative prompt's embeds (same latents, timestep, guidance, ids), and the pipeline
  mixes neg + true_cfg_scale · (cond − neg).

So the reference answers SD3's single call with [ε, ε] (the pipeline's CFG of two equal halves is ε), and each of
Flux's calls with its own half: ẽ(c) on the cond call and ẽ(∅) on the uncond call; the pipeline then does the true
CFG mix (in the latents' dtype). For contrastive-cond the extra s·(p(c) − n(c)) is put on the cond call divided by
true_cfg_scale G, and for contrastive-uncond the extra s·(p(∅) − n(∅)) on the uncond call divided by 1 − G, so the
pipeline's mix adds exactly that term.
"""
from __future__ import annotations

import contextlib

import torch

# Transformer inputs with a batch dimension, per family (the rest are passed through untouched).
BATCH_INPUTS = {
    "sd3": ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"),
    "flux": ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections", "guidance"),
}
STATIC_INPUTS = {"sd3": (), "flux": ("txt_ids", "img_ids")}
MODES = ("base", "contrastive", "contrastive-cond", "contrastive-uncond", "pgd", "npo", "merged", "cfg")
# Without an unconditional branch these modes have nothing to act on.
NEED_UNCOND = ("contrastive-cond", "contrastive-uncond", "npo")


def pipeline_family(pipe) -> str:
    name = type(pipe.transformer).__name__
    family = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}.get(name)
    if family is None:
        raise TypeError(f"no reference for a {name} pipeline")
    return family


class TransformerReference:
    """Context manager: inside it, pipe(...) runs every branch as its own transformer call and merges in float64.

    mode: one of MODES ("base" = adapters off). strength s, start/stop (fractions of the steps; outside, "base"),
    merge_weight (NPO's m = base + s·neg + (1 − merge_weight)·pos), user: the adapters "cfg" activates.
    true_cfg_scale: Flux only, the value passed to the pipeline call (None or ≤ 1: no true CFG). Pass
    `callback_on_step_end=ref.callback` to the pipeline call.
    """

    def __init__(self, pipe, mode: str, strength: float = 1.0, start: float = 0.0, stop: float = 1.0,
                 merge_weight: float = 0.0, user=("pos", "neg"), true_cfg_scale: float | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        self.pipe, self.mode, self.s, self.mw = pipe, mode, strength, merge_weight
        self.start, self.stop, self.user = start, stop, list(user)
        self.family = pipeline_family(pipe)
        self.true_cfg = true_cfg_scale if (self.family == "flux" and (true_cfg_scale or 0) > 1) else None
        if mode in NEED_UNCOND and self.family == "flux" and self.true_cfg is None:
            raise ValueError(f"{mode} needs an unconditional branch: Flux has one only with true_cfg_scale > 1 and "
                             "a negative prompt")
        self.step = 0
        self.calls_in_step = 0
        # what fp32 rounding bounds of comparisons scale with: transformer calls answered, largest |branch output|
        self.calls, self.branch_scale = 0, 0.0

    # -- wrapping ----------------------------------------------------------------------------------------------------
    def __enter__(self):
        self.original = self.pipe.transformer.forward
        self.pipe.transformer.forward = self.forward
        return self

    def __exit__(self, *exc):
        del self.pipe.transformer.__dict__["forward"]
        transformer = self.pipe.transformer
        transformer.enable_lora()
        transformer.set_adapters(self.user)

    def callback(self, pipe, i, t, kwargs):
        self.step, self.calls_in_step = i + 1, 0
        return {}

    # -- one branch --------------------------------------------------------------------------------------------------
    def _branch(self, adapters: dict | None, rows: slice, inputs: dict, lora_scale: float) -> torch.Tensor:
        transformer = self.pipe.transformer
        if adapters is None:
            transformer.disable_lora()
        else:
            transformer.enable_lora()
            transformer.set_adapters(list(adapters), [w * lora_scale for w in adapters.values()])
        batch = {k: (None if v is None else v[rows]) for k, v in inputs["batch"].items()}
        out = self.original(**batch, **inputs["static"], return_dict=False)[0]
        self.branch_scale = max(self.branch_scale, out.abs().max().item())
        return out.double()

    def _split(self, kwargs: dict):
        unknown = set(kwargs) - set(BATCH_INPUTS[self.family]) - set(STATIC_INPUTS[self.family]) - {
            "joint_attention_kwargs", "return_dict"}
        if unknown:  # a new input of another diffusers version, or skip-layer guidance: not modelled here
            raise ValueError(f"the {self.family} reference does not model transformer inputs {sorted(unknown)}")
        attention = dict(kwargs.get("joint_attention_kwargs") or {})
        lora_scale = float(attention.pop("scale", 1.0))
        if attention:
            raise ValueError(f"the reference does not model joint_attention_kwargs {sorted(attention)}")
        batch = {k: kwargs.get(k) for k in BATCH_INPUTS[self.family]}
        static = {k: kwargs[k] for k in STATIC_INPUTS[self.family] if k in kwargs}
        return {"batch": batch, "static": static}, lora_scale

    def _guided(self) -> bool:
        n_steps = self.pipe.num_timesteps  # flow-matching Euler: one transformer call (per half) per step
        return int(self.start * n_steps) <= self.step < int(self.stop * n_steps)

    # -- the wrapped forward -----------------------------------------------------------------------------------------
    def forward(self, **kwargs):
        inputs, lora_scale = self._split(kwargs)
        hidden = inputs["batch"]["hidden_states"]
        mode = self.mode if self._guided() else "base"
        self.calls_in_step += 1
        self.calls += 1

        def ev(adapters, rows):
            return self._branch(adapters, rows, inputs, lora_scale)

        if self.family == "sd3" and self.pipe.do_classifier_free_guidance:
            n = hidden.shape[0] // 2
            halves = {"u": slice(0, n), "c": slice(n, 2 * n)}
            e, extra = self._halves(mode, halves, ev)
            g = self.pipe.guidance_scale
            if mode == "base":
                return (torch.cat([e["u"], e["c"]]).to(hidden.dtype),)
            eps = e["u"] + g * (e["c"] - e["u"]) + extra.get("c", 0.0) + extra.get("u", 0.0)
            return (torch.cat([eps, eps]).to(hidden.dtype),)
        rows = slice(0, hidden.shape[0])
        if self.true_cfg is not None:  # Flux true CFG: cond call first, then the uncond call, each step
            half = "c" if self.calls_in_step % 2 == 1 else "u"
            e, extra = self._halves(mode, {half: rows}, ev)
            weight = self.true_cfg if half == "c" else 1.0 - self.true_cfg
            return ((e[half] + extra.get(half, 0.0) / weight).to(hidden.dtype),)
        # No unconditional rows (SD3 with guidance_scale <= 1, as the UNet modes; Flux without true CFG, where
        # __init__ refused the modes that need them): the cond half alone.
        e, extra = self._halves(mode, {"c": rows}, ev)
        return ((e["c"] + extra.get("c", 0.0)).to(hidden.dtype),)

    def _halves(self, mode: str, halves: dict, ev):
        """Each half's guided prediction ẽ(y) in float64, and the term added after CFG per half it is computed on
        (contrastive-cond: s·(p(c) − n(c)); contrastive-uncond: s·(p(∅) − n(∅)); none elsewhere)."""
        s = self.s
        pos, neg = {"pos": 1.0}, {"neg": 1.0}
        extra = {}
        if mode == "base":
            e = {y: ev(None, r) for y, r in halves.items()}
        elif mode == "contrastive":
            e = {y: ev(None, r) + s * (ev(pos, r) - ev(neg, r)) for y, r in halves.items()}
        elif mode == "contrastive-cond":
            e = {y: ev(None, r) for y, r in halves.items()}
            if "c" in halves:
                extra["c"] = s * (ev(pos, halves["c"]) - ev(neg, halves["c"]))
        elif mode == "contrastive-uncond":
            e = {y: ev(None, r) for y, r in halves.items()}
            if "u" in halves:
                extra["u"] = s * (ev(pos, halves["u"]) - ev(neg, halves["u"]))
        elif mode == "pgd":
            e = {y: ev(None, r) + s * (ev(pos, r) - ev(None, r)) for y, r in halves.items()}
        elif mode == "npo":
            m = {"neg": s, "pos": 1.0 - self.mw}
            e = {y: ev(pos if y == "c" else m, r) for y, r in halves.items()}
        elif mode == "merged":
            e = {y: ev({"pos": s, "neg": -s}, r) for y, r in halves.items()}
        else:  # cfg: the user's adapters
            e = {y: ev({a: 1.0 for a in self.user}, r) for y, r in halves.items()}
        return e, extra


def reference_run(pipe, mode: str, call_kwargs: dict, **reference_kwargs):
    """(pipe(**call_kwargs).images under a TransformerReference, that reference); true_cfg_scale from the call."""
    true_cfg = call_kwargs.get("true_cfg_scale") if call_kwargs.get("negative_prompt") is not None else None
    ref = TransformerReference(pipe, mode, true_cfg_scale=true_cfg, **reference_kwargs)
    with ref:
        return pipe(**call_kwargs, callback_on_step_end=ref.callback).images, ref


def reference_images(pipe, mode: str, call_kwargs: dict, **reference_kwargs):
    """pipe(**call_kwargs).images under a TransformerReference (true_cfg_scale taken from the call)."""
    return reference_run(pipe, mode, call_kwargs, **reference_kwargs)[0]


@contextlib.contextmanager
def count_transformer_rows(pipe, rows: list):
    """Appends the batch size (rows) of every transformer call to `rows`: one entry per call."""
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append((kwargs.get("hidden_states", args[0] if args else None)).shape[0]),
        with_kwargs=True,
    )
    try:
        yield rows
    finally:
        hook.remove()
