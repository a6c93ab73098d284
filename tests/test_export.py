"""LoRA files, checkpoints and resume: what ComfyUI's own LoRA Loader makes of our files."""

import contextlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import comfy.lora
import comfy.model_management
import comfy.sd
import comfy.supported_models
import comfy.utils
import folder_paths
import pytest
import safetensors
import safetensors.torch
import torch
from live_server import ComfyServer
from tiny_encoders import CLIP_L_WIDTH, clip_files
from tiny_models import MODEL_FACTORIES, TINY_SD3_UNET, initialise_, random_inputs

from trainer_core import export
from trainer_core.config import LoraConfig, SaveConfig, TrainConfig
from trainer_core.job import JobHook, TrainingJob
from trainer_core.trainer import Sample, Trainer

FAMILIES = list(MODEL_FACTORIES)
LATENT_HW = (8, 8)
STARTED_AT = 1_700_000_000.0
EXPECTED_ARCHITECTURE = {
    "sdxl_eps": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
    "sdxl_v": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
    "sd3": ("sd3.5_medium", "stable-diffusion-v3-5-medium/lora"),
    "flux_dev": ("flux1_dev", "flux-1-dev/lora"),
    "flux_schnell": ("flux1_schnell", "flux-1-schnell/lora"),
}


def samples(patcher, count=3) -> list[Sample]:
    made = []
    for i in range(count):
        inputs = random_inputs(patcher, batch=1, latent_hw=LATENT_HW, seed=200 + i)
        made.append(Sample(inputs["x"][0], {"context": inputs["context"][0], "y": inputs["y"][0]}, key=str(i)))
    return made


def train_config(**overrides) -> TrainConfig:
    values = dict(steps=2, learning_rate=1e-2, precision="fp32", gradient_checkpointing=False, weight_decay=0.0,
                  seed=7)
    return TrainConfig(**(values | overrides))


def trained(patcher, lora: LoraConfig | None = None, **overrides) -> Trainer:
    """A few real steps, with B started away from zero so the LoRA clearly changes the output."""
    trainer = Trainer(patcher, samples(patcher), lora or LoraConfig(rank=4, alpha=2.0), train_config(**overrides))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in trainer.network.items():
            layer.up.copy_(torch.randn(layer.up.shape, generator=generator) * 0.05)
    trainer.run()
    return trainer


def predict(trainer: Trainer, inputs: dict) -> torch.Tensor:
    timesteps = torch.tensor([500]) if trainer.family.name == "sdxl" else torch.tensor([0.5])
    with torch.no_grad():
        return trainer.family.predict(inputs["x"], timesteps, {"context": inputs["context"], "y": inputs["y"]})


@contextlib.contextmanager
def loaded(patcher):
    """The patcher's weight patches merged into the shared model, as ComfyUI does before sampling."""
    comfy.model_management.load_models_gpu([patcher])
    try:
        yield
    finally:
        comfy.model_management.unload_all_models()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def save(trainer: Trainer, **overrides) -> Path:
    config = SaveConfig(**({"name": "run", "dtype": "fp32"} | overrides))
    return export.loras_folder() / export.save_lora(trainer, config, STARTED_AT)


def load_through_comfyui(path: Path, patcher, strength: float, monkeypatch):
    """What the LoRA Loader does with a file; returns the patched clone, the file keys ComfyUI used
    and the model weights it patched."""
    used, patched = set(), set()
    real_load_lora = comfy.lora.load_lora

    def recording_load_lora(lora, to_load, log_missing=True):
        patches = real_load_lora(lora, to_load, log_missing)
        for target, adapter in patches.items():
            used.update(adapter.loaded_keys)
            patched.add(target)
        return patches

    monkeypatch.setattr(comfy.lora, "load_lora", recording_load_lora)
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    clone, _ = comfy.sd.load_lora_for_models(patcher, None, lora, strength, 0)
    return clone, used, patched


