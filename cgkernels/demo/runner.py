"""The demo's phases: base model -> preference pairs -> adapters -> guided sampling -> measurement -> diagnosis ->
report.

Every phase caches its product under OUT/cache keyed by everything that shapes it (its settings, the source files
that compute it, torch's version, the thread count and the CPU kernels torch dispatches to), so a second run only
redoes what changed.

Reproducible: every random draw is seeded from the pipeline seed, torch runs a fixed number of threads
(`DemoConfig.threads`, recorded in the report) with deterministic algorithms, so two runs with the same seed on one
machine write the same numbers. Another CPU may round differently; the report's verdicts need margins larger than
that spread (measured in docs/demo/README.md).

Strength selection: the prompts are split three ways by the seed: preference prompts (pairs and adapters),
validation prompts and evaluation prompts. Every (method, strength) is sampled on the validation prompts with the
validation seeds and compared with base CFG there, pair by pair; each method's "chosen" strength is the one whose
gain is largest in standard errors (`selection`; ties: the smaller strength). Only the chosen strength is then
sampled on the evaluation prompts with the evaluation seeds, as held-out evaluation does: what is not chosen is not
evaluated (the grid shows it on each evaluation prompt's first seed). Evaluation prompts and seeds are used for
nothing but the final measurement and the diagnosis.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from itertools import combinations
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from cgkernels.demo import report, reward, selection, world
from cgkernels.demo.base_model import BaseModelConfig, cached_base_model, determinism, load_pipeline
from cgkernels.demo.diagnosis import correction_parts, cpgd_parts, part_alone_rewards
from cgkernels.demo.sampler import sample_images
from cgkernels.evaluate import win_rate
from cgkernels.train.config import SFT_OBJECTIVES

# method -> (cgkernels.patch guidance mode, positive adapter, negative adapter)
METHODS = {
    "pgd": ("pgd", "dpo", None),
    "contrastive": ("contrastive", "sft_pos", "sft_neg"),
    "contrastive-cond": ("contrastive-cond", "sft_pos", "sft_neg"),
    "contrastive-uncond": ("contrastive-uncond", "sft_pos", "sft_neg"),
    "npo": ("npo", None, "npo"),
    "merged": ("merged", "sft_pos", "sft_neg"),
}
BASE_METHOD = "base-cfg"


@dataclass(frozen=True)
class DemoConfig:
    out: str = "outputs/demo"
    seed: int = 0
    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    sample_steps: int = 15
    guidance_scale: float = 4.0
    n_eval_prompts: int = 8
    n_val_prompts: int = 8  # strength selection; disjoint from the evaluation and the preference prompts
    n_pair_prompts: int | None = None  # preference prompts used (None: all the rest of the world)
    samples_per_prompt: int = 12  # base samples per preference prompt
    pair_renders: int = 4  # renders of the world per preference prompt, ranked with the model's samples
    # DPO's and NPO's pairs. 0: every two images of a prompt make a pair; n > 0: the annotator's n best against
    # its n worst of each prompt.
    pair_extremes: int = 3
    # SFT's images, chosen the same way: sft_pos imitates each prompt's annotator-best n, sft_neg its worst n. A
    # tighter set than DPO's, measured on validation: SFT on the best 2 of 16 beat the best 3 (+0.280 vs +0.205),
    # while DPO on 2 x 2 pairs lost half its gain (+0.133 vs +0.269 on 3 x 3): it learns from the contrasts.
    sft_extremes: int = 2
    pair_steps: int = 8  # DDIM steps for the preference samples (fewer than for evaluation: labels are relative)
    bt_temperature: float = 0.1
    adapter_rank: int = 8
    # The attention projections, and the ResNet blocks' convolutions and timestep projections: with attention alone
    # (the UNet attends only at its coarsest, 4x4 resolution) the adapters barely moved the background's tint.
    adapter_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "time_emb_proj", "conv1", "conv2")
    adapter_steps: int = 600
    adapter_batch: int = 8
    adapter_lr: float = 1e-3  # 3e-3 harms even on clean data (the null test)
    # Decay to zero: at a constant rate the last steps' gradient noise stays in the weights, and cPGD guides with
    # the *difference* of two adapters, where that noise does not cancel.
    adapter_lr_schedule: str = "cosine"
    adapter_warmup_steps: int = 30
    # Training runs (sft, dpo+npo, the null test) and sampling runs side by side in this many processes of
    # `worker_threads` threads each: one step of these small models cannot use two threads, two processes use two
    # cores. A run uses `worker_threads` threads wherever it runs, so where it ran changes no number.
    workers: int = 2
    worker_threads: int = 1
    sft_prompt_dropout: float = 0.2  # share of SFT steps on the empty prompt (trains the adapter's uncond branch)
    # Diffusion-DPO's beta (dpo and npo): SD's 5000 held these adapters so close to the base model that neither
    # moved the reward alone.
    dpo_beta: float = 1000.0
    # 8 evaluation prompts x 16 seeds. With 8 seeds a rung of the ladder that gains +0.15 (sft_pos's mean over 12
    # seeds) sits at about 3 s.e. (pair spread about 0.4), so the 3-s.e. verdict was a coin toss; 128 pairs cut the
    # standard errors by 1.4x, at about 80 CPU-seconds of sampling (40 s on two cores).
    eval_seeds: tuple[int, ...] = tuple(range(1000, 1016))
    # 8 validation prompts x 8 seeds (64 pairs): with 4 seeds two methods tied within one s.e. on validation (seed
    # 0: +0.215 vs +0.205) and the pick split them on evaluation (win 0.67 vs 0.80). Every strength is sampled
    # here, so doubling these seeds would cost about twice what doubling the evaluation seeds did.
    val_seeds: tuple[int, ...] = tuple(range(2000, 2008))
    pair_seed_offset: int = 10_000  # preference samples use seeds from here on: never an evaluation/validation seed
    # Validation chose the lowest strength of the grid (0.5, 1, 2, 4) in 11 of 24 (method, seed) choices and 4 in
    # none: the grid moved down one step. On (0.25, 0.5, 1, 2) it chose 2 in none of 30 (seeds 0-3 and the
    # default-kernel run): 2 went, saving a fifth of the sampling.
    strengths: tuple[float, ...] = (0.25, 0.5, 1.0)
    methods: tuple[str, ...] = tuple(METHODS)
    sample_batch: int = 64
    diagnosis_timesteps: tuple[int, ...] = (800, 500, 200)
    # torch threads, fixed so that the numbers do not depend on the machine's core count or load (reductions split
    # over threads may round differently). python/demo.py sets OMP_WAIT_POLICY=PASSIVE, without which two threads
    # on a busy CPU run many times slower than one.
    threads: int = 2
    null_test: bool = True  # SFT on fresh renders of the world, sampled alone: must not move the reward

    def __post_init__(self):
        ranked = self.samples_per_prompt + self.pair_renders
        for name in ("pair_extremes", "sft_extremes"):
            if not 0 <= 2 * getattr(self, name) <= ranked:
                raise ValueError(f"{name} must be in [0, (samples_per_prompt + pair_renders) / 2] = [0, {ranked // 2}],"
                                 f" got {getattr(self, name)}")

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        """A smoke run of every phase in about a minute on two CPU cores."""
        base = BaseModelConfig(resolution=16, unet_channels=(16, 32), text_width=32, text_layers=1,
                               n_train_images=600, steps=40, batch_size=16, lr=2e-3, warmup_steps=5)
        settings = dict(base=base, sample_steps=3, n_eval_prompts=2, n_val_prompts=2, n_pair_prompts=4,
                        samples_per_prompt=3, pair_renders=1, pair_extremes=2, sft_extremes=1, pair_steps=2, adapter_rank=2,
                        adapter_steps=2, adapter_batch=2,
                        adapter_warmup_steps=0,
                        eval_seeds=(1000, 1001), val_seeds=(2000, 2001), strengths=(0.5, 1.0),
                        diagnosis_timesteps=(500,))
        settings.update(overrides)
        return cls(**settings)

    def key(self, *fields: str, sources: tuple[str, ...] = ()) -> str:
        """Cache key: the named settings, the base model, the numerics and the source files that compute it."""
        blob = json.dumps({name: _jsonable(getattr(self, name)) for name in fields}, sort_keys=True)
        blob += self.base.key() + numerics_fingerprint(self.threads) + source_fingerprint(*sources)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def numerics_fingerprint(threads: int) -> str:
    """What decides the rounding of the same computation: torch's version, the thread count, the CPU kernels."""
    return f"torch={torch.__version__};threads={threads};cpu={torch.backends.cpu.get_cpu_capability()}"


