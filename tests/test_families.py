"""Each family's objective against an independent computation from known noise, sigma and latents."""

import math

import pytest
import torch
from tiny_models import MODEL_FACTORIES

from trainer_core.config import TrainConfig
from trainer_core.families import SD3, SDXL, Flux, UnsupportedModelError, family_for

EXPECTED_FAMILY = {"sdxl_eps": SDXL, "sdxl_v": SDXL, "sd3": SD3, "flux_dev": Flux, "flux_schnell": Flux}


def sd_alphas_cumprod() -> torch.Tensor:
    # Stable Diffusion's "scaled linear" schedule: betas linear in sqrt space.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def known_inputs(channels: int, batch: int = 3):
    g = torch.Generator().manual_seed(7)
    return torch.randn(batch, channels, 8, 8, generator=g), torch.randn(batch, channels, 8, 8, generator=g)


@pytest.mark.parametrize("name", list(EXPECTED_FAMILY))
def test_family_is_detected(name):
    family = family_for(MODEL_FACTORIES[name]().model, TrainConfig())
    assert type(family) is EXPECTED_FAMILY[name]


def test_unsupported_model_is_refused_by_name():
    with pytest.raises(UnsupportedModelError, match="Linear models cannot be trained here; supported families: sdxl"):
        family_for(torch.nn.Linear(2, 2), TrainConfig())


@pytest.mark.parametrize("name, v_prediction", [("sdxl_eps", False), ("sdxl_v", True)])
def test_sdxl_noisy_input_and_target(name, v_prediction):
    family = family_for(MODEL_FACTORIES[name]().model, TrainConfig())
    assert family.v_prediction is v_prediction
    latents, noise = known_inputs(4)
    timesteps = torch.tensor([0, 500, 999])
    noisy, target = family.noisy_input_and_target(latents, noise, timesteps)
    abar = sd_alphas_cumprod()[timesteps].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, abar.sqrt() * latents + (1 - abar).sqrt() * noise, rtol=1e-5, atol=1e-5)
    expected = abar.sqrt() * noise - (1 - abar).sqrt() * latents if v_prediction else noise
    torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, v_prediction", [("sdxl_eps", False), ("sdxl_v", True)])
def test_sdxl_min_snr_weight(name, v_prediction):
    family = family_for(MODEL_FACTORIES[name]().model, TrainConfig(min_snr_gamma=5.0))
    timesteps = torch.tensor([10, 300, 900])
    abar = sd_alphas_cumprod()[timesteps]
    snr = abar / (1 - abar)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1 if v_prediction else snr)
    torch.testing.assert_close(family.loss_weight(timesteps).double(), expected, rtol=1e-4, atol=1e-6)
    assert family_for(family.model, TrainConfig()).loss_weight(timesteps) is None


def test_sdxl_timesteps_and_noise_offset():
    family = family_for(MODEL_FACTORIES["sdxl_eps"]().model, TrainConfig(noise_offset=0.1))
    g = torch.Generator().manual_seed(0)
    timesteps = torch.cat([family.sample_timesteps(torch.zeros(64, 4, 8, 8), g) for _ in range(20)])
    assert timesteps.dtype == torch.int64 and timesteps.min() >= 0 and timesteps.max() <= 999
    assert timesteps.unique().numel() > 500
    noise = torch.zeros(2, 4, 8, 8)
    offset = family.prepare_noise(noise, torch.Generator().manual_seed(3))
    expected = 0.1 * torch.randn(2, 4, 1, 1, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(offset, expected.expand(2, 4, 8, 8))


@pytest.mark.parametrize("name", ["sd3", "flux_dev", "flux_schnell"])
def test_rectified_flow_noisy_input_and_target(name):
    family = family_for(MODEL_FACTORIES[name]().model, TrainConfig())
    latents, noise = known_inputs(16)
    sigmas = torch.tensor([0.0, 0.25, 1.0])
    noisy, target = family.noisy_input_and_target(latents, noise, sigmas)
    for i, s in enumerate(sigmas.tolist()):
        torch.testing.assert_close(noisy[i], (1 - s) * latents[i] + s * noise[i])
        torch.testing.assert_close(target[i], noise[i] - latents[i])


def logit_normal_draws(seed: int, count: int, mean=0.0, std=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.sigmoid(mean + std * torch.randn(1, generator=g)) for _ in range(count)])


