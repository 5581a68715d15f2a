"""The embedded demo: its parts, and `python python/demo.py --quick` end to end with the report it writes."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cgkernels.demo import reward, world
from cgkernels.demo.base_model import BaseModelConfig, _weighted_loss, build_scheduler, identity_vae, vae_roundtrip_error
from cgkernels.demo.runner import METHODS, DemoConfig, diversity, win_rate

ROOT = Path(__file__).resolve().parents[1]


def test_identity_vae_round_trips_images():
    images, _ = world.make_dataset(8, seed=3, resolution=16)
    assert vae_roundtrip_error(identity_vae(), images) < 1e-2  # well under one 8-bit step (2/255 = 7.8e-3 ~)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_base_model_loss_targets_match_the_scheduler(prediction_type):
    import torch

    scheduler = build_scheduler(prediction_type)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(5, 3, 4, 4, generator=generator) * 2 - 1, torch.randn(5, 3, 4, 4, generator=generator)
    t = torch.tensor([0, 10, 500, 900, 999])
    alpha_bar = scheduler.alphas_cumprod[t]
    target = scheduler.get_velocity(x0, noise, t) if prediction_type == "v_prediction" else noise
    config = BaseModelConfig(prediction_type=prediction_type, min_snr_gamma=5.0)
    assert _weighted_loss(target, x0, noise, alpha_bar, config) < 1e-10  # the sampler reads what training taught
    off = target + 0.1 * torch.randn(target.shape, generator=generator)
    plain = _weighted_loss(off, x0, noise, alpha_bar, BaseModelConfig(prediction_type=prediction_type, min_snr_gamma=0))
    assert plain == pytest.approx(float((off - target).pow(2).mean()), rel=1e-5)


def test_world_captions_and_held_out_split():
    images, captions = world.make_dataset(5, seed=0, resolution=16)
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
    assert all(caption.split()[1] in world.SIZES for caption in captions)
    preference, held_out = world.split_prompts(seed=0, n_eval=10)
    assert len(held_out) == 10 and not set(preference) & set(held_out)
    assert len(preference) + len(held_out) == len(world.all_scenes())


def test_taste_prefers_vivid_shapes_on_clean_backgrounds():
    background = np.full((24, 24, 3), 0.2, np.float32)
    vivid = background.copy()
    vivid[8:16, 8:16] = (0.9, 0.1, 0.1)
    dull = background.copy()
    dull[8:16, 8:16] = (0.55, 0.45, 0.45)
    cluttered = vivid + np.random.default_rng(0).uniform(-0.15, 0.15, vivid.shape).astype(np.float32)
    r_vivid, r_dull, r_cluttered = reward.taste_rewards([vivid, dull, np.clip(cluttered, 0, 1)])
    assert r_vivid > r_dull and r_vivid > r_cluttered
    assert reward.taste_reward(background) < r_dull  # no shape at all is worst


def test_bradley_terry_labels_are_seeded_and_follow_rewards():
    r0, r1 = np.linspace(-1, 1, 2000), np.zeros(2000)
    labels = reward.bradley_terry_labels(r0, r1, temperature=0.1, seed=5)
    np.testing.assert_array_equal(labels, reward.bradley_terry_labels(r0, r1, temperature=0.1, seed=5))
    assert labels[r0 > 0.5].mean() > 0.95 and labels[r0 < -0.5].mean() < 0.05
    assert 0.3 < labels[np.abs(r0) < 0.02].mean() < 0.7  # near-ties are coin flips
    with pytest.raises(ValueError, match="temperature"):
        reward.bradley_terry_labels(r0, r1, temperature=0.0, seed=0)


def test_measures():
    assert win_rate(np.array([2.0, 1.0, 0.0]), np.array([1.0, 1.0, 1.0])) == pytest.approx(0.5)
    same = np.zeros((4, 8, 8, 3), np.uint8)  # 2 prompts x 2 seeds, identical samples: no diversity
    assert diversity(same, n_seeds=2) == 0.0
    different = same.copy()
    different[1] = 255
    assert diversity(different, n_seeds=2) == pytest.approx(0.5)  # one pair at distance 1, one at 0


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    # The demo picks CUDA where present; this test checks the CPU run it was written for on every machine.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, str(ROOT / "python" / "demo.py"), "--quick", "--no-progress", "--out", str(out)],
                   check=True, cwd=ROOT, timeout=600, env=env)
    return out


def test_quick_demo_writes_the_report(quick_demo):
    config = DemoConfig.quick()
    report = json.loads((quick_demo / "report.json").read_text())
    results = report["results"]
    expected = [("base-cfg", None)] + [(m, s) for m in METHODS for s in config.strengths]
    assert [(row["method"], row["strength"]) for row in results] == expected
    for row in results:
        for key in ("mean_reward", "win_rate", "diversity", "seconds_per_image"):
            assert math.isfinite(row[key]), (row, key)
        assert 0.0 <= row["win_rate"] <= 1.0 and row["seconds_per_image"] > 0
    assert results[0]["win_rate"] == 0.5  # base against itself
    assert set(report["timings_seconds"]) == {"base model", "preference pairs", "adapters", "sampling", "measurement"}
    assert len(report["eval_prompts"]) == config.n_eval_prompts

    markdown = (quick_demo / "report.md").read_text()
    assert "| method | strength | mean reward" in markdown and "win rate vs base CFG" in markdown
    for method in ["base-cfg", *METHODS]:
        assert f"| {method} |" in markdown

    grid = Image.open(quick_demo / "grid.png")
    assert grid.size == (230 + 64 * (1 + len(METHODS)), 14 + 64 * config.n_eval_prompts)
    strength = Image.open(quick_demo / "strength.png")
    assert strength.size[0] > 500 and np.asarray(strength.convert("L")).std() > 0  # a drawn plot, not blank


def test_quick_demo_artifacts_load(quick_demo):
    import pyarrow.parquet as pq
    from diffusers import StableDiffusionPipeline

    cache = quick_demo / "cache"
    (model_dir,) = [p for p in cache.iterdir() if p.name.startswith("base-")]
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    assert pipe.unet.config.in_channels == 3 and pipe.vae.config.latent_channels == 3

    (parquet,) = cache.glob("pairs-*.parquet")
    table = pq.read_table(parquet).to_pydict()
    assert set(table) == {"caption", "jpg_0", "jpg_1", "label_0", "label_1"}
    assert all(a + b == 1.0 for a, b in zip(table["label_0"], table["label_1"]))
    _, held_out = world.split_prompts(seed=0, n_eval=DemoConfig.quick().n_eval_prompts)
    assert not set(table["caption"]) & set(held_out)  # evaluation prompts never reach the preference data
    for side in ("sft/pos", "sft/neg", "dpo_npo/pos", "dpo_npo/neg"):
        (adapter,) = cache.glob(f"adapters-*/{side}/pytorch_lora_weights.safetensors")
        assert adapter.stat().st_size > 0


def test_gain_verdict_needs_two_standard_errors():
    from cgkernels.demo.report import gain_verdict
    from cgkernels.demo.runner import paired_sem

    assert gain_verdict(0.05, 0.02) == "yes"
    assert gain_verdict(0.03, 0.02) == "no (within noise)"
    assert gain_verdict(-0.05, 0.02) == "worse"
    scores, baseline = np.array([1.0, 2.0, 3.0, 4.5]), np.array([0.5, 1.5, 2.0, 4.0])
    assert paired_sem(scores, baseline) == pytest.approx(np.std(scores - baseline, ddof=1) / 2.0)