def source_fingerprint(*relative_paths: str) -> str:
    """Hash of source files (paths relative to the cgkernels package; a folder means its *.py files)."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for relative in relative_paths:
        path = package / relative
        for file in sorted(path.glob("*.py")) if path.is_dir() else [path]:
            digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class PromptSplit:
    preference: list[str]
    validation: list[str]
    evaluation: list[str]


def split_prompts(config: DemoConfig) -> PromptSplit:
    rest, evaluation = world.split_prompts(config.seed, config.n_eval_prompts)
    validation, preference = rest[: config.n_val_prompts], rest[config.n_val_prompts:]
    if config.n_pair_prompts is not None:
        preference = preference[: config.n_pair_prompts]
    return PromptSplit(preference, validation, evaluation)


def _jsonable(value):
    return asdict(value) if hasattr(value, "__dataclass_fields__") else value


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def run_demo(config: DemoConfig, progress: bool = True) -> dict:
    if pick_device().type != "cpu":  # the base model's data parallelism is a CPU path: one process drives a GPU
        config = replace(config, base=replace(config.base, train_processes=1))
    with determinism(config.threads):
        return _run_demo(config, progress)


def _run_demo(config: DemoConfig, progress: bool) -> dict:
    started = time.perf_counter()
    out = Path(config.out)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    device = pick_device()
    timings: dict[str, float] = {}
    # CPU seconds of this process and of its finished worker processes: what the phase costs without contention
    cpu_timings: dict[str, float] = {}

    def timed(name, fn, *args):
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        result = fn(*args)
        timings[name] = round(time.perf_counter() - start, 1)
        cpu_timings[name] = round(_cpu_seconds() - cpu_start, 1)
        return result

    model_dir, cached = timed("base model", cached_base_model, config.base, cache, device, progress,
                              numerics_fingerprint(config.threads))
    split = split_prompts(config)
    pairs = timed("preference pairs", build_preference_pairs, config, model_dir, split.preference, cache, device,
                  progress)
    renders = render_pairs(config, split.preference, cache) if config.null_test else None
    adapters, samples, ladder_samples = timed("adapters and sampling", train_and_sample, config, model_dir,
                                              training_runs(pairs, renders), cache, split, device, progress)
    results = timed("measurement", measure, config, samples, split)
    ladder = measure_ladder(config, samples[0], ladder_samples, split)
    pipe = load_pipeline_with_adapters(model_dir, device, adapters)
    diagnosis = timed("diagnosis", diagnose, config, pipe, samples, results, split)
    outputs = report.write_report(out, config, results, diagnosis, samples, split, timings, cpu_timings, device,
                                  base_cached=cached, total_seconds=time.perf_counter() - started,
                                  preference_stats=preference_statistics(pairs.dpo),
                                  sft_stats=preference_statistics(pairs.sft), ladder=ladder)
    return {"results": results, "adapters": ladder, "diagnosis": diagnosis, "timings": timings, "files": outputs}


# Labels come from the taste and images from the sampler: editing either invalidates cached pairs (and, through the
# file name, the adapters trained on them).
PAIR_SOURCES = ("demo/reward.py", "demo/sampler.py")
# The trainer runs the LoRA layers and the multi-LoRA op (their forward and backward decide the rounding, hence the
# adapters): editing any of them retrains.
ADAPTER_SOURCES = ("train", "lora_layers.py", "ops")


@dataclass(frozen=True)
class PreferenceFiles:
    dpo: Path  # DPO's and NPO's pairs (`pair_extremes`)
    sft: Path  # the pairs whose winners sft_pos imitates and whose losers sft_neg does (`sft_extremes`)


def build_preference_pairs(config: DemoConfig, model_dir: Path, prompts: list[str], cache: Path,
                           device: torch.device, progress: bool) -> PreferenceFiles:
    """`samples_per_prompt` base samples per prompt (pair_steps DDIM steps) and `pair_renders` renders of the
    world, every two of one prompt compared by the taste with Bradley-Terry noise (as Pick-a-Pic shows annotators
    several images per prompt), then cut to the annotator's extremes for DPO and for SFT (one sampling pass)."""
    fields = ("seed", "pair_steps", "guidance_scale", "n_eval_prompts", "n_val_prompts", "n_pair_prompts",
              "samples_per_prompt", "bt_temperature", "pair_seed_offset", "pair_renders")
    key = config.key(*fields, sources=PAIR_SOURCES + ('demo/world.py',))
    files = PreferenceFiles(*(cache / f"pairs-{key}-extremes{n}.parquet"
                              for n in (config.pair_extremes, config.sft_extremes)))
    if files.dpo.exists() and files.sft.exists():
        return files
    pipe = load_pipeline(model_dir, device)
    k, n = config.samples_per_prompt, config.samples_per_prompt + config.pair_renders
    captions = [p for p in prompts for _ in range(k)]
    seeds = [config.pair_seed_offset + i for i in range(len(captions))]
    with tqdm(total=len(captions), desc="preference samples", disable=not progress) as bar:
        samples = sample_images(pipe, captions, seeds, replace(config, sample_batch=4 * config.sample_batch),
                                steps=config.pair_steps, progress_bar=bar)
    # Pick-a-Pic's images come from several generators: next to the model's own samples each prompt gets
    # `pair_renders` renders of the world (a generator without the model's flaws, with the world's spread of tints).
    renders = render_images(prompts, config.pair_renders, np.random.default_rng([config.seed, 2]), config)
    images = np.concatenate([samples.reshape(len(prompts), k, *samples.shape[1:]),
                             renders.reshape(len(prompts), config.pair_renders, *samples.shape[1:])], axis=1)
    images = images.reshape(-1, *samples.shape[1:])
    captions = [p for p in prompts for _ in range(n)]
    rewards = reward.taste_rewards(images, captions)
    first, second = _all_pairs(len(prompts), n)
    labels_0 = reward.bradley_terry_labels(rewards[first], rewards[second], config.bt_temperature, config.seed)
    for path, extremes in ((files.dpo, config.pair_extremes), (files.sft, config.sft_extremes)):
        _write_pairs(path, captions, images, first, second, labels_0, len(prompts), n, extremes)
    return files


