"""The training engine on every family's tiny model, on the CPU."""

import itertools
import math

import comfy.ldm.flux.math
import comfy.ldm.modules.attention
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.utils
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from tiny_encoders import clip_files
from tiny_models import MODEL_FACTORIES, dynamic_vram_stand_in, load_sd3, needs_dynamic_vram, random_inputs, sd3_file
from torch.nn.attention import SDPBackend, sdpa_kernel

from trainer_core import comfy_compat, loading
from trainer_core.attention import cudnn_attention_fault
from trainer_core.config import ConfigError, LoraConfig, TrainConfig
from trainer_core.families import family_for
from trainer_core.lora import LinearLora, LoraNetwork
from trainer_core.optim import QUANT_STATE
from trainer_core.trainer import Sample, Trainer, lr_factor

FAMILIES = list(MODEL_FACTORIES)
LATENT_HW = (16, 16)


def fixed_samples(patcher, count=4) -> list[Sample]:
    """Latents with the spatial smoothness of real VAE latents (upsampled 2x2 noise), random conditioning."""
    samples = []
    for i in range(count):
        inputs = random_inputs(patcher, batch=1, latent_hw=LATENT_HW, seed=100 + i)
        coarse = torch.randn(inputs["x"][:, :, :2, :2].shape, generator=torch.Generator().manual_seed(i))
        latents = F.interpolate(coarse, size=LATENT_HW, mode="bilinear")[0]
        samples.append(Sample(latents, {"context": inputs["context"][0], "y": inputs["y"][0]}, key=str(i)))
    return samples


def train_config(**overrides) -> TrainConfig:
    values = dict(steps=30, learning_rate=3e-3, precision="fp32", gradient_checkpointing=False, max_grad_norm=1.0,
                  weight_decay=0.0, seed=1234)
    values.update(overrides)
    return TrainConfig(**values)


def evaluation_set(trainer: Trainer):
    """The same noise and timesteps for every evaluation: one low, two middle, one high noise level."""
    latents = torch.stack([s.latents for s in trainer.samples])
    keys = trainer.samples[0].conditioning
    conditioning = {k: torch.stack([s.conditioning[k] for s in trainer.samples]) for k in keys}
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(99))
    if type(trainer.family).__name__ == "SDXL":
        timesteps = torch.tensor([100, 400, 600, 900])
    else:
        timesteps = torch.tensor([0.2, 0.4, 0.6, 0.8])
    return latents, conditioning, noise, timesteps[: len(latents)]


def run_collecting_losses(trainer: Trainer) -> list[float]:
    losses = []
    trainer.run(lambda t, reports: losses.extend(r.loss for r in reports))
    return losses


def evaluate(trainer: Trainer, fixed) -> float:
    with trainer.network.attached(trainer.family.diffusion_model), torch.no_grad():
        return trainer.loss(*fixed).item()


def lora_weights(network: LoraNetwork) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


def base_output(patcher, inputs) -> torch.Tensor:
    family = family_for(patcher.model, TrainConfig())
    timesteps = torch.tensor([500]) if type(family).__name__ == "SDXL" else torch.tensor([0.5])
    with torch.no_grad():
        return family.predict(inputs["x"], timesteps, {"context": inputs["context"], "y": inputs["y"]})


@pytest.mark.parametrize("name", FAMILIES)
def test_training_lowers_the_loss_and_is_reproducible(name):
    patcher = MODEL_FACTORIES[name]()
    # The tiny UNet does most of its work in convolutions at full resolution: train them too (LoCon).
    targets = "attention+mlp+conv" if name.startswith("sdxl") else "attention+mlp"
    lora = LoraConfig(rank=8, alpha=8, targets=targets)
    trainer = Trainer(patcher, fixed_samples(patcher), lora, train_config(steps=60))
    fixed = evaluation_set(trainer)
    before = evaluate(trainer, fixed)
    trainer.run()
    after = evaluate(trainer, fixed)
    assert after <= 0.7 * before, f"{name}: loss {before:.4f} -> {after:.4f}"

    again = Trainer(patcher, fixed_samples(patcher), lora, train_config(steps=60))
    again.run()
    first, second = lora_weights(trainer.network), lora_weights(again.network)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("name", FAMILIES)
