"""Calls into ComfyUI internals that differ, or may differ, between the supported host versions."""

import contextlib
import inspect
import sys
import weakref

import comfy.float
import comfy.lora
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import folder_paths
import torch

from .config import ConfigError


def forget_file_list(folder_name: str) -> None:
    """Drops ComfyUI's cached file list of a model folder so the next listing sees new files.

    The cache is checked against folder modification times, which misses a file written within
    the same timestamp tick as the last listing (coarse mtimes on some file systems). ComfyUI
    0.3.75 keeps a module-level cache and a per-request one (`cache_helper`, active while the
    server answers /object_info); a newer host may have neither.
    """
    request_cache = getattr(folder_paths, "cache_helper", None)
    for cache in (getattr(folder_paths, "filename_list_cache", None), getattr(request_cache, "cache", None)):
        if cache is not None:
            cache.pop(folder_name, None)


def unload_models(patchers) -> None:
    """Moves the models of `patchers` (and of their clones) to their offload device and drops them from
    ComfyUI's list of loaded models, leaving every other model where it is.

    ComfyUI has no public call for this: `unload_all_models` would also unload the model about to train,
    and `free_memory` unloads by size, not by model. This uses `current_loaded_models` and
    `LoadedModel.model_unload` as in 0.3.75.
    """
    loaded = comfy.model_management.current_loaded_models
    for index in reversed(range(len(loaded))):
        model = loaded[index].model
        if model is not None and any(model.is_clone(patcher) for patcher in patchers):
            loaded.pop(index).model_unload()
    comfy.model_management.soft_empty_cache()


def plain_loader_options(loader) -> dict:
    """The option that makes a ComfyUI loader return its plain ModelPatcher. ComfyUI 0.33's server loads for
    dynamic VRAM by default on NVIDIA cards: weights stay in host memory and are paged onto the card layer by
    layer as the model runs. Training places and reads the weights itself (block swap, the base weight under a
    LoRA, CUDA graphs of the step), so the models it trains are loaded plain, as on 0.3.75 (no such option)."""
    return {"disable_dynamic": True} if "disable_dynamic" in inspect.signature(loader).parameters else {}


def _loads_from_file_as_is() -> bool:
    """Whether ComfyUI's layers take a file's tensors as they are: 0.33 with comfy-aimdo on (its server on an NVIDIA
    card); 0.3.75 has no such switch."""
    memory_management = sys.modules.get("comfy.memory_management")
    return bool(getattr(memory_management, "aimdo_enabled", False))


def store_in_declared_dtypes(model: torch.nn.Module) -> None:
    """Casts each weight that ComfyUI 0.33 left in its file's dtype to the dtype its layer was built for.

    With dynamic VRAM on (its server, comfy-aimdo), ComfyUI builds its layers empty and gives them the file's
    tensors as they are, whatever dtype it chose to run the model in; the dynamic patcher casts each weight as
    its layer runs, a plain one does not. On the H200 an SD3.5 Medium file in bf16, which ComfyUI runs in fp16,
    trained under autocast and then failed in ComfyUI's sampler at the first preview (fp16 latents, bf16
    weights); a file cast to fp8 on loading would keep its full size. This casts as a load without comfy-aimdo
    does (0.3.75, `lora-train`). Without comfy-aimdo it casts nothing: the loader copied the file into layers
    built in their dtype, so a weight in another dtype was put there on purpose (a CLIP converted with
    `.float()`)."""
    if not _loads_from_file_as_is():
        return
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            dtype = getattr(module, f"{name}_comfy_model_dtype", None)
            # ComfyUI's quantized weights (a tensor subclass) keep their own storage format.
            if dtype is not None and parameter.dtype != dtype and type(parameter.data) is torch.Tensor:
                parameter.data = parameter.data.to(dtype)


# The plain copy made of each dynamic model and text-encoder set (ComfyUI's clone override: the plain model and its
# backups), for as long as the dynamic one lives. ComfyUI keeps it on the patcher it was made for and forgets it
# in every clone of that patcher, so without this each run from a fresh clone would load the model again.
_plain_copies: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _is_dynamic(patcher) -> bool:
    return getattr(patcher, "is_dynamic", lambda: False)()


