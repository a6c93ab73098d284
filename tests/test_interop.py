"""LoRA files other programs read: kohya's metadata (A1111, Forge, LoRA managers) and diffusers' own loaders.

Each family's file, in both formats, goes through ComfyUI's LoRA loading and through diffusers' `load_lora_weights`
on a tiny diffusers model whose module names are the real model's. Both must take every key, and the weight
change each applies to each layer must be the trained LoRA's. Layers are paired across the two programs by
ComfyUI's own diffusers name maps (`comfy.utils.*_to_diffusers`), not by the pack's: a wrong name in the file
would land on another layer in diffusers and fail the comparison.
"""

import hashlib
import json
import logging
import warnings

import comfy.lora
import comfy.model_base
import comfy.sd
import comfy.utils
import diffusers
import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from PIL import Image
from tiny_encoders import build_clip, build_vae
from tiny_models import build_flux, build_flux_full_width_direct, build_sd3, build_sdxl, random_inputs

from trainer_core import export
from trainer_core.config import DatasetFacts, LoraConfig, SaveConfig, TrainConfig
from trainer_core.data import DatasetConfig, build_samples
from trainer_core.trainer import Sample, Trainer

STARTED_AT = 1_700_000_000.0
TOLERANCE = 1e-5  # fp32 files, fp32 deltas