def test_injection_and_removal_leave_the_cached_model_bit_identical(name):
    patcher = MODEL_FACTORIES[name]()
    inputs = random_inputs(patcher, batch=1, latent_hw=LATENT_HW, seed=5)
    state_before = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    before = base_output(patcher, inputs)
    trainer = Trainer(patcher, fixed_samples(patcher), LoraConfig(rank=4), train_config(steps=3, learning_rate=1e-2))
    trainer.run()
    # The LoRA really changes the model while attached ...
    with trainer.network.attached(patcher.model.diffusion_model):
        assert not torch.equal(base_output(patcher, inputs), before)
    # ... and nothing of it stays: no hooks, no wrappers, the same weights, the same output.
    assert torch.equal(base_output(patcher, inputs), before)
    state_after = patcher.model.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], state_before[k]) for k in state_before)
    for module in patcher.model.diffusion_model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, type(module).__name__
        assert "forward" not in vars(module), type(module).__name__


@pytest.mark.parametrize("name", FAMILIES)
def test_removal_also_happens_when_training_fails(name):
    patcher = MODEL_FACTORIES[name]()
    trainer = Trainer(patcher, fixed_samples(patcher), LoraConfig(rank=4), train_config(steps=5,
                      gradient_checkpointing=True))

    def fail(trainer, reports):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        trainer.run(fail)
    for module in patcher.model.diffusion_model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert "forward" not in vars(module)


@pytest.mark.parametrize("name", FAMILIES)
def test_gradient_checkpointing_gives_the_same_gradients(name):
    patcher = MODEL_FACTORIES[name]()
    grads = {}
    for checkpointing in (False, True):
        trainer = Trainer(patcher, fixed_samples(patcher, 2), LoraConfig(rank=4),
                          train_config(gradient_checkpointing=checkpointing, batch_size=2))
        # B starts at zero, which would leave every A gradient zero: give B values first.
        torch.manual_seed(0)
        for _, layer in trainer.network.items():
            torch.nn.init.normal_(layer.up, std=0.02)
        fixed = evaluation_set(trainer)
        with trainer.session():
            trainer.loss(*fixed).backward()
        grads[checkpointing] = {k: p.grad.clone() for k, p in trainer.network.named_parameters()}
    assert grads[True].keys() == grads[False].keys()
    for key in grads[False]:
        assert grads[False][key].abs().sum() > 0, key
        torch.testing.assert_close(grads[True][key], grads[False][key], rtol=1e-5, atol=1e-7)


def test_flux_trains_with_and_without_checkpointing_although_its_blocks_add_in_place():
    """ComfyUI's Flux blocks do `img += ...` after a LayerNorm saved `img`; a plain backward fails."""
    patcher = MODEL_FACTORIES["flux_dev"]()
    losses = {}
    for checkpointing in (False, True):
        trainer = Trainer(patcher, fixed_samples(patcher), LoraConfig(rank=4),
                          train_config(steps=3, gradient_checkpointing=checkpointing))
        losses[checkpointing] = run_collecting_losses(trainer)
    assert len(losses[True]) == 3
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]))


def test_training_works_on_a_model_loaded_under_inference_mode():
    """ComfyUI builds models and runs nodes under torch.inference_mode()."""
    with torch.inference_mode():
        patcher = load_sd3()
        samples = fixed_samples(patcher, 2)
    assert next(patcher.model.parameters()).is_inference() and samples[0].latents.is_inference()
    trainer = Trainer(patcher, samples, LoraConfig(rank=4), train_config(steps=2))
    trainer.run()
    assert all(torch.isfinite(p).all() for p in trainer.network.parameters())


