"""Guidance as an algebra over denoiser branches, and the guidance modes as presets written in it.

A branch is one denoiser prediction: at a prompt ("uncond": the negative / empty prompt, "cond": the prompt) with a
mix of LoRA adapters at given weights (no adapters: the base model). `branch(prompt, **weights)` is a `Term`, and
terms form linear combinations with +, - and scalar *. `Guidance(uncond, cond, after)` defines one step's
prediction

    eps = (1 - g) * uncond + g * cond + after          (with CFG, g = the pipeline's guidance scale)
    eps = cond + after                                 (without CFG)

Guidance rescale takes cond + after as its reference. `compile_merge` turns a Guidance into the distinct branches
one batched denoiser call runs (each (prompt, adapter mix) once) and the merge coefficients of the fused merge op;
`build_step_plan` adds the per-prompt adapter mixes of one call and the row routing (a `StepPlan`).

Presets (b = base, p / n = the positive / negative adapter, s = strength), the single source of the mode strings of
`cgkernels.patch(pipe, guidance="...")`:

- contrastive        uncond = b(u) + s(p(u) - n(u)),  cond = the same at c                        6 branches
- contrastive-cond   uncond = b(u), cond = b(c),  after = s(p(c) - n(c))                           4 branches
- contrastive-uncond uncond = b(u), cond = b(c),  after = s(p(u) - n(u))        needs CFG          4 branches
- pgd                uncond = b(u) + s(p(u) - b(u)),  cond = the same at c                         4 branches
- npo                uncond = m(u), cond = q(c);  m = base + s*neg + (1 - merge_weight)*pos, q = base + pos
                     (positive=None: q = base, m = base + s*neg)                needs CFG          2 branches
- merged             uncond, cond at base + s*pos - s*neg (one combined adapter)                   2 branches
- cfg                uncond, cond with the adapters active at patch time, at their set_adapters weights

Published cPGD ("contrastive") adds s*[g*(p(c) - n(c)) + (1 - g)*(p(u) - n(u))] to plain CFG: the correction's
unconditional part enters with weight 1 - g < 0. "contrastive-cond" keeps only the conditional part;
"contrastive-uncond" applies the unconditional part after CFG with weight +s. npo and contrastive-uncond act through
the unconditional prediction: without CFG they would silently do nothing (npo) or have nothing to read, so they are
refused there.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from cgkernels.lora_layers import ACTIVE_ADAPTERS, SegmentRouting, build_routing
from cgkernels.ops.guidance_merge import MAX_PREDS

__all__ = ["MODES", "ADAPTER_ROLES", "NEEDS_CFG", "NEEDS_UNCOND", "ACTIVE_ADAPTERS", "Branch", "Term", "branch", "Guidance",
           "GuidanceConfig", "preset", "guides_each_call_alone", "compile_merge", "StepPlan", "build_step_plan", "is_guided_step", "as_real",
           "combine_mixes", "mix_of", "UNCOND", "COND", "Mix"]

MODES = ("contrastive", "contrastive-cond", "contrastive-uncond", "pgd", "npo", "merged", "cfg")
# Presets that act through the unconditional prediction: refused without CFG.
NEEDS_CFG = ("contrastive-uncond", "npo")
# Presets refused on a guidance-distilled Flux model without true CFG (contrastive-cond there is plain contrastive).
NEEDS_UNCOND = ("contrastive-cond", "contrastive-uncond", "npo")

UNCOND, COND = "uncond", "cond"
_PROMPTS = (UNCOND, COND)
# ACTIVE_ADAPTERS (a pseudo-adapter name): the adapters active in each LoRA layer at patch time, at the per-layer
# weights peft holds then (the user's set_adapters weights, which may differ per block). The "cfg" preset runs it.

Mix = tuple  # ((adapter, weight), ...) sorted by adapter, no zero weights; () = the base model


def as_real(value, name: str) -> float:
    """`value` as a finite float: Python, NumPy and 0-d torch real scalars are accepted; bools, complex numbers,
    other types and inf / nan are refused naming `name`."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real scalar, got a tensor of shape {tuple(value.shape)} and dtype "
                            f"{value.dtype}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def mix_of(weights: dict, where: str) -> Mix:
    """{adapter: weight} as a Mix (weights checked: finite real scalars; zero weights dropped)."""
    mix = {}
    for adapter, weight in weights.items():
        if not isinstance(adapter, str) or not adapter:
            raise TypeError(f"{where}: adapter names must be non-empty strings, got {adapter!r}")
        w = as_real(weight, f"{where}: weight of adapter {adapter!r}")
        if w != 0.0:
            mix[adapter] = w
    return tuple(sorted(mix.items()))


