"""The demo's base text-to-image model: a small pixel-space diffusers UNet and CLIP text encoder, trained in-process.

Recipe for a few CPU minutes: v-prediction on a cosine schedule, min-SNR loss weights, AdamW with warm-up and cosine
decay, and sampling from an exponential moving average of the weights (which matters most at short budgets).

The result is an ordinary `StableDiffusionPipeline` folder. Diffusion runs in pixel space (16x16 RGB by default): the pipeline's
VAE is an `AutoencoderKL` whose weights are set in code so that encode and decode are the identity map to ~1e-3
(no VAE training, no blur), which keeps the standard pipeline, LoRA loading and trainer code paths untouched.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cgkernels.demo import world

# The identity VAE carries each pixel channel c in four hidden channels (eps*x + B, -eps*x - B, eps*x - B,
# -eps*x + B), one GroupNorm group per pixel channel: the group's mean is exactly 0 and its variance B^2 +
# eps^2*mean(x^2), so the closing GroupNorm + SiLU is affine in x up to O(eps) (the second-order SiLU terms of
# the +B and -B channels cancel), and the output convolution reads x back from their difference.
_VAE_EPS = 3e-3
_VAE_HIDDEN_PER_CHANNEL = 4

# How long a data-parallel rank waits for the others (start-up: spawn, imports and the dataset take ~10 s).
RANK_TIMEOUT_SECONDS = 120


@dataclass(frozen=True)
class BaseModelConfig:
    resolution: int = 16
    unet_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    text_width: int = 64
    text_layers: int = 2
    n_train_images: int = 6000
    steps: int = 1000
    batch_size: int = 48  # on 2 CPU cores 48 images per step cost ~1.3x what 32 do
    lr: float = 2e-3
    warmup_steps: int = 50
    ema_decay: float = 0.995  # sampling uses an exponential moving average of the weights
    min_snr_gamma: float = 5.0  # min-SNR loss weighting (0 = plain MSE)
    prediction_type: str = "v_prediction"
    caption_dropout: float = 0.1
    seed: int = 0
    # CPU data parallelism: the batch split over this many single-thread processes (see train_base_model).
    train_processes: int = 2

    def key(self) -> str:
        """Cache key: changes whenever anything that shapes the trained weights changes."""
        blob = json.dumps(asdict(self), sort_keys=True) + _source_fingerprint()
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _source_fingerprint() -> str:
    # The world and this file define the model: editing either invalidates cached base models.
    here = Path(__file__).parent
    return hashlib.sha256((here / "world.py").read_bytes() + (here / "base_model.py").read_bytes()).hexdigest()


def identity_vae():
    """An AutoencoderKL (no downsampling, 3 latent channels, scaling 1) whose encode/decode are ~identity on [-1, 1]."""
    from diffusers import AutoencoderKL

    hidden = 3 * _VAE_HIDDEN_PER_CHANNEL
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(hidden,),
        layers_per_block=1,
        latent_channels=3,
        norm_num_groups=3,
        sample_size=32,
        scaling_factor=1.0,
        mid_block_add_attention=False,
    )
    with torch.no_grad():
        for module in vae.modules():  # every residual block becomes the identity
            if module.__class__.__name__ == "ResnetBlock2D":
                module.conv2.weight.zero_()
                module.conv2.bias.zero_()
        _set_spread_conv(vae.encoder.conv_in)
        _set_gather_conv(vae.encoder.conv_out, logvar_channels=3)
        _set_spread_conv(vae.decoder.conv_in)
        _set_gather_conv(vae.decoder.conv_out, logvar_channels=0)
        for conv in (vae.quant_conv, vae.post_quant_conv):
            conv.weight.zero_()
            conv.bias.zero_()
            for c in range(conv.weight.shape[0]):
                conv.weight[c, c, 0, 0] = 1.0
    return vae


def _set_spread_conv(conv) -> None:
    signs = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]])  # (x sign, B sign) per copy
    conv.weight.zero_()
    conv.bias.zero_()
    centre = conv.kernel_size[0] // 2
    for c in range(3):
        for copy, (x_sign, b_sign) in enumerate(signs):
            channel = c * _VAE_HIDDEN_PER_CHANNEL + copy
            conv.weight[channel, c, centre, centre] = x_sign * _VAE_EPS
            conv.bias[channel] = b_sign


def _set_gather_conv(conv, logvar_channels: int) -> None:
    # silu(1 + d) - silu(-1 + d) = 1 + (silu'(1) - silu'(-1)) d + O(d^3), with d = eps * x.
    slope = _silu_slope(1.0) - _silu_slope(-1.0)
    conv.weight.zero_()
    conv.bias.zero_()
    centre = conv.kernel_size[0] // 2
    for c in range(3):
        plus, minus = c * _VAE_HIDDEN_PER_CHANNEL, c * _VAE_HIDDEN_PER_CHANNEL + 2
        conv.weight[c, plus, centre, centre] = 1.0 / (slope * _VAE_EPS)
        conv.weight[c, minus, centre, centre] = -1.0 / (slope * _VAE_EPS)
        conv.bias[c] = -(_silu(1.0) - _silu(-1.0)) / (slope * _VAE_EPS)
    for c in range(logvar_channels):  # a (near) deterministic encoder: std = exp(-15)
        conv.bias[3 + c] = -30.0


def _silu(x: float) -> float:
    return x / (1.0 + math.exp(-x))


def _silu_slope(x: float) -> float:
    sigmoid = 1.0 / (1.0 + math.exp(-x))
    return sigmoid + x * sigmoid * (1.0 - sigmoid)


def build_text_encoder(tokenizer, config: BaseModelConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_width,
        intermediate_size=config.text_width * 2,
        num_hidden_layers=config.text_layers,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(text_config)


def build_unet(config: BaseModelConfig):
    from diffusers import UNet2DConditionModel

    n = len(config.unet_channels)
    return UNet2DConditionModel(
        sample_size=config.resolution,
        in_channels=3,
        out_channels=3,
        block_out_channels=config.unet_channels,
        # Cross-attention (where the prompt enters, and where the LoRA adapters act) only at the coarsest level and
        # in the mid block: attention over 32x32 or 16x16 tokens dominates the cost on a CPU.
        down_block_types=("DownBlock2D",) * (n - 1) + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        layers_per_block=config.layers_per_block,
        cross_attention_dim=config.text_width,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def build_scheduler(prediction_type: str = "v_prediction"):
    from diffusers import DDIMScheduler

    # At the last timesteps of the cosine schedule alpha_bar ~ 0, so the predicted clean image divides by ~0.
    # Stable Diffusion pipelines switch clip_sample off, but thresholding with sample_max_value=1 clips the
    # predicted image to [-1, 1] just the same (our pixel range).
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        thresholding=True,
        sample_max_value=1.0,
        prediction_type=prediction_type,
        set_alpha_to_one=True,
        steps_offset=1,
        timestep_spacing="trailing",
    )


@contextlib.contextmanager
def determinism(threads: int):
    """A fixed thread count and torch's deterministic algorithms (two runs with one seed give the same numbers), for
    the demo's process, its worker processes and the base model's data-parallel ranks; the caller's settings are
    restored afterwards, so a process that runs the demo (the tests) keeps its own thread count."""
    callers_threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(callers_threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def train_base_model(config: BaseModelConfig, out_dir: Path, device: torch.device, progress: bool = True) -> Path:
    """Train UNet + text encoder jointly on the world (noise-prediction MSE) and save a pipeline folder at `out_dir`.

    With `config.train_processes` > 1 (CPU only) the batch is split across that many single-thread processes whose
    gradients are summed (gloo) before each optimiser step: one step of this small model cannot use two threads,
    two processes can use two cores."""
    from diffusers import StableDiffusionPipeline

    processes = config.train_processes
    if processes < 1 or config.batch_size % processes:
        raise ValueError(f"batch_size ({config.batch_size}) must split evenly over train_processes ({processes})")
    if processes > 1 and device.type != "cpu":
        raise ValueError(f"train_processes > 1 is a CPU data-parallel path; on {device.type} use train_processes=1")
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    if processes == 1:
        tokenizer, text_encoder, unet, scheduler = _train_rank(config, 0, None, staging, device, progress)
    else:
        tokenizer, text_encoder, unet, scheduler = _train_data_parallel(config, staging, progress)

    pipe = StableDiffusionPipeline(
        vae=identity_vae(),
        text_encoder=text_encoder.eval().cpu(),
        tokenizer=tokenizer,
        unet=unet.eval().cpu(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(staging)
    shutil.rmtree(staging / "tokenizer_build", ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.replace(out_dir)  # atomic: a half-written folder is never mistaken for a cached model
    return out_dir


def _train_data_parallel(config: BaseModelConfig, staging: Path, progress: bool):
    """Rank 0 trains here, ranks 1.. in spawned processes; all ranks end with the same weights."""
    import multiprocessing
    import tempfile

    context = multiprocessing.get_context("spawn")  # a fork of a process that has run torch's thread pools can hang
    with tempfile.TemporaryDirectory(prefix="cgkernels-base-") as rendezvous, determinism(1):
        helpers = [context.Process(target=_train_helper_rank, args=(config, rank, rendezvous), daemon=True)
                   for rank in range(1, config.train_processes)]
        for helper in helpers:
            helper.start()
        try:
            trained = _train_rank(config, 0, rendezvous, staging, torch.device("cpu"), progress)
        except RuntimeError as error:  # gloo gives up on a rank that died: say which and why
            for helper in helpers:
                helper.join(timeout=5)
            died = [f"rank {rank} exited with code {helper.exitcode}"
                    for rank, helper in enumerate(helpers, start=1) if helper.exitcode not in (None, 0)]
            raise RuntimeError(f"data-parallel base-model training failed ({'; '.join(died) or error})") from error
        finally:
            for helper in helpers:
                helper.join(timeout=60)
                if helper.is_alive():
                    helper.terminate()
        failed = [helper.exitcode for helper in helpers if helper.exitcode != 0]
        if failed:
            raise RuntimeError(f"a base-model training process exited with code {failed[0]}")
    return trained


def _train_helper_rank(config: BaseModelConfig, rank: int, rendezvous: str) -> None:
    with determinism(1):
        _train_rank(config, rank, rendezvous, Path(rendezvous) / f"rank{rank}", torch.device("cpu"), progress=False)


def _train_rank(config: BaseModelConfig, rank: int, rendezvous: str | None, scratch: Path, device: torch.device,
                progress: bool):
    """The training loop of one process. Every rank draws the whole batch from the same generator and trains on
    its slice; `rendezvous` (a folder shared by the ranks, None for one process) is where they meet to sum
    gradients. Returns (tokenizer, text encoder, UNet with the averaged weights, scheduler)."""
    from cgkernels.testing import build_clip_tokenizer

    torch.manual_seed(config.seed)
    tokenizer = build_clip_tokenizer(world.caption_words(), scratch / "tokenizer_build", model_max_length=77)
    # The tokenizer may split some words into pieces: size the context to the longest caption, never truncate.
    longest = max(len(tokenizer(scene.caption).input_ids) for scene in world.all_scenes())
    tokenizer.model_max_length = longest
    text_encoder = build_text_encoder(tokenizer, config).to(device)
    unet = build_unet(config).to(device)
    scheduler = build_scheduler(config.prediction_type)

    images, captions = world.make_dataset(config.n_train_images, config.seed, config.resolution)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # [-1, 1]; identity VAE
    caption_ids = _tokenize(tokenizer, captions)
    empty_ids = _tokenize(tokenizer, [""])[0]

    # The text encoder learns with the UNet: a random frozen encoder gives poorly separated prompt features.
    models = torch.nn.ModuleList([unet, text_encoder])
    gradients = _DataParallelGroup(rendezvous, rank, config.train_processes)
    gradients.broadcast_weights(models)  # every rank starts from rank 0's initialisation
    ema = _ExponentialMovingAverage(models, config.ema_decay)
    optimizer = torch.optim.AdamW(models.parameters(), lr=config.lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(config.warmup_steps, config.steps))
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    generator = torch.Generator().manual_seed(config.seed)
    share = slice(rank * config.batch_size // config.train_processes,
                  (rank + 1) * config.batch_size // config.train_processes)

    models.train()
    bar = tqdm(range(config.steps), desc="base model", disable=not progress)
    for _ in bar:
        index = torch.randint(0, len(pixels), (config.batch_size,), generator=generator)
        dropped = torch.rand(config.batch_size, generator=generator) < config.caption_dropout
        noise = torch.randn((config.batch_size, *pixels.shape[1:]), generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator)
        index, dropped, noise, t = index[share], dropped[share], noise[share].to(device), t[share].to(device)
        x0 = pixels[index].to(device)
        ids = caption_ids[index].clone()
        ids[dropped] = empty_ids  # classifier-free guidance needs an unconditional model too
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        hidden = text_encoder(ids.to(device))[0]
        prediction = unet(noisy, t, hidden).sample
        loss = _weighted_loss(prediction, x0, noise, a.view(-1), config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gradients.average(models)  # the gradient of the whole batch's mean loss, on every rank
        torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        ema.update(models)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(models)  # short runs sample far better from the averaged weights than from the last step's
    return tokenizer, text_encoder, unet, scheduler


class _DataParallelGroup:
    """Averages gradients over the data-parallel ranks through one flat buffer (one gloo call per step); a no-op
    for one process."""

    def __init__(self, rendezvous: str | None, rank: int, processes: int):
        self.processes = processes
        self.group = None
        if processes > 1:
            import datetime

            import torch.distributed as dist
            from torch.distributed.distributed_c10d import ProcessGroupGloo

            store = dist.FileStore(str(Path(rendezvous) / "store"), processes)
            # A group of its own, not torch.distributed's global one: a caller's own process group is left alone.
            # The timeout bounds the wait for a rank that died (each step's exchange takes milliseconds).
            self.group = ProcessGroupGloo(store, rank, processes, datetime.timedelta(seconds=RANK_TIMEOUT_SECONDS))

    @torch.no_grad()
    def broadcast_weights(self, module: torch.nn.Module) -> None:
        if self.group is None:
            return
        weights = [p.detach() for p in module.parameters()]
        flat = torch.cat([w.reshape(-1) for w in weights])
        self.group.broadcast(flat, 0).wait()
        _copy_from_flat(weights, flat)

    @torch.no_grad()
    def average(self, module: torch.nn.Module) -> None:
        if self.group is None:
            return
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.group.allreduce([flat]).wait()
        _copy_from_flat(grads, flat.div_(self.processes))


def _copy_from_flat(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def _warmup_cosine(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _weighted_loss(prediction, x0, noise, alpha_bar, config: BaseModelConfig) -> torch.Tensor:
    """MSE against the scheduler's target, each timestep weighted by min-SNR (Hang et al. 2023) when enabled."""
    a = alpha_bar.view(-1, 1, 1, 1)
    if config.prediction_type == "v_prediction":
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
    else:
        target = noise
    per_item = (prediction - target).pow(2).mean(dim=(1, 2, 3))
    if config.min_snr_gamma > 0:
        snr = alpha_bar / (1 - alpha_bar).clamp_min(1e-8)
        clipped = snr.clamp(max=config.min_snr_gamma)
        # Weights relative to the plain loss of each target: v's MSE already carries a factor (snr + 1).
        weight = clipped / (snr + 1) if config.prediction_type == "v_prediction" else clipped / snr.clamp_min(1e-8)
        per_item = per_item * weight
    return per_item.mean()


