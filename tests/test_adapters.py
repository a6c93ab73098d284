"""LoHa, LoKr and DoRA beside LoRA: ComfyUI's own loaders take their files whole and rebuild the trained
model from them, each lowers the loss as LoRA does, resume is bit-exact, and the settings reach the engine
from the node and the YAML file."""

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import comfy.lora
import comfy.model_management
import comfy.ops
import comfy.sd
import comfy.utils
import comfy.weight_adapter.base
import pytest
import safetensors
import torch
import torch.nn.functional as F
from live_server import ComfyServer
from test_cli import line_of, short_form, write
from test_engine import evaluate, evaluation_set, fixed_samples, run_collecting_losses
from test_engine import train_config as engine_train_config
from test_export import (
    LATENT_HW,
    STARTED_AT,
    cancelled_at_2_and_resumed,
    load_through_comfyui,
    loaded,
    predict,
    relative_error,
    run_and_read_latent,
    samples,
    save,
    train_config,
    weights_of,
    write_live_sd3,
)
from test_optim import trained_fused_and_per_tensor
from test_server import pack_nodes
from tiny_encoders import clip_files
from tiny_models import MODEL_FACTORIES, random_inputs
from torch import nn

from trainer_core import cli, export, headless, yaml_config
from trainer_core.config import ConfigError, LoraConfig, SaveConfig, check_save_format
from trainer_core.job import TrainingJob
from trainer_core.lora import LoraNetwork, factorization, lora_layer_for
from trainer_core.optim import QUANT_STATE
from trainer_core.trainer import Trainer

FAMILIES = list(MODEL_FACTORIES)
# One model of each family for the longer tests (the variants share the family's code).
ONE_PER_FAMILY = ["sdxl_eps", "sd3", "flux_dev"]
ALGORITHMS = {
    "loha": dict(algorithm="loha"),
    "lokr": dict(algorithm="lokr"),
    "lokr_full": dict(algorithm="lokr", lokr_full_rank=True, lokr_factor=4),
    "dora": dict(algorithm="dora"),
}
# The file keys of each algorithm's layers besides `.alpha`: LyCORIS' forms, which ComfyUI reads.
FILE_KEYS = {
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
    "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b"},
    "lokr_full": {"lokr_w1", "lokr_w2"},
    "dora": {"lora_down.weight", "lora_up.weight", "dora_scale"},
}


def lora_config(algorithm: str, name: str = "sd3", **overrides) -> LoraConfig:
    # The tiny UNet does most of its work in convolutions: SDXL runs adapt them too.
    targets = "attention+mlp+conv" if name.startswith("sdxl") else "attention+mlp"
    return LoraConfig(**({"rank": 4, "alpha": 2.0, "targets": targets} | ALGORITHMS[algorithm] | overrides))