def combine_mixes(*mixes: Mix) -> Mix:
    """The sum of adapter mixes (weights of the same adapter add; zero weights dropped)."""
    total: dict[str, float] = {}
    for mix in mixes:
        for adapter, weight in mix:
            total[adapter] = total.get(adapter, 0.0) + weight
    return tuple(sorted((a, w) for a, w in total.items() if w != 0.0))


@dataclass(frozen=True)
class Branch:
    """One denoiser prediction: at `prompt` ("uncond" or "cond") with the adapter mix `adapters`."""

    prompt: str
    adapters: Mix = ()

    def __repr__(self):
        weights = "".join(f", {a}={w:g}" if a.isidentifier() else f", **{{{a!r}: {w:g}}}" for a, w in self.adapters)
        return f"branch({self.prompt!r}{weights})"


class Term:
    """A linear combination of branches, sum_k c_k * branch_k (immutable)."""

    __slots__ = ("_coeffs",)

    def __init__(self, coeffs: dict | None = None):
        cleaned = {b: c for b, c in (coeffs or {}).items() if c != 0.0}
        object.__setattr__(self, "_coeffs", tuple(sorted(cleaned.items(), key=lambda item: _branch_key(item[0]))))

    def __setattr__(self, name, value):
        raise AttributeError("Term is immutable")

    def items(self) -> tuple[tuple[Branch, float], ...]:
        return self._coeffs

    def branches(self) -> tuple[Branch, ...]:
        return tuple(b for b, _ in self._coeffs)

    def _combined(self, other, sign: float) -> "Term":
        if isinstance(other, numbers.Number) and not isinstance(other, bool) and other == 0:
            return self  # sum(...) starts from 0
        if not isinstance(other, Term):
            raise TypeError(f"a guidance Term can be added to another Term (branch(...)), not to "
                            f"{type(other).__name__} ({other!r}); scale terms with `*`")
        coeffs = dict(self._coeffs)
        for b, c in other._coeffs:
            coeffs[b] = coeffs.get(b, 0.0) + sign * c
        return Term(coeffs)

    def __add__(self, other):
        return self._combined(other, 1.0)

    __radd__ = __add__

    def __sub__(self, other):
        return self._combined(other, -1.0)

    def __rsub__(self, other):
        return (-self)._combined(other, 1.0)

    def __neg__(self):
        return Term({b: -c for b, c in self._coeffs})

    def __mul__(self, scalar):
        if isinstance(scalar, Term):
            raise TypeError("a product of two guidance Terms is not linear: multiply a Term by a real number")
        s = as_real(scalar, "a guidance Term's scalar factor")
        return Term({b: s * c for b, c in self._coeffs})

    __rmul__ = __mul__

    def __truediv__(self, scalar):
        s = as_real(scalar, "a guidance Term's divisor")
        if s == 0.0:
            raise ZeroDivisionError("a guidance Term divided by zero")
        return Term({b: c / s for b, c in self._coeffs})

    def __eq__(self, other):
        return isinstance(other, Term) and self._coeffs == other._coeffs

    def __hash__(self):
        return hash(self._coeffs)

    def __repr__(self):
        if not self._coeffs:
            return "Term()"
        parts = [("-" if c < 0 else "+", repr(b) if abs(c) == 1.0 else f"{abs(c):g}*{b!r}") for b, c in self._coeffs]
        text = " ".join(f"{sign} {body}" for sign, body in parts)
        return text[2:] if text.startswith("+ ") else "-" + text[2:]


def _branch_key(b: Branch):
    return (_PROMPTS.index(b.prompt), b.adapters)


