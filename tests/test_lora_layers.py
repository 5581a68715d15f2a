"""Segmented LoRA layers against float64 per-segment references built from peft's own forward."""
import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from cgkernels.lora_layers import attach_segmented_lora, segment_routing

class TinyNet(nn.Module):
    """Input [B, C, H, W]: a 1x1 conv, a 3x3 conv, then linears over channels (tokens = H*W)."""

    def __init__(self, c=6, hidden=10):
        super().__init__()
        self.proj_in = nn.Conv2d(c, hidden, 1)
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.to_q = nn.Linear(hidden, 7)
        self.to_out = nn.Linear(7, 5, bias=False)

    def forward(self, x):
        h = self.conv(self.proj_in(x))
        tokens = h.flatten(2).transpose(1, 2)  # [B, HW, hidden]
        return self.to_out(self.to_q(tokens))

def make_net(dropout=0.0):
    torch.manual_seed(0)
    net = TinyNet()
    # Different ranks, alphas and target sets: "neg" has no LoRA on to_out, "pos" none on the 3x3 conv.
    pos = LoraConfig(r=3, lora_alpha=6, target_modules=["proj_in", "to_q", "to_out"], init_lora_weights=False,
                     lora_dropout=dropout)
    neg = LoraConfig(r=2, lora_alpha=2, target_modules=["proj_in", "conv", "to_q"], init_lora_weights=False,
                     lora_dropout=dropout)
    net = inject_adapter_in_model(pos, net, adapter_name="pos")
    net = inject_adapter_in_model(neg, net, adapter_name="neg")
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    return net

def set_active(net, adapters):
    """Activate exactly `adapters` (none = base). Set peft's flags directly: its set_adapter also toggles
    requires_grad, which would hide reference gradients."""
    from peft.tuners.lora import LoraLayer

    for m in net.modules():
        if isinstance(m, LoraLayer):
            m._active_adapter = list(adapters)
            m._disable_adapters = not adapters

def run_mix(net64, xs, mix):
    """peft's own forward with the mix's adapters active and each adapter's scaling multiplied by its weight."""
    from peft.tuners.lora import LoraLayer

    weights = mix or {}
    set_active(net64, list(weights))
    saved = {}
    for m in net64.modules():
        if isinstance(m, LoraLayer):
            saved[m] = dict(m.scaling)
            for a, w in weights.items():
                if a in m.scaling:
                    m.scaling[a] = m.scaling[a] * w
    try:
        return net64(xs)
    finally:
        for m, scaling in saved.items():
            m.scaling.update(scaling)

def reference(net, x, segments, mixes, net64=None):
    """float64, one peft forward per segment."""
    net64 = copy.deepcopy(net).double() if net64 is None else net64
    outs, start = [], 0
    for n, mix in segments:
        outs.append(run_mix(net64, x[start:start + n].double(), mixes[mix] if mix else None))
        start += n
    return torch.cat(outs)

MIXES = {"pos": {"pos": 1.0}, "neg": {"neg": 1.0}, "combo": {"neg": 1.5, "pos": -0.7}}

@pytest.mark.parametrize("segments", [
    [(2, "pos"), (1, None), (3, "combo"), (1, "neg")],
    [(1, "combo"), (0, "pos"), (2, "combo"), (2, None)],
])
def test_routed_forward_matches_reference(segments):
    net = make_net()
    x = torch.randn(sum(n for n, _ in segments), 6, 5, 3)
    expected = reference(net, x, segments, MIXES)
    handle = attach_segmented_lora(net, MIXES)
    with torch.no_grad(), segment_routing(net, segments):
        out = net(x)
    handle.detach()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)

def test_outside_routing_is_peft_and_detach_restores():
    net = make_net()
    x = torch.randn(3, 6, 4, 4)
    set_active(net, ["pos", "neg"])
    before = net(x)
    handle = attach_segmented_lora(net, MIXES)
    assert torch.equal(net(x), before)  # outside a routing context: peft's own forward
    set_active(net, ["neg"])
    only_neg = net(x)
    assert not torch.equal(only_neg, before)
    handle.detach()
    assert torch.equal(net(x), only_neg)
    assert all("forward" not in m.__dict__ for m in net.modules())
    keys = set(net.state_dict())
    assert any(k.endswith("lora_A.pos.weight") for k in keys)

def test_trainable_gradients_match_reference():
    net = make_net()
    segments = [(2, "pos"), (1, "combo"), (1, None)]
    x = torch.randn(4, 6, 3, 3)
    grad_out = torch.randn(4, 9, 5)

    ref_net64 = copy.deepcopy(net).double()
    (reference(net, x, segments, MIXES, net64=ref_net64) * grad_out.double()).sum().backward()

    handle = attach_segmented_lora(net, MIXES, trainable=True)
    with segment_routing(net, segments):
        (net(x) * grad_out).sum().backward()
    handle.detach()
    ref_grads = dict(ref_net64.named_parameters())
    checked = 0
    for name, p in net.named_parameters():
        if "lora_" in name:
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad.double(), ref_grads[name].grad, rtol=1e-4, atol=1e-5)
            checked += 1
    assert checked == 12

