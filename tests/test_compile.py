"""torch.compile of patched pipelines: no graph breaks, one graph per step plan, every patch / compile order.

Graph breaks and graphs are counted from dynamo's own counters. Compiles use backend="eager" (dynamo's tracing is
what is checked; the custom ops' fake implementations are exercised by aot / inductor in test_multi_lora_linear.py).
Each pipeline run has two step plans: with stop=0.5 and 2 steps, step 0 is guided (6 branch rows per sample) and
step 1 runs the base model only, so a correct host/core split compiles exactly two graphs and never recompiles.
"""
import contextlib

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import cgkernels
from cgkernels.testing import add_random_lora, tiny_sd_pipeline

PATCH = dict(guidance="contrastive", strength=1.5, start=0.0, stop=0.5)


def _pipe(kind):
    pipe = tiny_sd_pipeline(kind, seed=3)
    add_random_lora(pipe, "pos", rank=4, seed=1, lora_alpha=6)
    add_random_lora(pipe, "neg", rank=3, seed=2, lora_alpha=2,
                    target_modules=("to_k", "to_v", "proj_in", "ff.net.2", "conv1"))
    pipe.unet.set_adapters(["pos", "neg"])
    return pipe


def _run(pipe, steps=2):
    return pipe(prompt=["a red circle"], num_inference_steps=steps, guidance_scale=5.0, guidance_rescale=0.3,
                output_type="latent", generator=torch.Generator().manual_seed(0)).images


@contextlib.contextmanager
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    try:
        yield
    finally:
        torch._dynamo.reset()


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def _assert_close(actual, expected):
    # The eager backend runs the same kernels as eager mode; allow fp32 reassociation anyway.
    scale = expected.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def _compile(pipe, how):
    if how == "wrapper":
        pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend="eager")
    else:
        pipe.unet.compile(fullgraph=True, backend="eager")


@pytest.mark.slow
@pytest.mark.parametrize("kind,how,steps", [("sd15", "wrapper", 2), ("sdxl", "in_place", 1)])
def test_patch_then_compile_one_graph_per_plan_then_unpatch(kind, how, steps):
    """SD1.5: 2 steps, a guided and a base-only plan; SDXL (its added_cond_kwargs): 1 guided step, to save time."""
    pipe = _pipe(kind)
    module = pipe.unet
    plain = _run(pipe, steps=1) if how == "wrapper" else None
    cgkernels.patch(pipe, **PATCH)
    eager = _run(pipe, steps)
    with _fresh_dynamo():
        _compile(pipe, how)
        compiled = _run(pipe, steps)
        assert _graph_breaks() == 0, dict(counters["graph_break"])
        assert _graphs() == steps  # one per step plan: the guided one (and the base-only one)
        again = _run(pipe, steps)
        assert _graphs() == steps  # state updates ran on the host: no recompiles, the same graphs replayed
        _assert_close(compiled, eager)
        _assert_close(again, eager)

        wrapper_forward = pipe.unet.__dict__.get("forward") if how == "wrapper" else None
        cgkernels.unpatch(pipe)
        assert "forward" not in module.__dict__  # the original class forward, bit for bit
        if how == "in_place":
            return
        assert pipe.unet.__dict__.get("forward") is wrapper_forward  # the compile wrapper keeps its own forward
        torch.testing.assert_close(_run(pipe, steps=1), plain, rtol=0, atol=0)  # recompiled: the plain UNet
        cgkernels.patch(pipe, **PATCH)  # patching the compiled UNet again works
        _assert_close(_run(pipe, steps=1), eager_first_step(pipe, module))
        assert _graph_breaks() == 0
        cgkernels.unpatch(pipe)


def eager_first_step(pipe, module):
    """The patched eager result of a one-step run (the compiled wrapper set aside for the call)."""
    compiled, pipe.unet = pipe.unet, module
    try:
        return _run(pipe, steps=1)
    finally:
        pipe.unet = compiled