def _plain_clone(patcher, what: str):
    """A plain ModelPatcher of dynamic `patcher`'s model: the copy made before, else ComfyUI loads it again
    from the file it came from (the loader's `cached_patcher_init`)."""
    override = _plain_copies.get(patcher.model)
    if override is None and getattr(patcher, "cached_patcher_init", None) is None:
        raise ConfigError(f"{what}: it was loaded for ComfyUI's dynamic VRAM by a loader that cannot load it again "
                          "for training; load it with Load Base Model, or start ComfyUI with --disable-dynamic-vram")
    plain = patcher.clone(disable_dynamic=True, model_override=override)
    _plain_copies[patcher.model] = plain.get_clone_model_override()
    return plain


def plain_patcher(patcher):
    """`patcher`, or where it is ComfyUI 0.33's dynamic-VRAM patcher (what its server's own loaders return on
    NVIDIA cards) a plain ModelPatcher of the model, loaded again from its file once (as ComfyUI's torch.compile
    node does) and shared by later runs and clones. A dynamic patcher keeps the weights in host memory and pages
    them onto the card as each layer runs, which block swap, the base weight under a LoRA and a recorded step
    cannot follow. Its weights in the dtypes the model runs in (`store_in_declared_dtypes`)."""
    plain = _plain_clone(patcher, "model") if _is_dynamic(patcher) else patcher
    store_in_declared_dtypes(plain.model)
    return plain


def plain_clip(clip):
    """`clip`, or where its patcher is dynamic (see plain_patcher) a clone that encodes with plain encoders, its
    settings (last layer, tokenizer options) those of `clip`. ComfyUI's `CLIP.clone(disable_dynamic=True)`
    would keep the dynamic encoders as the clone's `cond_stage_model`, which encodes, and load the plain ones
    again at every call. Its weights in the dtypes the encoders run in (`store_in_declared_dtypes`)."""
    if not _is_dynamic(clip.patcher):
        store_in_declared_dtypes(clip.patcher.model)
        return clip
    plain = clip.clone()
    plain.patcher = _plain_clone(clip.patcher, "clip")
    plain.cond_stage_model = plain.patcher.model
    store_in_declared_dtypes(plain.cond_stage_model)
    return plain


# What ComfyUI's partial (lowvram) loading sets on the modules of its ops (comfy/model_patcher.py in 0.3.75:
# `partially_unload`, `wipe_lowvram_weight`), shadowing class attributes with instance ones.
_LOADING_ATTRIBUTES = ("comfy_cast_weights", "prev_comfy_cast_weights", "weight_function", "bias_function",
                       "comfy_patched_weights")


def loading_state(model: torch.nn.Module) -> dict:
    """The loading attributes each module of `model` holds itself (not from its class), by module."""
    return {module: {name: module.__dict__[name] for name in _LOADING_ATTRIBUTES if name in module.__dict__}
            for module in model.modules()}


def restore_loading_state(model: torch.nn.Module, state: dict) -> None:
    """Gives every module of a fully loaded `model` back the loading attributes of `state`, no more.

    A preview on a small card makes ComfyUI unload part of the model for the VAE; loading it fully
    again leaves instance attributes where the class's were read before (`comfy_cast_weights` after
    `wipe_lowvram_weight`). The values are the same, but compiled blocks guard on where an attribute
    comes from, and would all compile again (SD3.5 Large and Flux: 80-100 s after each preview).
    """
    for module in model.modules():
        before = state.get(module, {})
        for name in _LOADING_ATTRIBUTES:
            if name in before:
                setattr(module, name, before[name])
            elif name in module.__dict__:
                delattr(module, name)


