"""Segmented LoRA layers: every batch segment of one UNet call runs its own mix of peft adapters.

`attach_segmented_lora(unet, mixes)` takes over the forward of every peft LoRA layer in `unet` (the modules, their
parameters and state-dict keys stay exactly as peft made them, so `set_adapters`, `get_peft_model_state_dict` and
`save_lora_weights` keep working). Inside `handle.routing([(n_rows, mix), ...])` (or `segment_routing(model, ...)`)
each such layer computes

    y[rows of segment s] = base(x) + lora_scale * sum_{adapter a in mix_s} weight_a * scaling_a * B_a A_a x

with one `cgkernels.ops.multi_lora_linear` call per layer (Linear, and 1x1 Conv2d as a linear over channels), or a
segmented torch fallback (other convolutions, and LoRA dropout while training). A mix is a weighted sum of adapters;
its adapters are concatenated along the rank with the weights and peft's `scaling` folded into B, so a combined
adapter costs one rank-(r1 + r2) LoRA and never touches the base weights. Outside a routing context the layers run
peft's own forward (the adapters the user activated).

scaling_a is the adapter's configured scale (lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA), fixed when
attaching: weights set with diffusers' `set_adapters` and the transient LoRA scale of `cross_attention_kwargs`
(which both rewrite peft's `layer.scaling`) do not leak into the mixes. The pseudo-adapter ACTIVE_ADAPTERS in a mix
stands for the adapters active in each layer at attach time, at the per-layer scaling peft holds then (the user's
`set_adapters` weights). Mixes are named at attach time or added later (`handle.add_mixes`, keyed by their
((adapter, weight), ...) tuple; at most MAX_MIXES per handle). The LoRA scale of one call is
`handle.routing(..., lora_scale=)`. Under `torch.autocast` the fused path computes in the autocast dtype, as
`nn.Linear` would.

Routing is plain data: the handle's `SegmentRouter.current`, which every layer reads. torch.compile traces that
attribute read and guards on the routing's values, so a compiled model gets one graph per distinct routing and no
graph breaks; per layer, the validated launch (row plan, backend) is cached per routing and input in eager mode.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from cgkernels.ops.multi_lora_linear import (
    MAX_TRITON_RANK,
    SegmentPlan,
    planned_multi_lora_linear,
    prepare_multi_lora_linear,
)

__all__ = [
    "attach_segmented_lora", "segment_routing", "routing_checkpoint", "adapter_scaling", "SegmentedLoraHandle",
    "SegmentRouting", "SegmentRouter", "unwrap_model", "build_routing", "ACTIVE_ADAPTERS", "MAX_MIXES",
]

# A pseudo-adapter name in a mix: the adapters active in each LoRA layer when attaching, at the per-layer scaling peft
# holds then (the user's set_adapters weights, which may differ per block).
ACTIVE_ADAPTERS = "<active>"
# Distinct adapter mixes one attach handle stacks (named at attach time, or added later by add_mixes). The fused op has
# no limit of its own (int32 slot indices); this bounds the stacked factors' memory, about MAX_MIXES x the widest mix
# rank x (in + out features) per layer. Slots are never renumbered (a compiled graph bakes them in).
MAX_MIXES = 64


# --------------------------------------------------------------------------------------------------------------------
# Routing context
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentRouting:
    """Consecutive batch segments (in samples, i.e. along dim 0) and the mix each one runs."""

    offsets: tuple[int, ...]  # S + 1 sample offsets, 0 .. total
    mixes: tuple  # S mixes: a name given at attach time, an ((adapter, weight), ...) tuple (add_mixes), None = base
    lora_scale: float = 1.0  # multiplies every adapter delta (diffusers' cross_attention_kwargs["scale"])

    @property
    def total(self) -> int:
        return self.offsets[-1]


class SegmentRouter:
    """The routing that the segmented layers of one attach handle read, as plain data.

    Every `_SegmentedLoraLayer` holds a reference to its router and reads `router.current` in forward. An attribute
    of a plain object is something torch.compile traces and guards on (a ContextVar is not): each distinct routing
    gets its own graph, and the same routing reuses it. Routings are interned, so one plan is one object (and one
    cache key in every layer).
    """

    _INTERN_SIZE = 256

    def __init__(self):
        self.current: SegmentRouting | None = None
        self._interned: dict[SegmentRouting, SegmentRouting] = {}

    def plan(self, segments, lora_scale: float = 1.0) -> SegmentRouting:
        """The interned routing of `[(n_rows, mix_or_None), ...]` (validated)."""
        return self.intern(build_routing(segments, lora_scale))

    def intern(self, routing: SegmentRouting) -> SegmentRouting:
        known = self._interned.get(routing)
        if known is None:
            if len(self._interned) >= self._INTERN_SIZE:
                self._interned.clear()
            known = self._interned[routing] = routing
        return known

    @contextlib.contextmanager
    def routing_as(self, routing: SegmentRouting | None):
        """Route the layers by `routing` inside this block (None: peft's own forward); restores the previous one."""
        previous, self.current = self.current, routing
        try:
            yield
        finally:
            self.current = previous


def _is_mix_key(mix) -> bool:
    return mix is None or isinstance(mix, str) or (
        isinstance(mix, tuple) and all(isinstance(t, tuple) and len(t) == 2 and isinstance(t[0], str) for t in mix))


def build_routing(segments, lora_scale: float = 1.0) -> SegmentRouting:
    """The SegmentRouting of `[(n_rows, mix), ...]` (validated; empty segments dropped, equal neighbours joined)."""
    if isinstance(lora_scale, bool) or not isinstance(lora_scale, numbers.Real) or not math.isfinite(lora_scale):
        raise ValueError(f"lora_scale must be a finite number, got {lora_scale!r}")
    offsets, mixes = [0], []
    for item in segments:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"segment_routing expects (n_rows, mix_name_or_None) pairs, got {item!r}")
        n_rows, mix = item
        if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 0:
            raise ValueError(f"segment row count must be a non-negative int, got {n_rows!r}")
        if not _is_mix_key(mix):
            raise ValueError(f"segment mix must be a mix name (str), an ((adapter, weight), ...) tuple or None, got "
                             f"{mix!r}")
        if n_rows == 0:
            continue
        if mixes and mixes[-1] == mix:  # neighbours with the same mix are one segment
            offsets[-1] += n_rows
        else:
            offsets.append(offsets[-1] + n_rows)
            mixes.append(mix)
    if not mixes:
        raise ValueError("segment_routing needs at least one segment with rows")
    return SegmentRouting(tuple(offsets), tuple(mixes), float(lora_scale))