def test_dropout_only_in_train_mode_and_only_on_adapter_rows():
    net = make_net(dropout=0.5)
    x = torch.randn(3, 6, 4, 4)
    segments = [(1, None), (2, "pos")]
    handle = attach_segmented_lora(net, MIXES, trainable=True)
    net.eval()
    with torch.no_grad(), segment_routing(net, segments):
        eval_out = net(x)
    torch.testing.assert_close(eval_out.double(), reference(net, x, segments, MIXES), rtol=1e-5, atol=1e-5)
    net.train()
    torch.manual_seed(1)
    with torch.no_grad(), segment_routing(net, segments):
        train_out = net(x)
    handle.detach()
    torch.testing.assert_close(train_out[:1], eval_out[:1], rtol=1e-6, atol=1e-6)  # base rows: no dropout
    assert not torch.allclose(train_out[1:], eval_out[1:])

def test_unet_routing_matches_per_adapter_calls():
    from cgkernels.testing import add_random_lora, fp32_merge_atol, tiny_sd_pipeline

    pipe = tiny_sd_pipeline("sd15")
    add_random_lora(pipe, "pos", rank=4, seed=1)
    add_random_lora(pipe, "neg", rank=2, seed=2, target_modules=("to_k", "to_v", "proj_in", "conv1"))
    unet = pipe.unet
    torch.manual_seed(0)
    sample = torch.randn(3, 4, 16, 16)
    text = torch.randn(3, 5, 32)
    t = torch.tensor(500)

    def branch(adapter, rows):
        if adapter is None:
            unet.disable_lora()
        else:
            unet.enable_lora()
            unet.set_adapters([adapter])
        return unet(sample[rows], t, text[rows], return_dict=False)[0]

    with torch.no_grad():
        expected = torch.cat([branch("pos", slice(0, 1)), branch("neg", slice(1, 2)), branch(None, slice(2, 3))])
        unet.enable_lora()
        handle = attach_segmented_lora(unet, {"pos": {"pos": 1.0}, "neg": {"neg": 1.0}})
        with handle.routing([(1, "pos"), (1, "neg"), (1, None)]):
            out = unet(sample, t, text, return_dict=False)[0]
        handle.detach()
    # one batched UNet call vs one call per branch: fp32 rounding bound from the output magnitude
    torch.testing.assert_close(out, expected, rtol=0, atol=fp32_merge_atol([1.0], expected.abs().max()))

def test_lora_scale_configured_scaling_and_cast_after_attach():
    """Mixes use each adapter's configured scale (lora_alpha / r), not peft's live `scaling` (set_adapters weights,
    diffusers' LoRA scale rewrite it); the routing's lora_scale multiplies every delta, fused and conv fallback
    alike; stacks follow a cast of the module after attaching."""
    from peft.tuners.lora import LoraLayer

    net = make_net()
    segments = [(2, "pos"), (1, None), (2, "combo")]
    x = torch.randn(5, 6, 4, 3)
    half = {name: {a: 0.5 * w for a, w in mix.items()} for name, mix in MIXES.items()}
    expected = reference(net, x, segments, half)
    handle = attach_segmented_lora(net, MIXES)
    for m in net.modules():
        if isinstance(m, LoraLayer):
            m.set_scale("pos", 3.0)  # what set_adapters(["pos"], [3.0]) does: must not leak into the mixes
    with torch.no_grad(), segment_routing(net, segments, lora_scale=0.5):
        out = net(x)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    net.double()
    with torch.no_grad(), segment_routing(net, segments, lora_scale=0.5):
        out64 = net(x.double())
    handle.detach()
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="lora_scale"), handle.routing(segments, lora_scale=float("inf")):
        pass

def test_autocast_computes_in_the_autocast_dtype():
    """Under torch.autocast the layers see inputs in the autocast dtype next to fp32 weights, as nn.Linear does."""
    net = make_net()
    segments = [(1, "neg"), (2, "combo"), (1, None)]
    x = torch.randn(4, 6, 3, 5)
    expected = reference(net, x, segments, MIXES)
    handle = attach_segmented_lora(net, MIXES)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), segment_routing(net, segments):
        out = net(x)
    handle.detach()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=3e-2, atol=3e-2 * expected.abs().max().item())

def test_bad_inputs():
    net = make_net()
    with pytest.raises(ValueError, match="loaded"):
        attach_segmented_lora(net, {"x": {"nope": 1.0}})
    with pytest.raises(ValueError, match="finite"):
        attach_segmented_lora(net, {"x": {"pos": float("nan")}})
    handle = attach_segmented_lora(net, MIXES)
    with pytest.raises(ValueError, match="already attached"):
        attach_segmented_lora(net, MIXES)
    with pytest.raises(ValueError, match="unknown mix"), segment_routing(net, [(2, "other")]):
        net(torch.randn(2, 6, 3, 3))
    with pytest.raises(RuntimeError, match="rows"), segment_routing(net, [(3, "pos")]):
        net(torch.randn(2, 6, 3, 3))
    with pytest.raises(ValueError):
        with segment_routing(net, [(-1, "pos")]):
            pass
    handle.detach()

    torch.manual_seed(0)
    dora = inject_adapter_in_model(
        LoraConfig(r=2, target_modules=["to_q"], use_dora=True), TinyNet(), adapter_name="d"
    )
    with pytest.raises(ValueError, match="DoRA"):
        attach_segmented_lora(dora, {"d": {"d": 1.0}})