def trainer_with_random_lora(patcher, targets: str, rank: int = 4, alpha: float = 2.0) -> Trainer:
    """A trainer whose LoRA has random down and up matrices (a fresh one has up = 0, which any loader gets right)."""
    inputs = random_inputs(patcher, batch=1, latent_hw=(8, 8), seed=1)
    sample = Sample(inputs["x"][0], {"context": inputs["context"][0], "y": inputs["y"][0]}, key="0")
    config = TrainConfig(steps=1, precision="fp32", gradient_checkpointing=False, compile_blocks="off",
                         cuda_graphs="off")
    trainer = Trainer(patcher, [sample], LoraConfig(rank=rank, alpha=alpha, targets=targets), config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in trainer.network.items():
            layer.up.copy_(torch.randn(layer.up.shape, generator=generator) * 0.05)
    return trainer


def write(trainer: Trainer, folder, save_format: str, **save) -> "Path":  # noqa: F821
    path = folder / f"{save_format}.safetensors"
    config = SaveConfig(name="interop", dtype="fp32", format=save_format, **save)
    export.write_lora(path, trainer, config, STARTED_AT)
    return path


def trained_deltas(trainer: Trainer) -> dict[str, torch.Tensor]:
    """What the trained LoRA adds to each weight of the ComfyUI model, by state-dict key."""
    return {f"diffusion_model.{path}.weight": layer.delta_weight().detach().float()
            for path, layer in trainer.network.items()}


# -- metadata: what A1111, Forge and LoRA managers read -------------------------------------------------------


def write_captioned_dataset(root) -> None:
    """Two images in the folder itself, one in a repeat folder; one without a caption."""
    captions = {"a.png": "Red Ball, outdoor", "b.png": "red ball,  indoor, ", "3_cats/c.png": "cat, outdoor, ohwx",
                "3_cats/d.png": None}
    for index, (name, caption) in enumerate(captions.items()):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(index).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        if caption is not None:
            path.with_suffix(".txt").write_text(caption)


def kohya_model_hash(file_bytes: bytes) -> str:
    """sd-scripts' `addnet_hash_safetensors`: SHA-256 of what follows the header (length: first 8 bytes, LE)."""
    header_length = int.from_bytes(file_bytes[:8], "little")
    return hashlib.sha256(file_bytes[8 + header_length:]).hexdigest()


def kohya_legacy_hash(serialized: bytes) -> str:
    """sd-scripts' `addnet_hash_legacy`: the first 8 hex digits of the SHA-256 of 0x10000 bytes at 0x100000."""
    return hashlib.sha256(serialized[0x100000:0x100000 + 0x10000]).hexdigest()[:8]


def test_metadata_holds_kohyas_hashes_tag_frequencies_and_dataset_facts(tmp_path):
    root = tmp_path / "my_set"
    write_captioned_dataset(root)
    patcher = build_sd3()
    dataset = DatasetConfig(folder=str(root), resolution=64, trigger_word="ohwx", default_caption="a cat")
    _, report = build_samples(dataset, patcher, build_clip("sd3"), build_vae(16), tmp_path, tmp_path / "out")
    # Rank 64 in fp32 makes the file larger than 1.06 MiB, so the legacy hash covers real bytes.
    trainer = trainer_with_random_lora(patcher, "attention+mlp", rank=64, alpha=32.0)
    path = write(trainer, tmp_path, "comfyui", trigger_word="ohwx", dataset=report.facts())
    file_bytes = path.read_bytes()
    assert len(file_bytes) > 0x110000
    with safetensors.safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
        tensors = {key: file.get_tensor(key) for key in file.keys()}

    # Each image once, whatever its repeats; tags lower-cased and stripped; the trigger word in front of the
    # captions that lack it; the uncaptioned image has the default caption.
    assert json.loads(metadata["ss_tag_frequency"]) == {
        "my_set": {"ohwx": 2, "red ball": 2, "outdoor": 1, "indoor": 1},
        "3_cats": {"ohwx": 2, "cat": 1, "outdoor": 1, "a cat": 1},
    }
    assert metadata["ss_num_train_images"] == "8"  # 2 + 3 x 2
    assert metadata["ss_resolution"] == "(64, 64)"
    assert metadata["modelspec.resolution"] == "64x64"
    assert metadata["modelspec.date"][:4] >= "2026" and "T" in metadata["modelspec.date"]
    assert metadata["modelspec.trigger_phrase"] == "ohwx"

    assert metadata["sshs_model_hash"] == kohya_model_hash(file_bytes)
    # The legacy hash is of the file as written with only the ss_* metadata (kohya: "only retain the training
    # metadata"), which the other keys do not shift.
    training_only = {key: value for key, value in metadata.items() if key.startswith("ss_")}
    assert metadata["sshs_legacy_hash"] == kohya_legacy_hash(safetensors.torch.save(tensors, training_only))
    assert metadata["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]


def test_the_hashes_follow_the_weights_and_not_the_other_metadata(tmp_path):
    trainer = trainer_with_random_lora(build_sd3(), "attention")
    facts = DatasetFacts({"x": {"a": 1}}, 1, 64)
    first = write(trainer, tmp_path / "a", "comfyui", dataset=facts)
    renamed = write(trainer, tmp_path / "b", "comfyui", dataset=facts, trigger_word="other")
    with torch.no_grad():
        next(iter(trainer.network.items()))[1].up.add_(1.0)
    changed = write(trainer, tmp_path / "c", "comfyui", dataset=facts)
    hashes = [safetensors.safe_open(str(p), framework="pt").metadata()["sshs_model_hash"]
              for p in (first, renamed, changed)]
    assert hashes[0] == hashes[1] != hashes[2]


# -- the same LoRA in ComfyUI and in diffusers ---------------------------------------------------------------


def comfyui_deltas(patcher, path, caplog) -> dict[str, torch.Tensor]:
    """What ComfyUI's LoRA loading adds to each weight it patches, by state-dict key; fails on any key not used."""
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        clone, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    weights = patcher.model.state_dict()
    # On zero weights, the patched weight is the change ComfyUI applies.
    return {key: comfy.lora.calculate_weight(patches, torch.zeros_like(weights[key], dtype=torch.float32), key)
            for key, patches in clone.patches.items()}


def comfyui_diffusers_names(patcher) -> dict[str, tuple[str, tuple | None, object]]:
    """ComfyUI's own map: diffusers module -> (ComfyUI weight key, (dim, start, length) or None, function or None),
    where the function turns a change in diffusers' row order into ComfyUI's."""
    model = patcher.model
    config = model.model_config.unet_config
    if isinstance(model, comfy.model_base.SDXL):
        names = {k: f"diffusion_model.{v}" for k, v in comfy.utils.unet_to_diffusers(config).items()}
    elif isinstance(model, comfy.model_base.SD3):
        names = comfy.utils.mmdit_to_diffusers(config, output_prefix="diffusion_model.")
    else:
        names = comfy.utils.flux_to_diffusers(config, output_prefix="diffusion_model.")
    result = {}
    for key, target in names.items():
        if key.endswith(".weight"):
            if isinstance(target, str):
                target = (target, None, None)
            elif len(target) == 2:
                target = (*target, None)
            result[key.removesuffix(".weight")] = target
    return result


class DiffusersLog:
    """Warnings diffusers and peft give while loading: diffusers' loggers do not propagate by default."""

    def __enter__(self):
        diffusers.utils.logging.enable_propagation()
        self.records = warnings.catch_warnings(record=True)
        self.caught = self.records.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self.records.__exit__(*exc)
        diffusers.utils.logging.disable_propagation()


def diffusers_deltas(pipeline, model, path, caplog) -> dict[str, torch.Tensor]:
    """What diffusers' load_lora_weights adds to each module of `model` (peft's merge delta), by module name;
    fails on any warning of diffusers or peft (unexpected or missing keys, keys for no module)."""
    caplog.clear()
    with caplog.at_level(logging.WARNING), DiffusersLog() as log:
        pipeline.load_lora_weights(str(path))
    messages = [r.getMessage() for r in caplog.records if r.name.startswith(("diffusers", "peft"))]
    messages += [str(w.message) for w in log.caught if "peft" in w.filename or "diffusers" in w.filename]
    # The pipelines have no text encoders, which diffusers says it found no keys for.
    assert [m for m in messages if not m.startswith("No LoRA keys associated to NoneType")] == []
    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, PeftLoraLayer):
            (adapter,) = module.lora_A.keys()
            deltas[name] = module.get_delta_weight(adapter).detach().float()
    pipeline.unload_lora_weights()
    return deltas


def assert_same_change(comfyui: dict, diffusers_side: dict, names: dict, expected: dict) -> None:
    """ComfyUI's and diffusers' changes are both the trained LoRA's, and together cover every row of every layer."""
    assert comfyui.keys() == expected.keys()
    for key, delta in comfyui.items():
        torch.testing.assert_close(delta, expected[key], rtol=0, atol=TOLERANCE)
    covered = {key: 0 for key in expected}
    for module, delta in diffusers_side.items():
        key, offset, function = names[module]
        assert key in expected, f"diffusers changed {module}, which is {key}: not a layer of the LoRA"
        want = expected[key] if offset is None else expected[key].narrow(*offset)
        got = function(delta) if function is not None else delta
        torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE, msg=lambda m, module=module: f"{module}: {m}")
        covered[key] += want.shape[0]
    assert covered == {key: weight.shape[0] for key, weight in expected.items()}
    assert min(delta.abs().max().item() for delta in expected.values()) > 1e-3, "a layer's LoRA does nothing"