def _write_pairs(path: Path, captions: list[str], images: np.ndarray, first: np.ndarray, second: np.ndarray,
                 labels_0: np.ndarray, n_prompts: int, k: int, extremes: int) -> Path:
    """Pick-a-Pic parquet of the labelled pairs (images prompt-major, k per prompt), cut to the annotator's
    `extremes` best against its `extremes` worst of each prompt (0: every pair)."""
    if extremes:
        first, second, labels_0 = extreme_pairs(first, second, labels_0, n_prompts, k, extremes)
    return reward.write_pickapic_parquet(path, [captions[i] for i in first], images[first], images[second], labels_0)


def extreme_pairs(first: np.ndarray, second: np.ndarray, labels_0: np.ndarray, n_prompts: int, k: int,
                  extremes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best-of-k against worst-of-k, as the annotator ranks them: each image's score is the number of its pairs the
    (noisy) annotator gave it; per prompt the `extremes` highest-scored images are paired with the `extremes`
    lowest (ties: the lower index), the higher-scored one preferred. The taste itself is never consulted here."""
    if not 0 < 2 * extremes <= k:
        raise ValueError(f"extremes must be in [1, k / 2] for k = {k} images per prompt, got {extremes}")
    wins = np.zeros(n_prompts * k)
    np.add.at(wins, first, labels_0)
    np.add.at(wins, second, 1.0 - labels_0)
    pairs = []
    for prompt in range(n_prompts):
        ranked = prompt * k + np.argsort(-wins[prompt * k:(prompt + 1) * k], kind="stable")
        pairs += [(best, worst) for best in ranked[:extremes] for worst in ranked[-extremes:]]
    best, worst = map(np.asarray, zip(*pairs))
    return best, worst, np.ones(len(best))


def render_pairs(config: DemoConfig, prompts: list[str], cache: Path) -> Path:
    """The null test's data: fresh renders of the world (the base model's own training distribution, none of its
    samples) for the preference prompts, as many per prompt as the preference data ranks, cut like SFT's pairs,
    with coin-flip labels."""
    fields = ("seed", "n_eval_prompts", "n_val_prompts", "n_pair_prompts", "samples_per_prompt", "pair_renders",
              "sft_extremes")
    path = cache / f"renders-{config.key(*fields, sources=('demo/world.py',))}.parquet"
    if path.exists():
        return path
    rng = np.random.default_rng([config.seed, 1])  # not the base model's training draw (that is rng(seed))
    k = config.samples_per_prompt + config.pair_renders
    captions = [p for p in prompts for _ in range(k)]
    images = render_images(prompts, k, rng, config)
    first, second = _all_pairs(len(prompts), k)
    labels_0 = rng.integers(0, 2, len(first)).astype(np.float64)
    return _write_pairs(path, captions, images, first, second, labels_0, len(prompts), k, config.sft_extremes)


def render_images(prompts: list[str], per_prompt: int, rng: np.random.Generator, config: DemoConfig) -> np.ndarray:
    """uint8 [len(prompts) * per_prompt, H, W, 3]: fresh renders of the world, prompt-major."""
    scenes = {scene.caption: scene for scene in world.all_scenes()}
    images = [np.round(world.render(scenes[p], rng, config.base.resolution) * 255).astype(np.uint8)
              for p in prompts for _ in range(per_prompt)]
    side = config.base.resolution
    return np.stack(images) if images else np.zeros((0, side, side, 3), np.uint8)


def _all_pairs(n_prompts: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of every two of the k images of each prompt (images prompt-major)."""
    first, second = zip(*[(p * k + i, p * k + j) for p in range(n_prompts) for i, j in combinations(range(k), 2)])
    return np.asarray(first), np.asarray(second)