@pytest.mark.parametrize(
    "name, targets", [(name, "attention+mlp") for name in FAMILIES] + [("sdxl_eps", "attention+mlp+conv")]
)
def test_comfyui_lora_loader_uses_every_key_and_reproduces_the_trained_model(name, targets, caplog, monkeypatch):
    trainer = trained(MODEL_FACTORIES[name](), LoraConfig(rank=4, alpha=2.0, targets=targets))
    patcher, network = trainer.patcher, trainer.network
    inputs = random_inputs(patcher, batch=2, latent_hw=LATENT_HW, seed=11)
    base = predict(trainer, inputs)
    with network.attached(patcher.model.diffusion_model):
        expected = predict(trainer, inputs)
    assert relative_error(base, expected) > 1e-3, "the LoRA hardly changes the output; the test would prove nothing"
    if targets.endswith("conv"):
        assert any(layer.down.ndim == 4 for _, layer in network.items()), "no LoCon layer was trained"

    path = save(trainer)
    with safetensors.safe_open(str(path), framework="pt") as file:
        file_keys = set(file.keys())
    with caplog.at_level(logging.WARNING):
        clone, used, patched = load_through_comfyui(path, patcher, 1.0, monkeypatch)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert used == file_keys
    assert patched == {f"diffusion_model.{module}.weight" for module, _ in network.items()}

    with loaded(clone):
        actual = predict(trainer, inputs)
    assert relative_error(actual, expected) < 1e-4

    clone_at_zero, _, _ = load_through_comfyui(path, patcher, 0.0, monkeypatch)
    with loaded(clone_at_zero):
        assert torch.equal(predict(trainer, inputs), base)
    # The cached model is back to its own weights.
    assert torch.equal(predict(trainer, inputs), base)


def test_apply_lora_to_clone_matches_the_lora_loader():
    trainer = trained(MODEL_FACTORIES["flux_dev"]())
    inputs = random_inputs(trainer.patcher, batch=1, latent_hw=LATENT_HW, seed=3)
    with trainer.network.attached(trainer.patcher.model.diffusion_model):
        expected = predict(trainer, inputs)
    clone = export.apply_lora_to_clone(trainer.patcher, trainer.network, 1.0)
    assert not trainer.patcher.patches, "the LoRA leaked into the base patcher"
    with loaded(clone):
        assert relative_error(predict(trainer, inputs), expected) < 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_metadata(name):
    lora = LoraConfig(rank=4, alpha=2.0)
    patcher = MODEL_FACTORIES[name]()
    trainer = Trainer(patcher, samples(patcher, 1), lora, train_config(steps=5))
    path = save(trainer, name="my run", trigger_word="sks dog")
    with safetensors.safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    base_model_version, architecture = EXPECTED_ARCHITECTURE[name]
    # Checked in test_interop: the hashes (against kohya's formula) and the date (the time of saving).
    assert metadata | dict.fromkeys(("ss_training_config", "modelspec.date", "sshs_model_hash", "sshs_legacy_hash"),
                                    "") == {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "2.0",
        "ss_base_model_version": base_model_version,
        "ss_output_name": "my run",
        "ss_steps": "0",
        "ss_learning_rate": "0.01",
        "ss_unet_lr": "0.01",
        "ss_text_encoder_lr": "0.0",  # no text encoder trained (tests/test_text_encoder_lora.py: one that did)
        "ss_train_text_encoder": "False",
        "ss_text_encoders": "",
        "ss_training_started_at": str(STARTED_AT),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.title": "my run",
        "modelspec.trigger_phrase": "sks dog",
        "modelspec.date": "",
        "sshs_model_hash": "",
        "sshs_legacy_hash": "",
        "ss_training_config": "",
    }
    recorded = json.loads(metadata["ss_training_config"])
    assert recorded == json.loads(json.dumps({"lora": asdict(lora), "train": trainer.config.to_dict()}))
    assert TrainConfig.from_dict(recorded["train"]) == trainer.config