@pytest.mark.slow
def test_compile_then_patch_acts_on_the_original_module():
    pipe = _pipe("sd15")
    cgkernels.patch(pipe, **PATCH)
    eager = _run(pipe, steps=1)
    cgkernels.unpatch(pipe)
    module = pipe.unet
    with _fresh_dynamo():
        pipe.unet = torch.compile(module, fullgraph=True, backend="eager")
        cgkernels.patch(pipe, **PATCH)
        assert "forward" in module.__dict__  # patched the original module, not the wrapper
        _assert_close(_run(pipe, steps=1), eager)
        assert _graph_breaks() == 0 and _graphs() == 1
        cgkernels.unpatch(pipe)
        assert "forward" not in module.__dict__


def test_unsupported_compile_forms_raise_clear_errors():
    pipe = _pipe("sd15")
    module = pipe.unet
    module.forward = lambda *args, **kwargs: None  # a forward wrapper that hides the UNet's signature
    with pytest.raises(ValueError, match="compile the module"):
        cgkernels.patch(pipe, **PATCH)
    del module.__dict__["forward"]
    cgkernels.patch(pipe, **PATCH)
    patched = module.__dict__["forward"]
    module.forward = lambda *a, **k: None  # replaced behind the patch's back
    with pytest.raises(ValueError, match="replaced after cgkernels.patch"):
        cgkernels.unpatch(pipe)
    module.forward = patched
    cgkernels.unpatch(pipe)
    assert "forward" not in module.__dict__


@pytest.mark.cuda
def test_reduce_overhead_captures_cuda_graphs():
    """On a GPU: inductor + CUDA graphs (mode="reduce-overhead") capture the patched step (no cudagraph skips),
    step state keeps advancing across replays (the window switches plans), and the result matches eager."""
    pipe = _pipe("sd15").to("cuda")
    cgkernels.patch(pipe, **PATCH)
    steps = 4  # steps 0-1 guided, 2-3 base only: replays of both graphs inside one run
    eager = _run(pipe, steps)
    with _fresh_dynamo():
        pipe.unet = torch.compile(pipe.unet, fullgraph=True, mode="reduce-overhead")
        for _ in range(3):  # warm-up and recording runs, then replays
            compiled = _run(pipe, steps)
        assert _graph_breaks() == 0
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
        scale = eager.abs().max().item()
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4 * scale)
        cgkernels.unpatch(pipe)


@pytest.mark.slow
def test_changed_guidance_scale_lora_scale_and_batch_recompile_under_fullgraph():
    """A later call with another guidance scale, LoRA scale or batch is another step plan: it compiles a new graph
    (the plan's coefficients, offsets and batch stay constants, even when the user's compile would make a changed
    value dynamic) and gives the eager result. Before the fix the second call raised under fullgraph=True."""
    pipe = _pipe("sd15")
    cgkernels.patch(pipe, guidance="contrastive", strength=1.5)
    calls = [dict(guidance_scale=5.0), dict(guidance_scale=7.5, cross_attention_kwargs={"scale": 0.5}),
             dict(guidance_scale=7.5, num_images_per_prompt=2)]

    def run(**kwargs):
        return pipe(prompt=["a red circle"], num_inference_steps=1, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **kwargs).images

    eager = [run(**kwargs) for kwargs in calls]
    with _fresh_dynamo():
        pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend="eager")
        for kwargs, expected in zip(calls, eager):
            _assert_close(run(**kwargs), expected)
        assert _graph_breaks() == 0, dict(counters["graph_break"])
        assert _graphs() == len(calls)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["patch_then_assign_wrapper", "assign_wrapper_then_patch", "patch_then_in_place",
                                   "compiled_forward_then_patch"])