def branch(prompt: str, **adapter_weights) -> Term:
    """The denoiser's prediction at `prompt` ("uncond" or "cond") with the named adapters at those weights (a
    weight multiplies the adapter's configured scale lora_alpha / r); no adapters: the base model."""
    if prompt not in _PROMPTS:
        raise ValueError(f"branch prompt must be 'uncond' or 'cond', got {prompt!r}")
    return Term({Branch(prompt, mix_of(adapter_weights, f"branch({prompt!r})")): 1.0})


def _as_term(value, name: str) -> Term:
    if value is None:
        return Term()
    if not isinstance(value, Term):
        raise TypeError(f"Guidance({name}=...) must be a Term built from cgkernels.branch(...), got "
                        f"{type(value).__name__}")
    return value


@dataclass(frozen=True)
class Guidance:
    """eps = (1 - g) * uncond + g * cond + after with CFG (g: the pipeline's guidance scale), cond + after without.

    needs_cfg (keyword): refuse calls without CFG (set by the presets that act through the unconditional
    prediction). name: how errors call it (the preset's mode string)."""

    uncond: Term
    cond: Term
    after: Term | None = None
    needs_cfg: bool = field(default=False, kw_only=True)
    name: str = field(default="Guidance(...)", kw_only=True, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "uncond", _as_term(self.uncond, "uncond"))
        object.__setattr__(self, "cond", _as_term(self.cond, "cond"))
        object.__setattr__(self, "after", _as_term(self.after, "after"))
        if not self.cond.items():
            raise ValueError("Guidance(cond=...) is empty: the guided prediction needs at least one branch")

    def adapters(self) -> list[str]:
        return sorted({a for term in (self.uncond, self.cond, self.after) for b in term.branches()
                       for a, _ in b.adapters})


def guides_each_call_alone(guidance: Guidance) -> bool:
    """Whether one call over one prompt's rows gives that prompt's guided prediction: nothing comes after CFG and the
    uncond term is the cond term at the negative prompt (the presets contrastive, pgd, merged, cfg). Only then is a
    loop that calls the denoiser once per prompt and mixes U + g (C - U) itself guided as the Guidance says."""
    swapped = Term({Branch(COND, b.adapters) if b.prompt == UNCOND else Branch(UNCOND, b.adapters): c
                    for b, c in guidance.uncond.items()})
    return not guidance.after.items() and swapped.items() == guidance.cond.items()


def compile_merge(guidance: Guidance, layout: str, guidance_scale: float = 1.0) -> tuple[tuple, tuple, tuple]:
    """(branches, coeffs, ref_coeffs) of one denoiser call: the distinct branches in row order and the merge
    coefficients (eps = sum coeffs[k] * branch_k; rescale reference sum ref_coeffs[k] * branch_k).

    layout: "cfg" (one call over [uncond, cond], g = guidance_scale), "cond" (no CFG: eps = cond + after), or one of
    the two calls of a pipeline that mixes separate calls as U' + g (C' - U') (Flux true CFG): "two_call_uncond"
    returns U' = uncond + after_u / (1 - g), "two_call_cond" C' = cond + after_c / g (no rescale reference).
    """
    g = float(guidance_scale)
    after = dict(guidance.after.items())
    if layout == "cfg":
        parts = ((guidance.uncond, 1.0 - g, 0.0), (guidance.cond, g, 1.0), (guidance.after, 1.0, 1.0))
    elif layout == "cond":
        _refuse_without_cfg(guidance, guidance_scale)
        parts = ((guidance.cond, 1.0, 1.0), (guidance.after, 1.0, 1.0))
    elif layout in ("two_call_uncond", "two_call_cond"):
        if not g > 1.0:
            raise ValueError(f"two-call CFG needs a guidance scale > 1, got {g}")
        prompt, weight = (UNCOND, 1.0 - g) if layout == "two_call_uncond" else (COND, g)
        own = guidance.uncond if prompt == UNCOND else guidance.cond
        if any(b.prompt != prompt for b in own.branches()):
            raise ValueError(
                f"{guidance.name}: Flux true CFG runs the {prompt} prompt in a call of its own, so "
                f"Guidance({prompt}=...) may only use branch({prompt!r}, ...) there; got {own!r}")
        mine = Term({b: c / weight for b, c in after.items() if b.prompt == prompt})
        parts = ((own, 1.0, 0.0), (mine, 1.0, 0.0))
    else:
        raise ValueError(f"unknown call layout {layout!r}")
    coeff: dict[Branch, float] = {}
    ref: dict[Branch, float] = {}
    for term, weight, ref_weight in parts:
        for b, c in term.items():
            coeff[b] = coeff.get(b, 0.0) + weight * c
            ref[b] = ref.get(b, 0.0) + ref_weight * c
    # Row order: grouped by adapter mix (uncond then cond inside a group), so that the expanded batch is the
    # pipeline's [u, c] batch repeated whenever every mix sees both prompts.
    mixes = list(dict.fromkeys(b.adapters for b in coeff))
    branches = tuple(Branch(p, m) for m in mixes for p in _PROMPTS
                     if coeff.get(Branch(p, m), 0.0) != 0.0 or ref.get(Branch(p, m), 0.0) != 0.0)
    if not branches:
        raise ValueError(f"{guidance.name}: every merge coefficient is zero at guidance scale {g}")
    return branches, tuple(coeff[b] for b in branches), tuple(ref[b] for b in branches)


