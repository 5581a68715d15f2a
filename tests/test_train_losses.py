"""sft_loss and dpo_loss against float64 hand computations (values, metrics and gradients)."""
import math

import pytest
import torch

from cgkernels.train import dpo_loss, sft_loss


def _dpo_by_hand(mw, ml, rw, rl, tw, tl, beta):
    """Per pair, in Python floats over float64 lists: -log sigmoid(-beta/2 * (model diff - ref diff))."""
    losses, margins = [], []
    for i in range(mw.shape[0]):
        def err(a, b):
            d = (a[i].double() - b[i].double()).flatten().tolist()
            return sum(x * x for x in d) / len(d)

        inside = -0.5 * beta * ((err(mw, tw) - err(ml, tl)) - (err(rw, tw) - err(rl, tl)))
        margins.append(inside)
        losses.append(math.log1p(math.exp(-inside)) if inside > -30 else -inside)
    return sum(losses) / len(losses), margins


@pytest.mark.parametrize("shape", [(3, 4, 5, 7), (1, 2, 9), (5, 13)])
@pytest.mark.parametrize("beta", [5000.0, 2.5])
def test_dpo_loss_matches_float64(shape, beta):
    g = torch.Generator().manual_seed(sum(shape))
    tensors = [torch.randn(shape, generator=g) for _ in range(6)]
    # Policy close to the reference, as in training, so the sigmoid is not saturated for every pair.
    mw, ml = tensors[2] + 0.01 * tensors[0], tensors[3] + 0.01 * tensors[1]
    rw, rl, tw, tl = tensors[2], tensors[3], tensors[4], tensors[5]
    loss, metrics = dpo_loss(mw, ml, rw, rl, tw, tl, beta, return_metrics=True)
    expected, margins = _dpo_by_hand(mw, ml, rw, rl, tw, tl, beta)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert metrics["reward_margin"].item() == pytest.approx(sum(margins) / len(margins), rel=1e-4, abs=1e-5)
    accuracy = sum((m > 0) + 0.5 * (m == 0) for m in margins) / len(margins)
    assert metrics["accuracy"].item() == pytest.approx(accuracy)
    assert (metrics["reward_chosen"] - metrics["reward_rejected"]).item() == pytest.approx(
        metrics["reward_margin"].item(), rel=1e-4, abs=1e-4)


def test_dpo_loss_gradient_matches_float64():
    g = torch.Generator().manual_seed(0)
    shape = (4, 3, 5, 5)
    ref_w, ref_l, tw, tl = (torch.randn(shape, generator=g) for _ in range(4))
    mw32 = (ref_w + 0.01 * torch.randn(shape, generator=g)).requires_grad_(True)
    ml32 = (ref_l + 0.01 * torch.randn(shape, generator=g)).requires_grad_(True)
    dpo_loss(mw32, ml32, ref_w, ref_l, tw, tl, 50.0).backward()
    mw64, ml64 = (t.detach().double().requires_grad_(True) for t in (mw32, ml32))
    # The formula written out independently in float64.
    def mse(a, b):
        return (a - b).pow(2).flatten(1).mean(1)

    inside = -0.5 * 50.0 * ((mse(mw64, tw.double()) - mse(ml64, tl.double()))
                            - (mse(ref_w.double(), tw.double()) - mse(ref_l.double(), tl.double())))
    (-torch.nn.functional.logsigmoid(inside).mean()).backward()
    torch.testing.assert_close(mw32.grad, mw64.grad.float(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ml32.grad, ml64.grad.float(), rtol=1e-4, atol=1e-7)


def test_dpo_loss_at_reference_is_log_two():
    g = torch.Generator().manual_seed(1)
    x, y, tw, tl = (torch.randn(2, 3, 4, generator=g) for _ in range(4))
    loss, metrics = dpo_loss(x, y, x, y, tw, tl, return_metrics=True)
    assert loss.item() == pytest.approx(math.log(2.0))
    assert metrics["accuracy"].item() == 0.5 and metrics["reward_margin"].item() == 0.0


def test_sft_loss_and_shape_check():
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    expected = ((pred.double() - target.double()) ** 2).mean().item()
    assert sft_loss(pred, target).item() == pytest.approx(expected, rel=1e-6)
    assert sft_loss(pred.bfloat16(), target.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="shape"):
        sft_loss(pred, target[:2])


def test_weighted_losses_match_float64():
    """Per-sample weights (flow matching's sigma weighting) scale each pair's squared errors, in sft and in dpo."""
    g = torch.Generator().manual_seed(7)
    shape = (3, 4, 5)
    mw, ml, rw, rl, tw, tl = (torch.randn(shape, generator=g) for _ in range(6))
    mw, ml = rw + 0.01 * mw, rl + 0.01 * ml
    weights = torch.tensor([0.5, 2.0, 1.3])
    per_sample = ((mw.double() - tw.double()) ** 2).flatten(1).mean(1)
    assert sft_loss(mw, tw, weights).item() == pytest.approx((weights.double() * per_sample).mean().item(), rel=1e-5)
    # Weighting pair i by w_i is the unweighted loss on that pair with every squared error scaled by w_i: the
    # hand computation sees the pair's tensors scaled by sqrt(w_i) around the target.
    root = weights.double().sqrt().view(-1, 1, 1)
    scaled = [t.double() + (x.double() - t.double()) * root for x, t in ((mw, tw), (ml, tl), (rw, tw), (rl, tl))]
    expected, _ = _dpo_by_hand(*scaled, tw.double(), tl.double(), 5000.0)
    assert dpo_loss(mw, ml, rw, rl, tw, tl, 5000.0, weights=weights).item() == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match=r"loss weights have shape \(2,\), expected one per sample \(3,\)"):
        sft_loss(mw, tw, weights[:2])
