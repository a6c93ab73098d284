"""SDXL: discrete 1000-step schedule, eps or v prediction."""

import comfy.model_base
import torch

from .base import Family


class SDXL(Family):
    name = "sdxl"
    base_model_version = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base/lora"
    layer_rules = (
        (r"transformer_blocks\.\d+\.attn\d\.(to_q|to_k|to_v|to_out\.0)$", "attention"),
        (r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)$", "mlp"),
        (r"(input_blocks|middle_block|output_blocks)\..*", "linear"),
        (r"(input_blocks|middle_block|output_blocks)\..*", "conv"),
    )
    checkpoint_block_types = ("ResBlock", "BasicTransformerBlock")
    # Compiling its ~100 block variants takes 4-5 minutes on an H100 for 1.4x faster steps (0.79 s
    # against 1.09 s eager; bench/NOTES.md §3): a loss for runs of under ~900 steps, so "auto" leaves
    # it eager and "on" compiles it. Measured before CUDA graphs, which took eager steps to 0.156 s (§5).
    compile_pays = False
    blocks_share_compiled_code = False
    # Through the Train LoRA node on the H200 with ComfyUI's default allocator: recorded on 12, 16 and 24 GB cards,
    # 0.152 s a step against 0.9-1.5 s eager (bench/NOTES.md §19; also 8 GB on 0.3.75, seventh session).
    records_under_cuda_malloc_async = True

    @classmethod
    def matches(cls, model) -> bool:
        return isinstance(model, comfy.model_base.SDXL)

    @property
    def v_prediction(self) -> bool:
        return self.model.model_type == comfy.model_base.ModelType.V_PREDICTION

    def _alphas_cumprod(self, timesteps: torch.Tensor) -> torch.Tensor:
        # ComfyUI keeps the schedule as sigmas, sigma² = (1 - ᾱ) / ᾱ.
        sigmas = self.model.model_sampling.sigmas.to(timesteps.device)[timesteps]
        return 1.0 / (1.0 + sigmas**2)

    def sample_timesteps(self, latents, generator):
        steps = self.model.model_sampling.sigmas.shape[0]
        return torch.randint(0, steps, (latents.shape[0],), generator=generator, device=generator.device)

    def prepare_noise(self, noise, generator):
        if self.config.noise_offset == 0:
            return noise
        offset = torch.randn(noise.shape[0], noise.shape[1], 1, 1, generator=generator, device=generator.device)
        return noise + self.config.noise_offset * offset.to(noise)

    def noisy_input_and_target(self, latents, noise, timesteps):
        abar = self._alphas_cumprod(timesteps).view(-1, 1, 1, 1).to(latents.dtype)
        noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        target = abar.sqrt() * noise - (1 - abar).sqrt() * latents if self.v_prediction else noise
        return noisy, target

    def loss_weight(self, timesteps):
        gamma = self.config.min_snr_gamma
        if gamma == 0:
            return None
        abar = self._alphas_cumprod(timesteps)
        snr = abar / (1 - abar)
        clipped = torch.clamp(snr, max=gamma)
        return clipped / (snr + 1) if self.v_prediction else clipped / snr

    def predict(self, noisy, timesteps, conditioning):
        return self.diffusion_model(
            self._to_compute(noisy),
            timesteps.float(),
            context=self._to_compute(conditioning["context"]),
            y=self._to_compute(conditioning["y"]),
            transformer_options={},
        )

    def sampling_defaults(self):
        return {"cfg": 7.0, "steps": 25, "sampler": "euler", "scheduler": "normal", "guidance": None}

    def conditioning(self, cond, pooled, width, height):
        adm = self.model.encode_adm(
            pooled_output=pooled, width=width, height=height, crop_w=0, crop_h=0,
            target_width=width, target_height=height, device=pooled.device,
        )
        return {"context": cond[0], "y": adm[0]}
