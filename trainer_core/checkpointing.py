"""Per-block gradient checkpointing and other run-scoped changes to ComfyUI's modules."""

import contextlib

import torch
import torch.utils.checkpoint
from torch import nn


def _copy_tensors(values):
    return tuple(v.clone() if isinstance(v, torch.Tensor) else v for v in values)


@contextlib.contextmanager
def wrapped_blocks(blocks: list[nn.Module], checkpoint: bool, copy_inputs: bool, compile: bool):
    """Per-block changes for a run: each block its own checkpoint (its activations recomputed in
    backward) and/or compiled by torch.compile (fewer, fused kernels: less launch overhead).

    `copy_inputs` is for blocks that add into their input tensors in place: the checkpoint
    keeps the inputs to replay the block, so the block must work on copies of them.
    """
    if compile:
        # Compiled code guards on the identity of the LoRA layers its hooks call; a layer of an
        # earlier run can share a dead layer's id, so earlier runs' compiled code must go.
        torch._dynamo.reset()
    for block in blocks:
        forward = block.forward
        if compile:
            forward = torch.compile(forward, dynamic=False)
        if checkpoint:
            forward = _checkpointed(forward, copy_inputs)
        block.forward = forward
    try:
        yield
    finally:
        for block in blocks:
            # Drops the instance attribute; the class's forward is back.
            del block.forward


def _checkpointed(forward, copy_inputs: bool):
    def run(*args, **kwargs):
        if copy_inputs:
            args = _copy_tensors(args)
            kwargs = dict(zip(kwargs, _copy_tensors(kwargs.values()), strict=True))
        return forward(*args, **kwargs)

    def checkpointed_forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

    return checkpointed_forward


def make_autograd_safe(module: nn.Module) -> int:
    """Replaces inference-mode parameters and buffers with ordinary copies of equal value.

    ComfyUI builds and loads models inside torch.inference_mode(); such tensors cannot be saved
    for backward. On a GPU the move to the device already makes ordinary tensors, on the CPU it
    does not. Returns how many tensors were copied.
    """
    copied = 0
    with torch.inference_mode(False):
        for owner in module.modules():
            for name, param in list(owner._parameters.items()):
                if param is not None and _untrackable(param):
                    owner._parameters[name] = nn.Parameter(param.clone(), requires_grad=False)
                    copied += 1
            for name, buffer in list(owner._buffers.items()):
                if buffer is not None and _untrackable(buffer):
                    owner._buffers[name] = buffer.clone()
                    copied += 1
    return copied


def _untrackable(tensor: torch.Tensor) -> bool:
    """True for inference tensors, and for tensors made from them outside inference mode
    (moved to a device, say), which report is_inference() False but have no version counter."""
    if tensor.is_inference():
        return True
    try:
        return tensor._version < 0  # never true: reading the counter is the check
    except RuntimeError:
        return True
