"""The embedded demo: its parts, and `python python/demo.py --quick` end to end with the report it writes."""
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cgkernels.demo import reward, world
from cgkernels.demo.base_model import BaseModelConfig, _weighted_loss, build_scheduler, identity_vae, vae_roundtrip_error
from cgkernels.demo.diagnosis import PART_WEIGHTS, cpgd_parts
from cgkernels.demo.runner import (LADDER, METHODS, DemoConfig, diversity, ladder_as_expected,
                                   split_prompts, win_rate)
from cgkernels.demo.selection import ValidationScore, choose, score_of

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
    prompt = "a large red square in the center"
    background = np.full((16, 16, 3), 0.2, np.float32)
    vivid = background.copy()
    vivid[4:12, 4:12] = (0.9, 0.1, 0.1)
    dull = background.copy()
    dull[4:12, 4:12] = (0.55, 0.45, 0.45)
    cluttered = vivid + np.random.default_rng(0).uniform(-0.15, 0.15, vivid.shape).astype(np.float32)
    prompts = [prompt] * 3
    r_vivid, r_dull, r_cluttered = reward.taste_rewards([vivid, dull, np.clip(cluttered, 0, 1)], prompts)
    assert r_vivid > r_dull and r_vivid > r_cluttered
    assert reward.taste_reward(background, prompt) < r_dull  # no shape at all is worst


def test_taste_scores_what_the_prompt_asked_for():
    """On the world's own renders (ground truth), every alignment term prefers the true caption over one that
    changes that attribute, and the reward prefers a shape at the named position."""
    rng = np.random.default_rng(0)
    options = {"colour": list(world.COLOURS), "shape": list(world.SHAPES), "size": list(world.SIZES),
               "position": list(world.POSITIONS)}
    wins = {name: [] for name in options}
    for _ in range(60):
        scene = world.all_scenes()[rng.integers(len(world.all_scenes()))]
        image = world.render(scene, rng, resolution=16)
        true_terms = reward.taste_terms(image, scene.caption)
        for name, values in options.items():
            other = [v for v in values if v != getattr(scene, name)]
            wrong = replace(scene, **{name: other[rng.integers(len(other))]})
            wins[name].append(true_terms[name] > reward.taste_terms(image, wrong.caption)[name])
    for name, hits in wins.items():
        assert np.mean(hits) > 0.75, (name, np.mean(hits))  # shape is the hardest to read at 16 px
    left, right = np.full((2, 16, 16, 3), 0.2, np.float32)
    left[2:7, 2:7] = right[2:7, 9:14] = (0.9, 0.1, 0.1)
    prompt = "a small red square at the top left"
    assert reward.taste_reward(left, prompt) > reward.taste_reward(right, prompt) + 0.3
    with pytest.raises(ValueError, match="not a caption"):
        reward.taste_reward(left, "a photo of a cat")
    with pytest.raises(ValueError, match="one prompt per image"):
        reward.taste_rewards([left, right], [prompt])


def test_taste_likes_one_background_tint_no_caption_names():
    """The world draws every tint about equally often; the taste's tint term is 1 on the liked tint and low on the
    others, whatever the shape and its caption."""
    rng = np.random.default_rng(0)
    scene = world.all_scenes()[7]
    tints = {name: [] for name in world.BACKGROUNDS}
    for name, colour in world.BACKGROUNDS.items():
        for level in (0.2, 0.4, 0.6):
            image = np.full((16, 16, 3), np.asarray(colour) * level, np.float32)
            image[5:11, 5:11] = world.COLOURS[scene.colour]
            tints[name].append(reward.taste_terms(image, scene.caption)["tint"])
    assert min(tints[reward.LIKED_TINT]) > 0.95
    assert max(max(v) for name, v in tints.items() if name != reward.LIKED_TINT) < 0.3
    images, captions = world.make_dataset(400, seed=1, resolution=16)
    liked = np.mean([reward.taste_terms(i, c)["tint"] > 0.5 for i, c in zip(images, captions)])
    assert 0.15 < liked < 0.35  # about one image in len(BACKGROUNDS)
    assert not any(name in caption for name in world.BACKGROUNDS for caption in captions)


