"""The demo's report: a printed table, report.md, report.json, grid.png (prompts x methods), strength.png."""
from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from cgkernels.demo import selection
from cgkernels.demo.selection import DIVERSITY_FLOOR, GOAL_SEMS, GOAL_WIN_RATE

GRID_CELL = 96  # pixels per image in grid.png (nearest-neighbour upscaling keeps the pixels honest)
FONT_SIZE = 14


def format_table(results: list[dict]) -> str:
    """Every (method, strength) on validation, and base CFG and the chosen strengths on evaluation."""
    lines = [
        "| method | strength | chosen on validation | validation gain ± s.e. | validation win rate | evaluation gain "
        "± s.e. | evaluation win rate | beats base? | alignment | aesthetics | diversity | s / image |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        baseline = row["strength"] is None
        strength = "-" if baseline else f"{row['strength']:g}"
        chosen = "-" if baseline else ("**yes**" if row["chosen"] else "")
        validation = ("- | -" if baseline else
                      f"{row['val_mean_gain']:+.3f} ± {row['val_gain_sem']:.3f} | {row['val_win_rate']:.2f}")
        if row["mean_reward"] is None:
            evaluation = "not evaluated | - | - | - | - | -"
        elif baseline:
            evaluation = (f"reward {row['mean_reward']:.3f} ± {row['reward_sem']:.3f} | - | (baseline) | "
                          f"{row['mean_alignment']:.2f} | {row['mean_aesthetics']:.2f} | {row['diversity']:.3f}")
        else:
            evaluation = (f"{row['mean_gain']:+.3f} ± {row['gain_sem']:.3f} | {row['win_rate']:.2f} | "
                          f"{gain_verdict(row['mean_gain'], row['gain_sem'])} | {row['mean_alignment']:.2f} | "
                          f"{row['mean_aesthetics']:.2f} | {row['diversity']:.3f}")
        lines.append(f"| {row['method']} | {strength} | {chosen} | {validation} | {evaluation} | "
                     f"{row['seconds_per_image']:.3f} |")
    return "\n".join(lines)


def format_chosen_table(results: list[dict]) -> str:
    """The headline: each method at the strength chosen on the validation set, measured on the evaluation set."""
    lines = ["| method | chosen strength | gain vs base CFG ± s.e. | gain / s.e. | win rate | beats base? | diversity |",
             "|---|---|---|---|---|---|---|"]
    for row in results:
        if row["strength"] is None:
            lines.append(f"| {row['method']} (reward {row['mean_reward']:.3f}) | - | - | - | - | (baseline) | "
                         f"{row['diversity']:.3f} |")
        elif row["chosen"]:
            lines.append(f"| {row['method']} | {row['strength']:g} | {_gain_cells(row)} | "
                         f"{gain_verdict(row['mean_gain'], row['gain_sem'])} | {row['diversity']:.3f} |")
    return "\n".join(lines)


MUST = {1: "beat base", -1: "lose", 0: "stay level"}  # what the ladder requires of an adapter, by expected sign


def format_ladder(ladder: list[dict]) -> str:
    """Each adapter alone with plain CFG: the first rung; guidance only amplifies what the adapters learned."""
    lines = ["| adapter | trained with | gain vs base CFG ± s.e. | gain / s.e. | win rate | must | as it must? |"
             " diversity |", "|---|---|---|---|---|---|---|---|"]
    for row in ladder:
        lines.append(f"| {row['adapter']} | {row['objective']} | {_gain_cells(row)} | {MUST[row['expected_sign']]} | "
                     f"{'yes' if row['as_expected'] else '**no**'} | {row['diversity']:.3f} |")
    return "\n".join(lines)


def _gain_cells(row: dict) -> str:
    """The cells 'gain ± s.e. | gain / s.e. | win rate' of a method's or an adapter's row."""
    ratio = row["mean_gain"] / row["gain_sem"] if row["gain_sem"] > 0 else float("nan")
    return f"{row['mean_gain']:+.3f} ± {row['gain_sem']:.3f} | {ratio:+.1f} | {row['win_rate']:.2f}"


def ladder_verdict(ladder: list[dict]) -> str:
    """The report's first sentence: whether the adapters learned the taste at all."""
    failed = [row for row in ladder if not row["as_expected"] and row["expected_sign"] != 0]
    null = [row for row in ladder if row["expected_sign"] == 0]
    if failed:
        misses = "; ".join(f"{row['adapter']} {row['mean_gain']:+.3f} ± {row['gain_sem']:.3f} (must "
                           f"{MUST[row['expected_sign']]})" for row in failed)
        passed = [row["adapter"] for row in ladder if row["as_expected"] and row["expected_sign"] != 0]
        verdict = (f"**The ladder fails: alone with plain CFG, {misses}: not by more than 3 s.e.** "
                   + (f"{', '.join(passed)} did move the reward as they must. " if passed else
                      "No adapter moved the reward as it must. ")
                   + "Guidance can only amplify what the adapters learned (the methods below show how much of it "
                     "survives in their differences).")
    else:
        verdict = ("The adapters learned the taste: alone with plain CFG every positive adapter beats base CFG and "
                   "every negative one loses, each by more than 3 s.e.")
    if null:
        row = null[0]
        verdict += (f" Null test (SFT on fresh renders of the world): {row['mean_gain']:+.3f} ± {row['gain_sem']:.3f}, "
                    + ("within 3 s.e. of zero, as it must be." if row["as_expected"] else
                       "**more than 3 s.e. from zero: training itself moves the reward.**"))
    return verdict


def best_method(results: list[dict]) -> dict:
    """The method whose chosen strength scores best on validation, by the rule that chose the strengths."""
    return max((row for row in results if row["chosen"]), key=lambda row: selection.score_of(row).key())


def goal_check(results: list[dict]) -> dict:
    """Whether the best method (chosen on validation) reaches the goal on the evaluation set."""
    best, base = best_method(results), results[0]
    ratio = best["mean_gain"] / best["gain_sem"] if best["gain_sem"] > 0 else float("nan")
    diversity = best["diversity"] / base["diversity"] if base["diversity"] > 0 else float("nan")
    return {"method": best["method"], "strength": best["strength"], "mean_gain": best["mean_gain"],
            "gain_sem": best["gain_sem"], "gain_in_sems": ratio, "win_rate": best["win_rate"],
            "diversity_vs_base": diversity,
            "reached": bool(best["win_rate"] >= GOAL_WIN_RATE and ratio > GOAL_SEMS and diversity >= DIVERSITY_FLOOR)}


def goal_summary(results: list[dict]) -> str:
    goal = goal_check(results)
    return (f"Best method on validation: **{goal['method']} at s = {goal['strength']:g}**; on the evaluation set "
            f"gain {goal['mean_gain']:+.3f} ± {goal['gain_sem']:.3f} ({goal['gain_in_sems']:+.1f} s.e.), win rate "
            f"{goal['win_rate']:.2f}, diversity {goal['diversity_vs_base']:.2f}x base CFG's. Goal (win rate >= "
            f"{GOAL_WIN_RATE:.2f}, gain > {GOAL_SEMS:g} s.e., diversity >= {DIVERSITY_FLOOR:g}x base): "
            f"**{'reached' if goal['reached'] else 'not reached'}**.")


def format_diagnosis(diagnosis: list[dict]) -> str:
    lines = ["| method | s | cond part | uncond part | whole correction | cos(d(c), d(u)) | CFG direction |"
             " cond part alone: gain (win) | uncond part alone: gain (win) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in diagnosis:
        parts = []
        for part in ("cond", "uncond"):
            key = f"{part}_alone_gain"
            parts.append(f"{row[key]:+.3f} ± {row[key + '_sem']:.3f} ({row[part + '_alone_win_rate']:.2f})"
                         if key in row else "")
        lines.append(f"| {row['method']} | {row['strength']:g} | {row['cond_part_norm']:.3f} | "
                     f"{row['uncond_part_norm']:.3f} | {row['correction_norm']:.3f} | {row['cosine_cond_uncond']:+.2f} | "
                     f"{row['cfg_direction_norm']:.3f} | {parts[0]} | {parts[1]} |")
    return "\n".join(lines)


def gain_verdict(gain: float, sem: float) -> str:
    """'yes' / 'worse' only when the paired gain is more than two standard errors from zero."""
    if gain - 2 * sem > 0:
        return "yes"
    if gain + 2 * sem < 0:
        return "worse"
    return "no (within noise)"


def write_report(out: Path, config, results, diagnosis, samples, split, timings, cpu_timings, device, *, base_cached: bool,
                 total_seconds: float, preference_stats: dict, sft_stats: dict, ladder: list[dict]) -> dict[str, str]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print("\n" + ladder_verdict(ladder) + "\n\n" + format_ladder(ladder) + "\n\n" + format_chosen_table(results)
          + "\n\n" + goal_summary(results) + "\n\n" + format_diagnosis(diagnosis) + "\n")
    files = {
        "grid": str(write_grid(out / "grid.png", config, results, samples, split.evaluation)),
        "strength": str(write_strength_plot(out / "strength.png", results)),
    }
    machine = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    payload = {
        "config": asdict(config),
        "adapters": ladder,
        "goal": goal_check(results),
        "selection_rule": "on the validation prompts x validation seeds, paired with base CFG: per method, the "
                          "strength with the largest gain in standard errors (ties: the smaller strength); the best "
                          "method likewise; only the chosen strength is sampled on the evaluation prompts x "
                          "evaluation seeds",
        "results": results,
        "diagnosis": diagnosis,
        "preference_data": preference_stats,
        "sft_data": sft_stats,
        "prompts": {"evaluation": list(split.evaluation), "validation": list(split.validation),
                    "preference": len(split.preference)},
        "timings_seconds": timings,
        "cpu_seconds": cpu_timings,
        "total_seconds": round(total_seconds, 1),
        "base_model_cached": base_cached,
        "machine": machine,
    }
    (out / "report.json").write_text(json.dumps(payload, indent=2))
    files["json"] = str(out / "report.json")
    markdown = _markdown(config, results, diagnosis, split, timings, cpu_timings, total_seconds, base_cached, machine,
                         preference_stats, sft_stats, ladder)
    (out / "report.md").write_text(markdown)
    files["markdown"] = str(out / "report.md")
    return files


def _markdown(config, results, diagnosis, split, timings, cpu_timings, total_seconds, base_cached, machine, stats,
              sft_stats, ladder) -> str:
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
    cpu = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in cpu_timings.items())
    g = config.guidance_scale
    return f"""# cgkernels demo report (pipeline seed {config.seed})

{ladder_verdict(ladder)}

Reward: the demo's hidden taste (cgkernels/demo/reward.py): prompt alignment (colour, shape, size, position, each
in [0, 1], weight 0.5) plus aesthetics (background tint, which no caption names, + saturation + contrast - 2
clutter). Win rate: share of (prompt, seed) pairs
where the method's reward beats base CFG's on the same prompt and seed (ties count half). Gain: mean over those pairs
of (method reward - base reward), with its standard error. "beats base?" = "yes" when the gain is more than two
standard errors above zero, "worse" when more than two below. Diversity: mean RMS pixel distance between samples of
one prompt with different seeds.

**Strength rule:** every method is sampled at strengths
{", ".join(f"{s:g}" for s in config.strengths)} on {len(split.validation)} validation prompts x
{len(config.val_seeds)} validation seeds and compared with base CFG pair by pair. Its chosen strength is the one
whose gain there is largest in standard errors (the paired t-ratio: the most reliable improvement, not the largest
mean one, which at high strengths comes with more losses). The best method is picked by the same rule. Only the
chosen strength is sampled on {len(split.evaluation)} other held-out evaluation prompts x {len(config.eval_seeds)}
evaluation seeds, which select nothing. Every evaluation number below comes from there. {config.sample_steps} DDIM
steps, guidance scale {g:g}.

Preference data: {stats['pairs']} pairs. For each of {len(split.preference)} preference prompts
{config.samples_per_prompt} base samples ({config.pair_steps} DDIM steps) and {config.pair_renders} render(s) of the
world are labelled pairwise by a noisy Bradley-Terry annotator (temperature {config.bt_temperature:g});
{_pairing(config)}. The labels agree with the reward on {stats['labels_agree_with_reward']:.0%} of the pairs; winners / losers: reward {stats['winner_reward']:.3f} /
{stats['loser_reward']:.3f}, alignment {stats['winner_alignment']:.3f} / {stats['loser_alignment']:.3f} (position
{stats['winner_position']:.3f} / {stats['loser_position']:.3f}), aesthetics {stats['winner_aesthetics']:.3f} /
{stats['loser_aesthetics']:.3f} (tint {stats['winner_tint']:.3f} / {stats['loser_tint']:.3f}). Those pairs train DPO and
NPO. SFT imitates a tighter set, {_sft_set(config)}: reward {sft_stats['winner_reward']:.3f} (sft_pos) /
{sft_stats['loser_reward']:.3f} (sft_neg), tint {sft_stats['winner_tint']:.3f} / {sft_stats['loser_tint']:.3f}.

## The ladder: each adapter alone with plain CFG

Each trained adapter at scale 1 on both branches, ordinary CFG, same evaluation prompts and seeds as everything
below. A positive adapter must beat base CFG and a negative one lose, each by more than 3 s.e., or no guidance built
on them can work.

{format_ladder(ladder)}

## Each method at its chosen strength

{format_chosen_table(results)}

{goal_summary(results)}

## Diagnosis: the correction split into its cond and uncond parts

eps = CFG(base) + w_c d(c) + w_u d(u) (see cgkernels/demo/diagnosis.py): with g = {g:g} published cPGD puts
w_u = 1 - g = {1 - g:g} on what the adapters changed for the empty prompt. RMS norms (v-prediction units) on noised
base samples of the validation prompts at timesteps {", ".join(str(t) for t in config.diagnosis_timesteps)}; the
parts' reward effect is measured on the evaluation set (cond part alone = contrastive-cond at s*g, uncond part alone
= contrastive-uncond at s*(1 - g)).

{format_diagnosis(diagnosis)}

## Every strength

On validation every strength, on evaluation base CFG and the chosen strengths only.

{format_table(results)}

![grid](grid.png)

Rows: evaluation prompts (first evaluation seed); columns: base CFG, each method at its chosen strength, then the
best method at every strength. Under each cell its reward (r) and the taste's two halves, aesthetics (ae: tint,
vividness, clutter) and alignment with the prompt (al); the last row: each column's means over all evaluation pairs
(where evaluated: base CFG and the chosen strengths).

![gain and win rate vs strength](strength.png)

The dose-response on validation (every strength), with each chosen strength's evaluation gain as a cross.

Wall time {total_seconds:.0f} s ({phases}; base model {'from cache' if base_cached else 'trained in this run'}),
{machine['device']}, torch {machine['torch']}, CPU kernels {machine['cpu_capability']}, deterministic algorithms
{'on' if machine['deterministic_algorithms'] else 'off'}. CPU time per phase, of the demo's process and its training
workers (what each phase costs, summed over threads and processes): {cpu}.
"""


def _sft_set(config) -> str:
    if config.sft_extremes:
        return (f"each prompt's {config.sft_extremes} best (sft_pos) and {config.sft_extremes} worst (sft_neg) images "
                "as the annotator ranks them")
    return "the winner (sft_pos) and loser (sft_neg) of every pair"


def _pairing(config) -> str:
    if config.pair_extremes:
        return (f"each image scores the pairs the annotator gave it, and the {config.pair_extremes} best of a prompt "
                f"are paired with its {config.pair_extremes} worst")
    return "every two images of a prompt make a pair"


def _font(size: int = FONT_SIZE):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def write_grid(path: Path, config, results, samples, eval_prompts) -> Path:
    """Evaluation prompts (first seed) x [base CFG, each method at its chosen strength, then the best method at
    every strength], cells upscaled nearest. Under each cell its reward and the taste's two halves (aesthetics:
    tint, vividness, clutter; alignment with the prompt), so a reader sees which half a guided column moved; the
    last row gives each column's means over the whole evaluation set."""
    from cgkernels.demo import reward

    n_seeds = len(config.eval_seeds)
    chosen = {(row["method"], row["strength"]) for row in results if row["chosen"]}
    best = best_method(results)["method"]
    columns = [samples[0]] + [s for s in samples[1:] if (s.method, s.strength) in chosen]
    columns += [None] + [s for s in samples[1:] if s.method == best]  # None: a gap before the dose columns
    rows = {(row["method"], row["strength"]): row for row in results}
    font = _font()
    label_width, header, gap = 262, 2 * FONT_SIZE + 10, GRID_CELL // 4
    cell_height = GRID_CELL + 2 * FONT_SIZE + 8
    widths = [gap if sample is None else GRID_CELL for sample in columns]
    summary_y = header + cell_height * len(eval_prompts)
    canvas = Image.new("RGB", (label_width + sum(widths), summary_y + 3 * FONT_SIZE + 24), "white")
    draw = ImageDraw.Draw(canvas)
    x = label_width
    for sample, width in zip(columns, widths):
        if sample is not None:
            name = sample.method.replace("contrastive-", "c-")  # "c-cond" / "c-uncond" fit a cell
            draw.text((x + 2, 2), name, fill="black", font=font)
            draw.text((x + 2, FONT_SIZE + 5), "" if sample.strength is None else f"s = {sample.strength:g}",
                      fill="black", font=font)
            for row, prompt in enumerate(eval_prompts):
                pixels = sample.preview[row]
                y = header + row * cell_height
                canvas.paste(Image.fromarray(pixels).resize((GRID_CELL, GRID_CELL), Image.NEAREST), (x, y))
                terms = reward.taste_terms(pixels, prompt)
                _cell_label(draw, (x + 2, y + GRID_CELL + 2), reward.reward_from_terms(terms),
                            reward.aesthetics(terms), reward.alignment(terms), font)
            means = rows[(sample.method, sample.strength)]  # measure() scored every evaluation image already
            if means["mean_reward"] is None:  # a strength not chosen is sampled only on each prompt's first seed
                draw.text((x + 2, summary_y + FONT_SIZE + 8), "not evaluated", fill="grey", font=font)
            else:
                _cell_label(draw, (x + 2, summary_y + FONT_SIZE + 8), means["mean_reward"], means["mean_aesthetics"],
                            means["mean_alignment"], font)
        x += width
    for row, prompt in enumerate(eval_prompts):
        draw.text((4, header + row * cell_height + GRID_CELL // 2 - FONT_SIZE // 2), prompt, fill="black", font=font)
    draw.text((4, summary_y + 4), "mean over all evaluation", fill="black", font=font)
    draw.text((4, summary_y + FONT_SIZE + 8), f"({len(eval_prompts)} prompts x {n_seeds} seeds)", fill="black",
              font=font)
    draw.text((4, summary_y + 2 * FONT_SIZE + 12), "r reward, ae aesthetics, al alignment", fill="grey", font=font)
    canvas.save(path)
    return path


def _cell_label(draw, xy, total: float, aesthetics: float, alignment: float, font) -> None:
    x, y = xy
    draw.text((x, y), f"r {total:.2f}", fill="black", font=font)
    draw.text((x, y + FONT_SIZE + 2), f"ae {aesthetics:.2f} al {alignment:.1f}", fill="dimgray", font=font)


def write_strength_plot(path: Path, results: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (gain_axis, win_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in dict.fromkeys(row["method"] for row in results if row["strength"] is not None):
        rows = [row for row in results if row["method"] == method]
        strengths = [row["strength"] for row in rows]
        line = gain_axis.errorbar(strengths, [r["val_mean_gain"] for r in rows],
                                  yerr=[r["val_gain_sem"] for r in rows], marker="o", capsize=3, label=method)
        win_axis.plot(strengths, [r["val_win_rate"] for r in rows], marker="o", label=method)
        for row in rows:
            if row["chosen"]:  # the validation-chosen strength, ringed; its evaluation result a cross
                for axis, validation, evaluation in ((gain_axis, "val_mean_gain", "mean_gain"),
                                                     (win_axis, "val_win_rate", "win_rate")):
                    axis.plot(row["strength"], row[validation], "o", markersize=13, fillstyle="none",
                              color=line[0].get_color())
                    axis.plot(row["strength"], row[evaluation], "x", markersize=9, color=line[0].get_color())
    gain_axis.axhline(0.0, color="black", linestyle="--", label="base CFG")
    win_axis.axhline(0.5, color="black", linestyle="--", label="parity")
    win_axis.axhline(GOAL_WIN_RATE, color="grey", linestyle=":", label=f"goal {GOAL_WIN_RATE:g}")
    strengths = sorted({row["strength"] for row in results if row["strength"] is not None})
    for axis in (gain_axis, win_axis):
        axis.set_xscale("log", base=2)
        axis.set_xticks(strengths, [f"{s:g}" for s in strengths])
    gain_axis.set(xlabel="strength", ylabel="reward gain vs base CFG (validation)",
                  title="gain vs strength on validation\n(ringed: chosen; x: its gain on evaluation)")
    win_axis.set(xlabel="strength", ylabel="win rate vs base CFG (validation)",
                 title="win rate vs strength on validation\n(ringed: chosen; x: its win rate on evaluation)", ylim=(0, 1))
    gain_axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
