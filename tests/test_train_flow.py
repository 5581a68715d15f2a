"""Preference training for flow-matching transformers (tiny SD3 and Flux pipelines): the inputs follow diffusers'
SD3/Flux LoRA training scripts, every objective learns, the segmented (joint) pass has the gradients of separate
peft passes through every targeted transformer layer, train() resumes exactly, bad options are refused, and the
written adapters load with pipe.load_lora_weights."""
import dataclasses
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cgkernels.lora_layers import attach_segmented_lora
from cgkernels.testing import (
    FLUX_LORA_TARGETS,
    SD3_LORA_TARGETS,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
)
from cgkernels.train import TrainConfig, train
from cgkernels.train import trainer as T
from cgkernels.train.data import PairTransform, PreferenceBatches, open_pair_source
from train_testdata import assert_joint_equals_separate, make_pickapic, with_trainable_adapters

FAMILIES = ("sd3", "flux")
TARGETS = {"sd3": SD3_LORA_TARGETS, "flux": FLUX_LORA_TARGETS, "schnell": FLUX_LORA_TARGETS}
SEQ = 8  # T5 tokens: the tiny pipelines need no more
REL64 = 1e-10  # float64 agreement of two computation orders, relative to the magnitudes (see the joint test)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_flow")
    tiny_sd3_pipeline().save_pretrained(root / "sd3")
    tiny_flux_pipeline().save_pretrained(root / "flux")
    tiny_flux_pipeline(guidance_embeds=False).save_pretrained(root / "schnell")
    make_pickapic(root / "pairs.parquet")
    return root


@pytest.fixture(scope="module")
def components(workspace):
    config = {f: TrainConfig(model="m", dataset="d", max_sequence_length=SEQ) for f in FAMILIES}
    return {f: T.load_components(str(workspace / f), torch.device("cpu"), torch.float32, config[f]) for f in FAMILIES}


def _config(root: Path, family: str, out: str, **overrides) -> TrainConfig:
    settings = dict(model=str(root / family), dataset=str(root / "pairs.parquet"), output_dir=str(root / out),
                    resolution=32, batch_size=2, max_steps=2, lr=1e-3, checkpoint_every=0, progress=False, rank=4,
                    alpha=8.0, target_modules=TARGETS[family], max_sequence_length=SEQ)
    settings.update(overrides)
    return TrainConfig(**settings)


def _fixed_inputs(root: Path, components, seed: int = 0, dropout: float = 0.3) -> T.PairInputs:
    source = open_pair_source(str(root / "pairs.parquet"), "pickapic")
    batch = PreferenceBatches(source, PairTransform(32), seed=0).next_batch(2)
    return T.prepare_inputs(components, batch, torch.Generator().manual_seed(seed), prompt_dropout=dropout,
                            device="cpu", dtype=torch.float32)


def _with_adapters(components, family, adapters=("pos", "neg"), randomize_b=False):
    return with_trainable_adapters(components, TARGETS[family], adapters, randomize_b)


