"""The sampler at benchmark scale on a tiny pipeline saved to disk with two LoRA files: prompts x seeds x methods x
strengths, batch-size invariance, resume, refusals before any model loads, and 2 processes equal to one."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cgkernels import sampling
from cgkernels.testing import add_random_lora, save_lora, tiny_sd3_pipeline, tiny_sd_pipeline
from cli_testdata import launch_two, save_pipeline_with_loras

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = str(ROOT / "python" / "sample.py")
sys.path.insert(0, str(ROOT / "python"))
import sample as sample_cli  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a large green triangle", "a small red square", "a blue circle"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny SD1.5 pipeline, a positive and a negative LoRA, a prompt file."""
    root = save_pipeline_with_loras(tmp_path_factory.mktemp("sampling"))
    lines = [json.dumps({"prompt": prompt, "id": index}) for index, prompt in enumerate(PROMPTS)]
    (root / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return root


def run_cli(*args, env=None, timeout=240):
    """python/sample.py (or another script) as a user runs it: a fresh process."""
    command = args if args[0].endswith(".py") or args[0] == "-m" else (SAMPLE, *args)
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def _pixels(folder) -> dict:
    return {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in sorted(Path(folder).glob("*.png"))}


def _assert_same_images(a: dict, b: dict):
    """Same files, pixel for pixel within one 8-bit level (fp32 rounding of batched arithmetic can flip one)."""
    assert sorted(a) == sorted(b)
    worst = max(np.abs(a[name] - b[name]).max() for name in a)
    assert worst <= 1, f"images differ by {worst}/255"


def _base_args(workspace, out, *extra):
    return ["--model", str(workspace / "model"), "--positive", str(workspace / "pos"), "--negative",
            str(workspace / "neg"), "--steps", "2", "--out", str(out), "--device", "cpu", "--no-progress", *extra]


def test_methods_and_sweep_share_one_load_and_write_one_image_per_item(workspace, tmp_path, monkeypatch):
    loads = []
    original = sampling.load_pipeline
    monkeypatch.setattr(sampling, "load_pipeline", lambda *a, **k: loads.append(a) or original(*a, **k))
    out = tmp_path / "out"
    counts = sample_cli.main(_base_args(workspace, out, "--guidance", "cfg,contrastive", "--sweep", "0,2",
                                        "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--seeds", "0-1",
                                        "--batch-size", "3"))
    assert len(loads) == 1
    # cfg once (it has no strength) + contrastive at two strengths, 2 prompts x 2 seeds each.
    assert counts["written"] == 12 and counts["skipped"] == 0
    images = _pixels(out)
    assert len(images) == 12 and "contrastive_s2_p00001_seed1.png" in images
    record = json.loads((out / "contrastive_s2_p00001_seed1.json").read_text())
    assert record["prompt"] == PROMPTS[1] and record["seed"] == 1 and record["prompt_index"] == 1
    assert record["guidance"] == "contrastive" and record["strength"] == 2.0 and record["settings"]["steps"] == 2
    # The grid lives in a subfolder: OUT itself stays a folder of (image, sidecar) pairs.
    assert Image.open(out / "grids" / "contrastive_sweep.png").size == (2 * 32, 2 * 32)
    assert not list(out.glob("*grid*.png"))
    # "cfg" is the base model with its adapters off: it equals contrastive at strength 0 (base + 0 * delta) ...
    for name in images:
        if name.startswith("cfg_"):
            assert np.abs(images[name] - images[name.replace("cfg_s0", "contrastive_s0")]).max() <= 1
    # ... and strength 2 is another image (the adapters were loaded and used).
    assert np.abs(images["contrastive_s2_p00000_seed0.png"] - images["contrastive_s0_p00000_seed0.png"]).max() > 8
    # Different seeds of one prompt are different images.
    assert np.abs(images["cfg_s0_p00000_seed0.png"] - images["cfg_s0_p00000_seed1.png"]).max() > 8


def test_image_does_not_depend_on_its_batch_and_rerun_skips(workspace, tmp_path):
    config = dict(model=str(workspace / "model"), prompts=PROMPTS[:3], positive=str(workspace / "pos"),
                  negative=str(workspace / "neg"), methods=["contrastive"], strengths=[1.5], seeds=[3, 4], steps=2,
                  device="cpu")
    pipe = sampling.load_pipeline(config["model"], device="cpu")
    one = sampling.sample(sampling.SampleConfig(out=str(tmp_path / "b1"), batch_size=1, **config), pipe=pipe,
                          progress=False)
    pipe = sampling.load_pipeline(config["model"], device="cpu")
    four = sampling.sample(sampling.SampleConfig(out=str(tmp_path / "b4"), batch_size=4, **config), pipe=pipe,
                           progress=False)
    assert one["written"] == four["written"] == 6
    _assert_same_images(_pixels(tmp_path / "b1"), _pixels(tmp_path / "b4"))

    # Before 8-bit quantisation: (prompt 2, seed 4) alone and in a batch of 3 agree within fp32 rounding.
    cfg = sampling.SampleConfig(**config)
    with sampling._method(pipe, "contrastive", 1.5, {"positive": "pos", "negative": "neg"}, cfg):
        alone = pipe(**sampling._call_kwargs(pipe, cfg, [PROMPTS[2]], [4]), output_type="np").images[0]
        batch = pipe(**sampling._call_kwargs(pipe, cfg, PROMPTS[:3], [3, 9, 4]), output_type="np").images[2]
    assert np.abs(alone - batch).max() < 1e-4 and np.abs(alone).max() > 0.1

    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "b1").iterdir()}
    again = sampling.sample(sampling.SampleConfig(out=str(tmp_path / "b1"), batch_size=2, **config), progress=False)
    assert again["written"] == 0 and again["skipped"] == 6
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "b1").iterdir()} == mtimes

    # One more seed: only the new images are sampled; other settings in the same folder are refused.
    more = sampling.sample(sampling.SampleConfig(out=str(tmp_path / "b1"), **{**config, "seeds": [3, 4, 5]}),
                           progress=False)
    assert more["written"] == 3 and more["skipped"] == 6
    with pytest.raises(ValueError, match="steps=2 then, 3 now.*another --out"):
        sampling.sample(sampling.SampleConfig(out=str(tmp_path / "b1"), **{**config, "steps": 3}), progress=False)


