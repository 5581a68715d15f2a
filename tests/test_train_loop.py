"""The training loop on a tiny SD-shaped model: objectives learn, joint == separate gradients, exact resume, DDP on
two CPU processes, bad input, and the written adapters round-trip through load_lora_weights and cgkernels.patch."""
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cgkernels.lora_layers import attach_segmented_lora
from cgkernels.testing import tiny_sd_pipeline
from cgkernels.train import TrainConfig, train
from cgkernels.train import trainer as T
from cgkernels.train.config import SFT_OBJECTIVES
from cgkernels.train.data import PairTransform, PreferenceBatches, open_pair_source
from train_testdata import assert_joint_equals_separate, make_pickapic, with_trainable_adapters

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_loop")
    tiny_sd_pipeline("sd15").save_pretrained(root / "sd15")
    make_pickapic(root / "pairs.parquet")  # 8 usable pairs, one of them with a corrupt image
    return root


def _config(root: Path, out: str, **overrides) -> TrainConfig:
    settings = dict(model=str(root / "sd15"), dataset=str(root / "pairs.parquet"), output_dir=str(root / out),
                    resolution=32, batch_size=2, max_steps=4, lr=1e-3, checkpoint_every=0, progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def _fixed_inputs(root: Path, components, prediction_seed: int = 0) -> T.PairInputs:
    source = open_pair_source(str(root / "pairs.parquet"), "pickapic")
    batch = PreferenceBatches(source, PairTransform(32), seed=0).next_batch(2)
    generator = torch.Generator().manual_seed(prediction_seed)
    return T.prepare_inputs(components, batch, generator, prompt_dropout=0.3, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def base_components(workspace):
    return T.load_components(str(workspace / "sd15"), torch.device("cpu"), torch.float32)


def _model_with_adapters(base_components, adapters=("pos", "neg"), randomize_b: bool = False):
    return with_trainable_adapters(base_components, ("to_q", "to_k", "to_v", "to_out.0"), adapters, randomize_b)


@pytest.mark.parametrize("objective", ["sft", "sft-pos", "dpo", "npo", "dpo+npo"])
def test_objective_decreases_loss_on_fixed_batch(workspace, base_components, objective):
    adapters = TrainConfig(model="m", dataset="d", objective=objective).adapters
    components, params = _model_with_adapters(base_components, adapters)
    inputs = _fixed_inputs(workspace, components)
    attach_segmented_lora(components.denoiser, {a: {a: 1.0} for a in adapters}, trainable=True)
    optimizer = torch.optim.AdamW(params.values(), lr=3e-3)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss, metrics = T.joint_step(components.denoiser, components.denoiser, inputs, objective, 5000.0, torch.Tensor.backward)
        losses.append(loss.item())
        optimizer.step()
    if objective not in SFT_OBJECTIVES:  # B = 0 at start: every adapter equals the reference, loss = ln 2 per adapter
        assert losses[0] == pytest.approx(0.6931472 * len(adapters), rel=1e-5)
        assert metrics["accuracy"].item() > 0.5
        assert losses[-1] < 0.9 * losses[0], losses
    else:  # plain MSE on noise moves slowly, but every step must lower it
        assert all(b < a for a, b in zip(losses, losses[1:])), losses


@pytest.mark.parametrize("objective, checkpointing", [("sft", False), ("sft-pos", False), ("dpo+npo", False), ("sft", True)])
def test_joint_gradients_equal_separate_training(workspace, base_components, objective, checkpointing):
    components, params = _model_with_adapters(base_components, randomize_b=True)
    inputs = _fixed_inputs(workspace, components)
    unet = components.denoiser
    if checkpointing:  # recomputation in backward must see the same segment routing as the forward
        unet.enable_gradient_checkpointing()
    assert_joint_equals_separate(unet, params, inputs, objective, rel=1e-4)


def test_bad_input_fails_before_training(workspace, tmp_path):
    with pytest.raises(ValueError, match="unknown objective"):
        train(_config(workspace, "bad", objective="ppo"))
    with pytest.raises(ValueError, match="unknown lr_scheduler"):
        train(_config(workspace, "bad", lr_scheduler="sawtooth"))
    with pytest.raises(ValueError, match="rank must be > 0"):
        train(_config(workspace, "bad", rank=0))
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(ValueError, match="no unet"):
        train(_config(workspace, "bad", model=str(tmp_path / "empty_model")))
    make_pickapic(tmp_path / "caption_less.parquet", drop_columns=("caption",))
    with pytest.raises(ValueError, match="missing column.*caption"):
        train(_config(workspace, "bad", dataset=str(tmp_path / "caption_less.parquet")))
    make_pickapic(tmp_path / "ties.parquet", n_rows=3, tie_every=1)
    with pytest.raises(ValueError, match="no usable preference pair"):
        train(_config(workspace, "bad", dataset=str(tmp_path / "ties.parquet")))
    assert not (workspace / "bad").exists()
    (tmp_path / "used" / "checkpoints" / "step-00000004").mkdir(parents=True)  # left by an earlier run
    with pytest.raises(ValueError, match="checkpoints of an earlier run .*step-00000004.*resume"):
        train(_config(workspace, "bad", output_dir=str(tmp_path / "used")))
    assert sorted(p.name for p in (tmp_path / "used").rglob("*")) == ["checkpoints", "step-00000004"]


def test_resume_reproduces_uninterrupted_run_and_round_trips(workspace):
    settings = dict(objective="sft", batch_size=1, grad_accum=2, random_crop=True, lr_scheduler="cosine",
                    lr_warmup_steps=1, checkpoint_every=2, empty_prompt_prob=0.5, rank=4, alpha=8.0)
    full = train(_config(workspace, "full", **settings))
    checkpoints = sorted(p.name for p in (workspace / "full" / "checkpoints").iterdir())
    assert checkpoints == ["step-00000002", "step-00000004"]
    # 8 readable pairs drawn from 7 readable + 1 corrupt: the corrupt one was met and skipped once.
    assert full["skipped_pairs"] == 1 and len(full["losses"]) == 4

    # An interrupted run: only the step-2 checkpoint exists; resume to step 4.
    (workspace / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(workspace / "full" / "checkpoints" / "step-00000002",
                    workspace / "resumed" / "checkpoints" / "step-00000002")
    resumed = train(_config(workspace, "resumed", resume=True, **settings))
    assert resumed["losses"] == full["losses"]  # bit-identical loss sequence, history included
    assert resumed["skipped_pairs"] == full["skipped_pairs"]
    assert resumed["lr"] == full["lr"]
    for adapter in ("pos", "neg"):
        a = load_file(str(workspace / "full" / adapter / T.LORA_WEIGHT_NAME))
        b = load_file(str(workspace / "resumed" / adapter / T.LORA_WEIGHT_NAME))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["adapter_sha256"] == full["adapter_sha256"]

    # Resuming under other batch size, accumulation, objective or dataset is refused before any step, naming it.
    make_pickapic(workspace / "other_pairs.parquet", n_rows=10)
    changes = [("batch_size", 2), ("grad_accum", 1), ("objective", "dpo+npo"),
               ("dataset", str(workspace / "other_pairs.parquet"))]
    for i, (key, value) in enumerate(changes):
        out = workspace / f"changed{i}"
        shutil.copytree(workspace / "full" / "checkpoints" / "step-00000002", out / "checkpoints" / "step-00000002")
        with pytest.raises(ValueError, match=rf"other settings \({key}: checkpoint .*, now {re.escape(repr(value))}"):
            train(_config(workspace, out.name, resume=True, **{**settings, key: value}))
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    from accelerate.state import is_initialized

    assert not is_initialized()  # train() released accelerate's singletons: the next call may change precision

    # The output loads as diffusers LoRA weights: identical factors, and cgkernels.patch accepts them.
    from diffusers import StableDiffusionPipeline

    trained = load_file(str(workspace / "full" / "checkpoints" / "step-00000004" / "adapters.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(str(workspace / "sd15"))
    pipe.set_progress_bar_config(disable=True)
    for adapter in ("pos", "neg"):
        pipe.load_lora_weights(workspace / "full" / adapter, adapter_name=adapter)
    loaded = dict(pipe.unet.named_parameters())
    assert all(torch.equal(loaded[name], value) for name, value in trained.items())
    assert {m.scaling["pos"] for m in pipe.unet.modules() if hasattr(m, "scaling") and "pos" in m.scaling} == {2.0}
    import cgkernels

    prompt_kwargs = dict(prompt="a red circle", num_inference_steps=2, height=32, width=32, output_type="latent",
                         generator=torch.Generator().manual_seed(0))
    cgkernels.patch(pipe, guidance="contrastive", positive="pos", negative="neg", strength=2.0)
    guided = pipe(**prompt_kwargs).images
    cgkernels.unpatch(pipe)
    pipe.disable_lora()
    prompt_kwargs["generator"] = torch.Generator().manual_seed(0)
    base = pipe(**prompt_kwargs).images
    assert torch.isfinite(guided).all() and not torch.allclose(guided, base)


def test_adapters_on_convolutions_and_time_embeddings_load_whole(workspace):
    """diffusers' name converter knows only the attention projections: with convolutions and time_emb_proj among the
    targets, the written file must still load every trained factor (a mixed file silently dropped the attention
    ones, leaving them at their zero initialisation)."""
    from diffusers import StableDiffusionPipeline

    targets = ("to_q", "to_v", "conv1", "time_emb_proj")
    train(_config(workspace, "convs", max_steps=2, checkpoint_every=2, target_modules=targets))
    trained = load_file(str(workspace / "convs" / "checkpoints" / "step-00000002" / "adapters.safetensors"))
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trained} == {"to_q", "to_v", "conv1",
                                                                                  "time_emb_proj"}
    pipe = StableDiffusionPipeline.from_pretrained(str(workspace / "sd15"))
    for adapter in ("pos", "neg"):
        pipe.load_lora_weights(workspace / "convs" / adapter, adapter_name=adapter)
    loaded = {name: value for name, value in pipe.unet.named_parameters() if ".lora_" in name}
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[name], value) for name, value in trained.items())
    assert all(value.abs().max() > 0 for name, value in trained.items() if ".lora_B." in name)


def _rank_logs(folder: Path) -> str:
    return "\n".join(f"--- rank {r} ---\n" + (folder / f"rank{r}.log").read_text()[-4000:] for r in range(2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_ends_with_identical_adapters(workspace, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(
        "import json, os, sys\n"
        "from cgkernels.train import TrainConfig, train\n"
        f"config = TrainConfig(model={str(workspace / 'sd15')!r}, dataset={str(workspace / 'pairs.parquet')!r},\n"
        f"    output_dir={str(tmp_path / 'out')!r}, objective='dpo+npo', resolution=32, batch_size=1, max_steps=2,\n"
        "    lr=1e-3, checkpoint_every=2, progress=False)\n"
        "result = train(config)\n"
        f"open(os.path.join({str(tmp_path)!r}, f\"rank{{os.environ['RANK']}}.json\"), 'w').write(json.dumps(result))\n"
    )
    # The two ranks are started here with the variables torchrun would set (env:// rendezvous, rank 0 hosts the
    # store), not through torchrun: its agent starts the workers in sessions of their own, out of reach of a
    # timeout's kill, and with their output on pipes a hung worker hung the whole test run (CI, stop 21).
    port = _free_port()
    ranks = []
    for rank in range(2):
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
        log = open(tmp_path / f"rank{rank}.log", "w")
        ranks.append((subprocess.Popen([sys.executable, str(script)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), log))
    deadline = time.monotonic() + 300
    try:
        for proc, _ in ranks:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"2-process training did not finish in 300 s:\n{_rank_logs(tmp_path)}")
    finally:
        for proc, log in ranks:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
    assert [proc.returncode for proc, _ in ranks] == [0, 0], _rank_logs(tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["adapter_sha256"] == results[1]["adapter_sha256"]
    assert results[0]["losses"] == results[1]["losses"]
    checkpoint = tmp_path / "out" / "checkpoints" / "step-00000002"
    assert (checkpoint / "rank0.json").is_file() and (checkpoint / "rank1.json").is_file()
    positions = [json.loads((checkpoint / f"rank{r}.json").read_text())["data"]["stream"]["counter"] for r in range(2)]
    assert positions == [3, 4]  # rank 0 took pairs 0 and 2, rank 1 pairs 1 and 3
    # The adapters actually moved away from their (equal) initialisation.
    saved = load_file(str(tmp_path / "out" / "pos" / T.LORA_WEIGHT_NAME))
    assert any(k.endswith("lora.up.weight") or "lora_B" in k for k in saved)
    assert max(v.abs().max().item() for k, v in saved.items() if "lora_B" in k or "up" in k) > 0


def test_cli_sdxl_npo_from_hpdv3_with_latent_cache(tmp_path):
    """The thin CLI end to end on an SDXL-shaped model (two text encoders, micro-conditioning), cached latents, bf16
    mixed precision (fp32 LoRA factors on a bf16 base), then the adapter drives cgkernels' NPO guidance."""
    import importlib.util

    from diffusers import StableDiffusionXLPipeline

    from train_testdata import make_image_folder_dataset

    tiny_sd_pipeline("sdxl").save_pretrained(tmp_path / "sdxl")
    make_image_folder_dataset(tmp_path / "hpd", "hpdv3", n_pairs=4, missing=(2,))
    spec = importlib.util.spec_from_file_location("train_cli", REPO / "python" / "train.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "out"
    result = cli.main(["--model", str(tmp_path / "sdxl"), "--dataset", str(tmp_path / "hpd"), "--dataset-format",
                       "hpdv3", "--objective", "npo", "--output-dir", str(out), "--resolution", "32", "--max-steps",
                       "2", "--batch-size", "2", "--rank", "2", "--target-modules", "to_q", "to_v", "--cache-latents",
                       "--mixed-precision", "bf16", "--empty-prompt-prob", "0.5",
                       "--no-progress", "--checkpoint-every", "0"])
    assert result["step"] == 2 and set(result["adapters"]) == {"neg"} and not (out / "pos").exists()
    assert result["skipped_pairs"] >= 1  # the pair whose loser image is missing
    assert len(list((out / "latent_cache").glob("group_*.safetensors"))) == 1
    saved = load_file(str(out / "neg" / T.LORA_WEIGHT_NAME))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in saved.values())
    assert max(v.abs().max().item() for k, v in saved.items() if "lora_B" in k or "lora.up" in k) > 0
    config = json.loads((out / "train_config.json").read_text())
    assert config["objective"] == "npo" and config["target_modules"] == ["to_q", "to_v"]
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "sdxl"))
    pipe.load_lora_weights(out / "neg", adapter_name="neg")
    lora_names = [n for n, _ in pipe.unet.named_parameters() if ".lora_A.neg." in n]
    assert lora_names and all(n.split(".lora_A.")[0].endswith(("to_q", "to_v")) for n in lora_names)
    import cgkernels  # the SDXL adapter drives NPO guidance (micro-conditioning and pooled embeds in the batch)

    cgkernels.patch(pipe, guidance="npo", positive=None, negative="neg")
    latents = pipe(prompt="a blue square", num_inference_steps=2, height=32, width=32, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 16, 16) and torch.isfinite(latents).all()


@pytest.mark.parametrize("kind, force_zeros", [("sd15", None), ("sdxl", True), ("sdxl", False)])
def test_prompt_dropout_uses_the_pipelines_unconditional_branch(tmp_path, kind, force_zeros):
    """Dropped prompts get exactly what the pipeline feeds the UNet for CFG's unconditional branch (the encoded "",
    or zeros for SDXL with force_zeros_for_empty_prompt), encoded once for the whole run."""
    pipe = tiny_sd_pipeline(kind)
    if force_zeros is not None:
        pipe.register_to_config(force_zeros_for_empty_prompt=force_zeros)
    pipe.save_pretrained(tmp_path / kind)
    components = T.load_components(str(tmp_path / kind), torch.device("cpu"), torch.float32)
    calls = []
    components.text_encoders[-1].register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    prompts = ["a red circle", "a blue square", "a red square"]
    hidden, pooled = T.prompt_conditioning(components, prompts, [False, True, False])
    encoded = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    cond, uncond = encoded[0], encoded[1]
    assert uncond.abs().max() > 0 if not force_zeros else uncond.abs().max() == 0
    torch.testing.assert_close(hidden[[0, 2]], cond[[0, 2]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden[1], uncond[1], rtol=1e-5, atol=1e-5)
    if kind == "sdxl":
        torch.testing.assert_close(pooled[[0, 2]], encoded[2][[0, 2]], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pooled[1], encoded[3][1], rtol=1e-5, atol=1e-5)
    else:
        assert pooled is None
    assert calls == [1, 2]  # "" once, then only the kept prompts
    T.prompt_conditioning(components, prompts, [True, True, True])
    assert calls == [1, 2]  # the empty prompt is not encoded again


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_targets_follow_prediction_type_with_shared_noise_and_timestep(base_components, prediction_type):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(base_components.noise_scheduler.config, prediction_type=prediction_type)
    components = dataclasses.replace(base_components, noise_scheduler=scheduler)
    g = torch.Generator().manual_seed(4)
    batch = {"prompts": ["a red circle"] * 6, "latents_w": torch.randn(6, 4, 5, 3, generator=g),
             "latents_l": torch.randn(6, 4, 5, 3, generator=g)}
    inputs = T.prepare_inputs(components, batch, torch.Generator().manual_seed(1), prompt_dropout=0.0,
                              device="cpu", dtype=torch.float32)
    t = inputs.timesteps
    assert t.dtype == torch.int64 and 0 <= t.min() and t.max() < scheduler.config.num_train_timesteps
    alpha = scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    noise = {s: (inputs.noisy[s].double() - alpha.sqrt() * batch[f"latents_{s}"].double()) / (1 - alpha).sqrt()
             for s in "wl"}
    torch.testing.assert_close(noise["w"], noise["l"], rtol=1e-4, atol=1e-4)  # one noise draw per pair
    for s in "wl":
        x0 = batch[f"latents_{s}"].double()
        expected = {"epsilon": noise[s], "sample": x0,
                    "v_prediction": alpha.sqrt() * noise[s] - (1 - alpha).sqrt() * x0}[prediction_type]
        torch.testing.assert_close(inputs.target[s].double(), expected, rtol=1e-4, atol=1e-4)


def test_unsupported_prediction_type_fails_at_load(workspace, tmp_path):
    shutil.copytree(workspace / "sd15", tmp_path / "m")
    config_file = tmp_path / "m" / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), prediction_type="flow_prediction")))
    with pytest.raises(ValueError, match="prediction_type 'flow_prediction'"):
        T.load_components(str(tmp_path / "m"), torch.device("cpu"), torch.float32)


RUN = {"objective": "sft", "batch_size": 2, "grad_accum": 1, "dataset": "/data/pairs.parquet"}


class _OneProcess:
    """The accelerate surface that save_checkpoint / load_checkpoint use, for one process."""

    is_main_process, process_index, num_processes, scaler = True, 0, 1, None

    def wait_for_everyone(self):
        pass


class _Position:
    def __init__(self, counter):
        self.counter = counter

    def state_dict(self):
        return {"stream": {"counter": self.counter}}

    def load_state_dict(self, state):
        self.counter = state["stream"]["counter"]


def test_checkpoints_are_atomic_pruned_and_restorable(tmp_path):
    param = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    for step in (1, 2, 3):
        param.grad = torch.randn(3, 2)
        optimizer.step()
        scheduler.step()
        T.save_checkpoint(_OneProcess(), tmp_path, step, {"p": param}, optimizer, scheduler, _Position(10 * step),
                          [float(step)], keep=2, run=RUN)
    assert [p.name for p in T._checkpoint_dirs(tmp_path)] == ["step-00000002", "step-00000003"]
    saved = param.detach().clone()

    # A crash while writing step 4 leaves step 3 complete and the half-written folder invisible to resume.
    def crash():
        raise OSError("disk full")

    optimizer.state_dict, real_state_dict = crash, optimizer.state_dict
    with pytest.raises(OSError, match="disk full"):
        T.save_checkpoint(_OneProcess(), tmp_path, 4, {"p": param}, optimizer, scheduler, _Position(40), [4.0], keep=2,
                          run=RUN)
    optimizer.state_dict = real_state_dict
    assert [p.name for p in T._checkpoint_dirs(tmp_path)] == ["step-00000002", "step-00000003"]

    with torch.no_grad():
        param.zero_()
    position = _Position(0)
    step, history = T.load_checkpoint(_OneProcess(), T._checkpoint_dirs(tmp_path)[-1], {"p": param}, optimizer,
                                      scheduler, position, run=RUN)
    assert (step, history, position.counter) == (3, [3.0], 30)
    assert torch.equal(param.detach(), saved) and scheduler.last_epoch == 3

    # Resuming needs the same LoRA shapes and the same process count (each process owns a data position).
    checkpoint = T._checkpoint_dirs(tmp_path)[-1]
    with pytest.raises(ValueError, match="shape .*LoRA rank"):
        T.load_checkpoint(_OneProcess(), checkpoint, {"p": torch.nn.Parameter(torch.zeros(3, 4))}, optimizer,
                          scheduler, position, run=RUN)
    shutil.copy(checkpoint / "rank0.json", checkpoint / "rank1.json")
    with pytest.raises(ValueError, match="written by 2 process"):
        T.load_checkpoint(_OneProcess(), checkpoint, {"p": param}, optimizer, scheduler, position, run=RUN)
    (checkpoint / "rank1.json").unlink()
    # ... and the run settings that define the data order and a step (every difference is named).
    with pytest.raises(ValueError, match=r"batch_size: checkpoint 2, now 4; grad_accum: checkpoint 1, now 8\)"):
        T.load_checkpoint(_OneProcess(), checkpoint, {"p": param}, optimizer, scheduler, position,
                          run={**RUN, "batch_size": 4, "grad_accum": 8})
    state = json.loads((checkpoint / "state.json").read_text())
    del state["run"]
    (checkpoint / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="records no run settings"):
        T.load_checkpoint(_OneProcess(), checkpoint, {"p": param}, optimizer, scheduler, position, run=RUN)