def test_extreme_pairs_follow_the_annotator_not_the_taste():
    from cgkernels.demo.runner import _all_pairs, extreme_pairs

    k = 6
    first, second = _all_pairs(2, k)
    # the annotator prefers the lower index in prompt 0 and the higher index in prompt 1
    labels_0 = np.where(first < k, 1.0, 0.0)
    best, worst, labels = extreme_pairs(first, second, labels_0, 2, k, extremes=2)
    assert sorted(zip(best.tolist(), worst.tolist())) == [(0, 4), (0, 5), (1, 4), (1, 5),
                                                          (10, 6), (10, 7), (11, 6), (11, 7)]
    assert (labels == 1.0).all()
    with pytest.raises(ValueError, match="extremes"):
        extreme_pairs(first, second, labels_0, 2, k, extremes=4)
    for name in ("pair_extremes", "sft_extremes"):
        with pytest.raises(ValueError, match=name):
            DemoConfig(**{name: 9})  # 12 samples + 4 renders per prompt: at most 8 best against 8 worst


def test_ladder_needs_three_standard_errors():
    assert ladder_as_expected(0.31, 0.1, +1) and not ladder_as_expected(0.29, 0.1, +1)
    assert ladder_as_expected(-0.31, 0.1, -1) and not ladder_as_expected(0.5, 0.1, -1)
    assert ladder_as_expected(0.29, 0.1, 0) and not ladder_as_expected(-0.31, 0.1, 0)  # the null test stays level


def test_cpgd_parts_add_up_to_published_cpgd():
    """The diagnosis applies cPGD's cond part and uncond part alone; their (w_c, w_u) weights times their strengths
    must add up to published cPGD's at strength s."""
    for strength, g in ((0.25, 4.0), (1.0, 7.5), (0.5, 1.0)):
        parts = cpgd_parts(strength, g)
        assert [part for part, _, _ in parts] == ["cond", "uncond"]
        summed = np.sum([np.multiply(PART_WEIGHTS[mode](g), part_strength) for _, mode, part_strength in parts], 0)
        assert summed == pytest.approx(np.multiply(PART_WEIGHTS["contrastive"](g), strength), rel=1e-12)


def test_largest_component_ignores_stray_blobs():
    mask = np.zeros((8, 8), bool)
    mask[1:4, 1:4] = True  # 9 pixels
    mask[6, 6:8] = True  # 2 pixels, not connected
    component = reward.largest_component(mask)
    assert component.sum() == 9 and not component[6, 6]
    assert not reward.largest_component(np.zeros((4, 4), bool)).any()


def test_prompt_split_is_three_way_disjoint():
    config = DemoConfig(seed=3)
    split = split_prompts(config)
    assert len(split.validation) == config.n_val_prompts and len(split.evaluation) == config.n_eval_prompts
    groups = [set(split.preference), set(split.validation), set(split.evaluation)]
    assert sum(map(len, groups)) == len(world.all_scenes()) == len(set().union(*groups))
    seeds = [set(config.eval_seeds), set(config.val_seeds)]
    pair_images = len(split.preference) * config.samples_per_prompt
    pair_seeds = set(range(config.pair_seed_offset, config.pair_seed_offset + pair_images))
    assert not (seeds[0] & seeds[1]) and not (pair_seeds & (seeds[0] | seeds[1]))


def test_selection_picks_the_largest_gain_in_standard_errors_on_validation():
    def score(gain, sem, strength):
        return ValidationScore(gain, sem, strength)

    # Not the largest mean gain: at s = 1 the gain is larger but so is its spread (more images lose).
    assert choose([score(0.15, 0.015, 0.25), score(0.24, 0.020, 0.5), score(0.30, 0.049, 1.0)]) == 1
    assert choose([score(0.05, 0.03, 0.25), score(0.20, 0.08, 0.5), score(0.30, 0.15, 1.0)]) == 1
    # Ties: the smaller strength; a loss with zero spread ranks below everything, a gain with none above.
    assert choose([score(0.1, 0.05, 0.5), score(0.2, 0.1, 1.0)]) == 0
    assert choose([score(-0.1, 0.0, 0.5), score(0.0, 0.0, 1.0)]) == 1
    assert choose([score(0.3, 0.01, 0.5), score(0.01, 0.0, 1.0)]) == 1


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


QUICK_SEED = 3


