"""cgkernels: fast guidance over LoRA adapters (cPGD, PGD, Diffusion-NPO, any Guidance expression) for diffusers
pipelines.

All guidance branches run as one batched denoiser pass: a fused multi-LoRA linear applies a different adapter mix to
each batch segment, and a fused guidance merge combines the branch predictions.
"""
from cgkernels import ops

__version__ = "0.1.0"


def __getattr__(name):
    # Heavier modules (diffusers, peft) load on first use, so `import cgkernels` stays cheap.
    if name in ("patch", "unpatch"):
        # The module is `patching`, not `patch`: a submodule named `patch` would shadow the function.
        from cgkernels import patching

        return getattr(patching, name)
    if name in ("branch", "Guidance"):
        from cgkernels import guidance

        return getattr(guidance, name)
    if name == "ContrastiveGuidance":
        from cgkernels.guider import ContrastiveGuidance

        return ContrastiveGuidance
    raise AttributeError(f"module 'cgkernels' has no attribute {name!r}")


__all__ = ["ops", "patch", "unpatch", "branch", "Guidance", "ContrastiveGuidance", "__version__"]