def _refuse_without_cfg(guidance: Guidance, guidance_scale: float) -> None:
    if guidance.needs_cfg:
        raise ValueError(
            f"guidance={guidance.name!r} acts through the unconditional branch of CFG; it needs guidance_scale > 1 "
            f"(got {guidance_scale}, which runs no unconditional branch and would silently give the base model)")
    # Without CFG the call has only the prompt's rows: an uncond branch in cond or after (the terms eps uses) would
    # silently run at the prompt instead of the negative prompt.
    for label, term in (("after", guidance.after), ("cond", guidance.cond)):
        uses_uncond = [b for b in term.branches() if b.prompt == UNCOND]
        if uses_uncond:
            raise ValueError(
                f"{guidance.name}: {label}={term!r} reads the unconditional prediction {uses_uncond[0]!r}, which a "
                f"call without CFG does not compute (guidance_scale={guidance_scale}); use guidance_scale > 1")


# ----------------------------------------------------------------------------------------------------------------
# Presets: the mode strings
# ----------------------------------------------------------------------------------------------------------------
def preset(mode: str, positive: str | None = "pos", negative: str | None = "neg", strength=1.0,
           merge_weight=0.0) -> Guidance:
    """The Guidance of a mode string (see the module docstring)."""
    s, mw = float(strength), float(merge_weight)
    pos = {positive: 1.0} if positive is not None else {}
    neg = {negative: 1.0} if negative is not None else {}

    def both(make):
        return dict(uncond=make(UNCOND), cond=make(COND))

    def contrast(y):
        return s * (branch(y, **pos) - branch(y, **neg))

    if mode == "contrastive":
        return Guidance(**both(lambda y: branch(y) + contrast(y)), name=mode)
    if mode == "contrastive-cond":
        return Guidance(branch(UNCOND), branch(COND), contrast(COND), name=mode)
    if mode == "contrastive-uncond":
        return Guidance(branch(UNCOND), branch(COND), contrast(UNCOND), needs_cfg=True, name=mode)
    if mode == "pgd":
        return Guidance(**both(lambda y: (1.0 - s) * branch(y) + s * branch(y, **pos)), name=mode)
    if mode == "npo":
        uncond = dict(combine_mixes(((negative, s),), tuple((a, 1.0 - mw) for a in pos)))
        return Guidance(branch(UNCOND, **uncond), branch(COND, **pos), needs_cfg=True, name=mode)
    if mode == "merged":
        weights = dict(combine_mixes(((positive, s),), ((negative, -s),)))
        return Guidance(**both(lambda y: branch(y, **weights)), name=mode)
    if mode == "cfg":
        return Guidance(**both(lambda y: branch(y, **{ACTIVE_ADAPTERS: 1.0})), name=mode)
    raise ValueError(f"unknown guidance mode {mode!r}; choose one of {MODES}")


# Which adapter arguments (patch's positive= / negative=) each preset reads.
ADAPTER_ROLES = {
    "contrastive": ("positive", "negative"),
    "contrastive-cond": ("positive", "negative"),
    "contrastive-uncond": ("positive", "negative"),
    "merged": ("positive", "negative"),
    "pgd": ("positive",),
    "npo": ("negative",),
    "cfg": (),
}