def preference_statistics(parquet: Path) -> dict:
    """How well the labels follow the taste, and how much the winners beat the losers on each of its parts."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    table = pq.read_table(parquet).to_pydict()
    winners, losers = [], []
    for caption, a, b, label in zip(table["caption"], table["jpg_0"], table["jpg_1"], table["label_0"]):
        terms = [reward.taste_terms(np.asarray(Image.open(io.BytesIO(x)).convert("RGB")), caption) for x in (a, b)]
        win, lose = (terms[0], terms[1]) if label == 1.0 else (terms[1], terms[0])
        winners.append(win)
        losers.append(lose)

    def mean(rows, fn):
        return float(np.mean([fn(t) for t in rows]))

    total = reward.reward_from_terms
    stats = {"pairs": len(winners), "labels_agree_with_reward": mean(
        range(len(winners)), lambda i: float(total(winners[i]) >= total(losers[i])))}
    for name, fn in (("reward", total), ("aesthetics", reward.aesthetics), ("alignment", reward.alignment),
                     ("position", lambda t: t["position"]), ("tint", lambda t: t["tint"])):
        stats[f"winner_{name}"], stats[f"loser_{name}"] = mean(winners, fn), mean(losers, fn)
    return stats


ADAPTER_FIELDS = ("adapter_rank", "adapter_modules", "adapter_steps", "adapter_batch", "adapter_lr",
                  "adapter_lr_schedule", "adapter_warmup_steps", "sft_prompt_dropout", "dpo_beta", "worker_threads")


# objective -> {adapter name: side the trainer writes}
METHOD_RUNS = {"sft": {"sft_pos": "pos", "sft_neg": "neg"}, "dpo+npo": {"dpo": "pos", "npo": "neg"}}
# The null test samples only the positive adapter: sft-pos trains it alone, at half the cost of both.
NULL_TEST_RUNS = {"sft-pos": {"null_sft": "pos"}}
# The ladder: each adapter alone with plain CFG -> (what it was trained on, the sign its gain must have)
LADDER = {
    "sft_pos": ("sft on the preferred images", +1),
    "sft_neg": ("sft on the dispreferred images", -1),
    "dpo": ("dpo", +1),
    "npo": ("npo (dpo with winner and loser swapped)", -1),
    "null_sft": ("null test: sft on fresh renders of the world", 0),
}


def training_runs(pairs: PreferenceFiles, renders: Path | None) -> dict[Path, dict[str, dict[str, str]]]:
    """{pair file: {objective: {adapter name: side}}}: DPO + NPO on the DPO pairs, SFT on the SFT pairs (the same
    file when both cut the same extremes), the null test on the renders (None: no null test)."""
    runs = {pairs.dpo: {"dpo+npo": METHOD_RUNS["dpo+npo"]}}
    runs.setdefault(pairs.sft, {})["sft"] = METHOD_RUNS["sft"]
    if renders is not None:
        runs[renders] = NULL_TEST_RUNS
    return runs


@dataclass(frozen=True)
class Task:
    """One call `function(job)` for a worker process: it may start once every product in `needs` (an adapter, or
    base CFG's validation rewards) that some task `provides` exists."""
    function: Callable
    job: object
    needs: frozenset[str] = frozenset()
    provides: frozenset[str] = frozenset()


def train_and_sample(config: DemoConfig, model_dir: Path, training_data: dict[Path, dict[str, dict[str, str]]],
                     cache: Path, split: PromptSplit, device: torch.device, progress: bool):
    """Trains the adapters not cached yet and samples base CFG, every method at every strength and each adapter
    alone, in one pool of worker processes (on CUDA: in this process): a sampling task starts as soon as the
    adapters it uses exist, so the cPGD forms sample while the DPO/NPO run still trains. Returns (adapters: {name:
    folder}, base CFG and the methods' samples, the ladder's samples)."""
    adapters, training = training_tasks(config, model_dir, training_data, cache)
    if device.type != "cpu":
        config = replace(config, workers=1)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix="run-") as scratch:
        sampling = sampling_tasks(config, model_dir, adapters, split, Path(scratch))
        with tqdm(total=len(training) + len(sampling), desc="training runs and sampling tasks",
                  disable=not progress) as bar:
            results = run_tasks(training + sampling, config, bar)
    samples = [sample for result in results[len(training):] for sample in result]
    n_methods = 1 + len(config.methods) * len(config.strengths)
    return adapters, samples[:n_methods], samples[n_methods:]