def moved_off_init(network: LoraNetwork) -> None:
    """Every weight moved a little from its initialisation (zero factors included), so that the adapter
    changes the output clearly and every factor shapes it."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05 * (parameter.std() + 0.1))


def trained(name: str, algorithm: str) -> Trainer:
    patcher = MODEL_FACTORIES[name]()
    trainer = Trainer(patcher, samples(patcher), lora_config(algorithm, name), train_config())
    moved_off_init(trainer.network)
    trainer.run()
    return trainer


def file_keys(path: Path) -> set[str]:
    with safetensors.safe_open(str(path), framework="pt") as file:
        return set(file.keys())


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("name", FAMILIES)
def test_comfyui_loads_every_key_and_reproduces_the_trained_model(name, algorithm, caplog, monkeypatch):
    trainer = trained(name, algorithm)
    patcher, network = trainer.patcher, trainer.network
    inputs = random_inputs(patcher, batch=2, latent_hw=LATENT_HW, seed=11)
    base = predict(trainer, inputs)
    with network.attached(patcher.model.diffusion_model):
        expected = predict(trainer, inputs)
    assert relative_error(base, expected) > 1e-3, "the adapter hardly changes the output; the test would prove nothing"
    if name.startswith("sdxl"):
        assert any(layer.delta_weight().ndim == 4 for _, layer in network.items()), "no convolution was adapted"

    path = save(trainer)
    keys = file_keys(path)
    suffixes = {key.partition(".")[2] for key in keys} - {"alpha"}
    if algorithm == "lokr":
        # Low-rank second factors, and full ones where the rank is at least half their sides (small SDXL convs).
        assert FILE_KEYS["lokr"] <= suffixes <= FILE_KEYS["lokr"] | FILE_KEYS["lokr_full"]
    else:
        assert suffixes == FILE_KEYS[algorithm]
    with caplog.at_level(logging.WARNING):
        clone, used, patched = load_through_comfyui(path, patcher, 1.0, monkeypatch)
        with loaded(clone):
            actual = predict(trainer, inputs)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert used | {k for k in keys if k.endswith(".alpha")} == keys
    assert patched == {f"diffusion_model.{module}.weight" for module, _ in network.items()}
    assert relative_error(actual, expected) < 1e-4

    with loaded(load_through_comfyui(path, patcher, 0.0, monkeypatch)[0]):
        assert torch.equal(predict(trainer, inputs), base)
    assert torch.equal(predict(trainer, inputs), base)


def test_lokr_makes_both_forms_of_its_second_factor_with_comfyuis_scale():
    """A low-rank w2 where the rank is below half its sides, scaled by alpha / rank; a full one at or above
    (LyCORIS' rule) or when asked, scaled by 1 (ComfyUI reads no rank from it)."""
    linear = nn.Linear(64, 96)
    low = lora_layer_for(linear, LoraConfig(rank=2, alpha=1.0, algorithm="lokr"))
    assert set(low.file_tensors()) == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"} and low.scale == 0.5
    assert low.lokr_w1.shape == (8, 8) and low.lokr_w2_a.shape == (12, 2) and low.lokr_w2_b.shape == (2, 8)
    high = lora_layer_for(linear, LoraConfig(rank=6, alpha=3.0, algorithm="lokr"))
    assert set(high.file_tensors()) == {"lokr_w1", "lokr_w2"} and high.scale == 1.0
    asked = lora_layer_for(linear, LoraConfig(rank=2, alpha=1.0, algorithm="lokr", lokr_full_rank=True, lokr_factor=4))
    assert asked.lokr_w1.shape == (4, 4) and asked.lokr_w2.shape == (24, 16) and asked.scale == 1.0


def test_the_lokr_split_is_comfyuis_and_lycoris():
    for dimension in range(1, 600):
        for factor in (-1, 1, 2, 3, 4, 8, 16, 32):
            assert factorization(dimension, factor) == comfy.weight_adapter.base.factorization(dimension, factor)


@pytest.mark.parametrize("algorithm", ["loha", "lokr", "dora"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_each_layer_adds_the_delta_of_its_merged_weight(kind, algorithm):
    """Activation-space and weight-space forms give what the weight they stand for gives (LoHa's Khatri-Rao
    form at rank 4 on 64x96, its weight form at rank 8)."""
    torch.manual_seed(0)
    base = nn.Linear(64, 96) if kind == "linear" else nn.Conv2d(16, 32, 3, padding=1)
    x = torch.randn(2, 5, 64) if kind == "linear" else torch.randn(2, 16, 6, 6)
    for rank in (4, 8):
        layer = lora_layer_for(base, LoraConfig(rank=rank, alpha=2.0, algorithm=algorithm))
        moved_off_init(LoraNetwork({"layer": layer}))
        if algorithm == "loha" and kind == "linear":
            assert layer.khatri_rao == (rank == 4)
        with LoraNetwork({"layer": layer}).attached(nn.ModuleDict({"layer": base})), torch.no_grad():
            actual = base(x)
        weight = base.weight + layer.delta_weight()
        if algorithm == "dora":
            norms = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
            column_scale = layer.magnitude / (norms + torch.finfo(torch.float32).eps)
            weight = weight * column_scale.view(1, -1, *([1] * (weight.ndim - 2)))
        with torch.no_grad():
            expected = F.linear(x, weight, base.bias) if kind == "linear" else F.conv2d(x, weight, base.bias, padding=1)
        assert relative_error(actual, expected) < 1e-5


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_disabled_network_gives_the_base_output_exactly(algorithm):
    """`LoraNetwork.disabled()` (differential output preservation's base prediction) turns DoRA's input
    scaling off too, not only the added deltas."""
    base = nn.Linear(64, 96)
    layer = lora_layer_for(base, lora_config(algorithm))
    network = LoraNetwork({"layer": layer})
    moved_off_init(network)
    x = torch.randn(2, 5, 64)
    with torch.no_grad(), network.attached(nn.ModuleDict({"layer": base})):
        with network.disabled():
            off = base(x)
        on = base(x)
    with torch.no_grad():
        assert torch.equal(off, base(x))
        assert relative_error(on, off) > 1e-3


def test_dora_trains_on_fp8_stored_weights_through_comfyuis_cast():
    """The base weight is read as ComfyUI's op casts it for the input; its norms are of that weight."""
    base = comfy.ops.manual_cast.Linear(64, 32, dtype=torch.float8_e4m3fn)
    with torch.no_grad():
        base.weight.copy_(torch.randn(32, 64) * 0.3)
        base.bias.copy_(torch.randn(32).to(torch.float8_e4m3fn))
    base.requires_grad_(False)  # as in training: only the adapter learns
    layer = lora_layer_for(base, LoraConfig(rank=4, alpha=4.0, algorithm="dora"))
    moved_off_init(LoraNetwork({"layer": layer}))
    x = torch.randn(3, 64)
    with LoraNetwork({"layer": layer}).attached(nn.ModuleDict({"layer": base})):
        output = base(x)
        output.square().mean().backward()
    cast = base.weight.float()
    weight = cast + layer.delta_weight()
    scale = layer.magnitude / (weight.norm(dim=0) + torch.finfo(torch.float32).eps)
    expected = F.linear(x, weight * scale, base.bias.float())
    assert relative_error(output.detach(), expected.detach()) < 1e-5
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (layer.magnitude, layer.up))


def test_doras_column_scale_stays_fp32_under_bf16_autocast():
    base = nn.Linear(64, 32).to(torch.bfloat16).requires_grad_(False)
    layer = lora_layer_for(base, LoraConfig(rank=4, alpha=4.0, algorithm="dora"))
    with torch.no_grad():  # ΔW as large as W: the norms' fp32 terms then matter
        layer.up.copy_(torch.randn(layer.up.shape, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    exact = layer.column_scale(base, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = layer.column_scale(base, x)
    assert exact.dtype == autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, exact, rtol=1e-6, atol=0)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_each_algorithm_lowers_the_loss(name, algorithm):
    patcher = MODEL_FACTORIES[name]()
    lora = lora_config(algorithm, name, rank=8, alpha=8.0)
    # LoKr's automatic split leaves few weights per layer (factors 8 to 32 a side on these widths);
    # LyCORIS' guidelines give it larger learning rates than LoRA for that reason.
    learning_rate = 1e-2 if algorithm == "lokr" else 3e-3
    trainer = Trainer(patcher, fixed_samples(patcher), lora, engine_train_config(steps=60, learning_rate=learning_rate))
    fixed = evaluation_set(trainer)
    before = evaluate(trainer, fixed)
    trainer.run()
    after = evaluate(trainer, fixed)
    assert after <= 0.7 * before, f"{name} {algorithm}: loss {before:.4f} -> {after:.4f}"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_checkpointed_and_compiled_flux_blocks_train_like_eager_ones(algorithm):
    """Per-block checkpointing (and for DoRA, whose pre-hook reads the base weight through ComfyUI's cast,
    torch.compile too: the GPU's defaults) on Flux, whose blocks add into their inputs in place, give the
    eager losses. Compiling on the CPU takes minutes, so the other algorithms' plain hooks are not compiled."""
    patcher = MODEL_FACTORIES["flux_dev"]()
    losses = []
    runs = ((False, "off"), (True, "off")) + (((True, "on"),) if algorithm == "dora" else ())
    for checkpointing, mode in runs:
        trainer = Trainer(patcher, fixed_samples(patcher, 2), lora_config(algorithm, "flux_dev"),
                          engine_train_config(steps=2, gradient_checkpointing=checkpointing, compile_blocks=mode))
        losses.append(torch.tensor(run_collecting_losses(trainer)))
    eager, *others = losses
    for run in others:
        torch.testing.assert_close(run, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_fused_8bit_adamw_trains_each_algorithm_as_bitsandbytes_per_tensor_one(algorithm):
    """The fused optimizer packs every parameter shape (DoRA's magnitude vectors, LoKr's small w1, large
    LoHa factors in 8-bit state) and updates them as bitsandbytes' AdamW8bit does one tensor at a time."""
    patcher = MODEL_FACTORIES["sd3"]()
    config = engine_train_config(optimizer="adamw8bit", steps=3, weight_decay=0.01, learning_rate=3e-3)
    fused = trained_fused_and_per_tensor(patcher, fixed_samples(patcher, 2), lora_config(algorithm, rank=16,
                                                                                         alpha=16.0), config)
    kinds = {s[QUANT_STATE]["state1"].dtype for s in fused.optimizer.state_dict()["state"].values()}
    # LoKr's automatic split leaves no tensor of 4096 elements on this model: 32-bit state only.
    assert kinds == ({torch.float32} if algorithm == "lokr" else {torch.uint8, torch.float32})


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_cancel_then_resume_equals_training_straight_through(algorithm, tmp_path):
    """With the fused 8-bit AdamW (vectors and small matrices beside the large factors) and dropout."""
    lora = lora_config(algorithm, dropout=0.1)
    config = train_config(steps=4, optimizer="adamw8bit", schedule="cosine", warmup_steps=1, max_grad_norm=0.5)
    patcher = MODEL_FACTORIES["sd3"]()
    straight = Trainer(patcher, samples(patcher), lora, config)
    straight.run()

    save_config = SaveConfig(name=f"resume-{algorithm}", every=2, output_dir=str(tmp_path))
    _, second_half, _ = cancelled_at_2_and_resumed(patcher, lora, config, save_config)
    assert second_half.state.step == 2
    second_half.run()
    expected, actual = weights_of(straight), weights_of(second_half)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


def test_a_checkpoint_of_one_algorithm_is_refused_for_another_naming_the_setting(tmp_path):
    patcher = MODEL_FACTORIES["sd3"]()
    config = train_config(steps=2)
    save_config = SaveConfig(name="other-algorithm", every=1, output_dir=str(tmp_path))
    first = Trainer(patcher, samples(patcher), lora_config("loha"), config)
    with TrainingJob(first, [export.CheckpointHook(save_config)]) as job:
        list(job.events())
    job.result()
    other = Trainer(patcher, samples(patcher), lora_config("dora"), config)
    with pytest.raises(export.CheckpointError, match="trained with lora.algorithm 'loha', this run uses 'dora'"):
        export.resume(other, export.checkpoints_folder(save_config))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_saved_file_reads_back_as_the_same_network(algorithm):
    name = "sdxl_eps"
    trainer = trained(name, algorithm)
    lora_file = export.load_lora_file(save(trainer))
    assert lora_file.algorithm == ALGORITHMS[algorithm]["algorithm"]
    network = export.network_from_lora(lora_file, trainer.family.diffusion_model)
    original = trainer.network.state_dict()
    assert network.state_dict().keys() == original.keys()
    assert all(torch.equal(network.state_dict()[k], original[k]) for k in original)
    continued = Trainer(trainer.patcher, samples(trainer.patcher), lora_config(algorithm, name), train_config(steps=1),
                        network=network)
    continued.run()
    assert continued.state.step == 1


def test_a_lokr_file_without_metadata_is_read_by_the_shapes_of_its_factors(tmp_path):
    trainer = trained("flux_dev", "lokr_full")
    tensors = export.lora_state_dict(trainer.network)
    path = tmp_path / "bare.safetensors"
    safetensors.torch.save_file(tensors, str(path))  # no ss_network_args: the factor is not recorded
    network = export.network_from_lora(export.load_lora_file(path), trainer.family.diffusion_model)
    assert all(torch.equal(network.state_dict()[k], v) for k, v in trainer.network.state_dict().items())


def test_an_incomplete_layer_is_refused_naming_it(tmp_path):
    trainer = trained("flux_dev", "loha")
    tensors = export.lora_state_dict(trainer.network)
    dropped = next(k for k in tensors if k.endswith(".hada_w2_b"))
    del tensors[dropped]
    path = tmp_path / "incomplete.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    with pytest.raises(ValueError, match=rf"layer {dropped.partition('.')[0]} has .*none of LoRA's"):
        export.load_lora_file(path)


@pytest.mark.parametrize("algorithm, module, args", [
    ("lora", "networks.lora", None),
    ("loha", "lycoris.kohya", {"algo": "loha"}),
    ("lokr_full", "lycoris.kohya", {"algo": "lokr", "factor": "4", "full_matrix": "True"}),
    ("dora", "lycoris.kohya", {"algo": "lora", "dora_wd": "True", "wd_on_out": "False"}),
])
def test_metadata_names_the_algorithm(algorithm, module, args):
    lora = LoraConfig(rank=4) if algorithm == "lora" else lora_config(algorithm)
    metadata = export.network_metadata(lora)
    assert metadata["ss_network_module"] == module
    if args is None:
        assert "ss_network_args" not in metadata
    else:
        assert json.loads(metadata["ss_network_args"]) == args


@pytest.mark.parametrize("algorithm", ["loha", "lokr", "dora"])
def test_the_diffusers_format_is_refused_for_other_algorithms_before_training(algorithm):
    with pytest.raises(ConfigError, match=rf"save.format: 'diffusers' holds plain LoRA only, and lora.algorithm is "
                                          rf"'{algorithm}': set save.format to 'comfyui'"):
        check_save_format(LoraConfig(algorithm=algorithm), SaveConfig(format="diffusers"))
    check_save_format(LoraConfig(algorithm=algorithm), SaveConfig(format="comfyui"))
    check_save_format(LoraConfig(), SaveConfig(format="diffusers"))


def test_the_config_names_a_wrong_algorithm_or_factor():
    with pytest.raises(ConfigError, match=r"lora.algorithm: 'lycoris' is not one of 'lora', 'loha', 'lokr', 'dora'"):
        LoraConfig(algorithm="lycoris")
    with pytest.raises(ConfigError, match=r"lora.lokr_factor: must be -1 \(automatic\) or an integer >= 1, got 0"):
        LoraConfig(algorithm="lokr", lokr_factor=0)


def write_yaml(folder: Path, network: str) -> Path:
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "data").mkdir()
    path = folder / "config.yaml"
    path.write_text(f"name: run\nmodel:\n  name_or_path: model.safetensors\nnetwork:\n{network}"
                    "datasets:\n  - folder_path: data\n", encoding="utf-8")
    return path


def test_the_yaml_takes_ai_toolkits_network_type_and_lokr_keys(tmp_path):
    path = write_yaml(tmp_path / "lokr", "  type: lokr\n  linear: 8\n  linear_alpha: 4\n  lokr_factor: 8\n"
                                         "  lokr_full_rank: true\n")
    lora = headless.build(yaml_config.load(path), LoraConfig, headless.LORA_KEYS)
    assert lora == LoraConfig(rank=8, alpha=4.0, algorithm="lokr", lokr_factor=8, lokr_full_rank=True)
    dora = write_yaml(tmp_path / "dora", "  type: dora\n  linear: 8\n  linear_alpha: 8\n")
    assert headless.build(yaml_config.load(dora), LoraConfig, headless.LORA_KEYS).algorithm == "dora"


def test_the_yaml_names_the_line_of_a_wrong_network_type_or_factor(tmp_path):
    with pytest.raises(yaml_config.ConfigFileError, match=r"config.yaml:5: network.type: 'locr' is not one of "
                                                          r"'lora', 'loha', 'lokr', 'dora'"):
        yaml_config.load(write_yaml(tmp_path / "type", "  type: locr\n"))
    config = yaml_config.load(write_yaml(tmp_path / "factor", "  type: lokr\n  lokr_factor: -3\n"))
    with pytest.raises(yaml_config.ConfigFileError, match=r"config.yaml:6: network.lokr_factor: must be -1"):
        headless.build(config, LoraConfig, headless.LORA_KEYS)


@pytest.mark.parametrize("algorithm", ["lokr", "dora"])
def test_lora_train_trains_resumes_and_writes_the_algorithms_file(files, tmp_path, caplog, algorithm):
    """`lora-train` with ai-toolkit's `network.type`: the run, its checkpoint resumed to more steps, and a file
    ComfyUI's LoRA loading takes whole (LoKr and DoRA: a second factor / a magnitude beside LoRA's keys)."""
    config = short_form(files)
    config["network"] = {"type": algorithm, "linear": 4, "linear_alpha": 4, "lokr_factor": 4}
    path = write(tmp_path, config)
    assert cli.main(["train", str(path), "--cpu"]) == 0
    config["train"]["steps"] += 2
    path = write(tmp_path, config)
    assert cli.main(["train", str(path), "--cpu", "--resume"]) == 0
    lora_path = tmp_path / "out" / "tiny" / "tiny.safetensors"
    lora_file = export.load_lora_file(lora_path)
    assert lora_file.algorithm == algorithm and lora_file.metadata["ss_steps"] == str(config["train"]["steps"])
    assert json.loads(lora_file.metadata["ss_network_args"])["algo"] == {"lokr": "lokr", "dora": "lora"}[algorithm]
    model = comfy.sd.load_diffusion_model(str(files / "models/diffusion_models/tiny_sd3.safetensors"))
    lora = comfy.utils.load_torch_file(str(lora_path))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1, 0)
    assert "lora key not loaded" not in caplog.text
    assert len(patched.patches) == len(lora_file.layers)


def test_lora_train_refuses_the_diffusers_format_for_loha_naming_the_line(files, tmp_path, caplog):
    config = short_form(files)
    config["network"]["type"] = "loha"
    config["save"]["format"] = "diffusers"
    path = write(tmp_path, config)
    assert cli.main(["train", str(path), "--cpu"]) == cli.EXIT_CONFIG
    assert (f"config.yaml:{line_of(path, 'format:')}: save.format: 'diffusers' holds plain LoRA only, and "
            "lora.algorithm is 'loha'") in caplog.text
    assert not (tmp_path / "out").exists()


def test_the_lora_config_node_passes_the_algorithm_and_its_settings():
    (node,) = [n for n in pack_nodes() if n.define_schema().node_id == "LoraTrainer_LoraConfig"]
    output = node.execute(rank=4, alpha=2.0, dropout=0.0, targets="attention", include="", exclude="",
                          algorithm="lokr", lokr_factor=8, lokr_full_rank=True)
    # The pack's own copy of the config class (ComfyUI imports the pack as a package): compared by fields.
    assert asdict(output.result[0]) == asdict(LoraConfig(rank=4, alpha=2.0, targets="attention", algorithm="lokr",
                                                         lokr_factor=8, lokr_full_rank=True))
    # A graph saved before the algorithm existed gives plain LoRA.
    legacy = node.execute(rank=4, alpha=2.0, dropout=0.0, targets="attention", include="", exclude="")
    assert legacy.result[0].algorithm == "lora"


# -- the live server: LoraLoader with each algorithm's file --------------------------------------------------


def lora_loader_graph(unet: str, clip: str, lora: str, strength: float, prefix: str) -> dict:
    """UNETLoader + CLIPLoader -> LoraLoader (model and clip) -> KSampler -> SaveLatent."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "3": {"class_type": "CLIPLoader", "inputs": {"clip_name": clip, "type": "stable_diffusion"}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["3", 0], "lora_name": lora,
                                                     "strength_model": strength, "strength_clip": strength}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a photo of a cat"}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "seed": 3, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["4", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": prefix}},
    }


def test_a_live_comfyui_lora_loader_samples_differently_with_each_algorithm(comfy_server: ComfyServer):
    unet = "adapters_live_sd3.safetensors"
    write_live_sd3(comfy_server.models_dir / "diffusion_models" / unet)
    clip = "adapters_live_clip_l.safetensors"
    os.symlink(clip_files("flux")[0], comfy_server.models_dir / "text_encoders" / clip)
    patcher = comfy.sd.load_diffusion_model(str(comfy_server.models_dir / "diffusion_models" / unet))
    lora_files = {}
    for algorithm in ALGORITHMS:
        trainer = Trainer(patcher, samples(patcher), lora_config(algorithm), train_config())
        moved_off_init(trainer.network)
        trainer.run()
        lora_files[algorithm] = f"adapters_live/{algorithm}.safetensors"
        export.write_lora(comfy_server.models_dir / "loras" / lora_files[algorithm], trainer,
                          SaveConfig(name=f"adapters_live_{algorithm}"), STARTED_AT)
    log_start = len(comfy_server.log_text())
    # Strength 0 is the base model whichever file is named.
    without = run_and_read_latent(comfy_server,
                                  lora_loader_graph(unet, clip, lora_files["dora"], 0.0, "adapters_live/off"))
    for algorithm, lora in lora_files.items():
        with_lora = run_and_read_latent(comfy_server, lora_loader_graph(unet, clip, lora, 1.0,
                                                                        f"adapters_live/{algorithm}_on"))
        assert with_lora.shape == without.shape == (1, 16, 8, 8)
        assert torch.isfinite(with_lora).all()
        assert relative_error(with_lora, without) > 1e-2, algorithm
    assert "lora key not loaded" not in comfy_server.log_text()[log_start:]
    comfy.model_management.unload_all_models()