@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                                ("fp32", torch.float32)])
def test_dtype_option_applies_to_the_weights_and_alpha_stays_exact(dtype, torch_dtype):
    patcher = MODEL_FACTORIES["sd3"]()
    trainer = Trainer(patcher, samples(patcher, 1), LoraConfig(rank=3, alpha=0.3), train_config())
    tensors = safetensors.torch.load_file(save(trainer, dtype=dtype))
    assert {t.dtype for k, t in tensors.items() if k.endswith(".weight")} == {torch_dtype}
    alphas = [t for k, t in tensors.items() if k.endswith(".alpha")]
    assert len(alphas) == len(list(trainer.network.items()))
    assert all(a.ndim == 0 and a.dtype == torch.float32 and a.item() == pytest.approx(0.3, rel=1e-7) for a in alphas)


def test_a_saved_lora_continues_training_as_the_same_network():
    lora = LoraConfig(rank=4, alpha=2.0, targets="attention+mlp+conv")
    trainer = trained(MODEL_FACTORIES["sdxl_eps"](), lora, steps=1)
    lora_file = export.load_lora_file(save(trainer))
    assert (lora_file.rank, lora_file.alpha) == (4, 2.0)
    network = export.network_from_lora(lora_file, trainer.family.diffusion_model)
    original = trainer.network.state_dict()
    assert network.state_dict().keys() == original.keys()
    assert all(torch.equal(network.state_dict()[k], original[k]) for k in original)
    continued = Trainer(trainer.patcher, samples(trainer.patcher), lora, train_config(steps=1), network=network)
    continued.run()
    assert continued.state.step == 1


def test_a_lora_for_another_architecture_is_refused_naming_the_layer():
    patcher = MODEL_FACTORIES["flux_dev"]()
    flux = export.load_lora_file(save(Trainer(patcher, samples(patcher, 1), LoraConfig(rank=2), train_config())))
    sd3 = MODEL_FACTORIES["sd3"]()
    with pytest.raises(ValueError, match=r"no layer for 'lora_unet_double_blocks_0_.*another architecture"):
        export.network_from_lora(flux, sd3.model.diffusion_model)


def test_the_loras_folder_listing_shows_a_new_file_at_once():
    patcher = MODEL_FACTORIES["sd3"]()
    trainer = Trainer(patcher, samples(patcher, 1), LoraConfig(rank=2), train_config())
    save(trainer, name="first")
    assert os.path.join("first", "first.safetensors") in folder_paths.get_filename_list("loras")
    cached_mtimes = dict(folder_paths.filename_list_cache["loras"][1])

    listed = export.save_lora(trainer, SaveConfig(name="second"), STARTED_AT)
    # A coarse file-system clock can leave every folder's mtime as the cache recorded it.
    for folder, mtime in cached_mtimes.items():
        os.utime(folder, (mtime, mtime))
    assert listed == os.path.join("second", "second.safetensors")
    assert listed in folder_paths.get_filename_list("loras")
    assert folder_paths.get_full_path("loras", listed) == str(export.loras_folder() / listed)


# -- atomic writes --------------------------------------------------------------------------------


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def write_half_then_fail(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"\x00" * 100)
    raise OSError("disk full")


def fail(*args):
    raise OSError("I/O error")


@pytest.mark.parametrize("breakage", ["save", "fsync", "rename"])
def test_a_failed_write_leaves_no_partial_file_and_the_previous_one_intact(breakage, monkeypatch):
    patcher = MODEL_FACTORIES["sd3"]()
    trainer = Trainer(patcher, samples(patcher, 1), LoraConfig(rank=2), train_config())
    path = save(trainer, name="atomic")
    before = path.read_bytes()
    listing = files_under(path.parent)
    with torch.no_grad():
        next(trainer.network.parameters()).add_(1.0)
    target = {"save": (safetensors.torch, "save_file", write_half_then_fail), "fsync": (os, "fsync", fail),
              "rename": (os, "replace", fail)}[breakage]
    monkeypatch.setattr(*target)
    with pytest.raises(OSError):
        save(trainer, name="atomic")
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert files_under(path.parent) == listing