def sdxl_pipeline():
    # The tiny SDXL of tiny_models in diffusers' terms: 3 levels of 32/64/128 channels, 2 res blocks each,
    # transformers (1 deep, linear projections) on the two lower levels and in the middle.
    unet = diffusers.UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=1,
        cross_attention_dim=800, attention_head_dim=(1, 1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=1568,
    )
    pipeline = diffusers.StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                                   tokenizer_2=None, unet=unet, scheduler=None)
    return pipeline, unet


def sd3_pipeline():
    # tiny_models' SD 3.5 Medium-like MMDiT: 2 blocks of 2 heads of 64, the first with a second attention.
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=4096, caption_projection_dim=128, pooled_projection_dim=800, out_channels=16,
        pos_embed_max_size=32, dual_attention_layers=(0,),
    )
    pipeline = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
    return pipeline, transformer


def flux_pipeline(full_width: bool):
    """Flux dev with one double and one single block: at full width (24 heads of 128), or tiny_models' narrow one
    (2 heads of 64). diffusers' converter of kohya-named Flux files splits the single blocks' linear1 at 3072 rows,
    so only the full width reads the comfyui format. The weights are never read (peft's delta does not use them),
    so they are left uninitialised."""
    heads, head_dim, axes = (24, 128, (16, 56, 56)) if full_width else (2, 64, (8, 28, 28))
    with torch.device("meta"):
        transformer = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=head_dim,
            num_attention_heads=heads, joint_attention_dim=64, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=axes,
        )
    transformer = transformer.to_empty(device="cpu")
    pipeline = diffusers.FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                      text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    return pipeline, transformer


# (family, ComfyUI model, diffusers pipeline, targets, formats diffusers reads)
CASES = {
    "sdxl-all-linear": (build_sdxl, sdxl_pipeline, "all-linear", ("comfyui", "diffusers")),
    # conv_in breaks diffusers' converter of kohya-named SDXL files: the comfyui format of this preset is
    # ComfyUI-only there (README); the diffusers format names every conv layer, conv_in included.
    "sdxl-conv": (build_sdxl, sdxl_pipeline, "attention+mlp+conv", ("diffusers",)),
    # diffusers has no converter for kohya-named SD3 files: that is what the diffusers format is for.
    "sd3-all-linear": (lambda: build_sd3(x_block_self_attn_layers=(0,)), sd3_pipeline, "all-linear", ("diffusers",)),
    "flux-all-linear": (build_flux, lambda: flux_pipeline(full_width=False), "all-linear", ("diffusers",)),
    # Minutes on a CPU: every delta of a 0.5 B parameter model, twice, in three programs.
    "flux-full-width-all-linear": pytest.param(
        (build_flux_full_width_direct, lambda: flux_pipeline(full_width=True), "all-linear", ("comfyui", "diffusers")),
        marks=pytest.mark.slow,
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_comfyui_and_diffusers_apply_the_trained_lora_from_both_formats(case, tmp_path, caplog):
    build_model, build_pipeline, targets, diffusers_formats = case
    patcher = build_model()
    trainer = trainer_with_random_lora(patcher, targets)
    expected = trained_deltas(trainer)
    names = comfyui_diffusers_names(patcher)
    pipeline, model = build_pipeline()
    for save_format in ("comfyui", "diffusers"):
        path = write(trainer, tmp_path, save_format)
        if save_format == "diffusers":
            with safetensors.safe_open(str(path), framework="pt") as file:
                assert not [key for key in file.keys() if key.endswith(".alpha")]
        comfyui = comfyui_deltas(patcher, path, caplog)
        diffusers_side = diffusers_deltas(pipeline, model, path, caplog) if save_format in diffusers_formats else {}
        if save_format in diffusers_formats:
            assert_same_change(comfyui, diffusers_side, names, expected)
        else:
            assert comfyui.keys() == expected.keys()
            for key, delta in comfyui.items():
                torch.testing.assert_close(delta, expected[key], rtol=0, atol=TOLERANCE)


def test_a_save_format_that_does_not_exist_is_named():
    with pytest.raises(ValueError, match=r"save\.format: 'peft' is not one of 'comfyui', 'diffusers'"):
        SaveConfig(name="x", format="peft")

