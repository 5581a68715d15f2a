"""Why a preference-guidance method helps or hurts: its correction to base CFG split into a cond and an uncond part.

Every method here is base CFG plus a correction, eps = b(u) + g (b(c) - b(u)) + w_c * d(c) + w_u * d(u), where
d(y) is what the method changes in branch y ("y" = u: the empty prompt, c: the prompt) and (w_c, w_u) are where
CFG puts it:

    method              d(y)                                  w_c   w_u
    contrastive         s (p(y) - n(y))                       g     1 - g     (published cPGD: both branches)
    contrastive-cond    s (p(c) - n(c))                       1     0
    contrastive-uncond  s (p(u) - n(u))                       0     1
    merged              m_s(y) - b(y), m_s = W + s(dW_p - dW_n) g     1 - g     (to first order: contrastive)
    pgd                 s (p(y) - b(y))                       g     1 - g
    npo                 m(u) - b(u), m = base + s * npo        0     1 - g

With g > 1 the uncond part enters with a negative weight: whatever the adapters learned at u is pushed *away* from.
The diagnosis measures, on noised base samples of the validation prompts, the RMS norms of both parts, the cosine
between d(c) and d(u), and the CFG direction b(c) - b(u) for scale; and for cPGD the reward change when each part
is applied alone (cond part = contrastive-cond at s*g, uncond part = contrastive-uncond at s*(1 - g)).
"""
from __future__ import annotations

import numpy as np
import torch

# method -> (w_c, w_u) as functions of g
PART_WEIGHTS = {
    "contrastive": lambda g: (g, 1.0 - g),
    "contrastive-cond": lambda g: (1.0, 0.0),
    "contrastive-uncond": lambda g: (0.0, 1.0),
    "merged": lambda g: (g, 1.0 - g),
    "pgd": lambda g: (g, 1.0 - g),
    "npo": lambda g: (0.0, 1.0 - g),
}


class BranchPredictor:
    """UNet predictions on fixed noised inputs for any adapter mix (peft set_adapters), memoised per mix."""

    def __init__(self, pipe, x0: torch.Tensor, prompts: list[str], timesteps, seed: int = 0):
        self.unet = pipe.unet
        generator = torch.Generator().manual_seed(seed)
        samples, times, conds, unconds = [], [], [], []
        cond, uncond = pipe.encode_prompt(prompts, pipe.device, 1, True)
        for t in timesteps:
            noise = torch.randn(x0.shape, generator=generator)
            t_batch = torch.full((len(x0),), int(t), dtype=torch.long)
            samples.append(pipe.scheduler.add_noise(x0, noise, t_batch))
            times.append(t_batch)
            conds.append(cond)
            unconds.append(uncond)
        self.inputs = {"c": torch.cat(conds), "u": torch.cat(unconds)}
        self.sample, self.t = torch.cat(samples).to(pipe.device), torch.cat(times).to(pipe.device)
        self.memo: dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, mix: dict[str, float] | None, branch: str) -> torch.Tensor:
        key = (tuple(sorted(mix.items())) if mix else None, branch)
        if key not in self.memo:
            if mix:
                self.unet.enable_lora()
                self.unet.set_adapters(list(mix), list(mix.values()))
            else:
                self.unet.disable_lora()
            out = self.unet(self.sample, self.t, self.inputs[branch].to(self.sample.device), return_dict=False)[0]
            self.memo[key] = out.double().flatten(1).cpu()
            self.unet.enable_lora()
        return self.memo[key]


def method_difference(predict: BranchPredictor, method: str, strength: float, positive, negative, branch: str):
    """d(y) of the table above, [N, elements] float64."""
    s = strength
    if method in ("contrastive", "contrastive-cond", "contrastive-uncond"):
        return s * (predict({positive: 1.0}, branch) - predict({negative: 1.0}, branch))
    if method == "pgd":
        return s * (predict({positive: 1.0}, branch) - predict(None, branch))
    if method == "merged":
        return predict({positive: s, negative: -s}, branch) - predict(None, branch)
    if method == "npo":
        return predict({negative: s}, branch) - predict(None, branch)
    raise ValueError(f"no diagnosis for method {method!r}; expected one of {tuple(PART_WEIGHTS)}")


def _rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean(dim=1).sqrt().mean())


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())


def correction_parts(pipe, config, chosen: dict[str, float], x0_images: np.ndarray, prompts: list[str]) -> list[dict]:
    """One row per method at its chosen strength: norms of the cond part, the uncond part and their sum, the cosine
    between d(c) and d(u), and the norm of the CFG direction b(c) - b(u)."""
    from cgkernels.demo.runner import METHODS

    x0 = torch.from_numpy(x0_images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # identity VAE: pixels
    predict = BranchPredictor(pipe, x0, prompts, config.diagnosis_timesteps, seed=config.seed)
    g = config.guidance_scale
    cfg_direction = _rms(predict(None, "c") - predict(None, "u"))
    rows = []
    for method, strength in chosen.items():
        _, positive, negative = METHODS[method]
        w_c, w_u = PART_WEIGHTS[method](g)
        d_c = method_difference(predict, method, strength, positive, negative, "c")
        d_u = method_difference(predict, method, strength, positive, negative, "u")
        rows.append({
            "method": method,
            "strength": strength,
            "cond_part_norm": _rms(w_c * d_c),
            "uncond_part_norm": _rms(w_u * d_u),
            "correction_norm": _rms(w_c * d_c + w_u * d_u),
            "cosine_cond_uncond": _cosine(d_c, d_u),
            "cfg_direction_norm": cfg_direction,
        })
    return rows


def cpgd_parts(strength: float, guidance_scale: float) -> tuple[tuple[str, str, float], ...]:
    """Published cPGD's correction at `strength` split into (part, the guidance mode that applies that part alone,
    its strength there): the cond part is contrastive-cond at s * g, the uncond part contrastive-uncond at
    s * (1 - g)."""
    g = guidance_scale
    return ("cond", "contrastive-cond", strength * g), ("uncond", "contrastive-uncond", strength * (1.0 - g))


def part_alone_rewards(rows: list[dict], part_stats: dict[str, dict]) -> None:
    """Adds to cPGD's row the reward statistics ({part: paired statistics vs base CFG}) of each part alone."""
    row = next(r for r in rows if r["method"] == "contrastive")
    for part, stats in part_stats.items():
        row[f"{part}_alone_gain"], row[f"{part}_alone_gain_sem"] = stats["mean_gain"], stats["gain_sem"]
        row[f"{part}_alone_win_rate"] = stats["win_rate"]
