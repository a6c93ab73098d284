"""Per-block gradient checkpointing and other run-scoped changes to ComfyUI's modules."""

import contextlib
import sys
import types
import weakref

import torch
import torch.utils.checkpoint
from torch import nn


def _copy_tensors(values):
    return tuple(v.clone() if isinstance(v, torch.Tensor) else v for v in values)


@contextlib.contextmanager
def wrapped_blocks(blocks: list[nn.Module], checkpoint: bool, copy_inputs: bool, compile: bool,
                   dynamic: bool = False, around=None, share_code: bool = True):
    """Per-block changes for a run: each block its own checkpoint (its activations recomputed in
    backward) and/or compiled by torch.compile (fewer, fused kernels: less launch overhead).

    `copy_inputs` is for blocks that add into their input tensors in place: the checkpoint
    keeps the inputs to replay the block, so the block must work on copies of them.

    `dynamic` compiles each block once for inputs of any size, for runs whose batches come in
    several shapes (aspect-ratio buckets): compiled for fixed sizes, every block would compile
    again at each bucket's first step (SD3.5 Medium on an H200: ~95 s; issue 13).

    `share_code`: blocks of one class compile into shared variants (see `_with_own_code` for when not).

    `around(block, forward)`, where given, wraps each block's (compiled) forward inside its checkpoint,
    so it runs in the forward and again in the recompute (block swap brings the block's weights there).

    Compiled code stays cached after the run, and a later run on the same model and shapes reuses
    it: it reaches the LoRA layers through the blocks' hooks and guards on their shapes and
    values, not on which layer objects they are.
    """
    with contextlib.ExitStack() as stack:
        if compile:
            stack.enter_context(_every_call_compiled())
        for block in blocks:
            forward = block.forward
            if compile:
                forward = _compiled_for_training(forward if share_code else _with_own_code(forward), dynamic)
            if around is not None:
                forward = around(block, forward)
            if checkpoint:
                forward = _checkpointed(forward, copy_inputs)
            block.forward = forward
        try:
            yield
        finally:
            for block in blocks:
                # Drops the instance attribute; the class's forward is back.
                del block.forward


@contextlib.contextmanager
def _every_call_compiled():
    """Lifts dynamo's recompile limits for the run; they come back when it ends.

    Dynamo compiles another variant of a function for each call that fails the guards of those
    it has: another input shape, another block (ComfyUI's blocks specialise on their own index,
    SDXL's on `block` and `transformer_index`), or on the CPU another free-memory reading
    (ComfyUI's attention reads it at every call; compiled code takes it as a constant). Past the
    limit of variants per code object (8) dynamo runs the call eager. A checkpointed block whose
    forward ran compiled and whose recompute eager (or the other way round) saves other tensors in
    each, and backward fails: "Recomputed values for the following tensors have different metadata".
    """
    config = torch._dynamo.config
    with config.patch(recompile_limit=sys.maxsize, accumulated_recompile_limit=sys.maxsize):
        yield


def _compiled_for_training(method, dynamic: bool):
    """The block compiled for the training steps; other calls run it eagerly. A preview samples
    between steps without gradients, at its own size and batch: compiled code guards on both and
    would compile another variant of every block for it, in the middle of the run."""
    compiled = torch.compile(method, dynamic=dynamic)

    def forward(*args, **kwargs):
        if torch.is_grad_enabled():
            return compiled(*args, **kwargs)
        return method(*args, **kwargs)

    return forward


# Each block's forward function with a code object of its own, kept while the block lives so a
# later run on the same (cached) model finds its compiled code again.
_OWN_FORWARDS: "weakref.WeakKeyDictionary[nn.Module, types.FunctionType]" = weakref.WeakKeyDictionary()


def _with_own_code(method):
    """The bound method, run by a code object of its own. Dynamo keeps compiled variants per code
    object and tries them in turn at every call: with one shared by all blocks of a class (SDXL: ~80
    variants for its 70 transformer blocks) each call's lookup walks that list; with one per block
    it finds its block's one or two variants at once."""
    block, function = method.__self__, method.__func__
    own = _OWN_FORWARDS.get(block)
    if own is None:
        own = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                                 function.__defaults__, function.__closure__)
        own.__kwdefaults__ = function.__kwdefaults__
        _OWN_FORWARDS[block] = own
    return types.MethodType(own, block)


def _frozen_options(value):
    """A dict argument as it is now: ComfyUI's backbones keep writing into the one options dict
    they pass every block (`transformer_index`, `block`, `block_type`), so by backward it holds
    the last block's values. One level is enough: nested entries (patches) are not rewritten."""
    return dict(value) if isinstance(value, dict) else value


def _checkpointed(forward, copy_inputs: bool):
    def run(*args, **kwargs):
        if copy_inputs:
            args = _copy_tensors(args)
            kwargs = dict(zip(kwargs, _copy_tensors(kwargs.values()), strict=True))
        return forward(*args, **kwargs)

    def checkpointed_forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # The recompute in backward must replay the block with the arguments the forward had:
        # compiled code guards on their values, and a recompute that misses the forward's
        # compiled variant saves other tensors than the forward did.
        args = tuple(_frozen_options(a) for a in args)
        kwargs = {k: _frozen_options(v) for k, v in kwargs.items()}
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