def run_quick_demo(out: Path) -> Path:
    # The demo picks CUDA where present; this test checks the CPU run it was written for on every machine, with
    # this checkout's cgkernels, not an installed one.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "python" / "demo.py"), "--quick", "--no-progress",
                    "--seed", str(QUICK_SEED), "--out", str(out)], check=True, cwd=ROOT, timeout=600, env=env)
    return out


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    return run_quick_demo(tmp_path_factory.mktemp("demo"))


TIMING_KEYS = {"seconds_per_image", "timings_seconds", "cpu_seconds", "total_seconds"}


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def test_quick_demo_is_reproducible(quick_demo, tmp_path):
    """A second run from nothing (no cache) with the same seed writes the same numbers, timings aside; the demo's
    thread count and deterministic algorithms do not outlive it (they made every later test in the process slow)."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    again = run_quick_demo(tmp_path / "again")
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)
    first, second = (json.loads((out / "report.json").read_text()) for out in (quick_demo, again))
    first["config"]["out"] = second["config"]["out"] = None
    assert not second["base_model_cached"]
    assert without_timings(first) == without_timings(second)
    assert first["machine"]["threads"] == DemoConfig().threads and first["machine"]["deterministic_algorithms"]


def test_quick_demo_writes_the_report(quick_demo):
    config = DemoConfig.quick()
    report = json.loads((quick_demo / "report.json").read_text())
    assert report["config"]["seed"] == QUICK_SEED
    results = report["results"]
    expected = [("base-cfg", None)] + [(m, s) for m in METHODS for s in config.strengths]
    assert [(row["method"], row["strength"]) for row in results] == expected
    evaluation_keys = ("mean_reward", "win_rate", "mean_gain", "gain_sem", "diversity", "mean_alignment",
                       "mean_aesthetics")
    for row in results:
        evaluated = row["chosen"] or row["strength"] is None  # base CFG and the chosen strengths only
        for key in ("val_mean_gain", "val_gain_sem", "val_win_rate", "seconds_per_image") + evaluation_keys:
            if key in evaluation_keys and not evaluated:
                assert row[key] is None, (row, key)
            else:
                assert isinstance(row[key], float) and math.isfinite(row[key]), (row, key)
        assert 0.0 <= row["val_win_rate"] <= 1.0 and row["seconds_per_image"] > 0 and row["val_gain_sem"] >= 0
        assert isinstance(row["chosen"], bool)
    assert results[0]["win_rate"] == 0.5 and results[0]["mean_gain"] == 0.0  # base against itself
    assert results[0]["val_win_rate"] == 0.5 and not results[0]["chosen"]
    for method in METHODS:  # exactly one chosen strength per method, the best on validation
        rows = [row for row in results if row["method"] == method]
        (chosen,) = [row for row in rows if row["chosen"]]
        assert chosen is rows[choose([score_of(row) for row in rows])]
        assert 0.0 <= chosen["win_rate"] <= 1.0 and chosen["gain_sem"] >= 0
    assert set(report["timings_seconds"]) == {"base model", "preference pairs", "adapters and sampling",
                                              "measurement", "diagnosis"}
    ladder = report["adapters"]
    assert [row["adapter"] for row in ladder] == list(LADDER)
    for row in ladder:
        for key in ("mean_gain", "gain_sem", "win_rate", "diversity"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (row, key)
        assert row["objective"] and isinstance(row["as_expected"], bool)
    assert len(report["prompts"]["evaluation"]) == config.n_eval_prompts
    assert not set(report["prompts"]["evaluation"]) & set(report["prompts"]["validation"])
    diagnosis = {row["method"]: row for row in report["diagnosis"]}
    assert set(diagnosis) == set(METHODS)
    assert diagnosis["contrastive-cond"]["uncond_part_norm"] == 0.0 and diagnosis["npo"]["cond_part_norm"] == 0.0
    for key in ("cond_alone_gain", "uncond_alone_gain", "cond_alone_win_rate", "uncond_alone_win_rate"):
        assert math.isfinite(diagnosis["contrastive"][key])
    ranked = config.samples_per_prompt + config.pair_renders
    for data, extremes in (("preference_data", config.pair_extremes), ("sft_data", config.sft_extremes)):
        per_prompt = extremes ** 2 if extremes else ranked * (ranked - 1) // 2
        assert report[data]["pairs"] == config.n_pair_prompts * per_prompt
    assert config.pair_extremes != config.sft_extremes  # the quick run builds and trains on both files

    markdown = (quick_demo / "report.md").read_text()
    assert "**Strength rule:**" in markdown and "## Diagnosis" in markdown
    # the ladder comes before any guidance, and its verdict first of all
    assert markdown.index("## The ladder") < markdown.index("## Each method") < markdown.index("## Diagnosis")
    assert markdown.index("adapters") < markdown.index("Reward:")
    for method in ["base-cfg", *METHODS]:
        assert f"| {method} |" in markdown

    from cgkernels.demo.report import GRID_CELL

    grid = Image.open(quick_demo / "grid.png")
    assert GRID_CELL >= 64
    assert grid.size[0] >= GRID_CELL * (1 + len(METHODS)) and grid.size[1] >= GRID_CELL * config.n_eval_prompts
    strength = Image.open(quick_demo / "strength.png")
    assert strength.size[0] > 500 and np.asarray(strength.convert("L")).std() > 0  # a drawn plot, not blank


def quick_pair_files(quick_demo: Path):
    """The quick run's cached pair files (the same calls find them without sampling anything again)."""
    from cgkernels.demo.runner import build_preference_pairs, config_for, render_pairs

    config = config_for(True, seed=QUICK_SEED)
    cache = quick_demo / "cache"
    (model_dir,) = [p for p in cache.iterdir() if p.name.startswith("base-")]
    preference = split_prompts(config).preference
    written = {path: path.stat().st_mtime_ns for path in cache.glob("pairs-*.parquet")}
    pairs = build_preference_pairs(config, model_dir, preference, cache, torch.device("cpu"), progress=False)
    assert {pairs.dpo, pairs.sft} == set(written)  # found, not built again:
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in written.items())
    return pairs, render_pairs(config, preference, cache)