def test_gradient_checkpointing_recomputes_with_the_routing():
    from cgkernels.lora_layers import routing_checkpoint
    from cgkernels.testing import add_random_lora, tiny_sd_pipeline

    pipe = tiny_sd_pipeline("sd15")
    add_random_lora(pipe, "pos", rank=4, seed=1)
    add_random_lora(pipe, "neg", rank=2, seed=2)
    unet = pipe.unet.train()
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    torch.manual_seed(0)
    sample, text, t = torch.randn(3, 4, 16, 16), torch.randn(3, 5, 32), torch.tensor(500)
    segments = [(1, "pos"), (1, None), (1, "neg")]

    def grads():
        for p in params:
            p.grad = None
        handle = attach_segmented_lora(unet, {"pos": {"pos": 1.0}, "neg": {"neg": 1.0}}, trainable=True)
        with handle.routing(segments):
            out = unet(sample, t, text, return_dict=False)[0]
        out.square().mean().backward()
        handle.detach()
        return [p.grad.clone() for p in params]

    plain = grads()
    unet.enable_gradient_checkpointing()  # diffusers' default function, enabled before attaching
    before_attach = grads()
    unet.disable_gradient_checkpointing()

    handle = attach_segmented_lora(unet, {"pos": {"pos": 1.0}, "neg": {"neg": 1.0}}, trainable=True)
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=routing_checkpoint)  # enabled after attaching
    for p in params:
        p.grad = None
    with handle.routing(segments):
        out = unet(sample, t, text, return_dict=False)[0]
    out.square().mean().backward()
    after_attach = [p.grad.clone() for p in params]
    handle.detach()
    unet.disable_gradient_checkpointing()
    for a, b, c in zip(plain, before_attach, after_attach):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-6)
    assert any(g.abs().max() > 0 for g in plain)

def test_routed_layers_compile_fullgraph_one_graph_per_routing():
    """The layers read the routing as data: dynamo traces them without breaks, compiles once per distinct routing
    (the same plan again reuses its graph), and the results equal eager."""
    from torch._dynamo.utils import counters

    net = make_net()
    x = torch.randn(4, 6, 3, 5)
    plans = [[(1, "neg"), (2, "combo"), (1, None)], [(2, "pos"), (2, None)]]
    handle = attach_segmented_lora(net, MIXES)
    with torch.no_grad():
        eager = []
        for segments in plans:
            with handle.routing(segments):
                eager.append(net(x))
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(net, fullgraph=True, backend="eager")
        for _ in range(2):
            for segments, expected in zip(plans, eager):
                with segment_routing(compiled, segments):  # the model found through the compile wrapper
                    torch.testing.assert_close(compiled(x), expected, rtol=0, atol=0)
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()
    handle.detach()


def test_trainable_layers_compile_with_gradients():
    """The trainer's mechanism under torch.compile (aot_eager): rebuilt stacks and the op's registered backward give
    the eager gradients."""
    net = make_net()
    x = torch.randn(3, 6, 4, 4)
    segments = [(1, "pos"), (1, None), (1, "neg")]
    params = [p for n, p in net.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    handle = attach_segmented_lora(net, MIXES, trainable=True)

    def grads(model):
        for p in params:
            p.grad = None
        with handle.routing(segments):
            model(x).square().sum().backward()
        return [p.grad.clone() for p in params]

    eager = grads(net)
    torch._dynamo.reset()
    compiled = grads(torch.compile(net, fullgraph=True, backend="aot_eager"))
    torch._dynamo.reset()
    handle.detach()
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(g.abs().max() > 0 for g in eager)


def test_eager_launch_validated_once_per_routing_and_shape(monkeypatch):
    """Per (routing, input shape, dtype, device) the layer validates once; repeated steps re-validate nothing."""
    import cgkernels.lora_layers as layers_module

    calls = []
    prepare = layers_module.prepare_multi_lora_linear
    monkeypatch.setattr(layers_module, "prepare_multi_lora_linear", lambda *a: calls.append(1) or prepare(*a))
    net = make_net()
    handle = attach_segmented_lora(net, MIXES)
    fused_layers = 3  # proj_in (1x1 conv), to_q, to_out; the 3x3 conv runs the per-segment fallback
    with torch.no_grad(), handle.routing([(1, "pos"), (1, "combo")]):
        for _ in range(3):
            net(torch.randn(2, 6, 3, 3))
        assert len(calls) == fused_layers
        net(torch.randn(2, 6, 4, 3))  # a new shape: validated once more
        assert len(calls) == 2 * fused_layers
    handle.detach()
