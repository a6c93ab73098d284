"""The test backbones as ComfyUI sees them: detected family, fully set weights, a working forward pass."""

from pathlib import Path

import comfy.model_base
import folder_paths
import pytest
import safetensors.torch
import torch
from comfy.model_base import ModelType
from tiny_models import MODEL_FACTORIES, assert_initialised, build_flux_full_width, build_sdxl_full, random_inputs

# factory name: (model class, supported_models config class name, model type, latent channels)
EXPECTED = {
    "sdxl_eps": (comfy.model_base.SDXL, "SDXL", ModelType.EPS, 4),
    "sdxl_v": (comfy.model_base.SDXL, "SDXL", ModelType.V_PREDICTION, 4),
    "sd3": (comfy.model_base.SD3, "SD3", ModelType.FLOW, 16),
    "flux_dev": (comfy.model_base.Flux, "Flux", ModelType.FLUX, 16),
    "flux_schnell": (comfy.model_base.Flux, "FluxSchnell", ModelType.FLOW, 16),
}
FAST = list(MODEL_FACTORIES)

# build, expected family, (unet_config key, value) that only the full-size model has. Ordered so that each
# full-size model is loaded once: only the latest one stays cached.
FULL_SIZE = [
    pytest.param(lambda: build_flux_full_width("dev"), "flux_dev", ("hidden_size", 3072), id="flux_dev_full_width"),
    pytest.param(
        lambda: build_flux_full_width("schnell"), "flux_schnell", ("hidden_size", 3072), id="flux_schnell_full_width"
    ),
    pytest.param(lambda: build_sdxl_full("eps"), "sdxl_eps", ("model_channels", 320), id="sdxl_full_eps"),
    pytest.param(lambda: build_sdxl_full("v"), "sdxl_v", ("model_channels", 320), id="sdxl_full_v"),
]


def predict(model: comfy.model_base.BaseModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    conds = {key: inputs[key] for key in ("y", "guidance") if key in inputs}
    with torch.no_grad():
        return model.apply_model(inputs["x"], inputs["sigma"], c_crossattn=inputs["context"], **conds)


def assert_detected_as(model: comfy.model_base.BaseModel, expected_name: str) -> None:
    model_class, config_name, model_type, latent_channels = EXPECTED[expected_name]
    assert type(model) is model_class
    assert type(model.model_config).__name__ == config_name
    assert model.model_type == model_type
    assert model.latent_format.latent_channels == latent_channels


def test_comfyui_folders_are_redirected_out_of_the_host(comfy_host: Path, comfy_dirs: Path) -> None:
    folders = [
        folder_paths.get_output_directory(),
        folder_paths.get_input_directory(),
        folder_paths.get_temp_directory(),
        folder_paths.get_user_directory(),
    ]
    for name, (paths, _) in folder_paths.folder_names_and_paths.items():
        if name != "custom_nodes":  # the host's installed node packs: read, never written
            folders += paths
    for folder in map(Path, folders):
        assert folder.is_relative_to(comfy_dirs) and not folder.is_relative_to(comfy_host), folder


@pytest.mark.parametrize("name", FAST)
def test_comfyui_sees_the_intended_family(name: str) -> None:
    assert_detected_as(MODEL_FACTORIES[name]().model, name)


@pytest.mark.parametrize("name", FAST)
def test_every_weight_is_set_and_the_state_dict_defines_the_model(name: str) -> None:
    patcher = MODEL_FACTORIES[name]()
    model = patcher.model
    assert_initialised(model)
    # A fresh model of the same config, filled only from a safetensors copy of the state dict, must predict the
    # same: nothing the output depends on lives outside the state dict (e.g. a non-persistent torch.empty buffer).
    weights = safetensors.torch.load(safetensors.torch.save(model.diffusion_model.state_dict()))
    fresh = type(model)(model.model_config, model_type=model.model_type)
    fresh.diffusion_model.load_state_dict(weights, strict=True)
    inputs = random_inputs(patcher, batch=2, seed=1)
    assert torch.equal(predict(fresh, inputs), predict(model, inputs))


@pytest.mark.parametrize("name", FAST)
def test_forward_is_finite_and_follows_the_conditioning(name: str) -> None:
    patcher = MODEL_FACTORIES[name]()
    inputs = random_inputs(patcher, batch=2)
    out = predict(patcher.model, inputs)
    assert out.shape == inputs["x"].shape
    assert out.isfinite().all()
    shifted = predict(patcher.model, inputs | {"context": inputs["context"] + 1.0})
    assert not torch.allclose(out, shifted)


@pytest.mark.parametrize("name", FAST)
def test_a_second_build_clones_the_cached_model(name: str) -> None:
    first, second = MODEL_FACTORIES[name](), MODEL_FACTORIES[name]()
    assert first is not second
    assert first.model is second.model


@pytest.mark.slow
@pytest.mark.parametrize(("build", "expected_name", "size"), FULL_SIZE)
def test_full_size_model_through_comfyui_loaders(build, expected_name: str, size: tuple[str, int]) -> None:
    patcher = build()
    assert_detected_as(patcher.model, expected_name)
    key, value = size
    assert patcher.model.model_config.unet_config[key] == value
    assert_initialised(patcher.model)
    inputs = random_inputs(patcher)
    out = predict(patcher.model, inputs)
    assert out.shape == inputs["x"].shape
    assert out.isfinite().all()
