"""Training objectives: the diffusion MSE (SFT) and Diffusion-DPO (also used, swapped, for Diffusion-NPO).

Both take optional per-sample loss weights [B] (flow matching's sigma-dependent weighting); None weighs every
sample 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over every non-batch dim, in fp32: shape [B]."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    err = (pred.float() - target.float()).pow(2)
    return err.reshape(err.shape[0], -1).mean(dim=1)


def _error_gap(model: torch.Tensor, ref: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sample, mean over non-batch dims of |target - model|^2 - |target - ref|^2, in fp32."""
    if not (model.shape == ref.shape == target.shape):
        raise ValueError(f"shapes differ: model {tuple(model.shape)}, ref {tuple(ref.shape)}, target {tuple(target.shape)}")
    model, ref, target = model.float(), ref.float(), target.float()
    gap = (model - ref) * (model + ref - 2.0 * target)
    return gap.reshape(gap.shape[0], -1).mean(dim=1)


def _weighted(per_sample: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return per_sample
    if weights.shape != per_sample.shape:
        raise ValueError(f"loss weights have shape {tuple(weights.shape)}, expected one per sample "
                         f"{tuple(per_sample.shape)}")
    return per_sample * weights.float()


def sft_loss(model_pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Ordinary diffusion loss: MSE between the prediction and its target (noise, velocity), optionally weighted
    per sample, averaged over the batch."""
    return _weighted(per_sample_mse(model_pred, target), weights).mean()


def dpo_loss(
    model_w: torch.Tensor,
    model_l: torch.Tensor,
    ref_w: torch.Tensor,
    ref_l: torch.Tensor,
    target_w: torch.Tensor,
    target_l: torch.Tensor,
    beta: float = 5000.0,
    *,
    weights: torch.Tensor | None = None,
    return_metrics: bool = False,
):
    """Diffusion-DPO loss (Wallace et al. 2023), averaged over the batch.

    loss = -log sigmoid(-beta/2 * [(|e_w - model_w|^2 - |e_l - model_l|^2) - (|e_w - ref_w|^2 - |e_l - ref_l|^2)])

    With `weights` each pair's squared errors are weighted (winner and loser share the pair's noise level, hence its
    weight), as the weighted flow-matching loss is. Swapping winner and loser gives Diffusion-NPO's objective for
    the negative adapter. With return_metrics the
    result is (loss, metrics) where metrics holds the implicit accuracy (share of pairs whose implicit reward
    prefers the winner; ties count half) and the mean implicit rewards and margin (detached floats as tensors).
    """
    # |e - m|^2 - |e - r|^2 = (m - r) . (m + r - 2e), per element: no cancellation between two large squared
    # errors, which beta = 5000 would otherwise amplify to ~1e-3 in fp32.
    # Implicit reward of an image: how much better the policy denoises it than the reference, scaled by beta/2.
    reward_w = -0.5 * beta * _weighted(_error_gap(model_w, ref_w, target_w), weights)
    reward_l = -0.5 * beta * _weighted(_error_gap(model_l, ref_l, target_l), weights)
    margin = reward_w - reward_l
    loss = -F.logsigmoid(margin).mean()
    if not return_metrics:
        return loss
    with torch.no_grad():
        metrics = {
            "accuracy": ((margin > 0).float() + 0.5 * (margin == 0).float()).mean(),
            "reward_chosen": reward_w.mean(),
            "reward_rejected": reward_l.mean(),
            "reward_margin": margin.mean(),
        }
    return loss, metrics