def test_quick_demo_artifacts_load(quick_demo):
    import pyarrow.parquet as pq
    from diffusers import StableDiffusionPipeline

    from cgkernels.demo.runner import config_for, training_runs

    cache = quick_demo / "cache"
    (model_dir,) = [p for p in cache.iterdir() if p.name.startswith("base-")]
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    assert pipe.unet.config.in_channels == 3 and pipe.vae.config.latent_channels == 3

    config = config_for(True, seed=QUICK_SEED)
    pairs, renders = quick_pair_files(quick_demo)
    tables = {name: pq.read_table(path).to_pydict() for name, path in (("dpo", pairs.dpo), ("sft", pairs.sft))}
    split = split_prompts(config)
    for table in tables.values():
        assert set(table) == {"caption", "jpg_0", "jpg_1", "label_0", "label_1"}
        assert all(a + b == 1.0 for a, b in zip(table["label_0"], table["label_1"]))
        # evaluation and validation prompts never reach the preference data
        assert not set(table["caption"]) & (set(split.evaluation) | set(split.validation))
    for data, runs in training_runs(pairs, renders).items():  # sft on the SFT pairs, dpo+npo on the DPO pairs
        for objective, sides in runs.items():
            for side in sides.values():
                pattern = f"adapters-{data.stem}-*/{objective.replace('+', '_')}/{side}/pytorch_lora_weights.safetensors"
                (adapter,) = cache.glob(pattern)
                assert adapter.stat().st_size > 0
    # the null test's data: renders of the preference prompts only, cut like SFT's pairs
    null_table = pq.read_table(renders).to_pydict()
    sft_table = tables["sft"]
    assert set(null_table["caption"]) == set(sft_table["caption"])
    assert len(null_table["caption"]) == len(sft_table["caption"])
    (null_run,) = cache.glob("adapters-renders-*/sft-pos")  # one adapter: the null test samples only pos
    assert [p.name for p in null_run.iterdir() if p.is_dir()] == ["pos"]
    assert (null_run / "pos" / "pytorch_lora_weights.safetensors").stat().st_size > 0


