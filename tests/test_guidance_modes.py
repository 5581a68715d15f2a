"""Preset merges and the Modular-Diffusers guider (`ContrastiveGuidance`) against the one-pass patched UNet."""
import pytest
import torch

import cgkernels
from cgkernels.guidance import COND, MODES, UNCOND, compile_merge, is_guided_step, preset
from cgkernels.testing import add_random_lora, fp32_merge_atol, tiny_sd_pipeline


def test_row_counts_and_coefficients():
    expected_rows = {"contrastive": 6, "contrastive-cond": 4, "pgd": 4, "npo": 2, "merged": 2, "cfg": 2}
    for mode, rows in expected_rows.items():
        branches, coeffs, ref_coeffs = compile_merge(preset(mode, strength=2.0), "cfg", 7.5)
        assert len(branches) == rows, mode
        # Every mode reduces to plain CFG when all branch predictions agree: coefficients sum to 1.
        assert sum(coeffs) == pytest.approx(1.0)
        assert sum(ref_coeffs) == pytest.approx(1.0)
        if mode != "npo":  # npo needs CFG (refused without it: test_guidance_algebra)
            no_cfg, _, _ = compile_merge(preset(mode, strength=2.0), "cond", 1.0)
            assert all(b.prompt == COND for b in no_cfg)
    pgd_full, _, _ = compile_merge(preset("pgd", strength=1.0), "cfg", 5.0)
    assert [b.adapters for b in pgd_full] == [(("pos", 1.0),)] * 2  # s = 1: the base rows drop out
    assert [b.prompt for b in pgd_full] == [UNCOND, COND]


@pytest.mark.parametrize("mode", MODES)
def test_two_call_cfg_plans_mix_into_the_one_call_plan(mode):
    """Flux true CFG: the pipeline mixes its uncond call U' and cond call C' as U' + g (C' - U'); with the two
    plans' coefficients that must be exactly the one-call CFG plan's coefficients per branch."""
    guidance = preset(mode, strength=1.5, merge_weight=0.25)
    g = 3.5
    branches, coeffs, _ = compile_merge(guidance, "cfg", g)
    mixed = {}
    for layout, prompt, weight in (("two_call_uncond", UNCOND, 1.0 - g), ("two_call_cond", COND, g)):
        call_branches, call_coeffs, call_ref = compile_merge(guidance, layout, g)
        assert all(b.prompt == prompt for b in call_branches) and not any(call_ref)
        for b, c in zip(call_branches, call_coeffs):
            mixed[b] = mixed.get(b, 0.0) + weight * c
    assert mixed == pytest.approx(dict(zip(branches, coeffs)))
    with pytest.raises(ValueError, match="guidance scale > 1"):
        compile_merge(guidance, "two_call_cond", 1.0)


def test_guided_step_window_matches_diffusers_guiders():
    assert [is_guided_step(i, 10, 0.2, 0.75) for i in range(10)] == [i in range(2, 7) for i in range(10)]

@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_sd_pipeline("sd15", seed=5)
    add_random_lora(pipe, "pos", rank=4, seed=1)
    add_random_lora(pipe, "neg", rank=2, seed=2, target_modules=("to_k", "to_v", "to_out.0"))
    return pipe

def _guider_step(guider, unet, latents, t, cond, uncond, step, num_steps):
    guider.set_state(step=step, num_inference_steps=num_steps, timestep=t)
    batches = guider.prepare_inputs({"encoder_hidden_states": (cond, uncond)})
    for batch in batches:
        guider.prepare_models(unet)
        batch.noise_pred = unet(latents, t, encoder_hidden_states=batch.encoder_hidden_states, return_dict=False)[0]
        guider.cleanup_models(unet)
    return guider(batches).pred, len(batches)

@pytest.mark.parametrize("mode", ["contrastive", "contrastive-cond", "contrastive-uncond", "pgd", "npo"])
def test_guider_matches_patched_unet(pipe, mode):
    torch.manual_seed(0)
    latents, t = torch.randn(2, 4, 16, 16), torch.tensor(400)
    cond, uncond = torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    g, phi, s = 6.0, 0.5, 1.5
    guider = cgkernels.ContrastiveGuidance(mode=mode, strength=s, merge_weight=0.3, guidance_scale=g,
                                           guidance_rescale=phi, start=0.5)
    pipe.unet.set_adapters(["pos", "neg"], [0.3, 2.0])  # user weights: neither path may use them
    scaling_before = {n: dict(m.scaling) for n, m in pipe.unet.named_modules() if hasattr(m, "scaling")}
    with torch.no_grad():
        pred, n_branches = _guider_step(guider, pipe.unet, latents, t, cond, uncond, step=3, num_steps=4)
        base_pred, n_base = _guider_step(guider, pipe.unet, latents, t, cond, uncond, step=1, num_steps=4)
        scaling_after = {n: dict(m.scaling) for n, m in pipe.unet.named_modules() if hasattr(m, "scaling")}
        pipe.unet.set_adapters(["pos", "neg"])
        # the one-pass path, UNet called directly with the pipeline's CFG batch
        pipe._guidance_scale, pipe._guidance_rescale = g, phi
        cgkernels.patch(pipe, guidance=mode, strength=s, merge_weight=0.3)
        try:
            patched = pipe.unet(torch.cat([latents] * 2), t, torch.cat([uncond, cond]), return_dict=False)[0]
        finally:
            cgkernels.unpatch(pipe)
        pipe.unet.disable_lora()
        u, c = pipe.unet(torch.cat([latents] * 2), t, torch.cat([uncond, cond]), return_dict=False)[0].chunk(2)
        pipe.unet.enable_lora()
    assert n_branches == {"contrastive": 6, "contrastive-cond": 4, "contrastive-uncond": 4, "pgd": 4, "npo": 2}[mode]
    # The guider (one UNet call per branch) and the one-pass path (one batched call) round differently: the bound is
    # derived from the branch magnitudes and the merge coefficients, not from one CPU's observed differences.
    _, coeffs, _ = compile_merge(preset(mode, strength=s, merge_weight=0.3), "cfg", g)
    branch_scale = torch.cat([u, c]).abs().max().item()
    atol = fp32_merge_atol(coeffs, branch_scale, rescale=phi)
    torch.testing.assert_close(pred, patched[:2], rtol=0, atol=atol)
    assert (pred - base_pred).abs().max() > 50 * atol  # the adapters' effect dwarfs the tolerance
    torch.testing.assert_close(patched[:2], patched[2:], rtol=0, atol=0)
    # outside [start, stop): plain base-model CFG with rescale
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    assert n_base == 2
    expected = rescale_noise_cfg(u + g * (c - u), c, phi)
    torch.testing.assert_close(base_pred, expected, rtol=0, atol=fp32_merge_atol((1 - g, g), branch_scale, rescale=phi))
    assert scaling_before == scaling_after
