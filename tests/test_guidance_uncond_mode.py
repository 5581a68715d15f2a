"""guidance="contrastive-uncond" (the unconditional part of the cPGD correction, applied after CFG) against the
per-branch float64 reference of test_patch, and the split of published cPGD into its cond and uncond parts."""
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

import cgkernels
from cgkernels.guidance import GuidanceConfig, row_plan
from cgkernels.testing import add_random_lora, tiny_sd_pipeline
from test_patch import Reference, _run


class UncondReference(Reference):
    """eps = b(u) + g (b(c) - b(u)) + s (p(u) - n(u)), one UNet call per branch, float64 (every step guided)."""

    def forward(self, sample, t, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True, **kw):
        self.halves = 2

        def ev(adapters, half):
            return self.branch(adapters, half, sample, t, encoder_hidden_states, added_cond_kwargs)

        g, s = self.pipe.guidance_scale, self.s
        base_u, base_c = ev(None, 0), ev(None, 1)
        extra = s * (ev({"pos": 1.0}, 0) - ev({"neg": 1.0}, 0))
        eps = base_u + g * (base_c - base_u) + extra
        phi = getattr(self.pipe, "_guidance_rescale", 0.0)
        if phi > 0:
            eps = rescale_noise_cfg(eps, base_c + extra, phi)
        return (torch.cat([eps, eps]).to(sample.dtype),)


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def pipe(request):
    pipe = tiny_sd_pipeline(request.param, seed=4)
    add_random_lora(pipe, "pos", rank=4, seed=1, lora_alpha=6)
    add_random_lora(pipe, "neg", rank=3, seed=2, lora_alpha=2, target_modules=("to_k", "to_v", "to_out.0"))
    pipe.unet.set_adapters(["pos", "neg"])
    return pipe


@pytest.mark.parametrize("strength, rescale", [(1.5, 0.0), (-2.0, 0.6)])
def test_contrastive_uncond_matches_reference(pipe, strength, rescale):
    call = dict(guidance_scale=4.0, guidance_rescale=rescale)
    with UncondReference(pipe, "contrastive-uncond", strength=strength):
        expected = _run(pipe, **call)
    cgkernels.patch(pipe, guidance="contrastive-uncond", strength=strength)
    rows = []
    hook = pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        out = _run(pipe, **call)
    finally:
        hook.remove()
        cgkernels.unpatch(pipe)
    torch.testing.assert_close(out, expected, rtol=2e-4, atol=5e-5)
    assert set(rows) == {4}  # b(u), b(c), p(u), n(u): one pass of 4 rows per step
    assert (out - _run(pipe, **call)).abs().max() > 1e-3  # the adapters matter, or the check proves nothing


def test_contrastive_uncond_needs_cfg(pipe):
    with pytest.raises(ValueError, match="guidance_scale > 1"):
        row_plan(GuidanceConfig(mode="contrastive-uncond"), cfg=False, guidance_scale=1.0)
    with pytest.raises(ValueError, match="negative adapter"):
        GuidanceConfig(mode="contrastive-uncond", negative=None).validate()


def test_contrastive_is_cfg_plus_its_cond_and_uncond_parts():
    """cPGD at s == base CFG + contrastive-cond at s*g + contrastive-uncond at s*(1 - g), branch by branch."""
    s, g = 1.5, 4.0

    def coefficients(mode, strength):
        plan = row_plan(GuidanceConfig(mode=mode, strength=strength), cfg=True, guidance_scale=g)
        return {branch: c for branch, c in zip(plan.branches, plan.coeffs)}

    whole = coefficients("contrastive", s)
    cond, uncond = coefficients("contrastive-cond", s * g), coefficients("contrastive-uncond", s * (1 - g))
    base = coefficients("cfg", 1.0)
    parts = {}
    for plan, sign in ((cond, 1), (uncond, 1), (base, -1)):
        for branch, c in plan.items():
            parts[branch] = parts.get(branch, 0.0) + sign * c
    assert set(whole) == {b for b, c in parts.items() if c != 0.0}
    for branch, c in whole.items():
        assert parts[branch] == pytest.approx(c, rel=1e-12)


def test_guider_matches_patched_unet():
    """The Modular-Diffusers guider runs the same row plan one branch at a time: same prediction as the patch."""
    from test_guidance_modes import _guider_step

    pipe = tiny_sd_pipeline("sd15", seed=5)
    add_random_lora(pipe, "pos", rank=4, seed=1)
    add_random_lora(pipe, "neg", rank=2, seed=2, target_modules=("to_k", "to_v", "to_out.0"))
    torch.manual_seed(0)
    latents, t = torch.randn(2, 4, 16, 16), torch.tensor(400)
    cond, uncond = torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    g, s = 4.0, 1.5
    guider = cgkernels.ContrastiveGuidance(mode="contrastive-uncond", strength=s, guidance_scale=g)
    with torch.no_grad():
        pred, n_branches = _guider_step(guider, pipe.unet, latents, t, cond, uncond, step=0, num_steps=2)
        pipe._guidance_scale, pipe._guidance_rescale = g, 0.0
        cgkernels.patch(pipe, guidance="contrastive-uncond", strength=s)
        try:
            patched = pipe.unet(torch.cat([latents] * 2), t, torch.cat([uncond, cond]), return_dict=False)[0]
        finally:
            cgkernels.unpatch(pipe)
        pipe.unet.disable_lora()
        base_u, base_c = pipe.unet(torch.cat([latents] * 2), t, torch.cat([uncond, cond]), return_dict=False)[0].chunk(2)
        pipe.unet.enable_lora()
    assert n_branches == 4
    torch.testing.assert_close(pred, patched[:2], rtol=1e-4, atol=1e-5)
    assert (pred - (base_u + g * (base_c - base_u))).abs().max() > 1e-3  # the adapters matter
