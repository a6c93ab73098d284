"""SD 3.5 (Medium, Large, Large-Turbo): MMDiT, rectified flow with shift 3.0."""

import comfy.model_base

from .base import FlowFamily, shift_constant


class SD3(FlowFamily):
    name = "sd3"
    layer_rules = (
        (r"joint_blocks\.\d+\.(x_block|context_block)\.attn2?\.(qkv|proj)$", "attention"),
        (r"joint_blocks\.\d+\.(x_block|context_block)\.mlp\.(fc1|fc2)$", "mlp"),
        (r"joint_blocks\.\d+\.", "linear"),
    )
    checkpoint_block_types = ("JointBlock",)

    @property
    def _variant(self) -> str:
        # SD3.5 Large has 38 joint blocks, Medium 24.
        return "large" if len(self.diffusion_model.joint_blocks) >= 38 else "medium"

    @property
    def base_model_version(self) -> str:
        return f"sd3.5_{self._variant}"

    @property
    def modelspec_architecture(self) -> str:
        return f"stable-diffusion-v3-5-{self._variant}/lora"

    @classmethod
    def matches(cls, model) -> bool:
        return isinstance(model, comfy.model_base.SD3)

    def shift_sigmas(self, sigmas, latents):
        return shift_constant(sigmas, float(self.model.model_sampling.shift))

    def predict(self, noisy, sigmas, conditioning):
        return self.diffusion_model(
            self._to_compute(noisy),
            self.model.model_sampling.timestep(sigmas).float(),
            context=self._to_compute(conditioning["context"]),
            y=self._to_compute(conditioning["y"]),
            transformer_options={},
        )

    def sampling_defaults(self):
        return {"cfg": 4.5, "steps": 28, "sampler": "euler", "scheduler": "simple", "guidance": None}

    def conditioning(self, cond, pooled, width, height):
        return {"context": cond[0], "y": pooled[0]}