def segment_routing(target, segments, *, lora_scale: float = 1.0):
    """Route consecutive batch rows to adapter mixes for the segmented layers of `target` called inside this block.

    target: the SegmentedLoraHandle, or the model it was attached to (also through torch.compile's OptimizedModule
        or a DistributedDataParallel-style `.module` wrapper).
    segments: [(n_rows, mix_name_or_None), ...]; rows are samples along dim 0 of every layer input.
    lora_scale: multiplies every mix's adapter delta in this block (diffusers' LoRA `scale`).
    """
    router = router_of(target)
    return router.routing_as(router.plan(segments, lora_scale))


_HANDLE_ATTR = "_cgkernels_segmented_handle"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under torch.compile's OptimizedModule (`_orig_mod`) and (Distributed)DataParallel wrappers."""
    while True:
        inner = model.__dict__.get("_modules", {}).get("_orig_mod")  # OptimizedModule, without importing dynamo
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def router_of(target) -> "SegmentRouter":
    if isinstance(target, SegmentedLoraHandle):
        return target.router
    if isinstance(target, nn.Module):
        handle = unwrap_model(target).__dict__.get(_HANDLE_ATTR)
        if handle is None:
            raise ValueError(
                f"no segmented LoRA layers are attached to this {type(target).__name__}: call "
                "attach_segmented_lora(model, mixes) first"
            )
        return handle.router
    raise TypeError(
        "segment_routing(target, segments) takes the SegmentedLoraHandle or the model it was attached to first, "
        f"got {type(target).__name__}"
    )


def routing_checkpoint(module, *args):
    """Gradient checkpointing that recomputes under the routing of the original forward.

    Activation checkpointing reruns blocks during backward, after the `segment_routing` block has exited; a plain
    rerun would apply peft's active adapters to every row. `attach_segmented_lora` makes checkpointing that is
    already enabled routing-aware; to enable it after attaching use
    `unet.enable_gradient_checkpointing(gradient_checkpointing_func=routing_checkpoint)`.
    """
    snapshot = _RoutingSnapshot(_routers_in(module))
    return torch.utils.checkpoint.checkpoint(
        module.__call__, *args, use_reentrant=False, context_fn=lambda: (snapshot.restored(), snapshot.restored())
    )


