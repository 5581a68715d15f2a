"""The evaluation harness: pairing by prompt and seed, win rates, scorer plug-ins and their errors."""
import json

import numpy as np
import pytest
from PIL import Image

from cgkernels import evaluate
from cgkernels.demo import reward, world


def _scene_image(seed: int, saturation_boost: bool):
    """One render per seed (its background tint, which the taste scores, is drawn from the seed), washed out towards
    grey unless saturation_boost: the taste prefers the vivid image of a seed to its washed-out twin."""
    image = world.render(world.Scene("large", "red", "circle", "in the center"), np.random.default_rng(seed),
                         resolution=24)
    if not saturation_boost:
        image = 0.5 * image + 0.25
    return (image * 255).round().astype(np.uint8)


def _write_folder(folder, entries, *, sidecar=True):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, prompt, seed, strength) in enumerate(entries):
        name = f"{i:03d}.png"
        Image.fromarray(image).save(folder / name)
        row = {"prompt": prompt, "seed": seed}
        if strength is not None:
            row["strength"] = strength
        if sidecar:
            (folder / f"{i:03d}.json").write_text(json.dumps(row))
        else:
            lines.append(json.dumps({"file_name": name, **row}))
    if not sidecar:
        (folder / "metadata.jsonl").write_text("\n".join(lines))


def test_pairs_by_prompt_and_seed_and_reports_win_rates(tmp_path):
    prompts = ["a large red circle in the center", "a small blue square at the top left"]
    baseline = [(_scene_image(10 * i + s, False), p, s, None) for i, p in enumerate(prompts) for s in (1, 2)]
    # The method folder: a sweep of two strengths, shuffled order, plus one image with no baseline partner.
    vivid = [(_scene_image(10 * i + s, True), p, s, 2.0) for i, p in enumerate(prompts) for s in (2, 1)]
    washed = [(_scene_image(10 * i + s + 5, False), p, s, 1.0) for i, p in enumerate(prompts) for s in (1, 2)]
    unmatched = [(_scene_image(99, True), prompts[0], 99, 2.0)]
    _write_folder(tmp_path / "base", baseline)
    _write_folder(tmp_path / "method", vivid + washed + unmatched, sidecar=False)

    taste = evaluate.make_scorer("taste")
    scored_images = []

    def counting_taste(images, prompts):
        scored_images.extend(images)
        return taste(images, prompts)

    rows = evaluate.evaluate(tmp_path / "method", tmp_path / "base", {"taste": counting_taste})
    assert len(scored_images) == len(baseline) + len(vivid) + len(washed)  # each baseline image scored once
    by_strength = {row["strength"]: row for row in rows}
    assert all(row["method"] is None for row in rows)  # metadata.jsonl without "guidance"
    assert set(by_strength) == {1.0, 2.0}
    assert by_strength[2.0]["pairs"] == 4 and by_strength[2.0]["prompts"] == 2
    expected_base = reward.taste_rewards([b[0] for b in baseline], [b[1] for b in baseline]).mean()
    assert by_strength[2.0]["baseline_mean_score"] == pytest.approx(expected_base)
    assert by_strength[2.0]["mean_score"] == pytest.approx(reward.taste_rewards([v[0] for v in vivid], [v[1] for v in vivid]).mean())
    assert by_strength[2.0]["win_rate"] == 1.0  # vivid beats washed out on every (prompt, seed)
    assert by_strength[1.0]["mean_score"] < by_strength[2.0]["mean_score"]
    assert "| taste | - | 2 | 4 | 2 |" in evaluate.format_rows(rows)


def test_win_rate_counts_ties_as_half():
    assert evaluate.win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0]) == pytest.approx(2.5 / 4)


def test_bad_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        evaluate.read_image_folder(tmp_path / "missing")
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    with pytest.raises(ValueError, match="sidecar"):
        evaluate.read_image_folder(tmp_path / "a")
    _write_folder(tmp_path / "b", [(_scene_image(1, True), "p", 1, None)])
    _write_folder(tmp_path / "c", [(_scene_image(2, True), "q", 1, None)])
    with pytest.raises(ValueError, match="no \\(prompt, seed\\) pair"):
        evaluate.evaluate(tmp_path / "b", tmp_path / "c", {"taste": evaluate.make_scorer("taste")})


def test_paired_statistics_against_a_direct_computation():
    rng = np.random.default_rng(3)
    prompts = [f"p{i}" for i in range(7) for _ in range(3)]  # 7 prompts x 3 seeds
    base = rng.normal(size=21)
    method = base + rng.normal(0.3, 1.0, size=21)
    method[4] = base[4]  # a tie
    stats = evaluate.paired_statistics(method, base, prompts, samples=500, seed=5)
    wins = (method > base) + 0.5 * (method == base)
    assert stats["pairs"] == 21 and stats["prompts"] == 7
    assert stats["win_rate"] == pytest.approx(wins.mean())
    assert stats["win_rate_se"] == pytest.approx(wins.std(ddof=1) / np.sqrt(21))
    assert stats["mean_score_se"] == pytest.approx(method.std(ddof=1) / np.sqrt(21))
    assert stats["mean_difference"] == pytest.approx((method - base).mean())
    # The bootstrap by hand: resample whole prompts (their 3 seeds together), the same draws.
    draws = np.random.default_rng(5).integers(0, 7, size=(500, 7))
    by_prompt = wins.reshape(7, 3)
    boot = np.array([by_prompt[d].mean() for d in draws])
    np.testing.assert_allclose(stats["win_rate_ci"], np.percentile(boot, [2.5, 97.5]))
    low, high = stats["mean_difference_ci"]
    assert low < stats["mean_difference"] < high
    assert evaluate.paired_statistics(method, base, prompts, samples=500, seed=5) == stats  # reproducible


