"""Evaluation harness: pair a method's images with a baseline's by (prompt, seed), score both, report mean scores
and win rates (share of pairs where the method's score beats the baseline's, ties half; as the NPO release) with
standard errors and paired bootstrap confidence intervals.

Image folders: PNG/JPEG files with either a sidecar JSON of the same stem (as python/sample.py writes: "prompt",
"seed", optional "guidance" (the method) and "strength") or a `metadata.jsonl` whose lines carry "file_name",
"prompt", "seed" (and optional "guidance", "strength"). Subfolders (sample.py's grids/, the score cache) are not
read. A method folder may hold several methods and strengths (a sweep): each (method, strength) is one row. The
baseline folder must hold one image per (prompt, seed), or name the variant to use (`baseline_method`,
`baseline_strength`); it may be the method folder itself (sample.py --guidance cfg,contrastive writes both).

Scores are cached per image in <folder>/scores/<scorer fingerprint>.rank<r>.jsonl (appended after every batch, so
a killed run loses only its in-flight batch); an image rewritten since is scored again. Across processes
(`accelerate launch`, torchrun) the images still to score are split between the processes; rank 0 writes the table.

Scorers: cgkernels.scorers ("taste", "pickscore", "hpsv2", "imagereward", "aesthetic").
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from cgkernels.scorers import SCORERS, Scorer, make_scorer  # noqa: F401  (re-exported: the public entry points)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
BOOTSTRAP_SAMPLES = 2000
CACHE_FOLDER = "scores"


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    prompt: str
    seed: int
    strength: Optional[float] = None
    method: Optional[str] = None

    @property
    def variant(self) -> tuple:
        return (self.method, self.strength)


def read_image_folder(folder) -> list[ImageRecord]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    metadata = folder / "metadata.jsonl"
    if metadata.exists():
        rows = [json.loads(line) for line in metadata.read_text().splitlines() if line.strip()]
        records = [_record(folder / row["file_name"], row, metadata) for row in rows]
    else:
        records = []
        for image in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            sidecar = image.with_suffix(".json")
            if not sidecar.exists():
                raise ValueError(f"{image} has no sidecar {sidecar.name} (and {folder} has no metadata.jsonl)")
            records.append(_record(image, json.loads(sidecar.read_text()), sidecar))
    if not records:
        raise ValueError(f"no images found in {folder}")
    return records


def _record(path: Path, row: dict, source: Path) -> ImageRecord:
    for key in ("prompt", "seed"):
        if key not in row:
            raise ValueError(f"{source}: missing {key!r} for {path.name}")
    strength = row.get("strength")
    return ImageRecord(path, str(row["prompt"]), int(row["seed"]), None if strength is None else float(strength),
                       row.get("guidance"))


def _variant_name(variant: tuple) -> str:
    method, strength = variant
    return f"{method or '-'} at strength {'-' if strength is None else f'{strength:g}'}"


def select_baseline(records: list[ImageRecord], method: Optional[str] = None,
                    strength: Optional[float] = None) -> list[ImageRecord]:
    """The baseline's images: one (method, strength) variant, the only one or the one asked for."""
    chosen = [r for r in records if (method is None or r.method == method)
              and (strength is None or r.strength == strength)]
    variants = sorted({r.variant for r in chosen}, key=_variant_key)
    if not chosen:
        raise ValueError(f"the baseline folder has no images of method {method!r} at strength {strength!r}; it has "
                         + ", ".join(_variant_name(v) for v in sorted({r.variant for r in records}, key=_variant_key)))
    if len(variants) > 1:
        raise ValueError("the baseline folder holds several variants (" + ", ".join(map(_variant_name, variants))
                         + "): choose one with --baseline-method and/or --baseline-strength")
    return chosen


def _variant_key(variant: tuple) -> tuple:
    method, strength = variant
    return (method or "", strength is not None, strength or 0.0)