@pytest.mark.parametrize("family", FAMILIES)
def test_inputs_follow_the_diffusers_flow_matching_scripts(components, family):
    """x_t = (1 - σ) x0 + σ noise with one noise draw and one σ per pair, velocity target noise - x0, σ from the
    scheduler's training schedule, the transformer's timestep (SD3: σ·1000; Flux: σ), Flux packing and ids."""
    comp = components[family]
    g = torch.Generator().manual_seed(5)
    batch = {"prompts": ["a red circle", "a blue square", "a tree"], "latents_w": torch.randn(3, 16 if family ==
             "sd3" else 4, 6, 4, generator=g)}
    batch["latents_l"] = torch.randn(batch["latents_w"].shape, generator=g)
    inputs = T.prepare_inputs(comp, batch, torch.Generator().manual_seed(1), prompt_dropout=0.0, device="cpu",
                              dtype=torch.float32)
    sigma = inputs.timesteps.double() / (1000.0 if family == "sd3" else 1.0)
    schedule = comp.noise_scheduler.sigmas.double()
    assert all((schedule - s).abs().min() < 1e-6 for s in sigma)  # drawn from the training schedule
    if family == "sd3":  # shift 3: the schedule's sigmas lie above the uniform grid's
        assert schedule[len(schedule) // 2] > 0.7
    x0 = {s: batch[f"latents_{s}"].double() for s in "wl"}
    noisy, target = inputs.noisy, inputs.target
    if family == "flux":
        from diffusers import FluxPipeline

        assert noisy["w"].shape == (3, 3 * 2, 16)  # 6x4 latents -> 3x2 tokens of 4 x 2x2 channels
        noisy = {s: FluxPipeline._unpack_latents(v, 12, 8, 2) for s, v in noisy.items()}  # the pipeline's inverse
        target = {s: FluxPipeline._unpack_latents(v, 12, 8, 2) for s, v in target.items()}
        assert inputs.static_inputs["img_ids"].shape == (6, 3) and inputs.static_inputs["txt_ids"].shape[1] == 3
        torch.testing.assert_close(inputs.transformer_inputs["guidance"], torch.full((3,), 3.5))
    else:
        assert inputs.static_inputs == {} and set(inputs.transformer_inputs) == {"pooled_projections"}
    s = sigma.view(-1, 1, 1, 1)
    noise = {k: (noisy[k].double() - (1 - s) * x0[k]) / s for k in "wl"}
    # fp32 rounding: x_t = (1 - σ) x0 + σ noise (two products and a sum) is within 2 eps of |(1 - σ) x0| + |σ noise|
    # <= |x_t| + 2 |x0|; recovering the noise divides that by σ; the target noise - x0 adds eps |target|.
    eps = torch.finfo(torch.float32).eps
    recovered = {k: 2 * eps * (noisy[k].double().abs().max() + 2 * x0[k].abs().max()).item() / sigma.min().item()
                 for k in "wl"}
    torch.testing.assert_close(noise["w"], noise["l"], rtol=0, atol=recovered["w"] + recovered["l"])  # one draw
    for k in "wl":
        atol = recovered[k] + eps * target[k].abs().max().item()
        torch.testing.assert_close(target[k].double(), noise[k] - x0[k], rtol=0, atol=atol)
    hidden, pooled = comp.prompt_encoder(batch["prompts"])  # the pipeline's encode_prompt
    torch.testing.assert_close(inputs.encoder_hidden_states, hidden)
    torch.testing.assert_close(inputs.transformer_inputs["pooled_projections"], pooled)
    expected_weighting = {"sd3": "logit_normal", "flux": "none"}[family]  # the diffusers scripts' defaults
    assert comp.flow.weighting_scheme == expected_weighting and torch.equal(inputs.loss_weights, torch.ones(3))


def test_weighting_schemes_weight_and_sample_as_diffusers(components):
    comp = components["sd3"]
    n = 4000
    for scheme in ("cosmap", "sigma_sqrt", "mode", "logit_normal"):
        settings = dataclasses.replace(comp.flow, weighting_scheme=scheme)
        _, sigmas = T.flow_matching.sample_sigmas(comp.noise_scheduler, n, settings, torch.Generator().manual_seed(0))
        weights = T.flow_matching.loss_weights(settings, sigmas).double()
        s = sigmas.double()
        expected = {"cosmap": 2 / (math.pi * (1 - 2 * s + 2 * s**2)), "sigma_sqrt": s**-2.0}
        expected = expected.get(scheme, torch.ones(n, dtype=torch.float64))
        torch.testing.assert_close(weights, expected, rtol=1e-5, atol=0)
        # logit-normal(0, 1) sampling concentrates on mid-range timesteps: its draws' median index is mid-schedule
        if scheme == "logit_normal":
            index = torch.searchsorted(-comp.noise_scheduler.sigmas.double(), -s)
            assert abs(index.double().median().item() - 500) < 40


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("objective", ["sft", "dpo", "npo", "dpo+npo"])
def test_objective_decreases_loss_on_fixed_batch(workspace, components, family, objective):
    adapters = TrainConfig(model="m", dataset="d", objective=objective).adapters
    comp, params = _with_adapters(components[family], family, adapters)
    inputs = _fixed_inputs(workspace, comp)
    handle = attach_segmented_lora(comp.denoiser, {a: {a: 1.0} for a in adapters}, trainable=True)
    optimizer = torch.optim.AdamW(params.values(), lr=3e-3)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss, metrics = T.joint_step(comp.denoiser, comp.denoiser, inputs, objective, 5000.0, torch.Tensor.backward)
        losses.append(loss.item())
        optimizer.step()
    handle.detach()
    if objective != "sft":  # B = 0 at start: every adapter equals the reference, loss = ln 2 per adapter
        assert losses[0] == pytest.approx(0.6931472 * len(adapters), rel=1e-5)
        assert metrics["accuracy"].item() > 0.5
        assert losses[-1] < 0.9 * losses[0], losses
    else:
        assert all(b < a for a, b in zip(losses, losses[1:])), losses


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("objective", ["sft", "sft-pos", "dpo+npo"])
def test_joint_gradients_equal_separate_training(workspace, components, family, objective):
    """One segmented transformer pass == one peft pass per adapter, for every LoRA layer kind the targets hit
    (joint attention incl. the context stream, both MLPs, Flux's single blocks), under non-uniform loss weights."""
    comp, params = _with_adapters(components[family], family, randomize_b=True)
    comp = dataclasses.replace(comp, flow=dataclasses.replace(comp.flow, weighting_scheme="cosmap"))
    inputs = _fixed_inputs(workspace, comp)
    assert inputs.loss_weights.std() > 0
    # In float64, so that the comparison bound is far below any real mismatch whatever DPO's beta amplifies: two
    # computation orders agree to ~FP32_UNET_REL * eps64 / eps32 ~ 2e-14 of the magnitudes (fp32's bound scaled to
    # float64's rounding); REL64 = 1e-10 leaves a margin of over 1e3 for beta = 5000, while routing the wrong adapter
    # or missing a layer changes results by > 1e-3.
    comp.denoiser.double()
    inputs = _to_float64(inputs)
    for param in params.values():
        assert param.dtype == torch.float64
    assert_joint_equals_separate(comp.denoiser, params, inputs, objective, rel=REL64)


def _to_float64(inputs: T.PairInputs) -> T.PairInputs:
    def cast(value):
        if isinstance(value, torch.Tensor):
            return value.double() if value.is_floating_point() else value
        if isinstance(value, dict):
            return {k: cast(v) for k, v in value.items()}
        return value

    return dataclasses.replace(inputs, **{f.name: cast(getattr(inputs, f.name)) for f in dataclasses.fields(inputs)})


def _loaded_factors(pipe, adapter):
    return {n.replace(f".{adapter}.", "."): p for n, p in pipe.transformer.named_parameters() if f".{adapter}." in n}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_objective_trains_and_loads_with_load_lora_weights(workspace, family):
    """A short train() per objective; the written adapters load into the pipeline (same factors, alpha kept) and
    change its output."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    pipeline_cls = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[family]
    extra = {"sd3": dict(text_encoder_3=None, tokenizer_3=None), "flux": {}}[family]
    pipe = pipeline_cls.from_pretrained(str(workspace / family), **extra)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a red circle", num_inference_steps=2, height=32, width=32, output_type="latent",
                max_sequence_length=SEQ)
    base = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    for objective in ("sft", "dpo", "npo", "dpo+npo"):
        out = workspace / f"{family}-{objective}"
        result = train(_config(workspace, family, out.name, objective=objective))
        assert result["step"] == 2 and all(math.isfinite(x) for x in result["losses"])
        for adapter in result["adapters"]:
            name = f"{objective}-{adapter}"
            pipe.load_lora_weights(out / adapter, adapter_name=name)
            saved = load_file(str(out / adapter / T.LORA_WEIGHT_NAME))
            assert saved and all(k.startswith("transformer.") for k in saved)
            factors = _loaded_factors(pipe, name)
            assert len(factors) == len(saved)
            assert {m.scaling[name] for m in pipe.transformer.modules() if name in getattr(m, "scaling", {})} == {2.0}
            pipe.set_adapters([name])
            tuned = pipe(**call, generator=torch.Generator().manual_seed(0)).images
            assert torch.isfinite(tuned).all() and (tuned - base).abs().max() > 0
    targeted = {n.split(".lora_A.")[0] for n in _loaded_factors(pipe, "sft-pos") if ".lora_A." in n}
    assert any("add_q_proj" in n for n in targeted) and any("ff_context" in n for n in targeted)
    if family == "flux":
        assert any(n.startswith("single_transformer_blocks") and n.endswith("proj_mlp") for n in targeted)


def test_resume_reproduces_uninterrupted_flux_run(workspace):
    settings = dict(objective="dpo+npo", batch_size=1, grad_accum=2, max_steps=4, checkpoint_every=2,
                    empty_prompt_prob=0.5, weighting_scheme="logit_normal")
    full = train(_config(workspace, "flux", "flux-full", **settings))
    (workspace / "flux-resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(workspace / "flux-full" / "checkpoints" / "step-00000002",
                    workspace / "flux-resumed" / "checkpoints" / "step-00000002")
    resumed = train(_config(workspace, "flux", "flux-resumed", resume=True, **settings))
    assert resumed["losses"] == full["losses"] and len(full["losses"]) == 4
    assert resumed["adapter_sha256"] == full["adapter_sha256"]


def test_bad_options_are_refused(workspace, tmp_path):
    with pytest.raises(ValueError, match="unknown weighting_scheme 'lognormal'"):
        train(_config(workspace, "sd3", "bad", weighting_scheme="lognormal"))
    with pytest.raises(ValueError, match="guidance_scale=2.0 is an input of guidance-distilled Flux"):
        train(_config(workspace, "schnell", "bad", guidance_scale=2.0))
    with pytest.raises(ValueError, match="guidance_scale=2.0 is an input of guidance-distilled Flux"):
        train(_config(workspace, "sd3", "bad", guidance_scale=2.0))
    with pytest.raises(ValueError, match="resolution 34 must be a multiple of 4"):
        train(_config(workspace, "flux", "bad", resolution=34))
    with pytest.raises(ValueError, match="mode_scale applies to weighting_scheme='mode'; this run samples with 'none'"):
        train(_config(workspace, "flux", "bad", mode_scale=1.0))
    with pytest.raises(ValueError, match="logit_std applies to weighting_scheme='logit_normal'.*'cosmap'"):
        train(_config(workspace, "sd3", "bad", weighting_scheme="cosmap", logit_std=2.0))
    with pytest.raises(ValueError, match="max_sequence_length must be > 0"):
        train(_config(workspace, "flux", "bad", max_sequence_length=0))
    tiny_sd_pipeline("sd15").save_pretrained(tmp_path / "sd15")
    with pytest.raises(ValueError, match="weighting_scheme, max_sequence_length apply to flow-matching models"):
        train(_config(workspace, "sd3", "bad", model=str(tmp_path / "sd15"), weighting_scheme="cosmap",
                      target_modules=("to_q",)))
    assert not (workspace / "bad").exists()


def test_schnell_takes_no_guidance_input(workspace):
    comp = T.load_components(str(workspace / "schnell"), torch.device("cpu"), torch.float32,
                             TrainConfig(model="m", dataset="d", max_sequence_length=SEQ))
    assert comp.flow.guidance is None
    inputs = _fixed_inputs(workspace, comp, dropout=0.0)
    assert "guidance" not in inputs.transformer_inputs
    assert T._unet_rows(comp.denoiser, inputs, ["w", "l"]).shape == (4, 64, 16)


def test_gradient_checkpointing_changes_nothing(workspace):
    """Recomputation in backward runs under the same segment routing: bit-identical adapters."""
    settings = dict(objective="dpo+npo", seed=1)
    plain = train(_config(workspace, "flux", "flux-plain", **settings))
    checkpointed = train(_config(workspace, "flux", "flux-ckpt", gradient_checkpointing=True, **settings))
    assert checkpointed["losses"] == plain["losses"]
    assert checkpointed["adapter_sha256"] == plain["adapter_sha256"]


def test_cli_sd3_bf16_cached_latents_weighted(workspace):
    """The CLI on SD3: bf16 base with fp32 factors, cached latents, cosmap weighting, the flow options as flags."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "python" / "train.py"
    spec = importlib.util.spec_from_file_location("train_cli", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = workspace / "sd3-cli"
    result = cli.main(["--model", str(workspace / "sd3"), "--dataset", str(workspace / "pairs.parquet"),
                       "--objective", "sft", "--output-dir", str(out), "--resolution", "32", "--max-steps", "2",
                       "--batch-size", "2", "--rank", "2", "--target-modules", "to_q", "add_q_proj",
                       "--cache-latents", "--mixed-precision", "bf16", "--weighting-scheme", "cosmap",
                       "--max-sequence-length", "8", "--no-progress", "--checkpoint-every", "0"])
    assert result["step"] == 2 and all(math.isfinite(x) for x in result["losses"])
    saved = load_file(str(out / "pos" / T.LORA_WEIGHT_NAME))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in saved.values())
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in saved} == {"to_q", "add_q_proj"}


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_dropout_trains_on_the_encoded_empty_prompt(components, family):
    """Dropped prompts get the pipeline's encoding of "" (SD3's default negative prompt; Flux's true-CFG branch for
    an empty negative prompt); kept ones their own."""
    comp = components[family]
    prompts = ["a red circle", "a blue square", "a tree"]
    hidden, pooled = T.prompt_conditioning(comp, prompts, [False, True, False])
    empty_hidden, empty_pooled = comp.prompt_encoder([""])
    own_hidden, own_pooled = comp.prompt_encoder(prompts)
    torch.testing.assert_close(hidden[1:2], empty_hidden)
    torch.testing.assert_close(pooled[1:2], empty_pooled)
    torch.testing.assert_close(hidden[[0, 2]], own_hidden[[0, 2]])
    torch.testing.assert_close(pooled[[0, 2]], own_pooled[[0, 2]])
    assert (empty_hidden - own_hidden[1]).abs().max() > 1e-3
