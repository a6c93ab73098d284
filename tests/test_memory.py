"""What ComfyUI holds loaded while a run trains, through the Train LoRA node and through `lora-train`, both with
sample prompts: the text encoders and the VAE are off the device before the first step (ComfyUI's list of loaded
models holds neither), the trained model is in it once, and sampling between steps leaves the list as it was.

On this CPU host ComfyUI keeps the same list of loaded models as on a GPU (`load_models_gpu` adds to it, unloading
removes from it); what those models take on a card is measured on the GPU (bench/)."""

import importlib
from pathlib import Path

import comfy.model_management
import folder_paths
import tiny_encoders
import torch
from comfy_api.latest import io
from graph_data import write_dataset
from test_cli import short_form, write
from test_server import PACK_MODULE, import_pack
from tiny_models import MODEL_FACTORIES

from trainer_core import cli, headless

STEPS, SAMPLE_EVERY = 4, 2


def loaded_at_each_step(monkeypatch, trainer_class) -> list[list]:
    """The models (patchers) of ComfyUI's loaded-model list as each step of `trainer_class` starts."""
    seen = []
    step = trainer_class.step

    def recording_step(self):
        seen.append([loaded.model for loaded in comfy.model_management.current_loaded_models])
        return step(self)

    monkeypatch.setattr(trainer_class, "step", recording_step)
    return seen


def assert_held_as_trained(seen: list[list], trained, clip, vae) -> None:
    """At every step: neither the text encoders nor the VAE, the trained model once; the list at the step
    after a sample is the one before it."""
    assert len(seen) == STEPS
    for step, models in enumerate(seen, 1):
        names = [type(model.model).__name__ for model in models]
        assert not any(model.is_clone(clip.patcher) for model in models), f"encoders at step {step}: {names}"
        assert not any(model.is_clone(vae.patcher) for model in models), f"VAE loaded at step {step}: {names}"
        assert sum(model.is_clone(trained) for model in models) == 1, f"step {step}: {names}"
    after_sample = seen[SAMPLE_EVERY]  # the list as step SAMPLE_EVERY + 1 starts
    assert [id(m) for m in after_sample] == [id(m) for m in seen[SAMPLE_EVERY - 1]], "sampling left a model loaded"


def test_lora_train_holds_neither_encoders_nor_vae_while_it_trains(files, tmp_path, monkeypatch):
    config = short_form(files)
    config["train"]["steps"], config["sample"]["sample_every"] = STEPS, SAMPLE_EVERY
    path = write(tmp_path, config)
    seen = loaded_at_each_step(monkeypatch, headless.Trainer)
    models = []
    load_models = headless.load_models
    monkeypatch.setattr(headless, "load_models", lambda resolved: models.append(load_models(resolved)) or models[0])

    assert cli.main(["train", str(path), "--cpu"]) == 0

    samples = sorted(p.name for p in (tmp_path / "out" / "tiny" / "samples").iterdir())
    assert samples == ["step000002_00.png", "step000004_00.png"]  # the sample prompts were encoded and sampled
    (loaded,) = models
    assert_held_as_trained(seen, loaded.patcher, loaded.clip, loaded.vae)


def test_the_train_lora_node_holds_neither_encoders_nor_vae_while_it_trains(tmp_path, monkeypatch):
    import_pack()
    node_class = importlib.import_module(f"{PACK_MODULE}.nodes.train_lora").TrainLoraNode
    pack_trainer = importlib.import_module(f"{PACK_MODULE}.trainer_core.trainer").Trainer
    DatasetConfig = importlib.import_module(f"{PACK_MODULE}.trainer_core.data").DatasetConfig  # noqa: N806
    LoraConfig = importlib.import_module(f"{PACK_MODULE}.trainer_core.config").LoraConfig  # noqa: N806
    seen = loaded_at_each_step(monkeypatch, pack_trainer)
    model, clip, vae = MODEL_FACTORIES["flux_dev"](), tiny_encoders.build_clip("flux"), tiny_encoders.build_vae(16)
    # Loaded as an earlier generation in the same ComfyUI would leave them (in inference mode, as ComfyUI runs
    # nodes; the session's VAE may hold inference tensors from an earlier test's node).
    with torch.inference_mode():
        vae.encode(torch.zeros(1, 64, 64, 3))
        clip.encode_from_tokens(clip.tokenize("x"))
    assert any(m.model.is_clone(clip.patcher) for m in comfy.model_management.current_loaded_models)
    dataset = DatasetConfig(folder=str(write_dataset(tmp_path / "data")), resolution=64)
    # The node's own defaults for what this test leaves as it is.
    defaults = {i.id: i.default for i in node_class.GET_SCHEMA().inputs if getattr(i, "default", None) is not None}
    inputs = defaults | dict(
        model=model, clip=clip, vae=vae, dataset=dataset, lora_config=LoraConfig(rank=4),
        output_name=f"memory-{tmp_path.name}", steps=STEPS, learning_rate=1e-3, optimizer="adamw",
        schedule="constant", warmup_steps=0, batch_size=1, gradient_accumulation=1, precision="fp32",
        gradient_checkpointing=False, seed=0, save_every=0, keep_last=1, save_dtype="fp32",
        sample_every=SAMPLE_EVERY, sample_prompts="a red circle", sample_seed=1, sample_size=64,
    )

    # A class of its own with the node's id set, as ComfyUI's executor makes one per run (its helper for that
    # takes other arguments in other versions).
    node = type(node_class.__name__, (node_class,), {"hidden": io.HiddenHolder.from_dict({io.Hidden.unique_id: "7"})})
    with torch.inference_mode():  # as ComfyUI runs nodes
        output = node.execute(**inputs)

    assert output.args[1].endswith(".safetensors")
    samples = Path(folder_paths.get_output_directory()) / inputs["output_name"] / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step000002_00.png", "step000004_00.png"]
    assert_held_as_trained(seen, model, clip, vae)