def pair_by_prompt_and_seed(method: list[ImageRecord], baseline: list[ImageRecord]):
    """{(method, strength): [(method record, baseline record), ...]} over the (prompt, seed) keys both sides have.
    The baseline's own images (the method folder may be the baseline folder) are not a method row."""
    by_key = {}
    for record in baseline:
        key = (record.prompt, record.seed)
        if key in by_key:
            raise ValueError(f"baseline has two images for prompt {record.prompt!r} seed {record.seed} "
                             f"({by_key[key].path.name}, {record.path.name})")
        by_key[key] = record
    baseline_paths = {record.path.resolve() for record in baseline}
    groups: dict[tuple, list] = {}
    for record in method:
        match = by_key.get((record.prompt, record.seed))
        if match is not None and record.path.resolve() not in baseline_paths:
            groups.setdefault(record.variant, []).append((record, match))
    if not groups:
        raise ValueError("no (prompt, seed) pair is shared by the method and baseline folders")
    return dict(sorted(groups.items(), key=lambda item: _variant_key(item[0])))


def plan_pairs(images_dir, baseline_dir, baseline_method=None, baseline_strength=None):
    """(pairs grouped by (method, strength), the baseline's records): everything checkable before scoring."""
    baseline = select_baseline(read_image_folder(baseline_dir), baseline_method, baseline_strength)
    return pair_by_prompt_and_seed(read_image_folder(images_dir), baseline), baseline


def win_rate(scores, baseline_scores) -> float:
    return float(_wins(scores, baseline_scores).mean())


def _wins(scores, baseline_scores) -> np.ndarray:
    scores, baseline_scores = np.asarray(scores, float), np.asarray(baseline_scores, float)
    return (scores > baseline_scores) + 0.5 * (scores == baseline_scores)


def _standard_error(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def paired_statistics(scores, baseline_scores, prompts, *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                      level: float = 0.95) -> dict:
    """Means with standard errors, the mean difference and the win rate with paired bootstrap CIs. The bootstrap
    resamples prompts (all seeds of a prompt together: they share the prompt's difficulty), keeping each
    (method, baseline) pair together."""
    scores, baseline_scores = np.asarray(scores, float), np.asarray(baseline_scores, float)
    wins, diffs = _wins(scores, baseline_scores), scores - baseline_scores
    _, cluster = np.unique(np.asarray(prompts, dtype=object).astype(str), return_inverse=True)
    n_clusters = cluster.max() + 1
    counts = np.bincount(cluster, minlength=n_clusters)
    win_sums = np.bincount(cluster, weights=wins, minlength=n_clusters)
    diff_sums = np.bincount(cluster, weights=diffs, minlength=n_clusters)
    draws = np.random.default_rng(seed).integers(0, n_clusters, size=(samples, n_clusters))
    n = counts[draws].sum(1)
    tail = 100 * (1 - level) / 2
    win_ci = np.percentile(win_sums[draws].sum(1) / n, [tail, 100 - tail])
    diff_ci = np.percentile(diff_sums[draws].sum(1) / n, [tail, 100 - tail])
    return {
        "pairs": int(len(scores)),
        "prompts": int(n_clusters),
        "mean_score": float(scores.mean()),
        "mean_score_se": _standard_error(scores),
        "baseline_mean_score": float(baseline_scores.mean()),
        "baseline_mean_score_se": _standard_error(baseline_scores),
        "mean_difference": float(diffs.mean()),
        "mean_difference_se": _standard_error(diffs),
        "mean_difference_ci": [float(v) for v in diff_ci],
        "win_rate": float(wins.mean()),
        "win_rate_se": _standard_error(wins),
        "win_rate_ci": [float(v) for v in win_ci],
        "ci_level": level,
    }


class ScoreCache:
    """Scores of one scorer for the images of one folder: <folder>/scores/<fingerprint>.rank<r>.jsonl, one line per
    image with its size and mtime (a rewritten image is scored again)."""

    def __init__(self, folder: Path, fingerprint: Optional[str], rank: int = 0):
        self.dir = Path(folder) / CACHE_FOLDER
        self.fingerprint = fingerprint  # None: a scorer without a stable identity, kept in memory only
        self.own_file = self.dir / f"{fingerprint}.rank{rank}.jsonl"
        self.memory: dict[tuple, float] = {}

    def load(self) -> dict[tuple, float]:
        if self.fingerprint is None:
            return dict(self.memory)
        scores = {}
        for file in sorted(self.dir.glob(f"{self.fingerprint}.rank*.jsonl")):
            for line in file.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # the last line of a killed run
                    continue
                scores[(row["image"], row["size"], row["mtime_ns"])] = row["score"]
        return scores

    def append(self, paths: list[Path], scores: np.ndarray) -> None:
        if self.fingerprint is None:
            self.memory.update((_cache_key(p), float(s)) for p, s in zip(paths, scores))
            return
        self.dir.mkdir(exist_ok=True)
        lines = "".join(json.dumps({"image": p.name, **_stat(p), "score": float(s)}) + "\n"
                        for p, s in zip(paths, scores))
        with open(self.own_file, "a") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())


