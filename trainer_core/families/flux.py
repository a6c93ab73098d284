"""Flux.1 dev (guidance-distilled) and schnell: rectified flow on 2x2-packed latents."""

import contextlib

import comfy.model_base
import torch

from .base import FlowFamily, shift_exponential

# Flux's own schedule: mu grows linearly with the image-token count between these points.
BASE_SEQ_LEN, BASE_SHIFT = 256, 0.5
MAX_SEQ_LEN, MAX_SHIFT = 4096, 1.15


def flux_mu(image_tokens: int) -> float:
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return BASE_SHIFT + slope * (image_tokens - BASE_SEQ_LEN)


class Flux(FlowFamily):
    name = "flux"
    layer_rules = (
        (r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)$", "attention"),
        (r"double_blocks\.\d+\.(img|txt)_mlp\.(0|2)$", "mlp"),
        # linear1 fuses qkv with the MLP input, linear2 the attention output with the MLP output.
        (r"single_blocks\.\d+\.linear[12]$", "attention"),
        (r"(double|single)_blocks\.\d+\.", "linear"),
    )
    checkpoint_block_types = ("DoubleStreamBlock", "SingleStreamBlock")
    # ComfyUI's Flux blocks do `img += ...` / `x += ...` on their inputs.
    blocks_mutate_inputs = True

    @classmethod
    def matches(cls, model) -> bool:
        return type(model) is comfy.model_base.Flux

    @property
    def guidance_distilled(self) -> bool:
        return bool(self.diffusion_model.params.guidance_embed)

    @property
    def base_model_version(self) -> str:
        return "flux1_dev" if self.guidance_distilled else "flux1_schnell"

    @property
    def modelspec_architecture(self) -> str:
        return "flux-1-dev/lora" if self.guidance_distilled else "flux-1-schnell/lora"

    def shift_sigmas(self, sigmas, latents):
        # schnell is sampled unshifted in ComfyUI (shift 1.0), so it trains unshifted too.
        if not self.guidance_distilled:
            return sigmas
        patch = self.diffusion_model.patch_size
        image_tokens = (latents.shape[-2] // patch) * (latents.shape[-1] // patch)
        return shift_exponential(sigmas, flux_mu(image_tokens))

    @contextlib.contextmanager
    def training_patches(self):
        # The blocks add into a tensor after a LayerNorm saved it for backward, which autograd
        # rejects ("modified by an inplace operation"). Normalising a copy keeps the saved
        # tensor unchanged; the copy costs one activation-sized write per norm.
        norms = [
            module for name, module in self.diffusion_model.named_modules()
            if name.startswith(("double_blocks.", "single_blocks.")) and isinstance(module, torch.nn.LayerNorm)
        ]
        handles = [norm.register_forward_pre_hook(_clone_input) for norm in norms]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def predict(self, noisy, sigmas, conditioning):
        guidance = None
        if self.guidance_distilled:
            guidance = torch.full((noisy.shape[0],), self.config.flux_guidance, device=noisy.device)
        return self.diffusion_model(
            self._to_compute(noisy),
            self.model.model_sampling.timestep(sigmas).float(),
            context=self._to_compute(conditioning["context"]),
            y=self._to_compute(conditioning["y"]),
            guidance=None if guidance is None else guidance.float(),
            transformer_options={},
        )

    def sampling_defaults(self):
        if self.guidance_distilled:
            return {"cfg": 1.0, "steps": 20, "sampler": "euler", "scheduler": "simple", "guidance": 3.5}
        return {"cfg": 1.0, "steps": 4, "sampler": "euler", "scheduler": "simple", "guidance": None}

    def conditioning(self, cond, pooled, width, height):
        return {"context": cond[0], "y": pooled[0]}


def _clone_input(module, args):
    if torch.is_grad_enabled():
        return (args[0].clone(),) + tuple(args[1:])
    return None
