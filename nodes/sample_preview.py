import comfy.samplers
from comfy_api.latest import io

from ..trainer_core.sampling import SampleSettings, encode_prompts, sample_images
from .compat import ADVANCED
from .lora_config import CATEGORY


def prompt_lines(text: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in text.splitlines() if line.strip())


class SamplePreviewNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoraTrainer_SamplePreview",
            display_name="Sample Preview",
            category=CATEGORY,
            description="Images from a model (with or without a LoRA), one per prompt line, all from one seed.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (ComfyUI MODEL)."),
                io.Clip.Input("clip", tooltip="The text encoders (ComfyUI CLIP)."),
                io.Vae.Input("vae", tooltip="The VAE (ComfyUI VAE)."),
                io.String.Input("prompts", multiline=True, default="a photo of a cat",
                                tooltip="One prompt per line; each gives one image."),
                io.Int.Input("seed", default=42, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Noise seed, the same for every prompt."),
                io.Int.Input("width", default=1024, min=16, max=8192, step=16, tooltip="Image width in pixels."),
                io.Int.Input("height", default=1024, min=16, max=8192, step=16, tooltip="Image height in pixels."),
                io.Int.Input("steps", default=0, min=0, max=200,
                             tooltip="Sampling steps; 0 uses the family's default."),
                io.Float.Input("cfg", default=0.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance; 0 uses the family's default (1 for Flux)."),
                io.Float.Input("guidance", default=0.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Flux dev's guidance value; 0 uses 3.5. Ignored by other models.", **ADVANCED),
                io.Combo.Input("sampler", options=["default", *comfy.samplers.KSampler.SAMPLERS], default="default",
                               tooltip="Sampler; 'default' picks the family's.", **ADVANCED),
                io.Combo.Input("scheduler", options=["default", *comfy.samplers.KSampler.SCHEDULERS],
                               default="default", tooltip="Noise schedule; 'default' picks the family's.", **ADVANCED),
                io.String.Input("negative", default="", tooltip="Negative prompt (used when cfg > 1).", **ADVANCED),
            ],
            outputs=[io.Image.Output(display_name="images")],
        )

    @classmethod
    def execute(cls, model, clip, vae, prompts, seed, width, height, steps, cfg, guidance, sampler, scheduler,
                negative) -> io.NodeOutput:
        settings = SampleSettings(
            prompts=prompt_lines(prompts), seed=seed, width=width, height=height, steps=steps, cfg=cfg,
            guidance=guidance, sampler="" if sampler == "default" else sampler,
            scheduler="" if scheduler == "default" else scheduler, negative=negative,
        ).resolved(model)
        images = sample_images(model, vae, encode_prompts(clip, settings), settings)
        return io.NodeOutput(images)