@pytest.mark.parametrize("name", ["sdxl_eps", "flux_dev"])
def test_gradient_accumulation_equals_a_larger_batch(name):
    patcher = MODEL_FACTORIES[name]()
    results = []
    for batch_size, accumulation in ((4, 1), (1, 4)):
        trainer = Trainer(patcher, fixed_samples(patcher), LoraConfig(rank=4),
                          train_config(steps=3, batch_size=batch_size, gradient_accumulation=accumulation))
        # Plain SGD: the update is linear in the gradient, so equal gradients give equal weights
        # (Adam's first steps divide by |g| and magnify rounding where g is near zero).
        trainer.optimizer = torch.optim.SGD(trainer.network.parameters(), lr=0.1)
        results.append((run_collecting_losses(trainer), lora_weights(trainer.network)))
    (losses_a, weights_a), (losses_b, weights_b) = results
    torch.testing.assert_close(torch.tensor(losses_a), torch.tensor(losses_b), rtol=1e-5, atol=1e-6)
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], rtol=1e-5, atol=1e-7)
    assert any(w.abs().sum() > 0 for k, w in weights_a.items() if k.endswith("up")), "B never moved"


def test_fp16_with_the_grad_scaler():
    patcher = MODEL_FACTORIES["sd3"]()
    trainer = Trainer(patcher, fixed_samples(patcher), LoraConfig(rank=8, alpha=8),
                      train_config(precision="fp16", steps=20))
    fixed = evaluation_set(trainer)
    before = evaluate(trainer, fixed)
    scales = []
    trainer.run(lambda t, reports: scales.append(t.scaler.get_scale()))
    assert scales and all(s > 1.0 for s in scales), "the scaler was not used"
    after = evaluate(trainer, fixed)
    assert after < before


def test_adamw8bit_on_the_cpu_keeps_8bit_state():
    patcher = MODEL_FACTORIES["flux_dev"]()
    trainer = Trainer(patcher, fixed_samples(patcher), LoraConfig(rank=16, alpha=16),
                      train_config(optimizer="adamw8bit", steps=15))
    fixed = evaluation_set(trainer)
    before = evaluate(trainer, fixed)
    states = []
    trainer.run(lambda t, reports: states.append([s[QUANT_STATE]["state1"]
                                                  for s in t.optimizer.state_dict()["state"].values()]))
    assert any(s.dtype == torch.uint8 for s in states[-1]), "no 8-bit optimizer state"
    assert evaluate(trainer, fixed) < before


@pytest.mark.parametrize("optimizer", ["adafactor", "prodigy"])
def test_other_optimizers_train(optimizer):
    patcher = MODEL_FACTORIES["sd3"]()
    lr = 1.0 if optimizer == "prodigy" else 3e-3
    trainer = Trainer(patcher, fixed_samples(patcher), LoraConfig(rank=8, alpha=8),
                      train_config(optimizer=optimizer, learning_rate=lr, steps=15))
    fixed = evaluation_set(trainer)
    before = evaluate(trainer, fixed)
    trainer.run()
    assert evaluate(trainer, fixed) < before


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("constant", [1.0] * 10),
        ("constant_with_warmup", [1 / 3, 2 / 3] + [1.0] * 8),
        ("linear", [1 / 3, 2 / 3] + [1 - i / 8 for i in range(8)]),
        ("cosine", [1 / 3, 2 / 3] + [0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(8)]),
    ],
)
def test_learning_rate_schedules(schedule, expected):
    curve = [lr_factor(step, schedule, warmup_steps=2, total_steps=10) for step in range(10)]
    torch.testing.assert_close(torch.tensor(curve), torch.tensor(expected))
    patcher = MODEL_FACTORIES["sd3"]()
    trainer = Trainer(patcher, fixed_samples(patcher, 1), LoraConfig(rank=2),
                      train_config(steps=10, schedule=schedule, warmup_steps=2, learning_rate=1e-3))
    lrs = []
    trainer.run(lambda t, reports: lrs.extend(r.lr for r in reports))
    expected_lrs = 1e-3 * torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(lrs, dtype=torch.float64), expected_lrs)


@needs_dynamic_vram
def test_a_model_loaded_for_dynamic_vram_trains_as_a_plainly_loaded_one(monkeypatch):
    plain = load_sd3()
    samples = fixed_samples(plain, 2)
    reference = run_collecting_losses(Trainer(plain, samples, LoraConfig(rank=4), train_config(steps=3)))
    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", dynamic_vram_stand_in())
    dynamic = load_sd3()
    assert dynamic.is_dynamic()

    trainer = Trainer(dynamic, samples, LoraConfig(rank=4), train_config(steps=3))
    assert not trainer.patcher.is_dynamic() and trainer.patcher.model is not dynamic.model
    assert run_collecting_losses(trainer) == reference
    # A later run, from a clone of the dynamic patcher (ComfyUI's clones forget their plain copy), loads no
    # second copy of the model.
    again = Trainer(dynamic.clone(), samples, LoraConfig(rank=4), train_config(steps=3))
    assert again.patcher.model is trainer.patcher.model