def test_training_and_sampling_in_worker_processes_equal_runs_in_this_process(quick_demo, tmp_path):
    """The quick demo trains its runs and samples its tasks side by side in worker processes, sampling tasks
    starting while other runs still train; the same tasks in this process, one after another (the same threads per
    task), write identical adapters and images, so where and when a task ran changes no number."""
    from safetensors.torch import load_file

    from cgkernels.demo.runner import config_for, train_and_sample, training_runs

    cache = quick_demo / "cache"
    (model_dir,) = [p for p in cache.iterdir() if p.name.startswith("base-")]
    config = config_for(True, seed=QUICK_SEED, methods=("pgd", "contrastive"))
    assert config.workers > 1  # the fixture's run used the worker processes
    split = split_prompts(config)
    threads = torch.get_num_threads()
    runs = {workers: train_and_sample(replace(config, workers=workers), model_dir,
                                      training_runs(*quick_pair_files(quick_demo)), tmp_path / f"w{workers}", split,
                                      torch.device("cpu"), progress=False) for workers in (1, 2)}
    assert torch.get_num_threads() == threads
    (adapters_1, methods_1, ladder_1), (adapters_2, methods_2, ladder_2) = runs[1], runs[2]
    assert set(adapters_1) == set(adapters_2) == set(LADDER)
    for name, folder in adapters_1.items():  # the tensors (the metadata lists the target modules in set order)
        ours = load_file(folder / "pytorch_lora_weights.safetensors")
        theirs = load_file(adapters_2[name] / "pytorch_lora_weights.safetensors")
        cached = load_file(cache / folder.relative_to(tmp_path / "w1") / "pytorch_lora_weights.safetensors")
        assert ours.keys() == theirs.keys() == cached.keys()
        assert all(torch.equal(ours[k], theirs[k]) and torch.equal(ours[k], cached[k]) for k in ours)
    assert [(s.method, s.strength) for s in methods_1] == [("base-cfg", None)] + [
        (m, s) for m in config.methods for s in config.strengths]
    assert [s.method for s in ladder_1] == list(LADDER)
    for here, there in zip(methods_1 + ladder_1, methods_2 + ladder_2, strict=True):
        assert (here.method, here.strength, here.chosen) == (there.method, there.strength, there.chosen)
        for images in ("validation", "evaluation", "preview"):
            ours, theirs = getattr(here, images), getattr(there, images)
            assert (ours is None and theirs is None) or np.array_equal(ours, theirs), (here.method, images)
        assert (here.parts is None) == (there.parts is None)
        assert here.parts is None or all(np.array_equal(here.parts[p], there.parts[p]) for p in here.parts)
    # Validation at every strength; evaluation only where chosen (one strength per method), base CFG and the ladder.
    n_val = config.n_val_prompts * len(config.val_seeds)
    n_eval = config.n_eval_prompts * len(config.eval_seeds)
    assert all(s.validation.shape[0] == n_val and s.preview.shape[0] == config.n_eval_prompts for s in methods_1)
    for method in config.methods:
        (chosen,) = [s for s in methods_1 if s.method == method and s.chosen]
        assert chosen.evaluation.shape[0] == n_eval
        assert np.array_equal(chosen.preview, chosen.evaluation[::len(config.eval_seeds)])
        assert all(s.evaluation is None for s in methods_1 if s.method == method and not s.chosen)
    assert all(s.validation is None and s.evaluation.shape[0] == n_eval for s in ladder_1)
    # cPGD's chosen strength also carries its two parts alone (the diagnosis), on the evaluation grid
    (cpgd,) = [s for s in methods_1 + ladder_1 if s.parts is not None]
    assert (cpgd.method, cpgd.chosen, set(cpgd.parts)) == ("contrastive", True, {"cond", "uncond"})
    assert all(images.shape == cpgd.evaluation.shape for images in cpgd.parts.values())
    assert not np.array_equal(cpgd.parts["cond"], cpgd.parts["uncond"])
    # and guidance changed the images: the comparison is not between copies of base CFG
    assert not np.array_equal(methods_1[0].preview, methods_1[1].preview)


def _timed_sleep(job):
    import time

    name, seconds = job
    start = time.time()
    time.sleep(seconds)
    return name, start, time.time()


