"""Validation loss, EMA of the LoRA weights and LoRA+ on the tiny models, each checked against its own formula
computed here; resume stays bit-exact with each on."""

import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import test_data
import torch
import torch.nn.functional as F
import yaml
from conftest import COMFY_HOST, REPO_ROOT
from graph_data import write_dataset
from test_cli import line_of, short_form, write
from test_data import build, noise_image
from test_data import config as data_config
from test_engine import fixed_samples
from test_export import CancelAt, weights_of
from test_graph import STEPS as GRAPH_STEPS
from test_graph import run as run_graph
from test_graph import tiny_loader, training_graph
from tiny_models import MODEL_FACTORIES

from trainer_core import cli, export, sampling
from trainer_core.config import ALGORITHMS, ConfigError, LoraConfig, SaveConfig, TrainConfig
from trainer_core.job import JobHook, TrainingJob
from trainer_core.lora import ConvLora, LinearLora
from trainer_core.loraplus import LR_RATIO
from trainer_core.trainer import Trainer
from trainer_core.validation import ValidationHook, ValidationSet, validation_hooks

RATIO = 16.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """test_data's dataset: 4 images, one of them in a 3_person repeat folder."""
    root = tmp_path_factory.mktemp("dataset")
    test_data.write_dataset(root)
    return root


def config(**overrides) -> TrainConfig:
    values = dict(steps=4, learning_rate=1e-3, precision="fp32", gradient_checkpointing=False, weight_decay=0.0,
                  seed=11, optimizer="adamw", max_grad_norm=0.0)
    return TrainConfig(**(values | overrides))


def make_trainer(family="sd3", lora=None, samples=None, **overrides) -> Trainer:
    patcher = MODEL_FACTORIES[family]()
    return Trainer(patcher, samples or fixed_samples(patcher, count=3), lora or LoraConfig(rank=4, alpha=4.0),
                   config(**overrides))


