"""What the command-line scripts in python/ share: a --help that keeps the examples' line breaks and shows every
default, and the process state under a multi-process launcher."""
from __future__ import annotations

import argparse
import os

__all__ = ["HelpFormatter", "distributed_state", "process_device"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description verbatim (examples with their continuations), one help line per flag with its default
    appended, unless the default is unset (None / False) or the help already says it."""

    def __init__(self, prog, **kwargs):
        kwargs.setdefault("width", 118)
        kwargs.setdefault("max_help_position", 36)
        super().__init__(prog, **kwargs)

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        # A plain switch (store_true) is off unless given; 0.0 == False, hence the identity tests.
        switch = default is False and not isinstance(action, argparse.BooleanOptionalAction)
        unset = default is None or switch or default == argparse.SUPPRESS
        if unset or "default" in text:
            return text
        if isinstance(default, (list, tuple)):
            default = " ".join(str(v) for v in default)
        return f"{text} (default: {default})" if text else f"default: {default}"


def distributed_state(device: str | None = None):
    """accelerate's process state when launched on several processes (`accelerate launch --multi_gpu`, torchrun),
    else None. Without CUDA (or with device "cpu") the processes talk over gloo on the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available() or str(device).startswith("cpu"))


def process_device(device: str | None, state) -> str | None:
    """The device of this process: under a launcher "cuda" (or nothing) means this process's own GPU."""
    if state is not None and device in (None, "cuda"):
        return str(state.device)
    return device