@needs_dynamic_vram
def test_a_dynamic_model_that_cannot_be_loaded_again_plainly_says_what_to_do(monkeypatch):
    """A custom loader's dynamic patcher that does not say how it was loaded cannot be loaded plainly."""
    plain = load_sd3()
    dynamic = dynamic_vram_stand_in()(plain.model, plain.load_device, plain.offload_device)
    with pytest.raises(ConfigError, match=r"^model: .*load it with Load Base Model, or start ComfyUI with "
                                          r"--disable-dynamic-vram$"):
        Trainer(dynamic, fixed_samples(plain, 2), LoraConfig(rank=4), train_config(steps=1))


@needs_dynamic_vram
def test_load_base_model_loads_plain_where_the_host_loads_for_dynamic_vram(monkeypatch):
    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", dynamic_vram_stand_in())
    assert comfy.sd.load_checkpoint_guess_config(str(sd3_file()), output_clip=False)[0].is_dynamic()
    model, clip, vae, family = loading.load_diffusion_model(str(sd3_file()), True, None)
    assert not model.is_dynamic() and family == "sd3"
    clip_l = str(clip_files("flux")[0])  # Flux's loader takes a CLIP-L file alone
    assert comfy.sd.load_clip([clip_l], clip_type=comfy.sd.CLIPType.FLUX).patcher.is_dynamic()
    assert not loading.load_text_encoders([clip_l], "flux").patcher.is_dynamic()


@pytest.mark.parametrize("card_computes_in_bf16", [True, False])
def test_load_base_model_stores_default_weights_in_bf16_where_the_card_computes_in_bf16(monkeypatch,
                                                                                       card_computes_in_bf16):
    """ComfyUI runs SDXL and SD3 in fp16 where it can, and a run trains under bf16 autocast, which casts each
    fp16 weight at every use; the benchmark harness stores bf16 (bench/NOTES.md §17). ComfyUI asks the card
    whether it computes in fp16 and in bf16; the CPU says no to both, so a CUDA card's answers are given here
    (yes and yes as on the H200, or fp16 only as on cards before Ampere)."""
    monkeypatch.setattr(comfy.model_management, "should_use_fp16", lambda *args, **kwargs: True)
    monkeypatch.setattr(comfy.model_management, "should_use_bf16", lambda *args, **kwargs: card_computes_in_bf16)
    path = str(sd3_file())  # fp32
    assert comfy.sd.load_checkpoint_guess_config(path)[0].model.get_dtype() == torch.float16  # ComfyUI's choice
    model = loading.load_diffusion_model(path, True, None)[0]
    dtypes = {parameter.dtype for parameter in model.model.diffusion_model.parameters()}
    if not card_computes_in_bf16:
        assert dtypes == {torch.float16}
    else:
        assert dtypes == {torch.bfloat16}
        assert model.model.get_dtype() == torch.bfloat16 and model.model.manual_cast_dtype is None
        # ComfyUI's sampler, which has no autocast, runs it (a preview) ...
        inputs = random_inputs(model, batch=1, latent_hw=LATENT_HW, seed=5)
        with torch.inference_mode():
            prediction = model.model.apply_model(inputs["x"], torch.full((1,), 0.5), c_crossattn=inputs["context"],
                                                 y=inputs["y"])
        assert prediction.shape == inputs["x"].shape and prediction.isfinite().all()
        # ... and a run trains it under bf16 autocast.
        trainer = Trainer(model, fixed_samples(model, 2), LoraConfig(rank=2), train_config(steps=2, precision="bf16"))
        assert all(math.isfinite(loss) for loss in run_collecting_losses(trainer))
    fp8 = loading.load_diffusion_model(path, True, torch.float8_e4m3fn)[0]  # asked for: whatever the card
    assert {parameter.dtype for parameter in fp8.model.diffusion_model.parameters()} == {torch.float8_e4m3fn}