def _stat(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _cache_key(path: Path) -> tuple:
    stat = _stat(path)
    return (path.name, stat["size"], stat["mtime_ns"])


def score_images(scorer: Scorer, records: list[ImageRecord], *, batch_size: int = 16, state=None,
                 progress: bool = False, desc: str = "scoring") -> dict[Path, float]:
    """{path: score} for every record, from the caches where they hold it; the rest scored (this process's share
    of them when `state` is an accelerate state of several processes) and appended to the caches."""
    from tqdm.auto import tqdm

    rank, world = (state.process_index, state.num_processes) if state else (0, 1)
    by_folder: dict[Path, list[ImageRecord]] = {}
    for record in records:
        by_folder.setdefault(record.path.parent, []).append(record)
    caches = {folder: ScoreCache(folder, scorer.fingerprint, rank) for folder in by_folder}
    cached = {folder: cache.load() for folder, cache in caches.items()}
    todo = sorted({r.path for r in records if _cache_key(r.path) not in cached[r.path.parent]})
    if progress and rank == 0:  # the total; each process's bar shows its share
        unique = len({r.path for r in records})
        print(f"{desc}: {unique} images, {unique - len(todo)} cached, {len(todo)} to score"
              + (f" on {world} processes" if world > 1 else ""), flush=True)
    if state and world > 1 and scorer.fingerprint is not None:  # uncached scorers: every process scores all
        # Every process must split the same list: none writes to the caches before all have read them.
        state.wait_for_everyone()
        with state.split_between_processes(todo) as shard:
            todo = list(shard)
    prompt_of = {record.path: record.prompt for record in records}
    with tqdm(total=len(todo), desc=f"{desc} (rank {rank})" if world > 1 else desc, position=rank,
              disable=not progress or not todo) as bar:
        for begin in range(0, len(todo), batch_size):
            paths = todo[begin: begin + batch_size]
            images = [Image.open(path).convert("RGB") for path in paths]
            scores = np.asarray(scorer(images, [prompt_of[p] for p in paths]), dtype=float).reshape(len(paths))
            for folder in dict.fromkeys(p.parent for p in paths):
                mine = [i for i, p in enumerate(paths) if p.parent == folder]
                caches[folder].append([paths[i] for i in mine], scores[mine])
            bar.update(len(paths))
    if state and world > 1:
        state.wait_for_everyone()
    cached = {folder: cache.load() for folder, cache in caches.items()}
    return {record.path: cached[record.path.parent][_cache_key(record.path)] for record in records}


def evaluate(images_dir, baseline_dir, scorers: dict, batch_size: int = 16, *, baseline_method=None,
             baseline_strength=None, state=None, progress: bool = False) -> list[dict]:
    """One row per (scorer, method, strength): pairs, prompts, mean scores with standard errors, mean difference
    and win rate with paired bootstrap CIs. Scorers: {name: Scorer or callable(images, prompts)}."""
    groups, baseline = plan_pairs(images_dir, baseline_dir, baseline_method, baseline_strength)
    needed = list({r.path: r for pairs in groups.values() for pair in pairs for r in pair}.values())
    scorers = {name: _as_scorer(name, scorer) for name, scorer in scorers.items()}
    for scorer in scorers.values():  # before any work: a scorer that cannot score these prompts says so
        scorer.check_prompts([r.prompt for r in needed])
    rows = []
    for name, scorer in scorers.items():
        # Each image is scored once per scorer, however many rows it appears in.
        score = score_images(scorer, needed, batch_size=batch_size, state=state, progress=progress,
                             desc=f"scoring ({name})")
        for (method, strength), pairs in groups.items():
            stats = paired_statistics([score[m.path] for m, _ in pairs], [score[b.path] for _, b in pairs],
                                      [m.prompt for m, _ in pairs])
            rows.append({"scorer": name, "method": method, "strength": strength,
                         "baseline": _variant_name(baseline[0].variant), **stats})
    return rows


def _as_scorer(name: str, scorer) -> Scorer:
    return scorer if isinstance(scorer, Scorer) else _CallableScorer(name, scorer)


class _CallableScorer(Scorer):
    """A plain function (images, prompts) -> scores: nothing identifies it across runs, so nothing is cached."""

    def __init__(self, name: str, function):
        self.name, self.function, self.fingerprint = name, function, None

    def __call__(self, images, prompts):
        return self.function(images, prompts)


def _fmt(value: float, digits: int = 3) -> str:
    return "nan" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def format_rows(rows: list[dict]) -> str:
    """A markdown table: means ± standard error, the difference and win rate with their bootstrap CIs."""
    lines = ["| scorer | method | strength | pairs | prompts | mean ± se | baseline ± se | difference [95% CI] | "
             "win rate ± se [95% CI] |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        strength = "-" if row["strength"] is None else f"{row['strength']:g}"
        low, high = row["mean_difference_ci"]
        win_low, win_high = row["win_rate_ci"]
        lines.append(
            f"| {row['scorer']} | {row.get('method') or '-'} | {strength} | {row['pairs']} | {row['prompts']} | "
            f"{_fmt(row['mean_score'], 4)} ± {_fmt(row['mean_score_se'], 4)} | "
            f"{_fmt(row['baseline_mean_score'], 4)} ± {_fmt(row['baseline_mean_score_se'], 4)} | "
            f"{_fmt(row['mean_difference'], 4)} [{_fmt(low, 4)}, {_fmt(high, 4)}] | "
            f"{_fmt(row['win_rate'])} ± {_fmt(row['win_rate_se'])} [{_fmt(win_low)}, {_fmt(win_high)}] |")
    return "\n".join(lines)


def plot_win_rates(rows: list[dict], path) -> Path:
    """Win rate against strength, one panel per scorer, one line per method, bootstrap CIs as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scorer_names = list(dict.fromkeys(row["scorer"] for row in rows))
    fig, axes = plt.subplots(1, len(scorer_names), figsize=(4.5 * len(scorer_names), 3.6), squeeze=False)
    for ax, scorer_name in zip(axes[0], scorer_names):
        mine = [r for r in rows if r["scorer"] == scorer_name and r["strength"] is not None]
        methods = list(dict.fromkeys(r.get("method") for r in mine))
        span = max((r["strength"] for r in mine), default=1.0) - min((r["strength"] for r in mine), default=0.0)
        for index, method in enumerate(methods):
            line = sorted((r for r in mine if r.get("method") == method), key=lambda r: r["strength"])
            dodge = 0.012 * (span or 1.0) * (index - (len(methods) - 1) / 2)  # methods at one strength side by side
            x = [r["strength"] + dodge for r in line]
            y = np.array([r["win_rate"] for r in line])
            ci = np.array([r["win_rate_ci"] for r in line]).T
            ax.errorbar(x, y, yerr=np.abs(ci - y), marker="o", capsize=3, label=method or "method")
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="tie with baseline")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("guidance strength")
        ax.set_ylabel("win rate vs baseline (ties count ½)")
        n = max((r["pairs"] for r in mine), default=0)
        ax.set_title(f"{scorer_name} ({n} pairs, {int(100 * rows[0]['ci_level'])}% CI)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"baseline: {rows[0]['baseline']}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(rows: list[dict], out_dir) -> dict[str, Path]:
    """table.json, table.md and win_rate.png in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "table.json", "markdown": out_dir / "table.md", "plot": out_dir / "win_rate.png"}
    paths["json"].write_text(json.dumps(rows, indent=1))
    paths["markdown"].write_text(format_rows(rows) + "\n")
    plot_win_rates(rows, paths["plot"])
    return paths