@pytest.mark.parametrize("breakage", ["lora file", "folder rename"])
def test_a_failed_checkpoint_leaves_the_previous_one_loadable_and_no_leftovers(breakage, monkeypatch, tmp_path):
    patcher = MODEL_FACTORIES["sd3"]()
    trainer = Trainer(patcher, samples(patcher, 1), LoraConfig(rank=2), train_config(steps=5))
    config = SaveConfig(name="crash", every=1, output_dir=str(tmp_path))
    real_replace = os.replace

    def replace_files_only(source, target):
        if Path(source).is_dir():
            raise OSError("I/O error")
        real_replace(source, target)

    with trainer.session():
        trainer.step()
        first = export.save_checkpoint(trainer, config, STARTED_AT, "run-a")
        listing = files_under(tmp_path)
        trainer.step()
        if breakage == "lora file":
            monkeypatch.setattr(safetensors.torch, "save_file", write_half_then_fail)
        else:
            monkeypatch.setattr(os, "replace", replace_files_only)
        with pytest.raises(OSError):
            export.save_checkpoint(trainer, config, STARTED_AT, "run-a")
    monkeypatch.undo()
    assert files_under(tmp_path) == listing
    assert export.list_checkpoints(export.checkpoints_folder(config)) == [first]
    weights, state = export.load_checkpoint(first)
    assert state["step"] == 1 and weights.keys() == trainer.network.state_dict().keys()


# -- checkpoints and resume -----------------------------------------------------------------------


class CancelAt(JobHook):
    """Presses Cancel at a given step."""

    def __init__(self, step: int):
        self.every = step
        self.job: TrainingJob | None = None

    def on_step(self, trainer):
        self.job.cancel()
        return []


def weights_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.network.state_dict().items()}


def cancelled_at_2_and_resumed(patcher, lora: LoraConfig, config, save: SaveConfig):
    """A run cancelled at step 2, where `save` writes a checkpoint, and a new trainer resumed from that
    checkpoint: (the first run's events, the resumed trainer, what export.resume returned)."""
    first_half = Trainer(patcher, samples(patcher), lora, config)
    cancel = CancelAt(2)
    job = cancel.job = TrainingJob(first_half, [export.CheckpointHook(save), cancel])
    with job:
        events = list(job.events())
    job.result()
    second_half = Trainer(patcher, samples(patcher), lora, config)
    return events, second_half, export.resume(second_half, export.checkpoints_folder(save))


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_cancel_then_resume_equals_training_straight_through(optimizer, tmp_path):
    # Dropout draws from torch's global generator and 3 samples at batch 1 cross an epoch at step 3:
    # the resumed run must restore both.
    lora = LoraConfig(rank=4, alpha=4.0, dropout=0.1)
    config = train_config(steps=4, optimizer=optimizer, schedule="cosine", warmup_steps=1, max_grad_norm=0.5)
    patcher = MODEL_FACTORIES["sd3"]()

    straight = Trainer(patcher, samples(patcher), lora, config)
    straight.run()

    # Cancel lands on a periodic checkpoint's step: that checkpoint is the one to resume from, never written twice.
    save = SaveConfig(name=f"resume-{optimizer}", every=2, output_dir=str(tmp_path))
    events, second_half, resumed = cancelled_at_2_and_resumed(patcher, lora, config, save)
    saved = [e.data for e in events if e.kind == "saved"]
    assert [(e["kind"], e["step"]) for e in saved] == [("checkpoint", 2)]
    assert Path(saved[0]["lora"]).is_file()
    assert [p.name for p in export.checkpoints_folder(save).iterdir()] == ["step-000002"]
    assert resumed.folder == Path(saved[0]["path"])
    assert second_half.state.step == 2
    second_half.run()
    expected, actual = weights_of(straight), weights_of(second_half)
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