class _ExponentialMovingAverage:
    """Shadow copies of the parameters, with the usual warm-up so early steps are not averaged in for long."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.steps = 0
        self.shadow = [p.detach().clone() for p in module.parameters()]

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for shadow, param in zip(self.shadow, module.parameters()):
            shadow.lerp_(param.detach(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for shadow, param in zip(self.shadow, module.parameters()):
            param.copy_(shadow)


def _tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def cached_base_model(config: BaseModelConfig, cache_dir: Path, device: torch.device, progress: bool = True,
                      numerics: str = "") -> tuple[Path, bool]:
    """The pipeline folder for `config`, trained now unless already cached. Returns (folder, was_cached).
    `numerics` names what decides the rounding (torch version, threads, CPU kernels): part of the cache key."""
    key = hashlib.sha256((config.key() + numerics).encode()).hexdigest()[:12]
    folder = Path(cache_dir) / f"base-{key}"
    if (folder / "model_index.json").exists():
        return folder, True
    start = time.perf_counter()
    train_base_model(config, folder, device, progress)
    (folder / "train_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    return folder, False


def load_pipeline(folder: Path, device: torch.device):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def vae_roundtrip_error(vae, images: np.ndarray) -> float:
    """Largest absolute pixel error of decode(encode(x)) on uint8 images, in [-1, 1] units."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return float((y - x).abs().max())