def training_tasks(config: DemoConfig, model_dir: Path, training_data: dict[Path, dict[str, dict[str, str]]],
                   cache: Path) -> tuple[dict[str, Path], list[Task]]:
    """Every training run of every pair file ({parquet: {objective: {adapter name: side}}}, e.g. sft -> sft_pos /
    sft_neg for cPGD, dpo+npo in one pass -> dpo / npo): ({adapter name: its folder}, a task per run not cached
    yet, the longest first)."""
    from cgkernels.train import TrainConfig

    adapters, tasks = {}, []
    for parquet, runs in training_data.items():
        folder = cache / f"adapters-{parquet.stem}-{config.key(*ADAPTER_FIELDS, sources=ADAPTER_SOURCES)}"
        for objective, names in runs.items():
            run_dir = folder / objective.replace("+", "_")
            if not all((run_dir / side / "pytorch_lora_weights.safetensors").exists() for side in names.values()):
                tasks.append(Task(_train_run, TrainConfig(
                    model=str(model_dir), dataset=str(parquet), dataset_format="pickapic", objective=objective,
                    output_dir=str(run_dir), rank=config.adapter_rank, target_modules=config.adapter_modules,
                    lr=config.adapter_lr, batch_size=config.adapter_batch, max_steps=config.adapter_steps,
                    resolution=config.base.resolution, lr_scheduler=config.adapter_lr_schedule,
                    lr_warmup_steps=config.adapter_warmup_steps,
                    empty_prompt_prob=config.sft_prompt_dropout if objective in SFT_OBJECTIVES else 0.0,
                    beta=config.dpo_beta,
                    random_flip=False,  # a flip would turn "left" into "right"
                    seed=config.seed, checkpoint_every=0, progress=False,
                ), provides=frozenset(names)))
            adapters.update({name: run_dir / side for name, side in names.items()})
    # The preference runs (two adapters, a reference pass) take longest: start them first.
    tasks.sort(key=lambda task: task.job.objective in SFT_OBJECTIVES)
    return adapters, tasks