routing_checkpoint._cgkernels_routing_aware = True


def _routers_in(module: nn.Module) -> tuple[SegmentRouter, ...]:
    routers = {}
    for sub in module.modules():
        layer = sub.__dict__.get(_MARK)
        if layer is not None:
            routers[id(layer.router)] = layer.router
    return tuple(routers.values())


class _RoutingSnapshot:
    """The routings some routers hold now, to be set again for a recomputation."""

    def __init__(self, routers):
        self.saved = [(router, router.current) for router in routers]

    @contextlib.contextmanager
    def restored(self):
        previous = [(router, router.current) for router, _ in self.saved]
        for router, routing in self.saved:
            router.current = routing
        try:
            yield
        finally:
            for router, routing in previous:
                router.current = routing


class _RoutedCall:
    """Stands in for a module inside a checkpoint function: every (re)computation runs under one routing."""

    def __init__(self, module: nn.Module, router: SegmentRouter):
        self.module, self.router, self.routing = module, router, router.current

    def __call__(self, *args, **kwargs):
        with self.router.routing_as(self.routing):
            return self.module(*args, **kwargs)


def _routing_aware(checkpoint_func, router: SegmentRouter):
    def call(module, *args):
        return checkpoint_func(_RoutedCall(module, router), *args)

    call._cgkernels_routing_aware = True
    return call


def _make_checkpointing_routing_aware(model: nn.Module, router: SegmentRouter) -> list[tuple[nn.Module, object]]:
    """Wrap diffusers' per-module `_gradient_checkpointing_func`; returns what to restore on detach."""
    wrapped = []
    for module in model.modules():
        func = module.__dict__.get("_gradient_checkpointing_func")
        if func is not None and not getattr(func, "_cgkernels_routing_aware", False):
            module._gradient_checkpointing_func = _routing_aware(func, router)
            wrapped.append((module, func))
    return wrapped


# --------------------------------------------------------------------------------------------------------------------
# Segmented layer
# --------------------------------------------------------------------------------------------------------------------
_MARK = "_cgkernels_segmented"
_ROUTE_CACHE_SIZE = 64  # routings remembered per layer (a pipeline uses a handful)


def adapter_scaling(layer: nn.Module, adapter: str) -> float:
    """peft's configured scale of `adapter` in `layer`: lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)), i.e. before
    diffusers' set_adapters weights or a LoRA `scale` rewrote `layer.scaling`."""
    alpha, rank = layer.lora_alpha[adapter], layer.r[adapter]
    return alpha / math.sqrt(rank) if layer.use_rslora.get(adapter, False) else alpha / rank


@dataclass(frozen=True)
class _Launch:
    """One layer's decision for one routing and input: the adapter slot of each segment, whether any segment has an
    adapter here, and for the fused path the validated row plan and multi_lora_linear backend."""

    slots: tuple[int, ...]
    base_only: bool  # no segment has an adapter in this layer: run the base layer
    plan: SegmentPlan | None = None  # None: base only, or the per-segment fallback (3x3 convs, wide stacks)
    backend: str | None = None