@dataclass(frozen=True)
class GuidanceConfig:
    """A mode string and its settings (patch's and the guider's arguments), validated."""

    mode: str = "contrastive"
    positive: str | None = "pos"
    negative: str | None = "neg"
    strength: float = 1.0
    start: float = 0.0
    stop: float = 1.0
    merge_weight: float = 0.0

    def validate(self) -> "GuidanceConfig":
        """The config with its numbers as floats (numpy / 0-d torch scalars accepted), or a ValueError."""
        if self.mode not in MODES:
            raise ValueError(f"unknown guidance mode {self.mode!r}; choose one of {MODES}")
        numbers_ = {}
        for name in ("strength", "start", "stop", "merge_weight"):
            try:
                numbers_[name] = as_real(getattr(self, name), name)
            except TypeError as error:
                raise ValueError(f"{error} (a finite number is needed)") from None
        if not 0.0 <= numbers_["start"] < numbers_["stop"] <= 1.0:
            raise ValueError(f"need 0 <= start < stop <= 1, got start={numbers_['start']}, stop={numbers_['stop']}")
        for role in ADAPTER_ROLES[self.mode]:
            if getattr(self, role) is None:
                raise ValueError(f"guidance={self.mode!r} needs a {role} adapter, got {role}=None")
        return GuidanceConfig(self.mode, self.positive, self.negative, **numbers_)

    def guidance(self) -> Guidance:
        return preset(self.mode, self.positive, self.negative, self.strength, self.merge_weight)


# ----------------------------------------------------------------------------------------------------------------
# Step plans
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepPlan:
    """What one denoiser call does, decided on the host: the row routing (which adapter mix each row segment runs),
    which block of the incoming batch feeds each branch, and the merge. Frozen and cached per distinct value:
    torch.compile guards on these fields, so each distinct plan (and input shape) is one graph.

    blocks None: an unguided call, the pipeline's rows run as they come (each prompt's own adapter mix only)."""

    routing: SegmentRouting
    batch: int  # B, the pipeline's rows per CFG half
    halves: int  # 2 for a call over [uncond, cond], else 1
    blocks: tuple[int, ...] | None
    coeffs: tuple[float, ...] = ()
    ref_coeffs: tuple[float, ...] = ()
    rescale: float = 0.0


def build_step_plan(guidance: Guidance | None, layout: str, guidance_scale: float, rescale: float, batch: int,
                    lora_scale: float, prompt_mixes: tuple[Mix, ...] = ((),)) -> StepPlan:
    """The StepPlan of one call. guidance None: an unguided step. prompt_mixes: the adapter mix of each prompt
    (each owns batch / len(prompt_mixes) consecutive rows of every CFG half), added to every branch's adapters."""
    halves = 2 if layout == "cfg" else 1
    rows_per_prompt = batch // len(prompt_mixes)

    def block_segments(mix: Mix):
        return [(rows_per_prompt, combine_mixes(mix, own) or None) for own in prompt_mixes]

    if guidance is None:
        segments = [s for _ in range(halves) for s in block_segments(())]
        return StepPlan(build_routing(segments, lora_scale), batch, halves, None)
    branches, coeffs, ref_coeffs = compile_merge(guidance, layout, guidance_scale)
    if len(branches) > MAX_PREDS:  # refused here, before a denoiser call over all those rows
        raise ValueError(f"{guidance.name}: {len(branches)} distinct branches in one call; the fused guidance merge "
                         f"takes at most {MAX_PREDS} (cgkernels.ops.guidance_merge.MAX_PREDS): {list(branches)}")
    blocks = tuple(_PROMPTS.index(b.prompt) if halves == 2 else 0 for b in branches)
    segments = [s for b in branches for s in block_segments(b.adapters)]
    return StepPlan(build_routing(segments, lora_scale), batch, halves, blocks, coeffs, ref_coeffs,
                    float(rescale) if layout == "cfg" else 0.0)


def is_guided_step(step: int, num_steps: int, start: float, stop: float) -> bool:
    """Step i of N is guided when int(start*N) <= i < int(stop*N), as diffusers' guiders count."""
    return int(start * num_steps) <= step < int(stop * num_steps)