def test_prompt_files_and_seed_lists(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\n  a blue square \n")
    assert sampling.read_prompts(tmp_path / "p.txt") == ["a red circle", "a blue square"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red circle"}\n"a blue square"\n')
    assert sampling.read_prompts(tmp_path / "p.jsonl") == ["a red circle", "a blue square"]
    (tmp_path / "parti.tsv").write_text("Prompt\tCategory\tChallenge\nbright scene\tAbstract\tBasic\n")
    assert sampling.read_prompts(tmp_path / "parti.tsv") == ["bright scene"]
    assert sampling.parse_seeds("0-3,10") == [0, 1, 2, 3, 10]
    for bad in ("", "1,1", "a", "3-x", "-1"):
        with pytest.raises(ValueError, match="seed"):
            sampling.parse_seeds(bad)
    assert set(sampling.ADAPTERS_NEEDED) == set(sampling.MODES)


def test_bad_input_is_refused_before_any_model_loads_naming_the_flag(workspace, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "not_a_model"
    empty.mkdir()  # a model folder that would fail to load: every refusal below must come first
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a red circle"}\n{"text": "no prompt key"}\n')
    (tmp_path / "prompts.csv").write_text("a red circle\n")
    cases = [
        (["--guidance", "contrastive", "--prompt", "x"], "--positive"),  # default mode, no adapters
        (["--guidance", "npo", "--positive", str(workspace / "pos"), "--prompt", "x"], "--negative"),
        (["--guidance", "contrastive,cfg-plus", "--prompt", "x"], "--guidance: unknown method cfg-plus"),
        (["--guidance", "pgd", "--positive", str(tmp_path / "missing"), "--prompt", "x"], "--positive LoRA not found"),
        (["--guidance", "cfg", "--prompts", str(tmp_path / "bad.jsonl")], "--prompts: .*line 2"),
        (["--guidance", "cfg", "--prompts", str(tmp_path / "prompts.csv")], "--prompts: .*unknown prompt file type"),
        (["--guidance", "cfg", "--prompts", str(tmp_path / "nowhere.txt")], "--prompts: prompt file not found"),
        (["--guidance", "cfg", "--prompt", "x", "--seeds", "0-"], "--seeds"),
        (["--guidance", "cfg", "--prompt", "x", "--batch-size", "0"], "--batch-size must be positive"),
        # before the fix these two raised a traceback from patch, after the model had loaded
        (["--guidance", "cfg", "--prompt", "x", "--start", "0.8", "--stop", "0.2"],
         "--start / --stop.*need 0 <= start < stop <= 1"),
        (["--guidance", "npo", "--negative", str(workspace / "neg"), "--prompt", "x", "--guidance-scale", "1"],
         "--guidance npo acts through CFG's unconditional prediction: it needs --guidance-scale > 1"),
    ]
    with pytest.raises(FileNotFoundError, match="--model folder not found"):
        sampling.SampleConfig(model=str(tmp_path / "nowhere"), prompts=["x"], methods=["cfg"]).validate()
    # As a user runs it: the two the issue reported (default mode without adapters, a misspelt method).
    for args, message in cases[:3]:
        result = run_cli("--model", str(empty), "--out", str(tmp_path / "out"), *args)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and "error:" in result.stderr, result.stderr[-2000:]
        assert re.search(message, result.stderr), (message, result.stderr[-2000:])
    # The rest in this process, where "before any model loads" is observable.
    monkeypatch.setattr(sampling, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    for args, message in cases[3:]:
        with pytest.raises(SystemExit) as exit_info:
            sample_cli.main(["--model", str(empty), "--out", str(tmp_path / "out"), *args])
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err), message
    assert not (tmp_path / "out").exists()


def test_sd3_folder_saved_without_t5_samples(tmp_path):
    tiny_sd3_pipeline(seed=3).save_pretrained(tmp_path / "sd3")
    assert not (tmp_path / "sd3" / "text_encoder_3").exists()
    with pytest.raises(ValueError, match="StableDiffusion3Pipeline has no guidance_rescale option"):
        sampling.SampleConfig(model=str(tmp_path / "sd3"), prompts=["x"], methods=["cfg"],
                              guidance_rescale=0.5).validate()
    result = run_cli("--model", str(tmp_path / "sd3"), "--guidance", "cfg", "--prompt", "a red circle", "--steps", "2",
                     "--max-sequence-length", "8", "--guidance-scale", "4", "--out", str(tmp_path / "out"),
                     "--device", "cpu", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote 1 images" in result.stdout
    assert np.asarray(Image.open(tmp_path / "out" / "cfg_s0_p00000_seed0.png")).std() > 0


def test_two_processes_write_the_one_process_images_and_rerun_writes_nothing(workspace, tmp_path):
    args = ["--guidance", "contrastive", "--strength", "2", "--prompts", str(workspace / "prompts.jsonl"),
            "--seeds", "0,1", "--batch-size", "2"]
    single = run_cli(*_base_args(workspace, tmp_path / "one", *args))
    assert single.returncode == 0, single.stderr[-3000:]
    assert "wrote 10 images" in single.stdout

    stdout = launch_two(SAMPLE, *_base_args(workspace, tmp_path / "two", *args))
    assert "on 2 processes" in stdout
    assert "rank 0: wrote 5 images" in stdout and "rank 1: wrote 5 images" in stdout
    _assert_same_images(_pixels(tmp_path / "one"), _pixels(tmp_path / "two"))
    sidecars = sorted(p.name for p in (tmp_path / "two").glob("*.json"))
    assert len(sidecars) == 10 and sidecars == sorted(p.name for p in (tmp_path / "one").glob("*.json"))

    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "two").iterdir()}
    stdout = launch_two(SAMPLE, *_base_args(workspace, tmp_path / "two", *args))
    assert "10 already in" in stdout and "rank 0: wrote 0 images" in stdout and "rank 1: wrote 0 images" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "two").iterdir()} == before


