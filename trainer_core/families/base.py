"""The one interface every model family implements, so the training loop never asks which it runs."""

import contextlib
import math
import re

import torch
from torch import nn

from ..config import TrainConfig

LayerKind = str  # "attention" | "mlp" | "linear" | "conv" | "" (never adapted)


class Family:
    """A model family: detection, objective, conditioning, LoRA targets and export naming.

    Subclasses set the class attributes and implement the abstract methods; instances hold the
    loaded ComfyUI model (`comfy.model_base.BaseModel`) and the training config.
    """

    name: str
    # Written into the LoRA file's metadata.
    base_model_version: str
    modelspec_architecture: str
    # (regex over module paths inside diffusion_model, kind); the first match decides.
    layer_rules: tuple[tuple[str, LayerKind], ...]
    # Class names of the modules checkpointed one by one.
    checkpoint_block_types: tuple[str, ...]
    # True where blocks add into their input tensors in place (checkpointing must copy inputs).
    blocks_mutate_inputs: bool = False
    # Whether compile_blocks="auto" compiles this family's blocks on a GPU (it pays where measured).
    compile_pays: bool = True
    # Whether the compiled blocks of one class share their compiled code. Where a block's forward reads
    # nothing of its own index, dynamo compiles a class once for all its blocks (Flux's 57 blocks in 3
    # variants instead of 57: minutes less before the first step); where it does (SDXL reads
    # `transformer_index` and `block` from its options), each block keeps a code object of its own,
    # so no call walks the variants of its class's other blocks.
    blocks_share_compiled_code: bool = True
    # Whether steps are recorded as CUDA graphs under cudaMallocAsync (a ComfyUI server's default allocator), where
    # a recording that fails can end the process (graphs.py): only where it was measured to record on the GPU.
    records_under_cuda_malloc_async: bool = False

    def __init__(self, model, config: TrainConfig):
        self.model = model
        self.config = config
        self._rules = [(re.compile(pattern), kind) for pattern, kind in self.layer_rules]

    @classmethod
    def matches(cls, model) -> bool:
        raise NotImplementedError

    @property
    def diffusion_model(self) -> nn.Module:
        return self.model.diffusion_model

    def layer_kind(self, name: str, module: nn.Module) -> LayerKind:
        is_conv = isinstance(module, nn.Conv2d)
        for pattern, kind in self._rules:
            if (kind == "conv") == is_conv and pattern.search(name):
                return kind
        return ""

    def checkpoint_blocks(self) -> list[nn.Module]:
        return [m for m in self.diffusion_model.modules() if type(m).__name__ in self.checkpoint_block_types]

    @contextlib.contextmanager
    def training_patches(self):
        """Changes the backbone needs only while it trains (none by default)."""
        yield

    def sample_timesteps(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One timestep per sample, in the family's own parametrisation (shape (B,))."""
        raise NotImplementedError

    def noisy_input_and_target(self, latents, noise, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def loss_weight(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-sample weight of the loss, or None for an unweighted mean."""
        return None

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """The backbone's raw prediction (eps, v or velocity), not ComfyUI's denoised x0."""
        raise NotImplementedError

    def conditioning(self, cond: torch.Tensor, pooled: torch.Tensor, width: int, height: int) -> dict:
        """Training conditioning for one sample from ComfyUI's CLIP output (cond (1, T, D), pooled (1, P))."""
        raise NotImplementedError

    def sampling_defaults(self) -> dict:
        """What sampling this family well takes: cfg, steps, sampler, scheduler, and Flux
        guidance (None where the model has no guidance input)."""
        raise NotImplementedError

    def prepare_noise(self, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return noise

    def compute_dtype(self) -> torch.dtype:
        return self.model.manual_cast_dtype or self.model.get_dtype()

    def _to_compute(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.compute_dtype())


class FlowFamily(Family):
    """Rectified flow (SD3, Flux): x_t = (1 - s)·x0 + s·noise, target noise - x0."""

    def shift_sigmas(self, sigmas: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return sigmas

    def sample_timesteps(self, latents, generator):
        batch = latents.shape[0]
        cfg = self.config
        if cfg.timestep_sampling == "uniform":
            sigmas = torch.rand(batch, generator=generator, device=generator.device)
        else:
            mean = cfg.logit_mean if cfg.timestep_sampling == "logit_normal" else 0.0
            std = cfg.logit_std if cfg.timestep_sampling == "logit_normal" else 1.0
            sigmas = torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=generator.device))
        if cfg.timestep_sampling != "sigmoid":
            sigmas = self.shift_sigmas(sigmas, latents)
        return sigmas

    def noisy_input_and_target(self, latents, noise, timesteps):
        s = timesteps.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
        return (1 - s) * latents + s * noise, noise - latents


def shift_constant(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift: s' = shift·s / (1 + (shift - 1)·s)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def shift_exponential(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """Flux's resolution-dependent shift: s' = e^mu / (e^mu + (1/s - 1))."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