def test_load_base_model_keeps_an_fp8_files_weights_in_fp8_by_default(monkeypatch, tmp_path):
    """A file released in fp8 (flux1-dev-fp8 and the like) loaded with `default` stays as ComfyUI keeps it, in fp8
    where the card computes in fp8 (as the H200 does; said so here, the CPU does not): stored in bf16 it would
    take twice the memory."""
    monkeypatch.setattr(comfy.model_management, "should_use_fp16", lambda *args, **kwargs: True)
    monkeypatch.setattr(comfy.model_management, "should_use_bf16", lambda *args, **kwargs: True)
    monkeypatch.setattr(comfy.model_management, "supports_fp8_compute", lambda *args, **kwargs: True)
    tensors, metadata = read_safetensors(str(sd3_file()))
    fp8_file = tmp_path / "tiny_sd3_fp8.safetensors"
    safetensors.torch.save_file({key: tensor.to(torch.float8_e4m3fn) if key.startswith("model.diffusion_model.")
                                 and tensor.is_floating_point() else tensor for key, tensor in tensors.items()},
                                str(fp8_file), metadata)
    model = loading.load_diffusion_model(str(fp8_file), True, None)[0]
    assert {parameter.dtype for parameter in model.model.diffusion_model.parameters()} == {torch.float8_e4m3fn}


def read_safetensors(path: str) -> tuple[dict, dict]:
    with safetensors.safe_open(path, framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}, file.metadata() or {}


@needs_dynamic_vram
@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.float8_e4m3fn])
def test_load_base_model_stores_the_weights_in_the_dtype_the_model_runs_in_under_dynamic_vram(monkeypatch,
                                                                                              weight_dtype):
    """ComfyUI 0.33's server (comfy-aimdo on) builds each Linear empty and assigns it its file's tensor, leaving
    the cast to the dynamic patcher's layers; a plain patcher kept the file's dtype. On the H200 an SD3.5 Medium
    file in bf16 loaded as fp16 trained under autocast, then ComfyUI's sampler fed fp16 latents to bf16 weights at
    the first preview (bench/NOTES.md §16); an fp8 choice would have kept the file's bf16, twice the memory."""
    path = str(sd3_file())  # fp32; written before the switch, which would build the model to write empty
    import comfy.memory_management  # 0.33's (needs_dynamic_vram)

    monkeypatch.setattr(comfy.memory_management, "aimdo_enabled", True)
    # The server reads files through comfy-aimdo's memory map, which needs its GPU library: read plainly here.
    monkeypatch.setattr(comfy.utils, "load_safetensors", read_safetensors)
    model = loading.load_diffusion_model(path, True, weight_dtype)[0]
    diffusion_model = model.model.diffusion_model
    assert {p.dtype for p in diffusion_model.parameters()} == {weight_dtype}
    # A dynamic model from ComfyUI's own loader, which a run trains as the plain copy ComfyUI loads of it.
    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", dynamic_vram_stand_in())
    dynamic = comfy.sd.load_checkpoint_guess_config(path, output_clip=False, model_options={"dtype": weight_dtype})[0]
    plain = comfy_compat.plain_patcher(dynamic)
    assert {p.dtype for p in plain.model.diffusion_model.parameters()} == {weight_dtype}
    if weight_dtype == torch.float16:
        inputs = random_inputs(model, batch=1, latent_hw=LATENT_HW, seed=5)
        sigma = torch.full((1,), 0.5)
        with torch.inference_mode():
            prediction = model.model.apply_model(inputs["x"], sigma, c_crossattn=inputs["context"], y=inputs["y"])
        assert prediction.shape == inputs["x"].shape and prediction.isfinite().all()