def test_lora_files_round_trip(tmp_path):
    pipe = tiny_sd_pipeline("sdxl", seed=7)
    add_random_lora(pipe, "pos", rank=4, seed=1)
    save_lora(pipe, "pos", tmp_path / "pos")
    fresh = tiny_sd_pipeline("sdxl", seed=7)
    fresh.load_lora_weights(tmp_path / "pos", adapter_name="pos")
    original = {k: v for k, v in pipe.unet.state_dict().items() if "lora" in k}
    loaded = fresh.unet.state_dict()
    assert original and all(torch.equal(v, loaded[k]) for k, v in original.items())


def test_a_crash_loses_only_the_batch_in_flight(workspace, tmp_path, monkeypatch):
    config = sampling.SampleConfig(model=str(workspace / "model"), prompts=PROMPTS[:3], methods=["cfg"], seeds=[0, 1],
                                   steps=2, batch_size=2, out=str(tmp_path / "out"), device="cpu")
    original, calls = sampling._sample_batch, []

    def crash_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(sampling, "_sample_batch", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        sampling.sample(config, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "cfg_s0_p00000_seed0.json", "cfg_s0_p00000_seed0.png", "cfg_s0_p00000_seed1.json", "cfg_s0_p00000_seed1.png"]
    monkeypatch.setattr(sampling, "_sample_batch", original)
    counts = sampling.sample(config, progress=False)
    assert counts["skipped"] == 2 and counts["written"] == 4
    assert len(list((tmp_path / "out").glob("*.png"))) == 6 and not list((tmp_path / "out").glob(".*tmp"))
