"""Test-only ComfyUI nodes, loaded by the live test server (see live_server.py); no user's ComfyUI loads them.

`TestTinyModelLoader` stands in for the pack's Load Base Model where ComfyUI's loaders cannot take a
small model: tiny SDXL and narrow Flux backbones (ComfyUI detects those only at full size) and the
small CLIP-G / T5 text encoders (its loader nodes cannot pass the config that makes them small).
It hands out what tests/tiny_models.py and tests/tiny_encoders.py build, cached for the server's life.
"""

import sys
from pathlib import Path

from comfy_api.latest import ComfyExtension, io

# The tiny model factories live beside this package, in tests/, and take Flux's config from bench/ in the
# repository's root; ComfyUI imports this package by file path. Appended: ComfyUI's own `nodes` module
# comes first, before the pack's `nodes/` package in the root.
TESTS_DIR = Path(__file__).resolve().parents[1]
for folder in (TESTS_DIR, TESTS_DIR.parent):
    if str(folder) not in sys.path:
        sys.path.append(str(folder))

import tiny_encoders  # noqa: E402
import tiny_models  # noqa: E402

# Loader family -> the text encoders' family in tiny_encoders.
ENCODER_FAMILIES = {"sdxl_eps": "sdxl", "sdxl_v": "sdxl", "sd3": "sd3", "flux_dev": "flux", "flux_schnell": "flux"}


class TestTinyModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TestTinyModelLoader",
            display_name="Tiny Model Loader (tests)",
            category="testing",
            description="A tiny diffusion model of a family with its text encoders and VAE, random weights.",
            inputs=[
                io.Combo.Input("family", options=list(ENCODER_FAMILIES), tooltip="Which tiny model to load."),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, family) -> io.NodeOutput:
        encoders = ENCODER_FAMILIES[family]
        model = tiny_models.MODEL_FACTORIES[family]()
        clip = tiny_encoders.build_clip(encoders)
        vae = tiny_encoders.build_vae(tiny_encoders.LATENT_CHANNELS[encoders])
        return io.NodeOutput(model, clip, vae)


class TestNodesExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TestTinyModelLoader]


async def comfy_entrypoint() -> TestNodesExtension:
    return TestNodesExtension()
