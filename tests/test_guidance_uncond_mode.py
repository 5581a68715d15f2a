"""guidance="contrastive-uncond" (the unconditional part of the cPGD correction, applied after CFG) against the
per-branch float64 reference of test_patch, and the split of published cPGD into its cond and uncond parts (the
guider's version is checked with the other modes in test_guidance_modes)."""
import pytest

from cgkernels import Guidance, branch
from cgkernels.guidance import GuidanceConfig, compile_merge, preset
from cgkernels.testing import add_random_lora, tiny_sd_pipeline
from test_patch import _check


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def pipe(request):
    pipe = tiny_sd_pipeline(request.param, seed=4)
    add_random_lora(pipe, "pos", rank=4, seed=1, lora_alpha=6)
    add_random_lora(pipe, "neg", rank=3, seed=2, lora_alpha=2, target_modules=("to_k", "to_v", "to_out.0"))
    pipe.unet.set_adapters(["pos", "neg"])
    return pipe


@pytest.mark.parametrize("strength, rescale", [(1.5, 0.0), (-2.0, 0.6)])
def test_contrastive_uncond_matches_reference(pipe, strength, rescale):
    """eps = b(u) + g (b(c) - b(u)) + s (p(u) - n(u)) against test_patch's per-branch float64 reference (its
    magnitude-derived tolerance, and its check that the adapters matter), in one pass of 4 rows per step."""
    rows = []
    _check(pipe, dict(guidance="contrastive-uncond", strength=strength), dict(guidance_scale=4.0,
                                                                              guidance_rescale=rescale), rows=rows)
    assert set(rows) == {4}  # b(u), b(c), p(u), n(u)


def test_contrastive_uncond_needs_cfg(pipe):
    with pytest.raises(ValueError, match="guidance_scale > 1"):
        compile_merge(preset("contrastive-uncond"), "cond", 1.0)
    with pytest.raises(ValueError, match="negative adapter"):
        GuidanceConfig(mode="contrastive-uncond", negative=None).validate()


def test_contrastive_is_cfg_plus_its_cond_and_uncond_parts():
    """cPGD at s == base CFG + contrastive-cond at s*g + contrastive-uncond at s*(1 - g), branch by branch."""
    s, g = 1.5, 4.0

    def coefficients(guidance):
        branches, coeffs, _ = compile_merge(guidance, "cfg", g)
        return dict(zip(branches, coeffs))

    whole = coefficients(preset("contrastive", strength=s))
    cond = coefficients(preset("contrastive-cond", strength=s * g))
    uncond = coefficients(preset("contrastive-uncond", strength=s * (1 - g)))
    base = coefficients(Guidance(branch("uncond"), branch("cond")))
    parts = {}
    for plan, sign in ((cond, 1), (uncond, 1), (base, -1)):
        for b, c in plan.items():
            parts[b] = parts.get(b, 0.0) + sign * c
    assert set(whole) == {b for b, c in parts.items() if c != 0.0}
    for b, c in whole.items():
        assert parts[b] == pytest.approx(c, rel=1e-12)
