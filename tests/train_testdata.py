"""Tiny synthetic preference datasets for the trainer tests (Pick-a-Pic parquet, HPDv3 JSON, JSONL), and the
joint-vs-separate training check the UNet and transformer trainer tests share.

Winners are bright images and losers dark ones, so a test can tell which side of a pair it got from the pixels.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(rng: np.random.Generator, bright: bool, *, size=(40, 36), fmt="PNG") -> bytes:
    low, high = (160, 256) if bright else (0, 96)
    pixels = rng.integers(low, high, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def make_pickapic(path: Path, *, n_rows: int = 12, tie_every: int = 3, corrupt_rows=(4,), null_rows=(),
                  row_group_size: int = 5, seed: int = 0, drop_columns=()) -> int:
    """Write a Pick-a-Pic v2 style parquet; every `tie_every`-th row (from row 2) is a tie. Returns the number of
    non-tie rows. Rows in `corrupt_rows` get an undecodable loser image, rows in `null_rows` a null loser cell."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    usable = 0
    for i in range(n_rows):
        tie = tie_every and i % tie_every == tie_every - 1
        first_wins = i % 2 == 0
        label_0 = 0.5 if tie else (1.0 if first_wins else 0.0)
        fmt = "JPEG" if i % 2 else "PNG"
        jpg_0 = image_bytes(rng, bright=tie or first_wins, fmt=fmt)
        jpg_1 = image_bytes(rng, bright=tie or not first_wins, size=(36, 44), fmt=fmt)
        if i in corrupt_rows:
            if first_wins:
                jpg_1 = b"\xff\xd8 not really a jpeg"
            else:
                jpg_0 = b"\xff\xd8 not really a jpeg"
        if i in null_rows:
            jpg_0, jpg_1 = (jpg_0, None) if first_wins else (None, jpg_1)
        rows["caption"].append(f"a red circle {i}")
        rows["jpg_0"].append(jpg_0)
        rows["jpg_1"].append(jpg_1)
        rows["label_0"].append(label_0)
        rows["label_1"].append(1.0 - label_0)
        usable += not tie
    for column in drop_columns:
        rows.pop(column)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path, row_group_size=row_group_size)
    return usable


def make_image_folder_dataset(folder: Path, dataset_format: str, *, n_pairs: int = 5, missing=(1,), seed: int = 0) -> None:
    """HPDv3 (train.json: prompt, path1 preferred, path2) or JSONL (train.jsonl: prompt, chosen, rejected) with
    images under folder/images; pairs in `missing` point at a file that does not exist."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n_pairs):
        for name, bright in ((f"{i}_good.png", True), (f"{i}_bad.jpg", False)):
            (folder / "images" / name).write_bytes(image_bytes(rng, bright, fmt="PNG" if name.endswith("png") else "JPEG"))
        loser = f"images/{i}_bad.jpg" if i not in missing else f"images/{i}_gone.jpg"
        if dataset_format == "hpdv3":
            records.append({"prompt": f"a blue square {i}", "path1": f"images/{i}_good.png", "path2": loser,
                            "model1": "m1", "model2": "m2"})
        else:
            records.append({"prompt": f"a blue square {i}", "chosen": f"images/{i}_good.png", "rejected": loser})
    if dataset_format == "hpdv3":
        (folder / "train.json").write_text(json.dumps(records))
    else:
        (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def assert_joint_equals_separate(model, params: dict, inputs, objective: str, *, rel: float, beta: float = 5000.0):
    """The trainer's one segmented pass over every adapter (joint_step) gives the losses and LoRA gradients of one
    peft pass per adapter (separate_step), to `rel` of their magnitudes. params: name -> LoRA parameter."""
    import pytest
    import torch

    from cgkernels.lora_layers import attach_segmented_lora
    from cgkernels.train import trainer as T
    from cgkernels.train.config import OBJECTIVE_ADAPTERS

    handle = attach_segmented_lora(model, {"pos": {"pos": 1.0}, "neg": {"neg": 1.0}}, trainable=True)
    joint_loss, joint_metrics = T.joint_step(model, model, inputs, objective, beta, torch.Tensor.backward)
    joint_grads = {n: None if p.grad is None else p.grad.clone() for n, p in params.items()}
    handle.detach()
    for p in params.values():
        p.grad = None
    separate_loss, separate_metrics = T.separate_step(model, inputs, objective, beta, torch.Tensor.backward,
                                                      list(params.values()))
    assert joint_loss.item() == pytest.approx(separate_loss.item(), rel=rel, abs=0)
    trained = OBJECTIVE_ADAPTERS[objective]
    for adapter in trained:
        key = f"loss_{adapter}"
        assert joint_metrics[key].item() == pytest.approx(separate_metrics[key].item(), rel=rel, abs=0)
    for adapter in ("pos", "neg"):
        names = [n for n in params if f".{adapter}." in n]
        if adapter not in trained:  # neither path may touch an adapter the objective does not train
            assert all(joint_grads[n] is None or not joint_grads[n].any() for n in names)
            assert all(params[n].grad is None or not params[n].grad.any() for n in names)
            continue
        joint = torch.cat([joint_grads[n].flatten() for n in names])
        alone = torch.cat([params[n].grad.flatten() for n in names])
        assert alone.abs().max() > 0
        torch.testing.assert_close(joint, alone, rtol=0, atol=rel * alone.abs().max().item())


def with_trainable_adapters(components, target_modules, adapters=("pos", "neg"), randomize_b: bool = False):
    """(a copy of the trainer's components with fresh LoRA adapters on a copy of the denoiser, their parameters).
    randomize_b: peft starts B at zero; make every adapter differ from the base so gradients reach A too."""
    import copy
    import dataclasses

    import torch

    from cgkernels.train import trainer as T

    components = dataclasses.replace(components, denoiser=copy.deepcopy(components.denoiser))
    params = T.add_lora_adapters(components.denoiser, adapters, rank=4, alpha=8.0, target_modules=target_modules)
    if randomize_b:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in params.items():
                if ".lora_B." in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
    components.denoiser.train()
    return components, params