@needs_dynamic_vram
def test_text_encoders_a_run_uses_hold_their_weights_in_the_dtype_they_run_in_under_dynamic_vram(monkeypatch):
    """As for the diffusion model above: the text encoders a run trains or encodes with, whichever way ComfyUI 0.33's
    server loaded them (Load Base Model; ComfyUI's loader, plain where it loads onto the CPU, else dynamic)."""
    import comfy.memory_management  # 0.33's (needs_dynamic_vram)

    clip_l = str(clip_files("flux")[0])  # fp16; Flux's loader takes a CLIP-L file alone
    monkeypatch.setattr(comfy.memory_management, "aimdo_enabled", True)
    monkeypatch.setattr(comfy.utils, "load_safetensors", read_safetensors)
    monkeypatch.setattr(comfy.model_management, "text_encoder_dtype", lambda *args, **kwargs: torch.float32)

    def dtypes(clip) -> set:
        return {p.dtype for p in clip.cond_stage_model.parameters()}

    assert dtypes(loading.load_text_encoders([clip_l], "flux")) == {torch.float32}
    plain = comfy.sd.load_clip([clip_l], clip_type=comfy.sd.CLIPType.FLUX)
    assert torch.float16 in dtypes(plain) and dtypes(comfy_compat.plain_clip(plain)) == {torch.float32}
    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", dynamic_vram_stand_in())
    dynamic = comfy.sd.load_clip([clip_l], clip_type=comfy.sd.CLIPType.FLUX)
    assert dynamic.patcher.is_dynamic() and dtypes(comfy_compat.plain_clip(dynamic)) == {torch.float32}


@pytest.mark.parametrize("name", ["sd3", "flux_dev"])
def test_base_weights_get_no_gradient_and_keep_their_flags(name):
    patcher = MODEL_FACTORIES[name]()
    parameters = list(patcher.model.diffusion_model.parameters())
    flags = [p.requires_grad for p in parameters]
    trainer = Trainer(patcher, fixed_samples(patcher, 2), LoraConfig(rank=4),
                      train_config(steps=2, gradient_checkpointing=True))
    trainer.run()
    assert all(p.grad is None for p in patcher.model.diffusion_model.parameters())
    assert [p.requires_grad for p in patcher.model.diffusion_model.parameters()] == flags


def test_weights_moved_outside_inference_mode_are_made_trainable():
    """Tensors made from inference tensors outside inference mode (as a device move does) report
    is_inference() False but have no version counter; the trainer copies them too."""
    with torch.inference_mode():
        patcher = load_sd3()
    patcher.model._apply(lambda t: t.clone())
    trainer = Trainer(patcher, fixed_samples(patcher, 2), LoraConfig(rank=4), train_config(steps=2))
    trainer.run()
    assert all(torch.isfinite(p).all() for p in trainer.network.parameters())


def test_a_trainer_built_under_inference_mode_trains():
    """ComfyUI calls a node's execute() under torch.inference_mode()."""
    patcher = MODEL_FACTORIES["flux_dev"]()
    with torch.inference_mode():
        trainer = Trainer(patcher, fixed_samples(patcher, 2), LoraConfig(rank=4), train_config(steps=2))
    trainer.run()
    assert not any(p.is_inference() for p in trainer.network.parameters())


def test_a_checkpointed_block_is_recomputed_with_the_options_of_its_forward():
    """ComfyUI's UNet rewrites one options dict as it goes (`block`, `transformer_index`); by backward
    it holds the last block's values. Each block's recompute must see its own, as its forward did:
    compiled blocks guard on them (see bench/NOTES.md §3)."""
    patcher = MODEL_FACTORIES["sdxl_eps"]()
    trainer = Trainer(patcher, fixed_samples(patcher, 1), LoraConfig(rank=4),
                      train_config(steps=1, gradient_checkpointing=True))
    seen = {}

    def record(attention, args, kwargs):
        options = kwargs["transformer_options"]
        seen.setdefault(attention, []).append((options["block"], options["transformer_index"]))

    attentions = [block.attn1 for block in trainer.family.checkpoint_blocks() if hasattr(block, "attn1")]
    handles = [attention.register_forward_pre_hook(record, with_kwargs=True) for attention in attentions]
    try:
        trainer.run()
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) == len(attentions) > 1
    for forward, recompute in seen.values():
        assert recompute == forward