def run_tasks(tasks: list[Task], config: DemoConfig, bar) -> list:
    """[task.function(task.job) for task in tasks], each call with `config.worker_threads` torch threads, in
    `config.workers` spawned processes (or in this one, in list order: its thread settings are restored). A task
    is queued, in list order, once the tasks that provide what it needs have finished; `bar` counts finished
    tasks. Results come back in task order."""
    provided = frozenset().union(*(task.provides for task in tasks))
    waits_for = [task.needs & provided for task in tasks]  # what is not provided here exists already
    results, done, queued = [None] * len(tasks), set(), set()
    if config.workers <= 1 or len(tasks) <= 1:
        for i, task in enumerate(tasks):
            if not waits_for[i] <= done:
                raise ValueError(f"task {i} needs {sorted(waits_for[i] - done)}, which no earlier task provides")
            results[i] = _with_threads(task.function, task.job, config.worker_threads)
            done |= task.provides
            bar.update()
        return results
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    # spawn: a fork of a process that has run torch's thread pools can hang.
    with ProcessPoolExecutor(min(config.workers, len(tasks)), mp_context=multiprocessing.get_context("spawn")) as pool:
        running = {}
        while True:
            for i, task in enumerate(tasks):
                if i not in queued and waits_for[i] <= done:
                    running[pool.submit(_with_threads, task.function, task.job, config.worker_threads)] = i
                    queued.add(i)
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                i = running.pop(future)
                results[i] = future.result()
                done |= tasks[i].provides
                bar.update()
    if len(queued) < len(tasks):
        raise ValueError(f"tasks {sorted(set(range(len(tasks))) - queued)} need adapters no task provides")
    return results


def _with_threads(function, job, threads: int):
    with determinism(threads):
        return function(job)


def _train_run(train_config) -> None:
    """One training run; a half-written run folder from an interrupted run is replaced."""
    from cgkernels.train import train

    shutil.rmtree(train_config.output_dir, ignore_errors=True)
    train(train_config)


def _cpu_seconds() -> float:
    """CPU seconds of this process plus those of its finished (joined) child processes."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


@dataclass
class MethodSamples:
    method: str
    strength: float | None
    validation: np.ndarray | None  # [validation prompts * validation seeds, H, W, 3] uint8, prompt-major
    # [evaluation prompts * evaluation seeds, H, W, 3]: base CFG, each method's chosen strength, the ladder
    evaluation: np.ndarray | None
    preview: np.ndarray | None  # [evaluation prompts, H, W, 3]: each evaluation prompt at its first seed (grid)
    seconds_per_image: float
    chosen: bool = False  # the method's strength chosen on validation
    # published cPGD at its chosen strength: {"cond" / "uncond": that part of its correction alone on the
    # evaluation grid} (the diagnosis; diagnosis.cpgd_parts); None for every other sample
    parts: dict[str, np.ndarray] | None = None


def _prompt_seed_grid(prompts: list[str], seeds) -> tuple[list[str], list[int]]:
    return [p for p in prompts for _ in seeds], [int(s) for _ in prompts for s in seeds]


@dataclass(frozen=True)
class SamplingJob:
    """Runs of one worker task. `runs` are (method, strength) pairs: BASE_METHOD (plain pipeline, sampled on the
    validation and the evaluation grid) or one METHODS key at every strength (each on the validation grid, then
    the strength chosen there on the evaluation grid); with `adapters_alone` they are (adapter name, None): that
    adapter alone, scale 1, with plain CFG on the evaluation grid (the ladder). `base_validation`: where base CFG's
    job writes its validation rewards and a method's job reads them, to choose its strength."""
    config: DemoConfig
    model_dir: Path
    adapters: dict[str, Path]
    split: PromptSplit
    runs: tuple[tuple[str, float | None], ...]
    adapters_alone: bool = False
    base_validation: Path | None = None


def sampling_tasks(config: DemoConfig, model_dir: Path, adapters: dict[str, Path], split: PromptSplit,
                   scratch: Path) -> list[Task]:
    """Base CFG and every method at every strength (the comparison), then each adapter alone (the ladder): one
    task per method (its strengths) and per adapter, each loading only the adapters it uses. A method's task also
    waits for base CFG's, whose validation rewards (in `scratch`) it chooses its strength against."""
    method_runs = [((BASE_METHOD, None),)] + [tuple((m, s) for s in config.strengths) for m in config.methods]
    ladder_runs = [((name, None),) for name in LADDER if name in adapters]
    base_validation = scratch / "base-cfg-validation-rewards.npy"
    tasks = []
    for i, runs in enumerate(method_runs + ladder_runs):
        method, alone = runs[0][0], i >= len(method_runs)  # "npo" names both a method and an adapter
        uses = {method} if alone else {name for name in METHODS.get(method, ())[1:] if name is not None}
        job = SamplingJob(config, model_dir, {name: adapters[name] for name in sorted(uses)}, split, runs, alone,
                          None if alone else base_validation)
        if alone:
            tasks.append(Task(_sample_job, job, needs=frozenset(uses)))
        elif method == BASE_METHOD:
            tasks.append(Task(_sample_job, job, provides=frozenset({BASE_METHOD})))
        else:
            tasks.append(Task(_sample_job, job, needs=frozenset(uses | {BASE_METHOD})))
    return tasks


