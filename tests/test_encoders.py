"""The tiny VAEs and text encoders work through ComfyUI's own code and carry the weights of their files."""

import comfy.utils
import pytest
import torch
from tiny_encoders import (
    ENCODERS,
    FAMILIES,
    build_clip,
    build_vae,
    clip_files,
    text_encoder_dims,
    vae_file,
)

import nodes  # ComfyUI's nodes.py: conftest puts the host first on sys.path

VAE_CASES = [(4, "AutoencoderKL"), (16, "AutoencodingEngine")]  # SDXL's; SD3's and Flux's


def assert_same_weights(module: torch.nn.Module, path) -> None:
    expected = comfy.utils.load_torch_file(str(path), safe_load=True)
    loaded = module.state_dict()
    assert loaded.keys() == expected.keys()
    unequal = [k for k in expected if not torch.equal(loaded[k].to(expected[k].dtype), expected[k])]
    assert not unequal, f"{len(unequal)} weights differ from {path.name}, e.g. {unequal[:3]}"


@pytest.mark.parametrize("latent_channels, model_class", VAE_CASES)
def test_vae_round_trips_an_image(latent_channels: int, model_class: str) -> None:
    vae = build_vae(latent_channels)
    assert (vae.latent_channels, type(vae.first_stage_model).__name__) == (latent_channels, model_class)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))  # ComfyUI's IMAGE: B, H, W, C

    # As ComfyUI runs its nodes: the VAE is shared by the session, and one first loaded inside a node (in inference
    # mode) holds inference tensors, which an encode with gradients on could not use.
    with torch.inference_mode():
        latents = vae.encode(image)
        decoded = vae.decode(latents)

    assert latents.shape == (1, latent_channels, 8, 8) and latents.isfinite().all()
    assert decoded.shape == (1, 64, 64, 3) and decoded.isfinite().all()


@pytest.mark.parametrize("latent_channels, model_class", VAE_CASES)
def test_vae_carries_every_weight_of_its_file(latent_channels: int, model_class: str) -> None:
    assert_same_weights(build_vae(latent_channels).first_stage_model, vae_file(latent_channels))


@pytest.mark.parametrize("family", FAMILIES)
def test_clip_text_encode_gives_the_documented_conditioning(family: str) -> None:
    clip = build_clip(family)
    dims = text_encoder_dims(family)

    ((cond, extras),) = nodes.CLIPTextEncode().encode(clip, "a photo of a cat")[0]
    ((other, _),) = nodes.CLIPTextEncode().encode(clip, "a watercolour of a dog")[0]

    assert cond.shape == (1, dims.tokens, dims.context_dim) and cond.isfinite().all()
    assert extras["pooled_output"].shape == (1, dims.pooled_dim) and extras["pooled_output"].isfinite().all()
    assert not torch.equal(cond, other), "the conditioning does not depend on the prompt"


@pytest.mark.parametrize("family", FAMILIES)
def test_clip_carries_every_weight_of_its_files(family: str) -> None:
    clip = build_clip(family)
    for name, path in zip(ENCODERS[family], clip_files(family), strict=True):
        assert_same_weights(getattr(clip.cond_stage_model, name).transformer, path)