def start_up_away_from_zero(trainer: Trainer) -> None:
    """B = 0 gives A no gradient in the first step; small random B lets both sides move from step 1."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in trainer.network.items():
            layer.up.copy_(torch.randn(layer.up.shape, generator=generator) * 0.05)


def run_job(trainer: Trainer, hooks: list[JobHook]) -> list:
    with TrainingJob(trainer, hooks) as job:
        events = list(job.events())
    job.result()
    return events


# -- configuration ------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("ema_decay", 1.0), ("ema_decay", -0.1), ("ema_decay", float("nan")), ("loraplus_lr_ratio", 0.0),
    ("loraplus_lr_ratio", 1e6), ("validation_every", -1), ("validation_every", 1.5),
])
def test_wrong_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^train\.{field}:"):
        config(**{field: value})


def test_every_layer_kind_names_its_up_side():
    linear, conv = torch.nn.Linear(8, 6), torch.nn.Conv2d(3, 5, 3)
    assert LinearLora(linear, 2, 2.0, 0.0).up_parameters()[0].shape == (6, 2)
    assert ConvLora(conv, 2, 2.0, 0.0).up_parameters()[0].shape == (5, 2, 1, 1)


# -- LoRA+ ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "adafactor"])
def test_loraplus_gives_the_up_matrices_ratio_times_the_learning_rate(optimizer):
    trainer = make_trainer(optimizer=optimizer, loraplus_lr_ratio=RATIO, schedule="cosine", steps=6)
    ups = {id(layer.up) for _, layer in trainer.network.items()}
    downs = {id(layer.down) for _, layer in trainer.network.items()}
    groups = trainer.optimizer.param_groups
    assert [{id(p) for p in g["params"]} for g in groups] == [downs, ups]
    seen = []
    trainer.run(lambda t, reports: seen.append([g["lr"] for g in t.optimizer.param_groups]))
    base = trainer.config.learning_rate
    for step, (down_lr, up_lr) in enumerate(seen):
        expected = base * 0.5 * (1 + math.cos(math.pi * step / 6))
        assert down_lr == pytest.approx(expected, rel=1e-9, abs=1e-15)
        assert up_lr == pytest.approx(RATIO * expected, rel=1e-9, abs=1e-14)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_loraplus_splits_every_algorithms_parameters_by_their_up_side(algorithm, tmp_path):
    lora = LoraConfig(rank=4, alpha=4.0, algorithm=algorithm)
    trainer = make_trainer(lora=lora, loraplus_lr_ratio=RATIO, steps=2)
    down_side, up_side = ({id(p) for p in group["params"]} for group in trainer.optimizer.param_groups)
    every = {id(p) for p in trainer.network.parameters()}
    assert down_side and up_side and not down_side & up_side and down_side | up_side == every
    ups = {id(p) for _, layer in trainer.network.items() for p in layer.up_parameters()}
    assert up_side == ups
    before = weights_of(trainer)
    trainer.run()
    after = weights_of(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())


def test_prodigy_refuses_loraplus():
    # Prodigy raises on parameter groups of different learning rates.
    with pytest.raises(ConfigError, match=r"^train\.loraplus_lr_ratio: prodigy"):
        config(optimizer="prodigy", learning_rate=1.0, loraplus_lr_ratio=RATIO)


def test_loraplus_off_keeps_one_group():
    trainer = make_trainer()
    assert len(trainer.optimizer.param_groups) == 1
    assert len(trainer.optimizer.param_groups[0]["params"]) == 2 * len(list(trainer.network.items()))


def test_loraplus_updates_move_up_ratio_times_as_far_as_down():
    # Adam's first update is lr * g / (|g| + eps): lr per element wherever the gradient is well above eps.
    trainer = make_trainer(loraplus_lr_ratio=RATIO, steps=1)
    start_up_away_from_zero(trainer)
    before = weights_of(trainer)
    trainer.run()
    after = weights_of(trainer)
    lr = trainer.config.learning_rate
    # Outputs the model does not use (SD3's last text-stream block) get no gradient and stay.
    counted = 0
    for key in before:
        moved = (after[key] - before[key]).abs()
        moved = moved[moved > lr * 1e-3]
        expected = lr * RATIO if key.endswith(".up") else lr
        counted += moved.numel()
        if not moved.numel():
            continue
        # Never more than its group's learning rate; about that rate where the gradient dwarfs eps (most elements).
        assert moved.max() <= expected * (1 + 1e-4), key
        assert moved.median() == pytest.approx(expected, rel=1e-2), key
    assert counted > 0.8 * sum(v.numel() for v in before.values())


# -- EMA --------------------------------------------------------------------------------------------------


def test_ema_is_the_recursion_over_the_weights_of_every_step():
    decay = 0.8
    trainer = make_trainer(ema_decay=decay, steps=5, learning_rate=1e-2)
    history = [{k: v.double() for k, v in weights_of(trainer).items()}]
    trainer.run(lambda t, reports: history.append({k: v.double() for k, v in weights_of(t).items()}))
    expected = dict(history[0])
    for weights in history[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    average = {f"{k}": v for k, v in trainer.ema.state_dict().items()}
    assert average.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.allclose(average[key].double(), value, rtol=1e-5, atol=1e-9), key
    # The average lags the trained weights: it is not them.
    assert not torch.equal(average[key], weights_of(trainer)[key])


def test_previews_and_saved_loras_use_the_ema_and_checkpoints_keep_the_trained_weights(tmp_path, monkeypatch):
    trainer = make_trainer(ema_decay=0.7, steps=4, learning_rate=1e-2)
    up_key = next(k for k in trainer.network.state_dict() if k.endswith(".up"))
    previewed = []

    target = dict(trainer.family.diffusion_model.named_modules())[up_key.split(".")[1].replace("/", ".")]

    def record_preview(patcher, vae, encoded, settings):
        # What the preview's sampler would run the model with: the LoRA's hook on its layer, and its weights.
        assert len(target._forward_hooks) == 1, trainer.state.step
        previewed.append((trainer.network.state_dict()[up_key].clone(), trainer.ema.state_dict()[up_key].clone(),
                          weights_of(trainer)[up_key]))
        return torch.zeros(1, 8, 8, 3)

    monkeypatch.setattr(sampling, "sample_images", record_preview)
    monkeypatch.setattr(sampling.comfy_compat, "unload_models", lambda models: None)
    no_vae = SimpleNamespace(patcher=None)
    preview = sampling.SampleHook(no_vae, None, sampling.SampleSettings(("x",)), 2, tmp_path / "samples")
    save = SaveConfig(name="ema", every=2, output_dir=str(tmp_path))
    events = run_job(trainer, [preview, export.CheckpointHook(save)])
    assert [e.data["step"] for e in events if e.kind == "sample"] == [2, 4]
    for shown, average, _ in previewed:
        assert torch.equal(shown, average)
    # Outside the preview the network holds its trained weights again.
    assert not torch.equal(previewed[0][0], weights_of(trainer)[up_key])

    checkpoint = export.read_checkpoint(export.checkpoints_folder(save) / "step-000002")
    lora_file = safetensors.torch.load_file(checkpoint.folder / "ema-step000002.safetensors")
    ema_at_2 = checkpoint.state["ema"]
    kohya = export.kohya_name(up_key.removeprefix("layers.").removesuffix(".up").replace("/", "."))
    assert torch.equal(lora_file[f"{kohya}.lora_up.weight"].float(), ema_at_2[up_key].bfloat16().float())
    assert not torch.equal(checkpoint.weights[up_key], ema_at_2[up_key])  # the raw weights, apart

    final = safetensors.torch.load_file(Path(export.loras_folder()) / "ema" / "ema.safetensors")
    assert torch.equal(final[f"{kohya}.lora_up.weight"], trainer.ema.state_dict()[up_key].bfloat16())


# -- validation loss ------------------------------------------------------------------------------------


def held_out(trainer: Trainer, count=3):
    """Samples the trainer does not train on (other latents and conditioning)."""
    return fixed_samples(trainer.patcher, count=count + 3)[3:]


def independent_validation_loss(trainer: Trainer, validation: ValidationSet) -> float:
    """Per sample, at its stored noise and timestep: the family's noisy input and target, the model's prediction
    with the LoRA attached, the mean squared error; then the mean over the samples."""
    family = trainer.family
    losses = []
    with trainer.network.attached(family.diffusion_model), torch.no_grad():
        for latents, conditioning, noise, timesteps in validation._prepared:
            noisy = (1 - timesteps.view(-1, 1, 1, 1)) * latents + timesteps.view(-1, 1, 1, 1) * noise
            prediction = family.predict(noisy, timesteps, conditioning)
            losses.append(F.mse_loss(prediction.float(), (noise - latents).float()).item())
    return sum(losses) / len(losses)


def test_validation_loss_is_the_mean_over_the_held_out_set_at_its_stored_noise():
    trainer = make_trainer(batch_size=2, steps=4, learning_rate=1e-2)
    validation = ValidationSet(held_out(trainer, 3), seed=trainer.config.seed)
    hook = ValidationHook(validation, every=2)
    events = run_job(trainer, [hook])
    reported = [e.data for e in events if e.kind == "validation"]
    # Every 2 steps, and at the end of the run.
    assert [(e["step"], e["total_steps"]) for e in reported] == [(2, 4), (4, 4)]
    assert reported[0]["validation_loss"] != reported[1]["validation_loss"]
    assert reported[1]["validation_loss"] == pytest.approx(independent_validation_loss(trainer, validation),
                                                           rel=1e-5)
    # The noise is stored once, seeded: a new set of the same seed draws the same, another seed other noise.
    again = ValidationSet(validation.samples, seed=trainer.config.seed)
    again._prepare(trainer)
    assert all(torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
               for a, b in zip(again._prepared, validation._prepared, strict=True))
    other = ValidationSet(validation.samples, seed=trainer.config.seed + 1)
    other._prepare(trainer)
    assert not torch.equal(other._prepared[0][2], validation._prepared[0][2])


def test_validation_changes_nothing_of_the_training():
    plain = make_trainer(steps=4, lora=LoraConfig(rank=4, dropout=0.1))
    plain.run()
    validated = make_trainer(steps=4, lora=LoraConfig(rank=4, dropout=0.1))
    run_job(validated, [ValidationHook(ValidationSet(held_out(validated), seed=1), every=1)])
    expected, actual = weights_of(plain), weights_of(validated)
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


def test_validation_every_without_held_out_images_says_what_to_set(caplog):
    assert validation_hooks([], config(validation_every=5)) == []
    assert "the dataset holds no images out: set the dataset's validation_split or validation_folder" in caplog.text
    caplog.clear()
    assert validation_hooks([], config()) == [] and not caplog.text


def test_a_cancelled_run_is_not_validated_at_its_end():
    trainer = make_trainer(steps=4)
    cancel = CancelAt(3)
    job = cancel.job = TrainingJob(trainer, [ValidationHook(ValidationSet(held_out(trainer), seed=1), every=2),
                                             cancel])
    with job:
        events = list(job.events())
    assert [e.data["step"] for e in events if e.kind == "validation"] == [2]


# -- resume ------------------------------------------------------------------------------------------------


RESUMED_FEATURES = {
    "ema": dict(ema_decay=0.9),
    "loraplus": dict(loraplus_lr_ratio=RATIO),
    "validation": dict(validation_every=1),
    "all": dict(ema_decay=0.9, loraplus_lr_ratio=RATIO, validation_every=1),
}


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
@pytest.mark.parametrize("feature", list(RESUMED_FEATURES))
def test_cancel_then_resume_equals_training_straight_through(feature, optimizer, tmp_path):
    overrides = RESUMED_FEATURES[feature] | dict(optimizer=optimizer, schedule="cosine", steps=4)
    lora = LoraConfig(rank=4, alpha=4.0, dropout=0.1)

    def trainer_and_hooks():
        trainer = make_trainer(lora=lora, **overrides)
        validation = ValidationHook(ValidationSet(held_out(trainer), seed=3), trainer.config.validation_every)
        return trainer, ([validation] if trainer.config.validation_every else [])

    straight, hooks = trainer_and_hooks()
    straight_events = run_job(straight, hooks)

    save = SaveConfig(name=f"resume-{feature}-{optimizer}", every=2, output_dir=str(tmp_path))
    first_half, hooks = trainer_and_hooks()
    cancel = CancelAt(2)
    job = cancel.job = TrainingJob(first_half, [*hooks, export.CheckpointHook(save), cancel])
    with job:
        first_events = list(job.events())
    job.result()

    second_half, hooks = trainer_and_hooks()
    export.resume(second_half, export.checkpoints_folder(save))
    second_events = run_job(second_half, hooks)
    expected, actual = weights_of(straight), weights_of(second_half)
    assert all(torch.equal(actual[k], expected[k]) for k in expected)
    if straight.ema is not None:
        expected, actual = straight.ema.state_dict(), second_half.ema.state_dict()
        assert all(torch.equal(actual[k], expected[k]) for k in expected)
    if straight.config.validation_every:
        def losses(events):
            return [(e.data["step"], e.data["validation_loss"]) for e in events if e.kind == "validation"]
        assert losses(first_events) + losses(second_events) == losses(straight_events)


@pytest.mark.parametrize("field, value", [("ema_decay", 0.9), ("loraplus_lr_ratio", RATIO)])
def test_a_checkpoint_is_refused_by_a_run_with_other_ema_or_loraplus_settings(field, value, tmp_path):
    save = SaveConfig(name=f"mismatch-{field}", every=1, output_dir=str(tmp_path))
    run_job(make_trainer(steps=2, **{field: value}), [export.CheckpointHook(save)])
    with pytest.raises(export.CheckpointError, match=rf"train\.{field} {value!r}, this run uses"):
        export.resume(make_trainer(steps=2), export.checkpoints_folder(save) / "step-000001")


def test_loraplus_groups_hold_their_ratio_in_the_optimizer_state(tmp_path):
    save = SaveConfig(name="groups", every=1, output_dir=str(tmp_path))
    run_job(make_trainer(steps=2, loraplus_lr_ratio=RATIO), [export.CheckpointHook(save)])
    groups = export.read_checkpoint(export.checkpoints_folder(save)).state["optimizer"]["param_groups"]
    assert [g[LR_RATIO] for g in groups] == [1.0, RATIO]


# -- the held-out set from the dataset ------------------------------------------------------------------


def test_a_validation_split_holds_images_out_of_training_whole_and_seeded(dataset, tmp_path):
    # 4 images; a quarter is one image, with every repeat and its flipped twin; its caption as written.
    with torch.inference_mode():  # as ComfyUI runs nodes
        samples, report, _, _ = build(data_config(dataset, validation_split=0.25, flip=True, caption_dropout=0.5),
                                      "sd3", tmp_path)
    held = [s.key for s in report.validation]
    assert len(held) == 1
    trained_images = {s.key.removesuffix(" (flipped)") for s in samples}
    assert held[0] not in trained_images and len(trained_images) == 3
    assert report.images == 3 and report.samples == len(samples)
    assert report.validation[0].alternatives == []
    assert report.validation[0].latents.shape == samples[0].latents.shape
    # The same seed holds out the same image; the held-out samples train a validation set.
    with torch.inference_mode():
        _, again, _, _ = build(data_config(dataset, validation_split=0.25), "sd3", tmp_path)
    assert [s.key for s in again.validation] == held
    trainer = make_trainer(samples=samples[:2], steps=1)
    assert ValidationSet(report.validation, seed=0).loss(trainer) > 0


def test_a_validation_folder_is_held_out_as_it_is(dataset, tmp_path):
    folder = tmp_path / "held_out"
    folder.mkdir()
    for index, name in enumerate(("a.png", "b.png")):
        noise_image((64, 64), 50 + index).save(folder / name)
    with torch.inference_mode():
        samples, report, _, _ = build(data_config(dataset, validation_folder=str(folder)), "sd3", tmp_path)
    assert [s.key for s in report.validation] == ["a.png", "b.png"]
    assert report.images == 4


@pytest.mark.parametrize("overrides, message", [
    ({"validation_split": 0.6}, r"^dataset\.validation_split: must be a fraction in \[0, 0\.5\]"),
    ({"validation_split": 0.2, "validation_folder": "x"}, r"^dataset\.validation_split: is set together with"),
])
def test_wrong_validation_settings_are_named(dataset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        data_config(dataset, **overrides)


def test_a_split_that_leaves_nothing_to_train_on_and_a_missing_folder_are_named(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    noise_image((64, 64), 1).save(one / "only.png")
    with pytest.raises(ConfigError, match=r"^dataset\.validation_split: holding out 1 of the dataset's 1 images"):
        build(data_config(one, validation_split=0.5), "sd3", tmp_path)
    with pytest.raises(ConfigError, match=r"^dataset\.validation_folder: .*missing is not a folder"):
        build(data_config(one, validation_folder=str(tmp_path / "missing")), "sd3", tmp_path)


# -- lora-train ---------------------------------------------------------------------------------------------


def test_lora_train_runs_validation_ema_and_loraplus_from_the_yaml(files, tmp_path, capsys):
    config = short_form(files, name="extras")
    config["datasets"][0]["validation_split"] = 0.25
    config["train"] |= {"validation_every": 2, "loraplus_lr_ratio": RATIO, "optimizer": "adamw8bit",
                        "ema_config": {"use_ema": True, "ema_decay": 0.5}}
    config["sample"]["prompts"] = []
    path = write(tmp_path, config)
    assert cli.main(["train", str(path), "--cpu"]) == 0
    err = capsys.readouterr().err
    assert [line.split("  ")[0] for line in err.splitlines() if "validation loss" in line] == ["step 2/4", "step 4/4"]
    run = tmp_path / "out" / "extras"
    with safetensors.safe_open(str(run / "extras.safetensors"), framework="pt") as file:
        training = json.loads(file.metadata()["ss_training_config"])["train"]
        final = {k: file.get_tensor(k) for k in file.keys()}
    assert (training["validation_every"], training["ema_decay"], training["loraplus_lr_ratio"]) == (2, 0.5, RATIO)
    # The checkpoint keeps the trained weights, the EMA apart, and LoRA+'s groups; its LoRA file holds the EMA.
    checkpoint = export.read_checkpoint(run / "checkpoints")
    assert [g[LR_RATIO] for g in checkpoint.state["optimizer"]["param_groups"]] == [1.0, RATIO]
    up_key = next(k for k in checkpoint.weights if k.endswith(".up"))
    kohya = export.kohya_name(up_key.removeprefix("layers.").removesuffix(".up").replace("/", "."))
    saved = safetensors.torch.load_file(checkpoint.folder / "extras-step000002.safetensors")
    assert torch.equal(saved[f"{kohya}.lora_up.weight"], checkpoint.state["ema"][up_key].half())
    assert not torch.equal(checkpoint.state["ema"][up_key], checkpoint.weights[up_key])
    assert final[f"{kohya}.lora_up.weight"].dtype == torch.float16
    # Held out: one image of four, so the metadata counts three.
    assert file_metadata(run / "extras.safetensors")["ss_num_train_images"] == "3"


def file_metadata(path: Path) -> dict:
    with safetensors.safe_open(str(path), framework="pt") as file:
        return file.metadata()


@pytest.mark.parametrize("change, line_text, expected", [
    ({"train": {"ema_config": {"use_ema": True, "ema_decay": 1.5}}}, "ema_decay:",
     "train.ema_config.ema_decay: must be a number in [0, 1)"),
    ({"train": {"ema_config": {"use_ema": "yes"}}}, "use_ema:", "train.ema_config.use_ema: expected true or false"),
    ({"train": {"ema_config": 0.99}}, "ema_config:", "train.ema_config: expected a mapping of keys"),
    ({"train": {"loraplus_lr_ratio": 0}}, "loraplus_lr_ratio:", "train.loraplus_lr_ratio: must be a number > 0"),
    ({"train": {"validation_every": -2}}, "validation_every:", "train.validation_every: must be >= 0"),
    ({"datasets": {"validation_split": 0.9}}, "validation_split:",
     "datasets[0].validation_split: must be a fraction in [0, 0.5]"),
    ({"datasets": {"validation_folder": "nowhere"}}, "validation_folder:",
     "datasets[0].validation_folder: "),
])
def test_wrong_extras_keys_are_refused_naming_the_key_and_its_line(files, tmp_path, caplog, change, line_text,
                                                                   expected):
    config = short_form(files)
    for section, values in change.items():
        (config[section][0] if section == "datasets" else config[section]).update(values)
    path = write(tmp_path, config)
    assert cli.main(["train", str(path), "--cpu"]) == cli.EXIT_CONFIG
    assert f"config.yaml:{line_of(path, line_text)}: {expected}" in caplog.text


def test_print_config_shows_the_extras_defaults(files, tmp_path, capsys):
    path = write(tmp_path, short_form(files))
    assert cli.main(["--print-config", str(path)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["ema_config"] == {"use_ema": False, "ema_decay": 0.999}
    assert (printed["train"]["validation_every"], printed["train"]["loraplus_lr_ratio"]) == (0, 1.0)
    assert (printed["datasets"][0]["validation_split"], printed["datasets"][0]["validation_folder"]) == (0.0, "")


# -- the graph ------------------------------------------------------------------------------------------------


def test_the_graph_trains_with_a_validation_set_ema_and_loraplus(comfy_server):
    write_dataset(comfy_server.input_dir / "extras_dataset")
    name = f"extras-{uuid.uuid4().hex[:8]}"
    graph = training_graph(tiny_loader("sd3"), "extras_dataset", name, optimizer="adamw8bit", sample_prompts="",
                           validation_every=2, ema_decay=0.5, loraplus_lr_ratio=RATIO)
    graph["dataset"]["inputs"]["validation_split"] = 0.25
    with comfy_server.events() as events:
        run_graph(events, graph)
        validations = [m["data"] for m in events.messages("lora_trainer.validation")]
    assert [(v["step"], v["total_steps"]) for v in validations] == [(2, GRAPH_STEPS), (4, GRAPH_STEPS)]
    history = comfy_server.get_json("/lora_trainer/status")["run"]["history"]
    assert history["validation"] == {"step": [2, 4], "loss": [v["validation_loss"] for v in validations]}
    assert history["step"] == [1, 2, 3, 4]

    checkpoint = export.read_checkpoint(comfy_server.output_dir / name / "checkpoints")
    assert [g[LR_RATIO] for g in checkpoint.state["optimizer"]["param_groups"]] == [1.0, RATIO]
    up_key = next(k for k in checkpoint.weights if k.endswith(".up"))
    kohya = export.kohya_name(up_key.removeprefix("layers.").removesuffix(".up").replace("/", "."))
    saved = safetensors.torch.load_file(checkpoint.folder / f"{name}-step000002.safetensors")
    assert torch.equal(saved[f"{kohya}.lora_up.weight"], checkpoint.state["ema"][up_key])  # save_dtype fp32
    final = comfy_server.models_dir / "loras" / name / f"{name}.safetensors"
    training = json.loads(file_metadata(final)["ss_training_config"])["train"]
    assert (training["validation_every"], training["ema_decay"], training["loraplus_lr_ratio"]) == (2, 0.5, RATIO)
    assert file_metadata(final)["ss_num_train_images"] == "3"  # one of four held out


def test_torchrun_validates_on_the_first_process_as_one_process_does(files, tmp_path):
    # Data-parallel ranks share each training loss through a collective; the validation runs on the first alone.
    config = short_form(files)
    config["datasets"][0]["validation_split"] = 0.25
    config["train"] |= {"validation_every": 2, "loraplus_lr_ratio": RATIO,
                        "ema_config": {"use_ema": True, "ema_decay": 0.5}}
    config["save"]["dtype"] = "float32"
    del config["sample"]
    single, parallel = write(tmp_path / "single", config), write(tmp_path / "parallel", config)
    command = [sys.executable, "-m", "trainer_core", "train", str(single), "--cpu"]
    environment = os.environ | {"COMFYUI_PATH": str(COMFY_HOST)}
    one_process = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
                                 timeout=240)
    assert one_process.returncode == 0, one_process.stderr[-4000:]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "trainer_core", "train", str(parallel), "--cpu"]
    two_processes = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
                                   timeout=240)
    assert two_processes.returncode == 0, two_processes.stderr[-4000:]

    def validation_losses(stderr: str) -> list[float]:
        return [float(line.split()[-1]) for line in stderr.splitlines() if "validation loss" in line]

    expected, actual = validation_losses(one_process.stderr), validation_losses(two_processes.stderr)
    assert len(expected) == 2 and actual == pytest.approx(expected, abs=2e-4)  # printed to 4 decimals
    one, two = (safetensors.torch.load_file(p.parent / "out/tiny/tiny.safetensors") for p in (single, parallel))
    # Float rounding of the split batch, which Adam scales up where a gradient is near zero, more so at LoRA+'s
    # 16 x the learning rate: seen up to 7e-5 of a tensor's norm (and of single elements' 1.6e-2 steps).
    differences = {key: ((two[key] - one[key]).norm() / one[key].norm()).item() for key in one}
    assert max(differences.values()) < 1e-3, max(differences, key=differences.get)