def patched_weight(patcher, key: str, weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` (the model's tensor at `key`) with the patcher's patches applied (LoRAs loaded before
    training), or None where it has none: as ComfyUI's loader patches a weight it loads
    (`ModelPatcher.patch_weight_to_device` in 0.3.75: computed in fp32, rounded back to the weight's dtype with
    the key's seed), but into a new tensor, leaving the model's own and ComfyUI's backups alone. For weights
    its loader does not see (swapped blocks)."""
    if key not in patcher.patches:
        return None
    _, set_func, convert_func = comfy.model_patcher.get_key_weight(patcher.model, key)
    if set_func is not None or convert_func is not None:
        raise ConfigError(f"train.blocks_to_swap: {key} is patched by a LoRA loaded before training and stored in a "
                          "format only ComfyUI's loader can patch; set blocks_to_swap to 0, or train without that LoRA")
    patched = comfy.lora.calculate_weight(patcher.patches[key], weight.to(torch.float32, copy=True), key)
    return comfy.float.stochastic_rounding(patched, weight.dtype, seed=comfy.model_patcher.string_to_seed(key))


def device_memory_available(device) -> int:
    """Bytes free on `device` for a run, as ComfyUI reckons it: free memory (the driver's and what PyTorch
    holds unused) less what ComfyUI keeps free for other programs (`--reserve-vram`, which the real-run
    benchmark uses to simulate a smaller card)."""
    return comfy.model_management.get_free_memory(device) - comfy.model_management.extra_reserved_memory()


def device_memory_unclaimed(device) -> int:
    """Bytes on `device` that nothing holds, PyTorch's cache included. ComfyUI counts what the cache holds
    unused as free; a recorded CUDA graph's pool is in that cache and lends nothing to anyone else."""
    free, held_unused_by_torch = comfy.model_management.get_free_memory(device, torch_free_too=True)
    return free - held_unused_by_torch


@contextlib.contextmanager
def attention_kernel_priority(kernels: list):
    """Makes the host's own order of SDPA's kernels, where it keeps one, the run's (`kernels`), and gives the
    host's back after. ComfyUI 0.33 on CUDA (0.3.75 on Windows only) runs each large SDPA call inside
    `sdpa_kernel(comfy.ops.SDPA_BACKEND_PRIORITY, set_priority=True)`, flash first, which overrides the order the
    run sets around its steps: on the H200 the steps' attention, forward and backward, ran FlashAttention-2
    instead of cuDNN's, and Flux and SD3.5 Large stepped 13-14 % slower than on 0.3.75 (bench/NOTES.md §15).
    The host reads the list at each call (and torch.compile as it traces a block), so setting it here reaches
    both."""
    if not hasattr(comfy.ops, "SDPA_BACKEND_PRIORITY"):
        yield
        return
    before = comfy.ops.SDPA_BACKEND_PRIORITY
    comfy.ops.SDPA_BACKEND_PRIORITY = list(kernels)
    try:
        yield
    finally:
        comfy.ops.SDPA_BACKEND_PRIORITY = before


@contextlib.contextmanager
def training_mode(enabled: bool):
    """Tells the host whether the model runs to be trained, and restores what it said before.

    ComfyUI 0.33 picks fused inference kernels unless `comfy.model_management.in_training` is set, and
    some have no backward (Flux's RoPE: "no autograd formula was registered" for
    `comfy_kitchen.apply_rope`); its own trainer sets the flag around its loop. 0.3.75 has no such flag.
    """
    if not hasattr(comfy.model_management, "in_training"):
        yield
        return
    before = comfy.model_management.in_training
    comfy.model_management.in_training = enabled
    try:
        yield
    finally:
        comfy.model_management.in_training = before


def layer_weight(module, like: torch.Tensor) -> torch.Tensor:
    """The weight of a ComfyUI layer as its forward uses it for input `like`: cast to the input's dtype
    and device, fp8 and quantised storage decoded, weight patches applied in low-VRAM mode, as
    `comfy.ops.cast_bias_weight` makes it (0.3.75 returns (weight, bias); newer hosts keep that form
    when `offloadable` is left False). Plain torch layers have their weight cast."""
    if hasattr(module, "weight_function"):
        return comfy.ops.cast_bias_weight(module, like)[0]
    return module.weight.to(device=like.device, dtype=like.dtype)