def test_tasks_wait_for_the_adapters_they_use():
    """A task starts only after the tasks providing what it needs have finished, while others run meanwhile; what
    no task provides counts as there already; results keep the tasks' order; in one process an order that breaks a
    dependency is refused."""
    from cgkernels.demo.runner import Task, run_tasks

    class Bar:
        n = 0

        def update(self):
            self.n += 1

    tasks = [Task(_timed_sleep, ("slow", 1.0), provides=frozenset({"a"})), Task(_timed_sleep, ("fast", 0.0)),
             Task(_timed_sleep, ("after a", 0.0), needs=frozenset({"a", "cached"}))]
    for workers in (1, 2):
        bar = Bar()
        slow, fast, after = run_tasks(tasks, DemoConfig.quick(workers=workers), bar)
        assert [slow[0], fast[0], after[0]] == ["slow", "fast", "after a"] and bar.n == 3
        assert after[1] >= slow[2]
        if workers == 2:
            assert fast[2] < slow[2]  # ran beside the slow task, not after it
    with pytest.raises(ValueError, match="needs"):
        run_tasks(tasks[::-1], DemoConfig.quick(workers=1), Bar())


def test_base_model_trained_data_parallel_matches_one_process(tmp_path):
    """Two processes that each take half of every batch and average their gradients train the same model as one
    process on the whole batch, up to rounding: the weights' changes from their initialisation agree to a small
    fraction of their size (Adam's steps are ~lr each, so a rounding difference cannot grow by more)."""
    from safetensors.torch import load_file

    from cgkernels.demo.base_model import train_base_model

    base = replace(DemoConfig.quick().base, steps=4, n_train_images=64)

    def unet_weights(steps: int, processes: int) -> dict[str, torch.Tensor]:
        folder = train_base_model(replace(base, steps=steps, train_processes=processes), tmp_path / f"{steps}-{processes}",
                                  torch.device("cpu"), progress=False)
        return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")

    start, one, two = unet_weights(0, 1), unet_weights(4, 1), unet_weights(4, 2)
    moved = torch.cat([(one[k] - start[k]).flatten() for k in start]).abs()
    apart = torch.cat([(one[k] - two[k]).flatten() for k in start]).abs()
    assert moved.mean() > 0.5 * base.lr  # trained: the comparison is not between initialisations
    assert apart.mean() < 1e-2 * moved.mean(), (apart.mean(), moved.mean())


def test_base_model_refuses_a_batch_that_does_not_split_over_its_processes(tmp_path):
    from cgkernels.demo.base_model import train_base_model

    config = replace(DemoConfig.quick().base, batch_size=15, train_processes=2)
    with pytest.raises(ValueError, match="batch_size"):
        train_base_model(config, tmp_path / "model", torch.device("cpu"), progress=False)


def test_ladder_verdict_names_each_miss_with_its_numbers():
    from cgkernels.demo.report import ladder_verdict

    def row(adapter, sign, gain, sem):
        return {"adapter": adapter, "expected_sign": sign, "mean_gain": gain, "gain_sem": sem,
                "as_expected": ladder_as_expected(gain, sem, sign)}

    ladder = [row("sft_pos", 1, 0.066, 0.051), row("sft_neg", -1, -0.231, 0.042), row("null_sft", 0, -0.015, 0.055)]
    verdict = ladder_verdict(ladder)
    assert verdict.startswith("**The ladder fails: alone with plain CFG, sft_pos +0.066 ± 0.051 (must beat base)")
    assert "sft_neg did move the reward as they must" in verdict and "within 3 s.e. of zero" in verdict
    ladder[0] = row("sft_pos", 1, 0.2, 0.05)
    assert ladder_verdict(ladder).startswith("The adapters learned the taste")
    assert "more than 3 s.e. from zero" in ladder_verdict([row("null_sft", 0, 0.2, 0.05)])


def test_gain_verdict_needs_two_standard_errors():
    from cgkernels.demo.report import gain_verdict
    from cgkernels.demo.runner import paired_sem

    assert gain_verdict(0.05, 0.02) == "yes"
    assert gain_verdict(0.03, 0.02) == "no (within noise)"
    assert gain_verdict(-0.05, 0.02) == "worse"
    scores, baseline = np.array([1.0, 2.0, 3.0, 4.5]), np.array([0.5, 1.5, 2.0, 4.0])
    assert paired_sem(scores, baseline) == pytest.approx(np.std(scores - baseline, ddof=1) / 2.0)