def test_periodic_checkpoints_keep_the_last_k_and_the_finished_lora_is_listed(tmp_path):
    patcher = MODEL_FACTORIES["sd3"]()
    trainer = Trainer(patcher, samples(patcher), LoraConfig(rank=2), train_config(steps=4))
    save = SaveConfig(name="periodic", every=1, keep_last=2, output_dir=str(tmp_path))
    folder_paths.get_filename_list("loras")  # cached before the save
    with TrainingJob(trainer, [export.CheckpointHook(save)]) as job:
        events = list(job.events())
    job.result()
    saved = [(e.data["kind"], e.data["step"]) for e in events if e.kind == "saved"]
    assert saved == [("checkpoint", 1), ("checkpoint", 2), ("checkpoint", 3), ("lora", 4)]
    kept = export.list_checkpoints(export.checkpoints_folder(save))
    assert [p.name for p in kept] == ["step-000002", "step-000003"]
    assert sorted(p.name for p in kept[-1].iterdir()) == [
        "periodic-step000003.safetensors", "resume.json", "resume.safetensors"
    ]
    assert os.path.join("periodic", "periodic.safetensors") in folder_paths.get_filename_list("loras")


def test_resume_state_round_trips_through_safetensors_and_json():
    shared = torch.arange(4.0)
    state = {
        "step": 3, "nan": float("nan"), "betas": (0.9, 0.999), "nothing": None, "flag": True,
        "optimizer": {"state": {0: {"exp_avg": torch.ones(2, 2), "qmap": shared}, 1: {"qmap": shared}},
                      "param_groups": [{"params": [0, 1], "lr": 1e-4}]},
        "view": shared[1:], "rng": [torch.zeros(3, dtype=torch.uint8)],
    }
    skeleton, tensors = export.flatten_state(state)
    restored = export.unflatten_state(json.loads(json.dumps(skeleton)),
                                      safetensors.torch.load(safetensors.torch.save(tensors)))
    assert restored["step"] == 3 and restored["betas"] == (0.9, 0.999) and restored["flag"] is True
    assert restored["nothing"] is None and restored["nan"] != restored["nan"]
    assert list(restored["optimizer"]["state"]) == [0, 1]
    assert restored["optimizer"]["state"][0]["qmap"] is restored["optimizer"]["state"][1]["qmap"]
    assert torch.equal(restored["view"], shared[1:]) and torch.equal(restored["optimizer"]["state"][0]["qmap"], shared)
    assert restored["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert restored["rng"][0].dtype == torch.uint8


# -- the LoRA Loader of a live ComfyUI ------------------------------------------------------------

# The tiny SD3 with CLIP-L's widths (context 768, pooled 768): ComfyUI's CLIPLoader turns a lone CLIP-L
# file into exactly that conditioning, the one way to give a KSampler real conditioning from small files.
LIVE_SD3_UNET = TINY_SD3_UNET | {
    "adm_in_channels": CLIP_L_WIDTH,
    "context_embedder_config": {
        "target": "torch.nn.Linear", "params": {"in_features": CLIP_L_WIDTH, "out_features": 128},
    },
}


def write_live_sd3(path: Path) -> None:
    model = comfy.supported_models.SD3(LIVE_SD3_UNET).get_model({})
    initialise_(model.diffusion_model)
    weights = {"model.diffusion_model." + k: v for k, v in model.diffusion_model.state_dict().items()}
    safetensors.torch.save_file(weights, str(path))


def sample_graph(unet: str, clip: str, lora: str, strength: float, prefix: str) -> dict:
    """UNETLoader -> LoraLoaderModelOnly -> KSampler (CLIP-L text conditioning, empty SD3 latent) -> SaveLatent."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "2": {"class_type": "LoraLoaderModelOnly",
              "inputs": {"model": ["1", 0], "lora_name": lora, "strength_model": strength}},
        "3": {"class_type": "CLIPLoader", "inputs": {"clip_name": clip, "type": "stable_diffusion"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 0], "text": "a photo of a cat"}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "seed": 3, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["4", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": prefix}},
    }


def run_and_read_latent(server: ComfyServer, graph: dict) -> torch.Tensor:
    entry = server.wait_for(server.post_prompt(graph), timeout=300)
    (saved,) = entry["outputs"]["7"]["latents"]
    path = server.output_dir / saved["subfolder"] / saved["filename"]
    return safetensors.torch.load_file(path)["latent_tensor"]


def test_a_live_comfyui_samples_differently_with_the_lora(comfy_server: ComfyServer, tmp_path):
    unet = "export_live_sd3.safetensors"
    write_live_sd3(comfy_server.models_dir / "diffusion_models" / unet)
    clip = "export_live_clip_l.safetensors"
    os.symlink(clip_files("flux")[0], comfy_server.models_dir / "text_encoders" / clip)

    trainer = trained(comfy.sd.load_diffusion_model(str(comfy_server.models_dir / "diffusion_models" / unet)))
    lora = "export_live/export_live.safetensors"
    export.write_lora(comfy_server.models_dir / "loras" / lora, trainer, SaveConfig(name="export_live"), STARTED_AT)

    log_start = len(comfy_server.log_text())
    with_lora = run_and_read_latent(comfy_server, sample_graph(unet, clip, lora, 1.0, "export_live/on"))
    without = run_and_read_latent(comfy_server, sample_graph(unet, clip, lora, 0.0, "export_live/off"))
    assert with_lora.shape == without.shape == (1, 16, 8, 8)
    assert torch.isfinite(with_lora).all()
    assert relative_error(with_lora, without) > 1e-2
    assert "lora key not loaded" not in comfy_server.log_text()[log_start:]


def test_cancel_inside_the_model_resumes_as_if_never_interrupted(tmp_path):
    """ComfyUI's Cancel raises InterruptProcessingException from inside the model's forward (its ops
    check the flag): the step in flight is dropped without a trace, the cancel's checkpoint is the
    last whole step, and resuming from it gives the uninterrupted run's weights."""
    import comfy.model_management

    lora = LoraConfig(rank=4, alpha=4.0, dropout=0.1)
    config = train_config(steps=5, optimizer="adamw", max_grad_norm=0.5)
    patcher = MODEL_FACTORIES["sd3"]()
    straight = Trainer(patcher, samples(patcher), lora, config)
    straight.run()

    save = SaveConfig(name="interrupted", output_dir=str(tmp_path))
    first_half = Trainer(patcher, samples(patcher), lora, config)
    block = patcher.model.diffusion_model.joint_blocks[1]
    calls = []

    def interrupt_in_step_four(module, args):
        calls.append(first_half.state.step)
        if first_half.state.step == 3:  # the fourth step, after its batch and noise were drawn
            raise comfy.model_management.InterruptProcessingException()

    handle = block.register_forward_pre_hook(interrupt_in_step_four)
    try:
        job = TrainingJob(first_half, [export.CheckpointHook(save)])
        with job:
            events = list(job.events())
        job.result()
    finally:
        handle.remove()
    assert events[-1].kind == "done" and events[-1].data["cancelled"] is True
    assert [(e.data["kind"], e.data["step"]) for e in events if e.kind == "saved"] == [("checkpoint", 3)]

    second_half = Trainer(patcher, samples(patcher), lora, config)
    export.resume(second_half, export.checkpoints_folder(save))
    assert second_half.state.step == 3
    second_half.run()
    expected, actual = weights_of(straight), weights_of(second_half)
    assert all(torch.equal(actual[k], expected[k]) for k in expected)