def test_sd3_logit_normal_with_shift_three():
    family = family_for(MODEL_FACTORIES["sd3"]().model, TrainConfig())
    g = torch.Generator().manual_seed(11)
    drawn = torch.cat([family.sample_timesteps(torch.zeros(1, 16, 8, 8), g) for _ in range(5)])
    u = logit_normal_draws(11, 5)
    torch.testing.assert_close(drawn, 3.0 * u / (1 + 2.0 * u))


@pytest.mark.parametrize("latent_side", [8, 64, 128])
def test_flux_dev_resolution_dependent_shift(latent_side):
    family = family_for(MODEL_FACTORIES["flux_dev"]().model, TrainConfig(logit_mean=0.5, logit_std=0.8))
    g = torch.Generator().manual_seed(5)
    latents = torch.zeros(1, 16, latent_side, latent_side)
    drawn = torch.cat([family.sample_timesteps(latents, g) for _ in range(4)])
    tokens = (latent_side // 2) ** 2
    mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
    u = logit_normal_draws(5, 4, 0.5, 0.8)
    torch.testing.assert_close(drawn, math.exp(mu) / (math.exp(mu) + (1 / u - 1)))


def test_flux_schnell_trains_unshifted_and_without_guidance():
    family = family_for(MODEL_FACTORIES["flux_schnell"]().model, TrainConfig())
    assert not family.guidance_distilled and family.base_model_version == "flux1_schnell"
    g = torch.Generator().manual_seed(9)
    drawn = torch.cat([family.sample_timesteps(torch.zeros(1, 16, 64, 64), g) for _ in range(4)])
    torch.testing.assert_close(drawn, logit_normal_draws(9, 4))


@pytest.mark.parametrize("sampling", ["uniform", "sigmoid"])
def test_other_timestep_samplers(sampling):
    family = family_for(MODEL_FACTORIES["sd3"]().model, TrainConfig(timestep_sampling=sampling))
    g = torch.Generator().manual_seed(2)
    drawn = torch.cat([family.sample_timesteps(torch.zeros(1, 16, 8, 8), g) for _ in range(3)])
    g = torch.Generator().manual_seed(2)
    if sampling == "uniform":
        u = torch.cat([torch.rand(1, generator=g) for _ in range(3)])
        expected = 3.0 * u / (1 + 2.0 * u)
    else:  # sigmoid(randn), unshifted
        expected = torch.cat([torch.sigmoid(torch.randn(1, generator=g)) for _ in range(3)])
    torch.testing.assert_close(drawn, expected)


@pytest.mark.parametrize("name", ["sdxl_eps", "sd3", "flux_dev"])
def test_default_targets_are_attention_and_mlp_of_every_block(name):
    """Per block: SDXL attn1/attn2 q,k,v,out + ff in/out; SD3 qkv,proj + fc1,fc2 per stream;
    Flux double blocks qkv,proj + mlp 0,2 per stream (single blocks' fused linears count as attention)."""
    family = family_for(MODEL_FACTORIES[name]().model, TrainConfig())
    kinds = {}
    for module_name, module in family.diffusion_model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            kinds.setdefault(family.layer_kind(module_name, module), []).append(module_name)
    assert all("norm" not in n for kind in ("attention", "mlp") for n in kinds.get(kind, []))
    if name == "sdxl_eps":
        per_block = [n for n in kinds["attention"] if ".transformer_blocks.0." in n and n.startswith("input_blocks")]
        assert len(per_block) >= 8  # attn1 and attn2: to_q, to_k, to_v, to_out.0
        assert all(n.endswith(("to_q", "to_k", "to_v", "to_out.0")) for n in kinds["attention"])
        assert all(n.endswith(("ff.net.0.proj", "ff.net.2")) for n in kinds["mlp"])
        assert kinds["conv"], "resblock convolutions are LoCon targets"
    if name == "sd3":
        assert all(n.endswith(("attn.qkv", "attn.proj")) for n in kinds["attention"])
        assert all(n.endswith(("mlp.fc1", "mlp.fc2")) for n in kinds["mlp"])
        blocks = len(family.diffusion_model.joint_blocks)
        # qkv and proj in both streams of every block; the last context block has no proj.
        assert len(kinds["attention"]) >= 4 * blocks - 1
    if name == "flux_dev":
        assert {n.split(".", 2)[2] for n in kinds["attention"] if n.startswith("double_blocks.0.")} == {
            "img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj"
        }
        assert {n.split(".", 2)[2] for n in kinds["attention"] if n.startswith("single_blocks.0.")} == {
            "linear1", "linear2"
        }
        assert {n.split(".", 2)[2] for n in kinds["mlp"] if n.startswith("double_blocks.0.")} == {
            "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2"
        }