def test_every_compile_order_with_a_window(order):
    """The issue's order first: patch(start=0.34), then diffusers' documented `pipe.unet = torch.compile(pipe.unet,
    fullgraph=True)` (before: "pipe.unet was called directly"). Every order gives the eager patched result with the
    [start, stop) window counted from the pipeline call, without graph breaks, one graph per plan."""
    pipe = _pipe("sd15")
    window = dict(guidance="contrastive", strength=1.5, start=0.34)
    cgkernels.patch(pipe, **window)
    eager = _run(pipe, steps=3)  # step 0 unguided, steps 1-2 guided
    cgkernels.unpatch(pipe)
    module = pipe.unet
    with _fresh_dynamo():
        if order == "patch_then_assign_wrapper":
            cgkernels.patch(pipe, **window)
            pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend="eager")
        elif order == "assign_wrapper_then_patch":
            pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend="eager")
            cgkernels.patch(pipe, **window)
        elif order == "patch_then_in_place":
            cgkernels.patch(pipe, **window)
            pipe.unet.compile(fullgraph=True, backend="eager")
        else:  # a compiled forward keeps the UNet's signature: the patch calls it as the model's forward
            module.forward = torch.compile(module.forward, fullgraph=True, backend="eager")
            cgkernels.patch(pipe, **window)
        try:
            _assert_close(_run(pipe, steps=3), eager)
            _assert_close(_run(pipe, steps=3), eager)  # a second pipeline call counts its steps afresh
            assert _graph_breaks() == 0, dict(counters["graph_break"])
            if order != "compiled_forward_then_patch":  # (there dynamo compiles the model's forward per call shape)
                assert _graphs() == 2  # the guided plan and the unguided one
        finally:
            cgkernels.unpatch(pipe)
            pipe.unet = module
            module.__dict__.pop("forward", None)


@pytest.mark.slow
def test_per_prompt_mixes_compile_one_graph_per_plan():
    """Per-prompt adapter mixes under fullgraph=True: each distinct (guidance, mixes, batch) plan is one graph, no
    graph breaks, the eager result; repeating a call replays its graph."""
    pipe = _pipe("sd15")
    cgkernels.patch(pipe, guidance=cgkernels.Guidance(uncond=cgkernels.branch("uncond", neg=1.0),
                                                      cond=cgkernels.branch("cond")))
    calls = [[{"pos": 1.0}, {}], [{"pos": 0.5}, {"neg": 1.0}]]

    def run(mixes):
        return pipe(prompt=["a red circle", "a blue square"], num_inference_steps=1, guidance_scale=5.0,
                    output_type="latent", generator=torch.Generator().manual_seed(0),
                    cross_attention_kwargs={"adapters_per_prompt": mixes}).images

    eager = [run(mixes) for mixes in calls]
    module = pipe.unet
    with _fresh_dynamo():
        pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend="eager")
        try:
            for mixes, expected in zip(calls + calls, eager + eager):
                _assert_close(run(mixes), expected)
            assert _graph_breaks() == 0, dict(counters["graph_break"])
            assert _graphs() == len(calls)
        finally:
            cgkernels.unpatch(pipe)
            pipe.unet = module


@pytest.mark.slow
def test_more_step_plans_than_dynamos_recompile_limit():
    """Dynamo compiles a code object at most recompile_limit (8) times; each step plan is one compile of the core.
    Trying nine guidance scales (or per-prompt mixes, or patching again with other guidance) on one compiled UNet
    passes that: before the fix the 9th plan raised FailOnRecompileLimitHit under fullgraph=True (without it the
    core silently ran eagerly from then on). The limit is lowered to 2 here to keep the test short (with dynamo's
    own config.patch: monkeypatch's undo deleted the config entry, and every later compile in the process failed)."""
    with torch._dynamo.config.patch(recompile_limit=2):
        _more_step_plans_than_the_recompile_limit()


def _more_step_plans_than_the_recompile_limit():
    pipe = _pipe("sd15")
    scales = [3.0, 5.0, 7.0]

    def run(scale):
        return pipe(prompt=["a red circle"], num_inference_steps=1, guidance_scale=scale, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    cgkernels.patch(pipe, guidance="contrastive", strength=1.5)
    eager = [run(scale) for scale in scales]
    module = pipe.unet
    with _fresh_dynamo():
        pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend="eager")
        try:
            for scale, expected in zip(scales, eager):
                _assert_close(run(scale), expected)
            assert _graph_breaks() == 0, dict(counters["graph_break"])
            assert _graphs() == len(scales)  # every plan compiled, none left to run eagerly
        finally:
            cgkernels.unpatch(pipe)
            pipe.unet = module
    assert torch._dynamo.config.recompile_limit == 2  # the user's setting is back after each call
