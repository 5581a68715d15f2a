"""Host-side guards of `cgkernels.patch`: which pipelines and dtypes it accepts, and what may not change after it.

A patched UNet holds, from patch time on, the adapters' stacked factors, the mode's adapter mixes and (mode "cfg")
the user's active adapters and weights. Changing any of these afterwards through diffusers or peft would otherwise
be silently ignored (or, for `fuse_lora`, applied twice). `AdapterGuard` records version stamps at patch time
(object identities, tensor version counters, a few small tuples: no tensor data is read) and compares them on the
host before guided UNet calls:

- every call: pipe.unet.peft_config, name -> config object (load_lora_weights / delete_adapters / a reload under
  the same name replace it), O(number of adapters);
- at the first UNet call of every pipeline call (the scheduler's timesteps change), and on every call that does not
  come from a pipeline: every LoRA layer's adapter modules, their weights' version counters (in-place edits), its
  merged (fused) adapters and, in mode "cfg", its active adapters and their scaling (set_adapters, disable_lora).

A change raises a ValueError that says what changed and what to do. Changes made mid-call (from a step callback)
are caught at the next pipeline call. Not detected: writes through `.data` (they bypass version counters), which is
how peft's LoRA hotswap (`load_lora_weights(..., hotswap=True)`) copies weights: unpatch before hotswapping.

Pipelines sharing the patched UNet (e.g. built from `pipe.components`) are found by `calling_pipeline`: the guided
forward then reads that pipeline's own guidance settings, or refuses a pipeline class cgkernels does not support.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["SUPPORTED_PIPELINES", "SUPPORTED_DTYPES", "supported_pipeline_classes", "check_pipeline",
           "check_dtype", "check_offload", "check_weight_hooks", "calling_pipeline", "AdapterGuard"]

# diffusers pipelines whose denoising loop calls the UNet once per step on the CFG batch [uncond, cond], with every
# batch-dim input (latents, masked-image latents, added conditioning, IP-Adapter image embeds, ControlNet residuals)
# along dim 0: the row expansion of the patch replicates each of them per branch. Each is tested against a per-branch
# float64 reference (tests/test_patch.py).
SUPPORTED_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionControlNetPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusionXLControlNetPipeline",
    # Transformer (DiT) pipelines (tests/test_patch_transformers.py): SD3 calls its transformer once per step on the
    # CFG batch like the UNet pipelines; Flux once per step on the cond rows, plus a separate uncond call under
    # true CFG (each call runs its own branches, see cgkernels.patching).
    "StableDiffusion3Pipeline",
    "StableDiffusion3Img2ImgPipeline",
    "FluxPipeline",
    "FluxImg2ImgPipeline",
)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

@functools.cache  # called on every UNet call made by a pipeline sharing the patched UNet
def supported_pipeline_classes() -> tuple[type, ...]:
    import diffusers

    return tuple(getattr(diffusers, name) for name in SUPPORTED_PIPELINES)


def check_pipeline(pipe, role: str = "cgkernels.patch") -> None:
    """Supported classes and their subclasses whose `__call__` (the denoising loop, which decides how the denoiser
    is called) is the supported parent's; a subclass with its own `__call__` may call it differently (another
    batch layout, several calls per step) and is refused."""
    cls = type(pipe)
    parent = next((c for c in cls.__mro__ if c in supported_pipeline_classes()), None)
    if parent is None:
        raise ValueError(f"{role} supports {', '.join(SUPPORTED_PIPELINES)} (and their subclasses that keep the "
                         f"parent's __call__); got {cls.__name__}")
    if cls.__call__ is not parent.__call__:
        owner = next(c for c in cls.__mro__ if "__call__" in c.__dict__)
        raise ValueError(f"{role} supports subclasses of {parent.__name__} that keep its __call__ (the denoising "
                         f"loop); {cls.__name__} gets its __call__ from {owner.__name__}, which may call the "
                         "denoiser differently")


def check_dtype(model, attr: str = "unet") -> None:
    """attr: the pipeline attribute holding `model` (unet, transformer), for the message."""
    dtype = model.dtype
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise ValueError(f"pipe.{attr} is {str(dtype).replace('torch.', '')}; cgkernels.patch supports {names} "
                         "pipelines (cast it, e.g. pipe.to(torch.float32), before patching)")


def check_offload(module, attr: str = "unet") -> None:
    """Refuse accelerate hooks that move weights per submodule (enable_sequential_cpu_offload, a device_map): the
    segmented layers read the base and adapter weights directly, outside those submodules' forwards, where such a
    hook leaves them offloaded (on the meta device). Whole-model offload (enable_model_cpu_offload) is supported."""
    hook = module.__dict__.get("_hf_hook")
    if hook is None:
        return
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    hooks = hook.hooks if isinstance(hook, SequentialHook) else (hook,)
    if any(isinstance(h, AlignDevicesHook) for h in hooks):
        raise ValueError(
            f"pipe.{attr} is under accelerate's per-layer device hooks (enable_sequential_cpu_offload or a "
            "device_map), which cgkernels.patch does not support: the fused layers read weights that those hooks "
            "keep offloaded. Use pipe.enable_model_cpu_offload() instead (before or after patching), or remove the "
            "hooks (pipe.remove_all_hooks())"
        )


# diffusers hooks that keep a layer's weights in another dtype (layerwise casting) or on another device (group
# offloading) outside that layer's own forward, where the fused segmented layers read them.
_WEIGHT_HOOKS = ("layerwise_casting", "group_offloading")


def check_weight_hooks(module, attr: str = "unet") -> None:
    """Refuse diffusers' enable_layerwise_casting / enable_group_offload on the denoiser (patch time: one scan)."""
    for name, sub in module.named_modules():
        registry = sub.__dict__.get("_diffusers_hook")
        found = [hook for hook in _WEIGHT_HOOKS if registry is not None and hook in registry.hooks]
        if found:
            raise ValueError(
                f"pipe.{attr}.{name or '(root)'} has diffusers' {found[0]} hook, which cgkernels.patch does not "
                "support: it keeps the weights cast or offloaded outside each layer's own forward, where the fused "
                "LoRA layers read them. Load the model in the compute dtype (torch_dtype=...) and use "
                "pipe.enable_model_cpu_offload() instead"
            )