def _sample_job(job: SamplingJob) -> list[MethodSamples]:
    config, split = job.config, job.split
    val_prompts, val_seeds = _prompt_seed_grid(split.validation, config.val_seeds)
    eval_prompts, eval_seeds = _prompt_seed_grid(split.evaluation, config.eval_seeds)
    base_only = all(method == BASE_METHOD for method, _ in job.runs)  # base CFG runs on the plain pipeline
    pipe = load_pipeline_with_adapters(job.model_dir, pick_device(), job.adapters)

    def sample(method, strength, prompts, seeds):
        start = time.perf_counter()
        with _configured(pipe, method, strength, job.adapters_alone):
            images = sample_images(pipe, prompts, seeds, config)
        return images, time.perf_counter() - start

    n_seeds = len(config.eval_seeds)
    first_seed = [config.eval_seeds[0]] * len(split.evaluation)
    if job.adapters_alone or base_only:  # one run, measured on the evaluation grid (base CFG: on validation too)
        (method, strength), = job.runs
        validation = None if job.adapters_alone else sample(method, strength, val_prompts, val_seeds)[0]
        if base_only:
            np.save(job.base_validation, reward.taste_rewards(validation, val_prompts))
        evaluation, seconds = sample(method, strength, eval_prompts, eval_seeds)
        return [MethodSamples(method, strength, validation, evaluation, evaluation[::n_seeds],
                              seconds / len(evaluation))]
    # One method at every strength on validation; the strength chosen there on the evaluation grid, the others on
    # each evaluation prompt's first seed (the grid).
    samples = []
    for method, strength in job.runs:
        images, seconds = sample(method, strength, val_prompts, val_seeds)
        samples.append(MethodSamples(method, strength, images, None, None, seconds / len(images)))
    base_validation = np.load(job.base_validation)
    scores = [validation_score(reward.taste_rewards(s.validation, val_prompts), base_validation, s.strength)
              for s in samples]
    best = samples[selection.choose(scores)]
    for s in samples:
        if s is best:
            s.evaluation, _ = sample(s.method, s.strength, eval_prompts, eval_seeds)
            s.preview, s.chosen = s.evaluation[::n_seeds], True
        else:
            s.preview, _ = sample(s.method, s.strength, split.evaluation, first_seed)
    # The diagnosis' cPGD parts alone, sampled here (beside the other tasks in the pool), not after the pool. Each
    # part's mode is a method of its own on cPGD's adapters (contrastive-cond / -uncond), which this job loaded.
    if best.method == "contrastive":
        best.parts = {part: sample(mode, strength, eval_prompts, eval_seeds)[0]
                      for part, mode, strength in cpgd_parts(best.strength, config.guidance_scale)}
    return samples


def validation_score(rewards: np.ndarray, base_rewards: np.ndarray, strength: float) -> selection.ValidationScore:
    stats = paired_statistics(rewards, base_rewards)
    return selection.ValidationScore(stats["mean_gain"], stats["gain_sem"], strength)


def load_pipeline_with_adapters(model_dir: Path, device: torch.device, adapters: dict[str, Path]):
    """The base pipeline with every adapter loaded under its name (unpatched, none active until set)."""
    pipe = load_pipeline(model_dir, device)
    for name, path in adapters.items():
        pipe.load_lora_weights(str(path), adapter_name=name)
    return pipe


@contextlib.contextmanager
def _configured(pipe, method: str, strength: float | None, adapter_alone: bool):
    if adapter_alone:
        pipe.set_adapters([method], [1.0])
        yield
    elif method == BASE_METHOD:
        yield
    else:
        with patched(pipe, method, strength):
            yield


def measure_ladder(config: DemoConfig, base: MethodSamples, ladder: list[MethodSamples], split: PromptSplit) -> list[dict]:
    """One row per adapter alone: evaluation gain, its s.e. and win rate vs base CFG, and whether it moved the way
    it must (positive adapters up, negative down, the null test neither) by > 3 s.e."""
    eval_prompts, _ = _prompt_seed_grid(split.evaluation, config.eval_seeds)
    base_eval = reward.taste_rewards(base.evaluation, eval_prompts)
    rows = []
    for sample in ladder:
        objective, expected_sign = LADDER[sample.method]
        stats = paired_statistics(reward.taste_rewards(sample.evaluation, eval_prompts), base_eval)
        rows.append({
            "adapter": sample.method, "objective": objective, "expected_sign": expected_sign,
            "mean_gain": stats["mean_gain"], "gain_sem": stats["gain_sem"], "win_rate": stats["win_rate"],
            "as_expected": ladder_as_expected(stats["mean_gain"], stats["gain_sem"], expected_sign),
            "diversity": diversity(sample.evaluation, len(config.eval_seeds)),
        })
    return rows


LADDER_MARGIN = 3.0  # standard errors


def ladder_as_expected(gain: float, sem: float, expected_sign: int) -> bool:
    """+1: gain above zero by > 3 s.e.; -1: below by > 3 s.e.; 0 (null test): within 3 s.e. of zero."""
    if expected_sign == 0:
        return abs(gain) <= LADDER_MARGIN * sem
    return expected_sign * gain > LADDER_MARGIN * sem