class _SegmentedLoraLayer:
    """Takes over one peft LoRA layer's forward; holds the stacked mixes of that layer."""

    def __init__(self, name: str, layer: nn.Module, mixes: dict, trainable: bool, router: SegmentRouter):
        self.name = name
        self.layer = layer
        self.router = router  # shared by the handle's layers: forward reads router.current
        self.base = layer.get_base_layer()  # resolved once: peft's lookup costs more than a small matmul
        self.trainable = trainable
        self.kind = _layer_kind(name, layer)
        # ACTIVE_ADAPTERS in a mix: the adapters active here now, at the scaling peft holds now (set_adapters).
        self.active_terms = [] if layer.disable_adapters else [
            (a, float(layer.scaling[a])) for a in layer.active_adapters if a in layer.lora_A]
        # Per mix present in this layer: its (adapter, coefficient) terms, coefficient = mix weight * adapter scale,
        # fixed when the mix is added; mixes with no adapter here run the base only (slot -1).
        self.slot_of_mix: dict = {}
        self.terms: list[list[tuple[str, float]]] = []
        self._launches: dict = {}  # eager: (routing, input and weight shape/dtype/device, autocast) -> _Launch
        self._stacks = None
        self.add_mixes(mixes)
        self._had_instance_forward = "forward" in layer.__dict__
        self._previous_forward = layer.__dict__.get("forward")
        self.peft_forward = layer.forward  # bound peft forward (or whatever the user had installed)

    def add_mixes(self, mixes: dict) -> None:
        """Stack more mixes ({key: {adapter: weight}}) after the existing ones: slots are only appended."""
        added = False
        for key, weights in mixes.items():
            if key in self.slot_of_mix:
                continue
            terms: dict[str, float] = {}
            for adapter, weight in weights.items():
                parts = ([(a, weight * scaling) for a, scaling in self.active_terms] if adapter == ACTIVE_ADAPTERS
                         else [(adapter, weight * adapter_scaling(self.layer, adapter))]
                         if adapter in self.layer.lora_A else [])
                for a, coeff in parts:
                    terms[a] = terms.get(a, 0.0) + float(coeff)
            terms = {a: c for a, c in terms.items() if c != 0.0}
            if terms:
                self.slot_of_mix[key] = len(self.terms)
                self.terms.append(list(terms.items()))
                added = True
            else:
                self.slot_of_mix[key] = -1
        if added:
            self._launches.clear()  # a wider stack may change a launch's backend (MAX_TRITON_RANK)
            if not self.trainable:
                self._stacks = self._build_stacks(self.base.weight.dtype)

    # -- install / restore ---------------------------------------------------------------------------------------
    def install(self):
        self.layer.forward = self.forward
        setattr(self.layer, _MARK, self)

    def restore(self):
        if self._had_instance_forward:
            self.layer.forward = self._previous_forward
        else:
            del self.layer.__dict__["forward"]
        delattr(self.layer, _MARK)

    # -- stacked adapters --------------------------------------------------------------------------------------------
    def _factor_matrices(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A [r, K] and B [N, r] of one adapter, as the linear map over channels."""
        a = self.layer.lora_A[adapter].weight
        b = self.layer.lora_B[adapter].weight
        return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)

    def _build_stacks(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """lora_a [A, R, K], lora_b [A, N, R] in `dtype` over this layer's mixes; coefficients folded into B."""
        if not self.terms or self.kind == "conv":
            return None
        mats_a, mats_b = [], []
        for terms in self.terms:
            parts = [self._factor_matrices(a) for a, _ in terms]
            mats_a.append(torch.cat([pa for pa, _ in parts], dim=0))
            mats_b.append(torch.cat([pb * coeff for (_, pb), (_, coeff) in zip(parts, terms)], dim=1))
        rank = max(m.shape[0] for m in mats_a)
        lora_a = torch.stack([F.pad(m, (0, 0, 0, rank - m.shape[0])) for m in mats_a])
        lora_b = torch.stack([F.pad(m, (0, rank - m.shape[1])) for m in mats_b])
        lora_a, lora_b = lora_a.to(dtype), lora_b.to(dtype)
        if not self.trainable:
            lora_a, lora_b = lora_a.detach(), lora_b.detach()
        return lora_a, lora_b

    def _stacks_now(self, device: torch.device, dtype: torch.dtype):
        if self.trainable:
            return self._build_stacks(dtype)  # differentiable w.r.t. peft's lora_A / lora_B parameters
        if self._stacks is not None and (self._stacks[0].device != device or self._stacks[0].dtype != dtype):
            self._stacks = self._build_stacks(dtype)  # moved or cast after attaching, or a new autocast dtype
        return self._stacks

    # -- forward -----------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        routing = self.router.current
        if routing is None:
            return self.peft_forward(x, *args, **kwargs)
        if args or kwargs:
            raise TypeError(f"{self.name}: segmented LoRA layers take only the input tensor inside segment_routing")
        base = self.base
        weight = base.weight
        autocast_dtype = _autocast_dtype(x)
        if torch.compiler.is_compiling():
            # Traced: the launch is built from values dynamo guards on (routing, shapes, dtypes) and becomes
            # constants of the graph; the eager cache below would only add guards on its contents.
            launch = self._new_launch(routing, x, autocast_dtype)
        else:
            key = (routing, x.shape, x.dtype, x.device, weight.dtype, weight.device, autocast_dtype)
            launch = self._launches.get(key)
            if launch is None:
                launch = self._new_launch(routing, x, autocast_dtype)
                if len(self._launches) >= _ROUTE_CACHE_SIZE:
                    self._launches.clear()
                self._launches[key] = launch
        if launch.base_only:
            return base(x)
        if launch.plan is None or self._dropout_active(launch.slots):
            return self._forward_per_segment(x, routing, launch.slots)
        x_rows, weight, bias, lora_a, lora_b = self._fused_operands(x, autocast_dtype)
        y = planned_multi_lora_linear(
            x_rows.reshape(-1, x_rows.shape[-1]), weight, bias, lora_a, lora_b, launch.plan, launch.backend
        )
        y = y.view(*x_rows.shape[:-1], weight.shape[0])
        return y if self.kind == "linear" else y.movedim(-1, 1)

    def _new_launch(self, routing: SegmentRouting, x: torch.Tensor, autocast_dtype) -> "_Launch":
        """Everything the layer needs for one routing and input: adapter slots per segment and, for the fused path,
        the validated row plan and backend. Checked here once, so the per-step path re-validates nothing."""
        if x.shape[0] != routing.total:
            raise RuntimeError(
                f"{self.name}: input has {x.shape[0]} rows along dim 0 but segment_routing covers {routing.total}"
            )
        slots = tuple(self._slot(mix) for mix in routing.mixes)
        if all(s < 0 for s in slots):
            return _Launch(slots, base_only=True)
        if self.kind == "conv":  # the per-segment fallback uses the slots only
            return _Launch(slots, base_only=False)
        # rows of the fused linear per sample: tokens (linear) or pixels (1x1 conv, a linear over channels)
        rows_per_sample = math.prod(x.shape[1:-1] if self.kind == "linear" else x.shape[2:])
        indptr = [o * rows_per_sample for o in routing.offsets]
        scales = [routing.lora_scale] * len(slots)
        x_rows, weight, bias, lora_a, lora_b = self._fused_operands(x, autocast_dtype)
        plan, backend = prepare_multi_lora_linear(x_rows.reshape(-1, x_rows.shape[-1]), weight, bias, lora_a, lora_b,
                                                  indptr, list(slots), scales)
        if backend == "triton" and lora_a.shape[1] > MAX_TRITON_RANK:
            # Mixes concatenate their adapters' ranks (a branch mix plus a per-prompt mix): a stack wider than the
            # Triton kernels are built for runs the per-segment torch path in this layer.
            return _Launch(slots, base_only=False)
        return _Launch(slots, False, plan, backend)

    def _slot(self, mix) -> int:
        if mix is None:
            return -1
        try:
            return self.slot_of_mix[mix]
        except KeyError:
            raise ValueError(f"unknown mix {mix!r}; attached mixes: {list(self.slot_of_mix)} (add mixes with "
                             "handle.add_mixes before routing to them)") from None

    def _fused_operands(self, x, autocast_dtype):
        """x as rows over input features ([..., K]; a 1x1 conv's channels moved last), the base weight [N, K] and
        bias, and the stacked adapters; all in the autocast dtype when autocast is on (as nn.Linear computes)."""
        weight, bias = self.base.weight, self.base.bias
        if self.kind == "conv1x1":
            x, weight = x.movedim(1, -1), weight.flatten(1)
        if autocast_dtype is not None:
            x, weight = x.to(autocast_dtype), weight.to(autocast_dtype)
            bias = None if bias is None else bias.to(autocast_dtype)
        lora_a, lora_b = self._stacks_now(weight.device, weight.dtype)
        return x, weight, bias, lora_a, lora_b

    def _dropout_active(self, slots) -> bool:
        if not (self.trainable and self.layer.training):
            return False
        return any(
            _is_active_dropout(self.layer.lora_dropout[a]) for s in slots if s >= 0 for a, _ in self.terms[s]
        )

    def _forward_per_segment(self, x, routing: SegmentRouting, slots) -> torch.Tensor:
        """Torch fallback: base over all rows, then each segment's adapters on its rows (convs, LoRA dropout)."""
        result = self.base(x)
        pieces = []
        for s, slot in enumerate(slots):
            lo, hi = routing.offsets[s], routing.offsets[s + 1]
            piece = result[lo:hi]
            if slot >= 0:
                for adapter, coeff in self.terms[slot]:
                    lora_a, lora_b = self.layer.lora_A[adapter], self.layer.lora_B[adapter]
                    x_seg = x[lo:hi].to(lora_a.weight.dtype)
                    delta = lora_b(lora_a(self.layer.lora_dropout[adapter](x_seg)))
                    piece = piece + (delta * (coeff * routing.lora_scale)).to(result.dtype)
            pieces.append(piece)
        return torch.cat(pieces, dim=0)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype nn.Linear would compute `x` in under torch.autocast (None: autocast off, or x not eligible)."""
    device_type = x.device.type
    if x.dtype == torch.float64 or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _is_active_dropout(module: nn.Module) -> bool:
    return isinstance(module, nn.Dropout) and module.p > 0 and module.training


def _layer_kind(name: str, layer: nn.Module) -> str:
    base = layer.get_base_layer()
    if isinstance(base, nn.Linear):
        if getattr(layer, "fan_in_fan_out", False):
            raise ValueError(f"{name}: LoRA with fan_in_fan_out=True is not supported")
        return "linear"
    if isinstance(base, nn.Conv2d):
        one_by_one = (
            base.kernel_size == (1, 1)
            and base.stride == (1, 1)
            and base.padding in ((0, 0), "valid")
            and base.groups == 1
        )
        return "conv1x1" if one_by_one else "conv"
    if isinstance(base, (nn.Conv1d, nn.Conv3d)):
        return "conv"
    raise ValueError(f"{name}: LoRA on {type(base).__name__} layers is not supported by the segmented layers")


def _check_layer(name: str, layer: nn.Module, adapters_used: set[str]):
    if layer.merged:
        raise ValueError(f"{name}: adapters {layer.merged_adapters} are merged (fused) into the base weights; "
                         "unfuse them (pipe.unfuse_lora()) before attaching segmented layers")
    if ACTIVE_ADAPTERS in adapters_used and not layer.disable_adapters:
        adapters_used = adapters_used | set(layer.active_adapters)
    for adapter in adapters_used & set(layer.lora_A.keys()):
        if layer.use_dora.get(adapter, False):
            raise ValueError(f"{name}: adapter {adapter!r} is a DoRA adapter; DoRA is not supported")
        if adapter in getattr(layer, "lora_variant", {}):
            variant = type(layer.lora_variant[adapter]).__name__
            raise ValueError(f"{name}: adapter {adapter!r} uses the LoRA variant {variant}, which is not supported")
        if layer.lora_bias.get(adapter, False):
            raise ValueError(f"{name}: adapter {adapter!r} has lora_bias=True, which is not supported")


# --------------------------------------------------------------------------------------------------------------------
# Attach / detach
# --------------------------------------------------------------------------------------------------------------------
class SegmentedLoraHandle:
    """Returned by `attach_segmented_lora`. `routing(segments)` routes its layers inside a with block; `detach()`
    gives every layer its original forward back."""

    def __init__(self, model: nn.Module, layers: list[_SegmentedLoraLayer], mixes: dict[str, dict[str, float]],
                 router: SegmentRouter, checkpointing=()):
        self.model = model
        self.layers = layers
        self.mixes = mixes
        self.router = router
        self._checkpointing = list(checkpointing)
        self.attached = True

    @property
    def mix_names(self) -> list:
        return list(self.mixes)

    def add_mixes(self, mixes) -> None:
        """Stack more adapter mixes, each an ((adapter, weight), ...) tuple (its own key), in every layer; mixes
        already stacked cost nothing. More than MAX_MIXES distinct mixes per handle is a ValueError."""
        new = {mix: dict(mix) for mix in dict.fromkeys(mixes) if mix is not None and mix not in self.mixes}
        if not new:
            return
        if len(self.mixes) + len(new) > MAX_MIXES:
            raise ValueError(
                f"{len(self.mixes) + len(new)} distinct adapter mixes would be stacked on this model; the segmented "
                f"layers hold at most {MAX_MIXES} (each branch's adapters plus each prompt's mix is one). Use fewer "
                "distinct per-prompt mixes, or detach and attach again (cgkernels.unpatch / patch) to start afresh")
        new = _check_mixes(self.model, new)
        used = {a for weights in new.values() for a in weights}
        for layer in self.layers:
            _check_layer(layer.name, layer.layer, used)
        for layer in self.layers:
            layer.add_mixes(new)
        self.mixes.update(new)

    def routing(self, segments, *, lora_scale: float = 1.0):
        """Context manager: route the batch rows to mixes, [(n_rows, mix_name_or_None), ...] (see segment_routing)."""
        return self.router.routing_as(self.router.plan(segments, lora_scale))

    def detach(self):
        if not self.attached:
            return
        for layer in self.layers:
            layer.restore()
        for module, func in self._checkpointing:
            module._gradient_checkpointing_func = func
        if self.model.__dict__.get(_HANDLE_ATTR) is self:
            del self.model.__dict__[_HANDLE_ATTR]
        self.attached = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()


def lora_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """All peft LoRA layers in `module`, with their qualified names."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]


def loaded_adapters(module: nn.Module) -> list[str]:
    names: set[str] = set()
    for _, layer in lora_layers(module):
        names.update(layer.lora_A.keys())
    return sorted(names)


def attach_segmented_lora(unet: nn.Module, mixes: dict, trainable: bool = False) -> SegmentedLoraHandle:
    """Make every peft LoRA layer of `unet` segment-aware for the named adapter mixes.

    mixes: {mix_name: {adapter_name: weight}}, e.g. {"pos": {"pos": 1.0}, "npo_m": {"neg": 2.0, "pos": 1.0}}.
    A weight multiplies the adapter's configured scale (lora_alpha / r): weight 1 is the adapter as trained,
    whatever `set_adapters` weights are set. The pseudo-adapter ACTIVE_ADAPTERS stands for the adapters active now
    at peft's current per-layer scaling (the user's set_adapters weights, read now). More mixes: handle.add_mixes.
    trainable=True rebuilds the stacked adapters each forward so gradients reach peft's lora_A/lora_B (and LoRA
    dropout is applied in train mode); trainable=False stacks them once (inference). Gradient checkpointing that is
    enabled when attaching is made routing-aware (restored on detach); to enable it later, pass
    `gradient_checkpointing_func=routing_checkpoint`.
    """
    unet = unwrap_model(unet)  # act on the module itself, not a torch.compile / DDP wrapper
    if _HANDLE_ATTR in unet.__dict__:
        raise ValueError("segmented LoRA layers are already attached to this model; detach them first")
    mixes = _check_mixes(unet, mixes)
    layers = lora_layers(unet)
    used = {a for weights in mixes.values() for a in weights}
    for name, layer in layers:
        if _MARK in layer.__dict__:
            raise ValueError(f"{name}: segmented LoRA layers are already attached to this model; detach them first")
        _check_layer(name, layer, used)
    if len(mixes) > MAX_MIXES:
        raise ValueError(f"{len(mixes)} mixes; the segmented layers hold at most {MAX_MIXES}")
    router = SegmentRouter()
    segmented = [_SegmentedLoraLayer(name, layer, mixes, trainable, router) for name, layer in layers]
    for layer in segmented:
        layer.install()
    handle = SegmentedLoraHandle(unet, segmented, mixes, router, _make_checkpointing_routing_aware(unet, router))
    unet.__dict__[_HANDLE_ATTR] = handle  # found by segment_routing(model, ...); plain attribute, not a submodule
    return handle


def _check_mixes(unet: nn.Module, mixes) -> dict:
    if not isinstance(mixes, dict):
        raise TypeError(f"mixes must be a dict of {{mix_name: {{adapter: weight}}}}, got {type(mixes).__name__}")
    loaded = loaded_adapters(unet)
    checked = {}
    for mix_name, weights in mixes.items():
        if not _is_mix_key(mix_name) or mix_name is None or not isinstance(weights, dict):
            raise TypeError(f"mix {mix_name!r} must map a str name (or its adapter tuple) to a dict of adapter weights")
        for adapter, w in weights.items():
            if adapter not in loaded and adapter != ACTIVE_ADAPTERS:
                raise ValueError(f"mix {mix_name!r} uses adapter {adapter!r}, which is not loaded; loaded: {loaded}")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ValueError(f"mix {mix_name!r}: weight of {adapter!r} must be a finite number, got {w!r}")
        checked[mix_name] = {a: float(w) for a, w in weights.items()}
    return checked