def calling_pipeline():
    """The diffusers pipeline whose method called the UNet, or None for a direct call (see cgkernels.call_record)."""
    from cgkernels.call_record import calling_pipeline as pipeline_and_locals

    return pipeline_and_locals()[0]


@dataclass
class _LayerStamp:
    name: str
    layer: object
    a_modules: dict  # the layer's lora_A / lora_B ModuleDict contents (peft adds and deletes adapters in them)
    b_modules: dict
    factors: tuple = ()  # (adapter, A weight, B weight, A weight version, B weight version) per adapter
    user: tuple | None = None  # mode "cfg": the active adapters and their scaling

    def factor_stamp(self) -> tuple:
        # Through plain dicts held since patch time: nn.Module.__getattr__ would cost several times more.
        stamp = []
        for adapter, a in self.a_modules.items():
            b = self.b_modules.get(adapter)
            a_weight, b_weight = a._parameters["weight"], None if b is None else b._parameters["weight"]
            stamp.append((adapter, a_weight, b_weight, a_weight._version, None if b is None else b_weight._version))
        return tuple(stamp)


def _user_stamp(layer) -> tuple:
    """What mode "cfg" runs in this layer: the active adapters at their current scaling, or nothing if disabled."""
    if layer.disable_adapters:
        return ()
    return tuple((a, layer.scaling.get(a)) for a in layer.active_adapters)


class AdapterGuard:
    """Version stamps of pipe.unet's adapters at patch time, compared on the host before guided UNet calls."""

    def __init__(self, unet, layers, *, watch_user_settings: bool, attr: str = "unet"):
        """layers: [(name, peft LoRA layer)] of the UNet; watch_user_settings: the mode runs the user's active
        adapters and set_adapters weights (mode "cfg"), so changes to those matter too."""
        self.unet = unet
        self.attr = attr  # the pipeline attribute holding the model (unet, transformer), for messages
        self.configs = dict(getattr(unet, "peft_config", None) or {})
        self.layers = []
        for name, layer in layers:
            stamp = _LayerStamp(name, layer, layer.lora_A._modules, layer.lora_B._modules)
            stamp.factors = stamp.factor_stamp()
            stamp.user = _user_stamp(layer) if watch_user_settings else None
            self.layers.append(stamp)
        self._scanned_for = None  # the scheduler timesteps the layer scan last ran for

    def check(self, caller) -> None:
        """Raise a ValueError if the adapters changed. caller: the pipeline making this UNet call, or None."""
        self._check_configs()
        timesteps = None if caller is None else getattr(caller.scheduler, "timesteps", None)
        if caller is None or timesteps is None or timesteps is not self._scanned_for:
            self._check_layers()
            self._scanned_for = timesteps

    def _check_configs(self) -> None:
        now = getattr(self.unet, "peft_config", None) or {}
        if len(now) == len(self.configs) and all(now.get(k) is v for k, v in self.configs.items()):
            return
        added = sorted(set(now) - set(self.configs))
        deleted = sorted(set(self.configs) - set(now))
        reloaded = sorted(k for k in set(now) & set(self.configs) if now[k] is not self.configs[k])
        what = "; ".join(f"{label}: {names}" for label, names in
                         (("loaded", added), ("deleted", deleted), ("reloaded", reloaded)) if names)
        raise ValueError(f"pipe.{self.attr}'s LoRA adapters changed after cgkernels.patch ({what}); the patch runs the "
                         "adapters as they were at patch time: call cgkernels.unpatch(pipe) and patch again")

    def _check_layers(self) -> None:
        for stamp in self.layers:
            layer = stamp.layer
            if layer.merged_adapters:  # a plain list attribute: cheap
                raise ValueError(
                    f"adapters {list(layer.merged_adapters)} were fused into pipe.{self.attr}'s base weights "
                    f"(fuse_lora) after cgkernels.patch ({stamp.name}); the patched model would apply them twice: call "
                    "pipe.unfuse_lora(), or cgkernels.unpatch(pipe) to use the fused pipeline")
            if stamp.factor_stamp() != stamp.factors:
                raise ValueError(
                    f"LoRA adapters of {stamp.name} were added, deleted or modified in place after cgkernels.patch; "
                    "the patch holds the adapters as they were at patch time: call cgkernels.unpatch(pipe) and "
                    "patch again")
            if stamp.user is not None and _user_stamp(layer) != stamp.user:
                raise ValueError(
                    f"the active adapters or their set_adapters weights changed after cgkernels.patch(guidance='cfg') "
                    f"({stamp.name}); mode 'cfg' runs the adapters active at patch time: call "
                    "cgkernels.unpatch(pipe) and patch again")


def guidance_pipeline(patched, caller):
    """The pipeline whose guidance settings (guidance_scale, guidance_rescale, CFG on/off, scheduler, step count) a
    guided UNet call follows: the calling pipeline, which may be another one sharing the patched UNet (built from
    `patched.components`), or `patched` itself for a direct UNet call."""
    if caller is None or caller is patched:
        return patched
    check_pipeline(caller, role=f"the UNet patched through a {type(patched).__name__} was called by another "
                                "pipeline; cgkernels")
    return caller