@pytest.mark.parametrize("name", ["sdxl_eps", "sd3", "flux_dev"])
def test_compiled_checkpointed_blocks_train_like_eager_ones(name):
    """compile_blocks "on" (and "auto" on a GPU) gives the eager losses, also in a second run, which
    reuses the first one's compiled code with new LoRA layers. SDXL's recomputes used to miss their
    forward's compiled variant and fail with "Recomputed values ... have different metadata"."""
    patcher = MODEL_FACTORIES[name]()
    recompile_limit = torch._dynamo.config.recompile_limit
    losses = []
    for mode in ("off", "on", "on"):
        trainer = Trainer(patcher, fixed_samples(patcher, 2), LoraConfig(rank=4),
                          train_config(steps=2, gradient_checkpointing=True, compile_blocks=mode))
        assert trainer.compiles_blocks is (mode == "on")
        losses.append(torch.tensor(run_collecting_losses(trainer)))
    eager, *compiled = losses
    for run in compiled:
        torch.testing.assert_close(run, eager, rtol=1e-4, atol=1e-5)
    assert torch._dynamo.config.recompile_limit == recompile_limit, "the run left dynamo's limit changed"
    auto = Trainer(patcher, fixed_samples(patcher, 1), LoraConfig(rank=4), train_config(compile_blocks="auto"))
    assert not auto.compiles_blocks, "auto compiles only on a GPU"


def test_attention_runs_with_the_kernel_order_the_config_asks_for(monkeypatch):
    """cuDNN's fused attention goes first only where asked or where "auto" finds a Hopper card with
    cuDNN >= 9.19 (bench/NOTES.md §4); flash, memory-efficient and math always follow, for inputs a
    kernel refuses. Flux runs ComfyUI's SDPA attention here (on the CPU ComfyUI would pick another),
    and every SDPA call of the run sees the order; every choice trains to the same losses."""
    monkeypatch.setattr(comfy.ldm.flux.math, "optimized_attention", comfy.ldm.modules.attention.attention_pytorch)
    seen = []

    def recording_sdpa(*args, sdpa=comfy.ops.scaled_dot_product_attention, **kwargs):
        seen.append([SDPBackend(i) for i in torch._C._get_sdp_priority_order()])
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(comfy.ops, "scaled_dot_product_attention", recording_sdpa)
    patcher = MODEL_FACTORIES["flux_dev"]()
    fallbacks = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    expected = {"auto": fallbacks, "flash": fallbacks, "cudnn": [SDPBackend.CUDNN_ATTENTION, *fallbacks]}
    losses = {}
    for choice, kernels in expected.items():
        seen.clear()
        trainer = Trainer(patcher, fixed_samples(patcher, 2), LoraConfig(rank=4),
                          train_config(steps=2, attention=choice))
        assert trainer.attention_kernels == kernels
        losses[choice] = run_collecting_losses(trainer)
        assert seen and all(order[:len(kernels)] == kernels for order in seen)
    assert losses["cudnn"] == losses["flash"] == losses["auto"]
    with pytest.raises(ConfigError, match=r"^train\.attention: 'xformers' is not one of 'auto', 'flash', 'cudnn'"):
        train_config(attention="xformers")


def test_the_hosts_own_attention_kernel_order_is_the_runs_while_it_trains(monkeypatch):
    """ComfyUI 0.33 on CUDA runs each large SDPA call inside its own kernel order (`comfy.ops.SDPA_BACKEND_PRIORITY`,
    flash first), inside the order the run sets: on the H200 the steps' attention ran FlashAttention-2 instead of
    cuDNN's, and steps were 13-14 % slower than on 0.3.75 (bench/NOTES.md §15). The run puts its own order there
    while it trains and gives the host's back after. That wrapper is defined only where CUDA is found as
    `comfy.ops` is imported, so here a stand-in does what it does: read the list at each call."""
    fallbacks = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    hosts_order = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.MATH]
    monkeypatch.setattr(comfy.ops, "SDPA_BACKEND_PRIORITY", hosts_order, raising=False)
    monkeypatch.setattr(comfy.ldm.flux.math, "optimized_attention", comfy.ldm.modules.attention.attention_pytorch)
    seen = []

    def hosts_sdpa(q, k, v, *args, **kwargs):
        with sdpa_kernel(comfy.ops.SDPA_BACKEND_PRIORITY, set_priority=True):
            seen.append([SDPBackend(i) for i in torch._C._get_sdp_priority_order()])
            return F.scaled_dot_product_attention(q, k, v, *args, **kwargs)

    monkeypatch.setattr(comfy.ops, "scaled_dot_product_attention", hosts_sdpa)
    patcher = MODEL_FACTORIES["flux_dev"]()
    for choice, kernels in {"cudnn": [SDPBackend.CUDNN_ATTENTION, *fallbacks], "flash": fallbacks}.items():
        seen.clear()
        run_collecting_losses(Trainer(patcher, fixed_samples(patcher, 2), LoraConfig(rank=4),
                                      train_config(steps=2, attention=choice)))
        assert seen and all(order[:len(kernels)] == kernels for order in seen), (choice, seen[0])
        assert comfy.ops.SDPA_BACKEND_PRIORITY is hosts_order


