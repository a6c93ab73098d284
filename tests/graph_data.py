"""Files a training graph reads, made on the fly: a small captioned dataset, and tiny model files that
ComfyUI's own loaders (and so the pack's Load Base Model) take.

Of the tiny models only SD3 is detected by ComfyUI at a small size. Its text encoders are the catch:
ComfyUI's loader nodes build CLIP-G and T5 at full size from any file. With CLIP-L as the only text
encoder, ComfyUI's SD3 encoder pads the context to 4096 wide (as always) and the pooled vector with
zeros for the missing CLIP-G to 768 + 1280, so a tiny SD3 built for that pooled width runs on what
the real loaders give.
"""

import shutil
from pathlib import Path

import comfy.supported_models
import safetensors.torch
import tiny_encoders
import tiny_models
import torch
from PIL import Image, ImageDraw

CLIP_G_POOLED = 1280
SD3_CLIP_L_ONLY_UNET = tiny_models.TINY_SD3_UNET | {"adm_in_channels": tiny_encoders.CLIP_L_WIDTH + CLIP_G_POOLED}
# Shapes and colours of the generated images, each with its caption.
SUBJECTS = (
    ("red", (220, 40, 40), "circle"),
    ("green", (40, 180, 60), "square"),
    ("blue", (40, 80, 220), "circle"),
    ("yellow", (230, 200, 40), "square"),
)


def write_dataset(folder: Path, size: int = 64, count: int = len(SUBJECTS)) -> Path:
    """`count` images of coloured shapes on grey, `size` px square, each with a same-name .txt caption."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (colour, rgb, shape) in enumerate(SUBJECTS[:count]):
        image = Image.new("RGB", (size, size), (128, 128, 128))
        box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=rgb)
        image.save(folder / f"{index:02d}_{colour}_{shape}.png")
        (folder / f"{index:02d}_{colour}_{shape}.txt").write_text(f"a {colour} {shape} on a grey background")
    return folder


def write_sd3_loader_files(models_dir: Path) -> dict[str, str]:
    """A tiny SD3 diffusion model, CLIP-L and a 16-channel VAE in a ComfyUI models folder (subfolders
    diffusion_models, text_encoders, vae); returns the file names by Load Base Model input."""
    names = {"diffusion_model": "tiny_sd3.safetensors", "text_encoder_1": "clip_l.safetensors",
             "vae": "tiny_vae_16ch.safetensors"}
    config = comfy.supported_models.SD3(SD3_CLIP_L_ONLY_UNET)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    tiny_models.initialise_(model.diffusion_model)
    target = models_dir / "diffusion_models" / names["diffusion_model"]
    target.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(model.diffusion_model.state_dict(), str(target))
    # CLIP-L comes first in every family's list of encoder files.
    copies = {"text_encoders": (tiny_encoders.clip_files("flux")[0], names["text_encoder_1"]),
              "vae": (tiny_encoders.vae_file(16), names["vae"])}
    for folder, (source, name) in copies.items():
        (models_dir / folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, models_dir / folder / name)
    return names
