"""The guidance algebra on its own: terms, scalars, Guidance, and compile_merge's coefficients against the formula
evaluated directly on random branch values (float64), for random expressions (hypothesis)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cgkernels import Guidance, branch
from cgkernels.guidance import COND, MODES, UNCOND, Term, as_real, build_step_plan, compile_merge, preset

ADAPTERS = ("a", "b", "c")


def test_terms_combine_and_deduplicate():
    t = branch("cond", a=1.0) + 2 * branch("cond", a=1.0) - branch("uncond") * 0.5
    assert dict(t.items()) == {branch("cond", a=1.0).branches()[0]: 3.0, branch("uncond").branches()[0]: -0.5}
    assert (t - t).items() == ()
    assert branch("cond", a=1.0, b=0.0) == branch("cond", a=1.0)  # zero weights drop out
    assert branch("cond", b=1.0, a=2.0) == branch("cond", a=2.0, b=1.0)  # order does not matter
    assert sum([branch("cond"), branch("cond")]) == 2 * branch("cond")
    assert -branch("cond") == (-1) * branch("cond")
    assert branch("cond") / 4 == 0.25 * branch("cond")
    assert repr(2 * branch("cond", a=1) - branch("uncond")) == "-branch('uncond') + 2*branch('cond', a=1)"


@pytest.mark.parametrize("scalar", [2, 2.0, np.float32(2.0), np.float64(2.0), np.int64(2), torch.tensor(2.0),
                                    torch.tensor(2, dtype=torch.int32), torch.tensor(2.0, dtype=torch.float16)])
def test_any_real_scalar_is_accepted(scalar):
    assert scalar * branch("cond") == 2.0 * branch("cond")
    assert branch("cond", a=scalar) == branch("cond", a=2.0)
    assert as_real(scalar, "x") == 2.0


@pytest.mark.parametrize("bad, error, match", [
    (float("inf"), ValueError, "finite"), (float("nan"), ValueError, "finite"), (np.float32("nan"), ValueError, "finite"),
    (torch.tensor(float("inf")), ValueError, "finite"), (1j, TypeError, "real"), (True, TypeError, "real"),
    (torch.tensor([1.0, 2.0]), TypeError, "shape"), (torch.tensor(1j), TypeError, "real"), ("2", TypeError, "real"),
])
def test_bad_scalars_are_refused_by_name(bad, error, match):
    with pytest.raises(error, match=match):
        bad * branch("cond")
    with pytest.raises(error, match=match):
        branch("cond", ugly=bad)
    with pytest.raises(error, match="ugly"):
        branch("cond", ugly=bad)


def test_bad_terms_are_refused():
    with pytest.raises(ValueError, match="'uncond' or 'cond'"):
        branch("negative")
    with pytest.raises(TypeError, match="not linear"):
        branch("cond") * branch("cond")
    with pytest.raises(TypeError, match="added to another Term"):
        branch("cond") + 1.0
    with pytest.raises(TypeError, match="Term built from cgkernels.branch"):
        Guidance(uncond=0.5, cond=branch("cond"))
    with pytest.raises(ValueError, match="empty"):
        Guidance(uncond=branch("uncond"), cond=branch("cond") - branch("cond"))


def test_refusals_without_cfg():
    after_uncond = Guidance(branch("uncond"), branch("cond"), after=branch("uncond", a=1) - branch("uncond"))
    with pytest.raises(ValueError, match="unconditional prediction.*guidance_scale > 1"):
        compile_merge(after_uncond, "cond", 1.0)
    for mode in ("npo", "contrastive-uncond"):  # npo without CFG would silently be the base model
        with pytest.raises(ValueError, match=f"guidance='{mode}'.*guidance_scale > 1"):
            compile_merge(preset(mode), "cond", 1.0)
    # A cond term reading the uncond prediction: without CFG the call has only the prompt's rows, so it would
    # silently run at the prompt (before the fix: branch("uncond", pos=1) in cond gave branch("cond", pos=1)).
    cond_uncond = Guidance(branch("uncond"), branch("cond") + 0.5 * (branch("cond") - branch("uncond", a=1)))
    with pytest.raises(ValueError, match=r"cond=.*reads the unconditional prediction branch\('uncond', a=1\).*"
                                         "guidance_scale > 1"):
        compile_merge(cond_uncond, "cond", 1.0)
    # an uncond term that CFG-off simply does not use: eps = cond + after
    branches, coeffs, _ = compile_merge(Guidance(branch("uncond", a=1), branch("cond", b=1)), "cond", 1.0)
    assert branches == branch("cond", b=1).branches() and coeffs == (1.0,)


def test_two_call_layout_refuses_cross_prompt_terms():
    mixed = Guidance(uncond=branch("cond", bad=1.0), cond=branch("cond"))  # autoguidance: no uncond prompt needed
    with pytest.raises(ValueError, match="true CFG runs the uncond prompt in a call of its own"):
        compile_merge(mixed, "two_call_uncond", 3.0)


def _evaluate(guidance: Guidance, values: dict, layout: str, g: float):
    """The definition, evaluated directly: eps and the rescale reference."""
    def ev(term):
        return sum(c * values[b] for b, c in term.items()) if term.items() else 0.0

    if layout == "cfg":
        return (1 - g) * ev(guidance.uncond) + g * ev(guidance.cond) + ev(guidance.after), ev(guidance.cond) + ev(
            guidance.after)
    return ev(guidance.cond) + ev(guidance.after), ev(guidance.cond) + ev(guidance.after)


@st.composite
def terms(draw, prompts=(UNCOND, COND)):
    n = draw(st.integers(1, 3))
    total = Term()
    for _ in range(n):
        prompt = draw(st.sampled_from(prompts))
        adapters = draw(st.dictionaries(st.sampled_from(ADAPTERS), st.sampled_from([0.5, 1.0, -1.0, 2.0]),
                                        max_size=2))
        total = total + draw(st.sampled_from([1.0, -0.5, 1.5, 3.0])) * branch(prompt, **adapters)
    return total


@st.composite
def guidances(draw):
    cond = draw(terms())
    if not cond.items():
        cond = branch("cond")
    after = draw(st.one_of(st.none(), terms()))
    return Guidance(draw(terms()), cond, after)


@settings(max_examples=40, deadline=None)
@given(guidances(), st.sampled_from([1.5, 4.0, 7.5]), st.integers(0, 2 ** 16))
def test_compiled_merge_equals_the_formula(guidance, g, seed):
    """Branches are deduplicated (one row block per distinct (prompt, mix)) and the coefficients give the formula's
    eps and rescale reference exactly, with and without CFG, and across Flux's two true-CFG calls."""
    rng = np.random.default_rng(seed)
    all_branches = {b for t in (guidance.uncond, guidance.cond, guidance.after) for b in t.branches()}
    values = {b: rng.standard_normal() for b in all_branches}
    for layout in ("cfg", "cond"):
        if layout == "cond" and any(b.prompt == UNCOND for term in (guidance.cond, guidance.after)
                                    for b in term.branches()):  # not computed without CFG: refused
            with pytest.raises(ValueError):
                compile_merge(guidance, layout, g)
            continue
        try:
            branches, coeffs, ref = compile_merge(guidance, layout, g)
        except ValueError as error:  # everything cancelled: refused, never a silent zero prediction
            assert "zero" in str(error)
            continue
        assert len(set(branches)) == len(branches)
        eps, reference = _evaluate(guidance, values, layout, g)
        got = sum(c * values.get(b, 0.0) for b, c in zip(branches, coeffs))
        got_ref = sum(c * values.get(b, 0.0) for b, c in zip(branches, ref))
        assert math.isclose(got, eps, rel_tol=1e-12, abs_tol=1e-12)
        assert math.isclose(got_ref, reference, rel_tol=1e-12, abs_tol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_presets_are_the_mode_formulas(mode):
    """Each preset against its formula written out (b = base, p = pos, n = neg, s = strength)."""
    s, mw = 1.5, 0.25
    b = {y: branch(y) for y in (UNCOND, COND)}
    p = {y: branch(y, pos=1) for y in (UNCOND, COND)}
    n = {y: branch(y, neg=1) for y in (UNCOND, COND)}
    u, c = UNCOND, COND
    expected = {
        "contrastive": (b[u] + s * (p[u] - n[u]), b[c] + s * (p[c] - n[c]), None),
        "contrastive-cond": (b[u], b[c], s * (p[c] - n[c])),
        "contrastive-uncond": (b[u], b[c], s * (p[u] - n[u])),
        "pgd": (b[u] + s * (p[u] - b[u]), b[c] + s * (p[c] - b[c]), None),
        "npo": (branch(u, neg=s, pos=1 - mw), p[c], None),
        "merged": (branch(u, pos=s, neg=-s), branch(c, pos=s, neg=-s), None),
        "cfg": (branch(u, **{"<active>": 1}), branch(c, **{"<active>": 1}), None),
    }[mode]
    got = preset(mode, strength=s, merge_weight=mw)
    assert (got.uncond, got.cond, got.after) == (expected[0], expected[1], expected[2] or Term())
    assert preset("npo", positive=None, strength=s).cond == b[c]  # NPO adapter alone: base model on cond


def test_step_plan_routes_each_prompts_mix_on_every_branch():
    guidance = Guidance(uncond=branch("uncond", ugly=1.0), cond=branch("cond"))
    plan = build_step_plan(guidance, "cfg", 5.0, 0.0, batch=4, lora_scale=0.5,
                           prompt_mixes=((("a", 1.0),), (("b", 0.7),)))
    # branches: b(u)+ugly, b(c); each block of 4 rows: prompt 0's 2 rows then prompt 1's 2 rows
    assert plan.blocks == (0, 1) and plan.halves == 2 and plan.coeffs == (-4.0, 5.0)
    assert plan.routing.offsets == (0, 2, 4, 6, 8)
    assert plan.routing.mixes == ((("a", 1.0), ("ugly", 1.0)), (("b", 0.7), ("ugly", 1.0)), (("a", 1.0),),
                                  (("b", 0.7),))
    assert plan.routing.lora_scale == 0.5
    unguided = build_step_plan(None, "cfg", 5.0, 0.0, batch=4, lora_scale=1.0, prompt_mixes=((("a", 1.0),), ()))
    assert unguided.blocks is None and unguided.routing.mixes == ((("a", 1.0),), None, (("a", 1.0),), None)