def _sweep_folder(folder, prompts, seeds, variants):
    """sample.py's layout: <method>_s<strength>_p<index>_seed<seed>.png + sidecar, several variants in one folder;
    every variant renders the same scene at a (prompt, seed), vivid or washed out."""
    folder.mkdir(parents=True, exist_ok=True)
    for method, strength, vivid in variants:
        for index, prompt in enumerate(prompts):
            for seed in seeds:
                stem = f"{method}_s{strength:g}_p{index:05d}_seed{seed}"
                Image.fromarray(_scene_image(100 * index + seed, vivid)).save(folder / f"{stem}.png")
                (folder / f"{stem}.json").write_text(json.dumps(
                    {"prompt": prompt, "seed": seed, "guidance": method, "strength": strength, "prompt_index": index}))
    (folder / "grids").mkdir(exist_ok=True)  # sample.py's sweep grid: not an image of the table
    Image.new("RGB", (8, 8)).save(folder / "grids" / "contrastive_sweep.png")


def test_one_folder_with_baseline_and_sweep_and_the_score_cache(tmp_path):
    prompts = ["a large red circle in the center", "a small blue square at the top left"]
    _sweep_folder(tmp_path / "s", prompts, (0, 1),
                  [("cfg", 0.0, False), ("contrastive", 1.0, False), ("contrastive", 2.0, True)])
    with pytest.raises(ValueError, match="several variants.*--baseline-method"):
        evaluate.evaluate(tmp_path / "s", tmp_path / "s", {"taste": evaluate.make_scorer("taste")})

    calls = []

    class CountingTaste(type(evaluate.make_scorer("taste"))):
        def __call__(self, images, prompts):
            calls.append(len(images))
            return super().__call__(images, prompts)

    rows = evaluate.evaluate(tmp_path / "s", tmp_path / "s", {"taste": CountingTaste()}, batch_size=5,
                             baseline_method="cfg")
    assert [(r["method"], r["strength"]) for r in rows] == [("contrastive", 1.0), ("contrastive", 2.0)]
    assert rows[1]["win_rate"] == 1.0 and rows[1]["pairs"] == 4 and rows[0]["baseline"] == "cfg at strength 0"
    assert sum(calls) == 12 and max(calls) == 5  # every image once, in batches of at most 5
    assert (tmp_path / "s" / "scores").is_dir()

    calls.clear()
    again = evaluate.evaluate(tmp_path / "s", tmp_path / "s", {"taste": CountingTaste()}, baseline_method="cfg")
    assert calls == [] and again == rows  # all from the cache

    # An image rewritten since it was scored is scored again, and only it.
    Image.fromarray(_scene_image(12345, False)).save(tmp_path / "s" / "contrastive_s2_p00000_seed0.png")
    rescored = evaluate.evaluate(tmp_path / "s", tmp_path / "s", {"taste": CountingTaste()}, baseline_method="cfg")
    assert calls == [1] and rescored[1]["mean_score"] != rows[1]["mean_score"]
    assert rescored[0] == rows[0]


def test_a_crashed_run_keeps_the_batches_it_finished(tmp_path):
    prompts = ["a large red circle in the center"]
    _sweep_folder(tmp_path / "m", prompts, range(4), [("contrastive", 1.0, True)])
    _sweep_folder(tmp_path / "b", prompts, range(4), [("cfg", 0.0, False)])
    taste = evaluate.make_scorer("taste")
    seen = []

    class Crashing(type(taste)):
        def __call__(self, images, prompts):
            if len(seen) == 2:
                raise RuntimeError("worker killed")
            seen.append(len(images))
            return super().__call__(images, prompts)

    with pytest.raises(RuntimeError, match="killed"):
        evaluate.evaluate(tmp_path / "m", tmp_path / "b", {"taste": Crashing()}, batch_size=3)
    seen.clear()
    rows = evaluate.evaluate(tmp_path / "m", tmp_path / "b", {"taste": Crashing()}, batch_size=3)
    assert seen == [2]  # 8 images: the two finished batches (6) came from the cache
    assert rows[0]["win_rate"] == 1.0


def test_report_files(tmp_path):
    prompts = ["a large red circle in the center", "a small blue square at the top left",
               "a large green triangle at the bottom right"]
    _sweep_folder(tmp_path / "s", prompts, (0, 1),
                  [("cfg", 0.0, False), ("contrastive", 1.0, False), ("contrastive", 2.0, True), ("pgd", 2.0, True)])
    rows = evaluate.evaluate(tmp_path / "s", tmp_path / "s", {"taste": evaluate.make_scorer("taste")},
                             baseline_method="cfg")
    paths = evaluate.write_report(rows, tmp_path / "report")
    assert json.loads(paths["json"].read_text()) == rows
    table = paths["markdown"].read_text()
    assert "| taste | contrastive | 2 | 6 | 3 |" in table and "[" in table and "±" in table
    plot = Image.open(paths["plot"])
    assert plot.size[0] >= 400 and np.asarray(plot.convert("L")).std() > 10