def test_the_cudnn_attention_check_reports_a_failing_kernel_instead_of_failing_itself():
    """The check "auto" runs before it takes cuDNN's attention runs the kernel in a child process and
    reports its failure. On the CPU no SDPA kernel takes the cuDNN-only order, so the child fails."""
    fault = cudnn_attention_fault(torch.device("cpu"))
    assert fault is not None and fault.startswith("exit 1: RuntimeError") and "kernel" in fault


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("shape", [(6, 16), (2, 3, 16), (2, 3, 4, 16)])
def test_the_fused_lora_sum_equals_output_plus_delta(shape, autocast):
    """added_to (one addmm for up-projection, scale and sum) gives the base output plus the delta, in
    the output's dtype and with the same gradients, also where autocast would turn addmm to bf16."""
    base = torch.nn.Linear(16, 8)
    layer = LinearLora(base, rank=4, alpha=2.0, dropout=0.0)
    torch.nn.init.normal_(layer.up)
    x = torch.randn(shape, requires_grad=True)
    results = []
    for combine in (lambda out, x: out + layer.delta(x), layer.added_to):
        x.grad = layer.down.grad = layer.up.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            output = base(x) if not autocast else base(x).float()
            summed = combine(output, x)
        summed.square().sum().backward()
        results.append((summed.detach(), x.grad, layer.down.grad, layer.up.grad))
    (expected, *expected_grads), (got, *got_grads) = results
    assert got.dtype == expected.dtype == torch.float32 and got.shape == expected.shape
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(got, expected, **tolerance)
    for a, b in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, **tolerance)


def free_memory_readings_of_a_busy_cpu():
    """A stand-in for comfy.model_management.get_free_memory whose reading changes at every call, except
    that the fifth call (tiny Flux: the second step's first attention call) reads what the first did."""
    page = 4096
    calls = itertools.count(1)

    @torch._dynamo.disable  # as opaque to dynamo as ComfyUI's psutil call, so that it stays a graph break
    def free_memory(dev=None, torch_free_too=False):
        call = next(calls)
        reading = (16 << 30) - page * (1 if call == 5 else call)
        return (reading, reading) if torch_free_too else reading

    return free_memory


def test_compiled_blocks_train_when_each_attention_call_compiles_anew(monkeypatch):
    """On the CPU, ComfyUI's attention reads the free memory at every call and compiled code takes the
    reading as a constant: nearly every call compiles another variant. When dynamo's limit of 8 fell
    between a block's forward (compiled) and its recompute (eager), backward failed; the compiled Flux
    test did so once in a full test run."""
    patcher = MODEL_FACTORIES["flux_dev"]()
    losses = {}
    for mode in ("off", "on"):
        monkeypatch.setattr(comfy.model_management, "get_free_memory", free_memory_readings_of_a_busy_cpu())
        trainer = Trainer(patcher, fixed_samples(patcher, 2), LoraConfig(rank=4),
                          train_config(steps=3, gradient_checkpointing=True, compile_blocks=mode))
        losses[mode] = run_collecting_losses(trainer)
    torch.testing.assert_close(torch.tensor(losses["on"]), torch.tensor(losses["off"]), rtol=1e-4, atol=1e-5)