@contextlib.contextmanager
def patched(pipe, method: str, strength: float):
    """cgkernels.patch with a demo method's guidance mode and adapters."""
    import cgkernels

    mode, positive, negative = METHODS[method]
    cgkernels.patch(pipe, guidance=mode, positive=positive, negative=negative, strength=strength)
    try:
        yield pipe
    finally:
        cgkernels.unpatch(pipe)


def paired_statistics(rewards: np.ndarray, base_rewards: np.ndarray) -> dict[str, float]:
    return {
        "mean_reward": float(rewards.mean()),
        "reward_sem": standard_error(rewards),
        "mean_gain": float((rewards - base_rewards).mean()),
        "gain_sem": paired_sem(rewards, base_rewards),
        "win_rate": win_rate(rewards, base_rewards),
    }


EVALUATION_FIELDS = ("mean_reward", "reward_sem", "mean_gain", "gain_sem", "win_rate", "mean_alignment",
                     "mean_aesthetics", "diversity")


def measure(config: DemoConfig, samples: list[MethodSamples], split: PromptSplit) -> list[dict]:
    """One row per (method, strength): the validation gain, its s.e. and win rate against base CFG on the same
    prompt and seed; "chosen" on the strength chosen on validation (see the module docstring); for base CFG and the
    chosen strengths the evaluation mean reward, paired gain and win rate, alignment, aesthetics and diversity
    (None where not evaluated); seconds per image. Gains' standard errors are over (prompt, seed) pairs."""
    val_prompts, _ = _prompt_seed_grid(split.validation, config.val_seeds)
    eval_prompts, _ = _prompt_seed_grid(split.evaluation, config.eval_seeds)
    base_val = reward.taste_rewards(samples[0].validation, val_prompts)
    base_eval = reward.taste_rewards(samples[0].evaluation, eval_prompts)
    rows = []
    for sample in samples:
        val = paired_statistics(reward.taste_rewards(sample.validation, val_prompts), base_val)
        row = {"method": sample.method, "strength": sample.strength, **dict.fromkeys(EVALUATION_FIELDS)}
        if sample.evaluation is not None:
            terms = [reward.taste_terms(image, prompt) for image, prompt in zip(sample.evaluation, eval_prompts)]
            row.update(paired_statistics(reward.taste_rewards(sample.evaluation, eval_prompts), base_eval),
                       mean_alignment=float(np.mean([reward.alignment(t) for t in terms])),
                       mean_aesthetics=float(np.mean([reward.aesthetics(t) for t in terms])),
                       diversity=diversity(sample.evaluation, len(config.eval_seeds)))
        row.update(val_mean_gain=val["mean_gain"], val_gain_sem=val["gain_sem"], val_win_rate=val["win_rate"],
                   seconds_per_image=sample.seconds_per_image, chosen=sample.chosen)
        rows.append(row)
    return rows


def standard_error(values: np.ndarray) -> float:
    values = np.asarray(values, float)
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


def paired_sem(scores: np.ndarray, baseline: np.ndarray) -> float:
    return standard_error(np.asarray(scores, float) - np.asarray(baseline, float))


def diversity(images: np.ndarray, n_seeds: int) -> float:
    """Mean RMS pixel distance (in [0, 1] units) between samples of one prompt with different seeds."""
    per_prompt = images.astype(np.float32).reshape(-1, n_seeds, *images.shape[1:]) / 255.0
    flat = per_prompt.reshape(per_prompt.shape[0], n_seeds, -1)
    distances = []
    for i in range(n_seeds):
        for j in range(i + 1, n_seeds):
            distances.append(np.sqrt(((flat[:, i] - flat[:, j]) ** 2).mean(axis=-1)))
    return float(np.mean(distances)) if distances else 0.0


def diagnose(config: DemoConfig, pipe, samples: list[MethodSamples], results: list[dict], split: PromptSplit) -> list[dict]:
    """Each method's correction to base CFG at its chosen strength, split into its cond and uncond parts; for
    published cPGD also each part alone (sampled in its sampling task), measured against base CFG."""
    chosen = {row["method"]: row["strength"] for row in results if row["chosen"]}
    x0_prompts, _ = _prompt_seed_grid(split.validation, config.val_seeds)
    rows = correction_parts(pipe, config, chosen, samples[0].validation, x0_prompts)
    cpgd = next((sample for sample in samples if sample.parts is not None), None)
    if cpgd is not None:
        eval_prompts, _ = _prompt_seed_grid(split.evaluation, config.eval_seeds)
        base_eval = reward.taste_rewards(samples[0].evaluation, eval_prompts)
        part_alone_rewards(rows, {part: paired_statistics(reward.taste_rewards(images, eval_prompts), base_eval)
                                  for part, images in cpgd.parts.items()})
    return rows


def config_for(quick: bool, *, seed: int = 0, **overrides) -> DemoConfig:
    """The default or --quick configuration; `seed` seeds every phase, the base model's training included."""
    config = DemoConfig.quick(**overrides) if quick else replace(DemoConfig(), **overrides)
    return replace(config, seed=seed, base=replace(config.base, seed=seed))
