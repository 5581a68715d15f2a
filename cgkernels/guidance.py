"""Guidance modes as row plans: which UNet branches run, which adapter mix each uses, and how they are merged.

Notation: b = base UNet, p = base + positive adapter, n = base + negative adapter, s = strength, g = guidance scale,
y in {uncond (negative/empty prompt), cond (prompt)}. Every mode is written as

    eps = (1 - g) * U + g * C + D

with U, C, D linear combinations of branch predictions (U: the guided unconditional prediction, C: the guided
conditional one, D: a term added after CFG). Without CFG (g <= 1 in the pipeline) eps = C + D. Guidance rescale
uses C + D as its reference ("the mode's conditional prediction").

- contrastive       U = b(u) + s(p(u) - n(u)),  C = the same at c,               D = 0          6 branches
- contrastive-cond  U = b(u), C = b(c),  D = s(p(c) - n(c))                                     4 branches
- contrastive-uncond U = b(u), C = b(c), D = s(p(u) - n(u))                                     4 branches
- pgd               U = b(u) + s(p(u) - b(u)),  C = the same at c                               4 branches
- npo               U = m(u), C = q(c);  q = base + positive (or base), m = base + s*neg + (1 - merge_weight)*pos
- merged            U, C from W + s(dW_pos - dW_neg) on every row                               2 branches
- cfg               U, C from the adapters the user activated                                   2 branches

Published cPGD ("contrastive") adds s*[g*(p(c) - n(c)) + (1 - g)*(p(u) - n(u))] to plain CFG: the correction's
unconditional part enters with weight 1 - g < 0. Adapters trained with empty prompts learn the prompt-independent
part of a preference at u, and CFG turns that part against the preference. "contrastive-cond" keeps only the
conditional part; "contrastive-uncond" applies the unconditional part after CFG with weight +s, the sign that keeps
it pointing towards the preference (with strength s*(1 - g) it is exactly the u-part of "contrastive"). It needs CFG
(guidance_scale > 1): without the unconditional half there is nothing to read it from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["MODES", "NEEDS_UNCOND", "GuidanceConfig", "Branch", "RowPlan", "mode_mixes", "row_plan",
           "two_call_cfg_plan", "is_guided_step"]

MODES = ("contrastive", "contrastive-cond", "contrastive-uncond", "pgd", "npo", "merged", "cfg")

# Mix names used by the patch (internal; adapter names are the user's).
POSITIVE, NEGATIVE, NPO_UNCOND, MERGED, USER = "positive", "negative", "npo_uncond", "merged", "user"

# Modes whose guidance acts through the unconditional prediction: without one (a guidance-distilled model such as
# FLUX.1-dev run without true CFG) npo and contrastive-uncond have nothing to act on and contrastive-cond is plain
# contrastive.
NEEDS_UNCOND = ("contrastive-cond", "contrastive-uncond", "npo")

UNCOND, COND = 0, 1  # index of the prompt half in the pipeline's CFG batch [uncond x B, cond x B]


@dataclass(frozen=True)
class GuidanceConfig:
    mode: str = "contrastive"
    positive: str | None = "pos"
    negative: str | None = "neg"
    strength: float = 1.0
    start: float = 0.0
    stop: float = 1.0
    merge_weight: float = 0.0

    def validate(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown guidance mode {self.mode!r}; choose one of {MODES}")
        for name in ("strength", "start", "stop", "merge_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0.0 <= self.start < self.stop <= 1.0:
            raise ValueError(f"need 0 <= start < stop <= 1, got start={self.start}, stop={self.stop}")
        needs = {
            "contrastive": ("positive", "negative"),
            "contrastive-cond": ("positive", "negative"),
            "contrastive-uncond": ("positive", "negative"),
            "merged": ("positive", "negative"),
            "pgd": ("positive",),
            "npo": ("negative",),
            "cfg": (),
        }[self.mode]
        for role in needs:
            if getattr(self, role) is None:
                raise ValueError(f"guidance={self.mode!r} needs a {role} adapter, got {role}=None")

    def adapters_used(self) -> list[str]:
        return sorted({a for weights in mode_mixes(self).values() for a in weights})


@dataclass(frozen=True)
class Branch:
    prompt: int  # UNCOND or COND: which half of the pipeline's CFG batch feeds this branch
    mix: str | None  # adapter mix name (see mode_mixes), None = base model


@dataclass(frozen=True)
class RowPlan:
    """Branches in row order (each one B rows), merge coefficients and rescale reference coefficients."""

    branches: tuple[Branch, ...]
    coeffs: tuple[float, ...]
    ref_coeffs: tuple[float, ...]

    def routing(self, batch: int) -> list[tuple[int, str | None]]:
        return [(batch, branch.mix) for branch in self.branches]

    def input_blocks(self, cfg: bool) -> list[int]:
        """For each branch, which B-row block of the incoming batch feeds it ([u, c] with CFG, [c] without)."""
        return [branch.prompt if cfg else 0 for branch in self.branches]


def mode_mixes(config: GuidanceConfig) -> dict[str, dict[str, float]]:
    """The adapter mixes a mode needs, {mix_name: {adapter: weight}}; combined mixes concatenate ranks."""
    s, pos, neg = float(config.strength), config.positive, config.negative
    mode = config.mode
    if mode in ("contrastive", "contrastive-cond", "contrastive-uncond"):
        return {POSITIVE: {pos: 1.0}, NEGATIVE: {neg: 1.0}}
    if mode == "pgd":
        return {POSITIVE: {pos: 1.0}}
    if mode == "npo":
        uncond = {neg: s}
        if pos is not None:
            uncond[pos] = uncond.get(pos, 0.0) + (1.0 - config.merge_weight)
            return {POSITIVE: {pos: 1.0}, NPO_UNCOND: uncond}
        return {NPO_UNCOND: uncond}
    if mode == "merged":
        return {MERGED: {pos: s, neg: -s}}
    return {}  # cfg: the user mix is added by the patch from the adapters active at patch time


def _terms(config: GuidanceConfig, user_mix: str | None):
    """U, C, D of the mode as lists of (prompt, mix, weight)."""
    s = float(config.strength)
    mode = config.mode

    def both(weights):  # the same combination at uncond (U) and cond (C)
        return [(UNCOND, m, w) for m, w in weights], [(COND, m, w) for m, w in weights]

    if mode == "contrastive":
        u, c = both([(None, 1.0), (POSITIVE, s), (NEGATIVE, -s)])
        return u, c, []
    if mode == "contrastive-cond":
        return [(UNCOND, None, 1.0)], [(COND, None, 1.0)], [(COND, POSITIVE, s), (COND, NEGATIVE, -s)]
    if mode == "contrastive-uncond":
        return [(UNCOND, None, 1.0)], [(COND, None, 1.0)], [(UNCOND, POSITIVE, s), (UNCOND, NEGATIVE, -s)]
    if mode == "pgd":
        u, c = both([(None, 1.0 - s), (POSITIVE, s)])
        return u, c, []
    if mode == "npo":
        cond_mix = POSITIVE if config.positive is not None else None
        return [(UNCOND, NPO_UNCOND, 1.0)], [(COND, cond_mix, 1.0)], []
    if mode == "merged":
        u, c = both([(MERGED, 1.0)])
        return u, c, []
    u, c = both([(user_mix, 1.0)])
    return u, c, []


def row_plan(config: GuidanceConfig, *, cfg: bool, guidance_scale: float, user_mix: str | None = None) -> RowPlan:
    """Branches and merge coefficients of one guided step. Branches with all-zero coefficients are not run."""
    if config.mode == "contrastive-uncond" and not cfg:
        raise ValueError("guidance='contrastive-uncond' reads the unconditional branch of CFG; it needs "
                         f"guidance_scale > 1 (got {guidance_scale}, which runs no unconditional branch)")
    g = float(guidance_scale) if cfg else 1.0
    uncond, cond, extra = _terms(config, user_mix)
    coeff: dict[Branch, float] = {}
    ref: dict[Branch, float] = {}
    for terms, weight, in_ref in ((uncond, 1.0 - g, False), (cond, g, True), (extra, 1.0, True)):
        for prompt, mix, w in terms:
            branch = Branch(prompt, mix)
            coeff[branch] = coeff.get(branch, 0.0) + weight * w
            ref[branch] = ref.get(branch, 0.0) + (w if in_ref else 0.0)
    # Row order: grouped by mix (uncond then cond inside a group), so that the expanded batch is the pipeline's
    # [u, c] batch repeated whenever every mix sees both prompts, and each mix is one routing segment.
    mixes_in_order = list(dict.fromkeys(b.mix for b in coeff))
    prompts = (UNCOND, COND) if cfg else (COND,)
    branches = [
        Branch(prompt, mix)
        for mix in mixes_in_order
        for prompt in prompts
        if coeff.get(Branch(prompt, mix), 0.0) != 0.0 or ref.get(Branch(prompt, mix), 0.0) != 0.0
    ]
    return RowPlan(tuple(branches), tuple(coeff[b] for b in branches), tuple(ref[b] for b in branches))


def two_call_cfg_plan(config: GuidanceConfig, *, prompt: int, guidance_scale: float,
                      user_mix: str | None = None) -> RowPlan:
    """The branches of ONE of the two denoiser calls of a pipeline that runs CFG as separate calls and mixes their
    outputs as U' + g (C' - U') (Flux's true CFG). Each call can only run branches at its own prompt, so the terms of
    D (added after CFG) go to the call of their prompt: the uncond call returns U' = U + D_u / (1 - g), the cond call
    C' = C + D_c / g, and the pipeline's mix is the mode's (1 - g) U + g C + D. No guidance rescale (ref_coeffs 0).
    """
    g = float(guidance_scale)
    if not g > 1.0:
        raise ValueError(f"two-call CFG needs a guidance scale > 1, got {g}")
    uncond, cond, extra = _terms(config, user_mix)
    weight = 1.0 - g if prompt == UNCOND else g
    terms = (uncond if prompt == UNCOND else cond) + [(p, m, w / weight) for p, m, w in extra if p == prompt]
    coeff: dict[str | None, float] = {}
    for _, mix, w in terms:
        coeff[mix] = coeff.get(mix, 0.0) + w
    branches = tuple(Branch(prompt, mix) for mix, c in coeff.items() if c != 0.0)
    return RowPlan(branches, tuple(coeff[b.mix] for b in branches), (0.0,) * len(branches))


def is_guided_step(step: int, num_steps: int, start: float, stop: float) -> bool:
    """Step i of N is guided when int(start*N) <= i < int(stop*N), as diffusers' guiders count."""
    return int(start * num_steps) <= step < int(stop * num_steps)
