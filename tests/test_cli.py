"""`lora-train` end to end for every family, from both YAML forms, its LoRA through ComfyUI's LoRA loading;
errors naming key and line, --print-config, Ctrl-C and --resume.

SD3 runs on tiny model files that ComfyUI's own loaders take. ComfyUI 0.3.75 detects SDXL only at full size and
Flux only at hidden 3072, and builds CLIP-G and T5 at full size from any file: the SDXL and Flux runs stand in
for its two file loaders with the tiny models, and a slow test takes the full-width Flux through the real ones."""

import copy
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import comfy.model_management
import comfy.sd
import comfy.utils
import graph_data
import pytest
import safetensors
import safetensors.torch
import tiny_encoders
import torch
import yaml
from conftest import COMFY_HOST, REPO_ROOT
from PIL import Image, ImageDraw
from tiny_models import MODEL_FACTORIES, flux_full_width_file, random_inputs

from trainer_core import cli, export, loading

STEPS = 4
FAMILY_FLAGS = {"sdxl": "is_xl", "flux": "is_flux"}
NOISE_SCHEDULERS = {"sdxl": "ddpm", "flux": "flowmatch"}
# The tiny models (tiny_models.MODEL_FACTORIES) that stand-in loaders hand out, with their text encoders' family.
STAND_IN_FAMILIES = {"sdxl_eps": "sdxl", "flux_dev": "flux"}


def sd3_model(files: Path) -> dict:
    return {
        "name_or_path": str(files / "models/diffusion_models/tiny_sd3.safetensors"),
        "is_v3": True,
        "vae_path": str(files / "models/vae/tiny_vae_16ch.safetensors"),
        "text_encoder_paths": [str(files / "models/text_encoders/clip_l.safetensors")],
    }


def short_form(files: Path, name: str = "tiny", model: dict | None = None) -> dict:
    """A short-form config of SD3's files, or of `model` (the model section)."""
    return {
        "name": name,
        "training_folder": "out",
        "trigger_word": "shp",
        "model": model or sd3_model(files),
        "network": {"type": "lora", "linear": 4, "linear_alpha": 4},
        "save": {"dtype": "float16", "save_every": 2, "max_step_saves_to_keep": 2},
        "datasets": [{"folder_path": str(files / "data"), "caption_ext": "txt", "caption_dropout_rate": 0.1,
                      "resolution": 64}],
        "train": {"batch_size": 2, "steps": STEPS, "lr": 1e-3, "optimizer": "adamw", "gradient_checkpointing": False,
                  "noise_scheduler": "flowmatch", "dtype": "fp32", "seed": 3},
        "sample": {"sample_every": 2, "width": 64, "height": 64, "prompts": ["[trigger] a red circle"],
                   "sample_steps": 2},
    }


def job_form(short: dict) -> dict:
    """ai-toolkit's layout of the same settings."""
    process = {key: value for key, value in short.items() if key != "name"}
    return {"job": "extension", "config": {"name": short["name"], "process": [{"type": "sd_trainer", **process}]},
            "meta": {"name": "[name]", "version": "1.0"}}


def write(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def line_of(path: Path, text: str) -> int:
    """The 1-based line of the first line of `path` that contains `text`."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory) -> dict[str, Path]:
    """The LoRA files of one short-form and one job-form run of the same settings."""
    root = tmp_path_factory.mktemp("cli_runs")
    loras = {}
    for form, make in (("short", lambda c: c), ("job", job_form)):
        config = write(root / form, make(short_form(files)))
        assert cli.main(["train", str(config), "--cpu"]) == 0
        loras[form] = root / form / "out" / "tiny" / "tiny.safetensors"
    return loras


def prediction(patcher, inputs: dict) -> torch.Tensor:
    """The model's output with the patcher's weight patches merged in, as ComfyUI merges them to sample."""
    comfy.model_management.load_models_gpu([patcher])
    try:
        conds = {key: inputs[key] for key in ("y", "guidance") if key in inputs}
        with torch.no_grad():
            return patcher.model.apply_model(inputs["x"], inputs["sigma"], c_crossattn=inputs["context"], **conds)
    finally:
        comfy.model_management.unload_all_models()


def assert_trained_run(run: Path, model, caplog) -> None:
    """The run folder of a 4-step run saving and sampling every 2 steps, and its LoRA as ComfyUI's LoRA
    loading takes it onto `model`: every key loaded, and the model's output changed."""
    assert [p.name for p in export.list_checkpoints(run / "checkpoints")] == ["step-000002"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step000002_00.png", "step000004_00.png"]
    path = run / f"{run.name}.safetensors"
    with safetensors.safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    assert metadata["ss_steps"] == str(STEPS) and metadata["modelspec.trigger_phrase"] == "shp"
    # The dataset's facts for A1111 / Forge: every caption got the trigger word.
    ((folder, tags),) = json.loads(metadata["ss_tag_frequency"]).items()
    assert folder == "data" and tags["shp"] == int(metadata["ss_num_train_images"]) == len(graph_data.SUBJECTS)
    assert metadata["ss_resolution"] == "(64, 64)"
    lora = comfy.utils.load_torch_file(str(path))
    assert lora[next(k for k in lora if k.endswith("lora_up.weight"))].dtype == torch.float16

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1, 0)
    assert "lora key not loaded" not in caplog.text
    assert len(patched.patches) == len(lora) // 3  # one patched weight per layer (down, up, alpha)
    inputs = random_inputs(model, batch=1, latent_hw=(8, 8), seed=5)
    base, changed = prediction(model, inputs), prediction(patched, inputs)
    assert changed.isfinite().all()
    assert ((changed - base).norm() / base.norm()).item() > 1e-4, "the trained LoRA does not change the output"


def test_both_forms_train_the_same_lora_which_comfyui_loads_with_every_key(files, trained, caplog):
    short, job = (safetensors.torch.load_file(trained[form]) for form in ("short", "job"))
    assert short.keys() == job.keys() and all((short[k] == job[k]).all() for k in short)
    model = comfy.sd.load_diffusion_model(str(files / "models/diffusion_models/tiny_sd3.safetensors"))
    for lora in trained.values():
        assert_trained_run(lora.parent, model, caplog)


def family_model(family: str, model_file: Path, encoder_files: list[str]) -> dict:
    """The model section of a config of a diffusion-model file, its text-encoder files and the family's VAE."""
    return {"name_or_path": str(model_file), FAMILY_FLAGS[family]: True, "text_encoder_paths": encoder_files,
            "vae_path": str(tiny_encoders.vae_file(tiny_encoders.LATENT_CHANNELS[family]))}


def family_config(files: Path, form: str, family: str, model_file: Path, encoder_files: list[str]) -> dict:
    config = short_form(files, model=family_model(family, model_file, encoder_files))
    config["train"]["noise_scheduler"] = NOISE_SCHEDULERS[family]
    return config if form == "short" else job_form(config)


def stand_in_for_comfyuis_file_loaders(monkeypatch, name: str, model_file: Path, encoder_files: list[str]) -> None:
    """comfy.sd's diffusion-model and text-encoder file loaders, which the command line's loading module
    calls, hand out tiny_models' `name` and tiny_encoders' text encoders of its family instead: ComfyUI cannot
    detect a tiny SDXL or a narrow Flux from a file, and builds CLIP-G and T5 at full size whatever the file
    holds. Each checks that it is asked for the files the config names (with the family's encoder type)."""
    family = STAND_IN_FAMILIES[name]
    clip = tiny_encoders.build_clip(family)  # before the stand-in: Flux's is built through load_clip

    def load_diffusion_model(unet_path, model_options=None):
        assert unet_path == str(model_file)
        return MODEL_FACTORIES[name]()

    def load_clip(ckpt_paths, embedding_directory=None, clip_type=None, model_options=None):
        assert ckpt_paths == encoder_files and clip_type == loading.CLIP_TYPES[family]
        return clip

    monkeypatch.setattr(comfy.sd, "load_diffusion_model", load_diffusion_model)
    monkeypatch.setattr(comfy.sd, "load_clip", load_clip)


# One YAML form each: SD3 trains from both, and test_print_config_resolves_both_forms_to_the_same_short_form.
@pytest.mark.parametrize("name, form", [("sdxl_eps", "job"), ("flux_dev", "short")])
def test_sdxl_and_flux_train_from_the_cli_into_a_lora_comfyui_loads_with_every_key(files, tmp_path, monkeypatch,
                                                                                   caplog, name, form):
    """The whole run (YAML, the family check against the weights, dataset cache, training, checkpoints,
    previews, the LoRA file) with stand-ins for ComfyUI's file loaders, which cannot load these tiny models
    (see stand_in_for_comfyuis_file_loaders). The model file holds the weights of the model handed out."""
    family = STAND_IN_FAMILIES[name]
    model_file = tmp_path / f"tiny_{name}.safetensors"
    safetensors.torch.save_file(MODEL_FACTORIES[name]().model.diffusion_model.state_dict(), str(model_file))
    encoder_files = [str(p) for p in tiny_encoders.clip_files(family)]
    stand_in_for_comfyuis_file_loaders(monkeypatch, name, model_file, encoder_files)
    path = write(tmp_path, family_config(files, form, family, model_file, encoder_files))
    assert cli.main(["train", str(path), "--cpu"]) == 0
    assert_trained_run(tmp_path / "out" / "tiny", MODEL_FACTORIES[name](), caplog)


def test_save_format_diffusers_writes_diffusers_keys_that_comfyui_loads_every_one_of(files, tmp_path, caplog):
    config = short_form(files)
    config["save"] = {"format": "diffusers", "dtype": "float32", "save_every": 0}
    config["train"]["steps"] = 1
    config["sample"]["prompts"] = []
    assert cli.main(["train", str(write(tmp_path, config)), "--cpu"]) == 0
    lora = comfy.utils.load_torch_file(str(tmp_path / "out" / "tiny" / "tiny.safetensors"))
    assert lora and all(re.fullmatch(r"transformer\.transformer_blocks\.\d+\..+\.lora_[AB]\.weight", k) for k in lora)
    caplog.clear()
    model = comfy.sd.load_diffusion_model(str(files / "models/diffusion_models/tiny_sd3.safetensors"))
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1, 0)
    assert "lora key not loaded" not in caplog.text and patched.patches


@pytest.mark.slow
def test_full_width_flux_trains_from_the_cli_through_comfyuis_own_loaders(files, tmp_path, caplog):
    """The Flux run above on files that ComfyUI's loaders take by themselves: the full-width Flux (0.5 B
    parameters) and CLIP-L alone (from any T5 file ComfyUI builds the full 4.7 B parameter T5). The full-size
    SDXL is left out: on this CPU its run and LoRA check took minutes and nearly 20 GB of memory."""
    model_file = flux_full_width_file("dev", tiny_encoders.CLIP_L_WIDTH)
    encoder_files = [str(tiny_encoders.clip_files("flux")[0])]
    path = write(tmp_path, family_config(files, "job", "flux", model_file, encoder_files))
    assert cli.main(["train", str(path), "--cpu"]) == 0
    assert_trained_run(tmp_path / "out" / "tiny", comfy.sd.load_diffusion_model(str(model_file)), caplog)


@pytest.mark.parametrize("flag, claimed", [("is_flux", "flux"), ("is_xl", "sdxl")])
def test_a_family_flag_that_contradicts_the_weights_is_an_error_naming_both(files, tmp_path, caplog, flag, claimed):
    config = short_form(files)
    del config["model"]["is_v3"]
    config["model"][flag] = True
    path = write(tmp_path, config)
    assert cli.main(["train", str(path), "--cpu"]) == cli.EXIT_CONFIG
    assert f"config.yaml:{line_of(path, flag)}: model.{flag}: says {claimed}, but the weights in " in caplog.text
    assert "tiny_sd3.safetensors are sd3" in caplog.text


def set_key(dotted: str, value):
    def change(config: dict) -> None:
        *parents, last = dotted.split(".")
        for part in parents:
            config = config[part]
        config[last] = value
    return change


def delete_key(dotted: str):
    def change(config: dict) -> None:
        section, key = dotted.split(".")
        del config[section][key]
    return change


@pytest.mark.parametrize("form", ["short", "job"])
@pytest.mark.parametrize("change, line_text, expected", [
    (set_key("train.steps", "many"), "steps:", "train.steps: expected an integer, got 'many'"),
    (set_key("train.lr", "fast"), "lr:", "train.lr: expected a number, got 'fast'"),
    (set_key("train.optimizer", "sgd"), "optimizer:", "train.optimizer: 'sgd' is not one of 'adamw', 'adamw8bit'"),
    (set_key("model.is_v2", True), "is_v2:", "model.is_v2: unknown family flag"),
    (set_key("model.is_xl", True), "is_xl:", "model.is_xl: contradicts model.is_v3"),
    (set_key("network.linear", 0), "linear:", "network.linear: must be an integer >= 1, got 0"),
    (delete_key("model.name_or_path"), "model:", "model.name_or_path: missing: this key is required"),
])
def test_a_broken_config_is_refused_naming_the_key_and_its_line(files, tmp_path, caplog, form, change, line_text,
                                                               expected):
    config = short_form(files)
    change(config)
    path = write(tmp_path, config if form == "short" else job_form(config))
    assert cli.main(["train", str(path), "--cpu"]) == cli.EXIT_CONFIG
    prefix = "" if form == "short" else "config.process[0]."
    assert f"config.yaml:{line_of(path, line_text)}: {prefix}{expected}" in caplog.text


def test_a_missing_dataset_folder_is_refused(files, tmp_path, caplog):
    config = short_form(files)
    config["datasets"][0]["folder_path"] = "no_such_folder"
    path = write(tmp_path, config)
    assert cli.main(["train", str(path), "--cpu"]) == cli.EXIT_CONFIG
    line = line_of(path, "folder_path:")
    assert f"config.yaml:{line}: datasets[0].folder_path: {tmp_path / 'no_such_folder'} is not a folder" in caplog.text


def test_unknown_keys_are_warnings_and_errors_with_strict(files, tmp_path, caplog, capsys):
    config = short_form(files)
    config["train"]["ema_decay"] = 0.99
    config["low_vram"] = True
    path = write(tmp_path, config)
    warnings = [f"config.yaml:{line_of(path, 'ema_decay')}: train.ema_decay: unknown key",
                f"config.yaml:{line_of(path, 'low_vram')}: low_vram: unknown key"]
    assert cli.main(["--print-config", str(path)]) == 0
    assert all(w in caplog.text for w in warnings) and "WARNING" in caplog.text
    assert yaml.safe_load(capsys.readouterr().out)["train"]["steps"] == STEPS
    caplog.clear()
    assert cli.main(["train", str(path), "--strict", "--print-config"]) == cli.EXIT_CONFIG
    assert "unknown keys (--strict makes them errors)" in caplog.text and all(w in caplog.text for w in warnings)


def test_print_config_resolves_both_forms_to_the_same_short_form(files, tmp_path, capsys):
    config = short_form(files)
    config["train"].pop("lr")
    config["train"]["gradient_accumulation_steps"] = 3
    config["datasets"][0]["resolution"] = [32, 64]
    printed = []
    for form, make in (("short", lambda c: c), ("job", job_form)):
        path = write(tmp_path / form, make(copy.deepcopy(config)))
        # Plain YAML reads 1e-4 as a string, as ai-toolkit files write it.
        path.write_text(re.sub(r"( +)steps: 4\n", r"\g<0>\1lr: 1e-4\n", path.read_text()))
        assert cli.main(["--print-config", str(path)]) == 0
        printed.append(yaml.safe_load(capsys.readouterr().out))
    short, job = printed
    assert short | {"training_folder": ""} == job | {"training_folder": ""}
    assert short["training_folder"] == str(tmp_path / "short" / "out")
    assert short["train"]["lr"] == 1e-4 and short["train"]["gradient_accumulation"] == 3
    assert short["train"]["optimizer"] == "adamw" and short["train"]["lr_scheduler"] == "constant"
    assert short["datasets"][0]["resolution"] == 64 and short["save"]["dtype"] == "fp16"


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run(files, tmp_path, caplog):
    config = short_form(files, name="stopped")
    # More steps than the run can take before the signal lands: the test waits for a step line, then
    # interrupts, and never depends on how fast the steps are. The resumed run then takes a few more.
    config["train"]["steps"] = 1_000_000
    config["save"]["save_every"] = 0
    del config["sample"]
    path = write(tmp_path, config)
    command = [sys.executable, "-m", "trainer_core", "train", str(path), "--cpu"]
    # Ctrl-C's default disposition, as in a terminal: a test run started as a shell's background job ignores
    # SIGINT, and the child would inherit that and never stop.
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=os.environ | {"COMFYUI_PATH": str(COMFY_HOST)},
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    watchdog = threading.Timer(120, process.kill)
    watchdog.start()
    try:
        output = []
        for line in process.stderr:
            output.append(line)
            if line.startswith("step 1/1000000"):
                process.send_signal(signal.SIGINT)
                break
        output.append(process.stderr.read())
        code = process.wait()
    finally:
        watchdog.cancel()
    output = "".join(output)
    assert code == cli.EXIT_INTERRUPTED, output
    checkpoints = export.list_checkpoints(tmp_path / "out" / "stopped" / "checkpoints")
    assert len(checkpoints) == 1, output
    assert f"Continue with: lora-train train {path} --cpu --resume" in output
    assert "step 1/1000000  loss " in output
    stopped_at = int(checkpoints[0].name.removeprefix("step-"))
    assert stopped_at >= 1

    config["train"]["steps"] = stopped_at + 2
    write(tmp_path, config)
    with caplog.at_level(logging.INFO):
        assert cli.main(["train", str(path), "--cpu", "--resume"]) == 0
    assert f"resumed at step {stopped_at} from {checkpoints[0]}" in caplog.text
    with safetensors.safe_open(str(tmp_path / "out" / "stopped" / "stopped.safetensors"), framework="pt") as file:
        assert file.metadata()["ss_steps"] == str(stopped_at + 2)


def test_resume_without_a_checkpoint_is_refused(files, tmp_path, caplog):
    path = write(tmp_path, short_form(files))
    assert cli.main(["train", str(path), "--cpu", "--resume"]) == cli.EXIT_CONFIG
    assert "no checkpoint at" in caplog.text


def test_comfyui_is_found_above_the_custom_nodes_folder(tmp_path, monkeypatch):
    host = tmp_path / "ComfyUI"
    (host / "comfy").mkdir(parents=True)
    (host / "comfy" / "cli_args.py").touch()
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setattr(cli, "PACK_ROOT", host / "custom_nodes" / "comfyui-lora-trainer")
    assert cli.find_comfyui() == host.resolve()
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="set COMFYUI_PATH"):
        cli.find_comfyui()


def test_the_console_script_is_the_cli():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert '[project.scripts]\nlora-train = "trainer_core.cli:main"\n' in pyproject
    assert callable(cli.main)


def train_in_one_and_in_two_processes(config: dict, folder: Path) -> tuple[dict, dict, str]:
    """`config` trained by `lora-train` in one process and under torchrun in two: both LoRA files' tensors and
    what the two processes wrote to stderr."""
    single, parallel = write(folder / "single", config), write(folder / "parallel", config)
    assert cli.main(["train", str(single), "--cpu"]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "trainer_core", "train", str(parallel), "--cpu"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=os.environ | {"COMFYUI_PATH": str(COMFY_HOST)},
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    one, two = (safetensors.torch.load_file(p.parent / "out/tiny/tiny.safetensors") for p in (single, parallel))
    return one, two, result.stderr


@pytest.mark.parametrize("accumulation", [1, 2])
def test_torchrun_with_two_processes_trains_the_lora_of_one_process(files, tmp_path, accumulation):
    # Three images in batches of two: every other batch holds one image, and one process gets none of it.
    # With accumulation the gradients of a step's first micro-batch stay local and are summed over the
    # processes with the last one's (distributed.GradientBuckets).
    config = short_form(files)
    config["train"]["gradient_accumulation"] = accumulation
    config["datasets"][0]["folder_path"] = str(graph_data.write_dataset(tmp_path / "three", count=3))
    config["save"]["dtype"] = "float32"
    del config["sample"]
    one, two, stderr = train_in_one_and_in_two_processes(config, tmp_path)
    assert stderr.count(f"step {STEPS}/{STEPS}  loss ") == 1  # only the first process reports
    assert one.keys() == two.keys()
    for key in one:
        # The float rounding of splitting the batch is all that may differ.
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=key)
    assert max(t.abs().max().item() for k, t in one.items() if k.endswith("lora_up.weight")) > 1e-3


# ComfyUI's settings as `lora-train` leaves them, printed by a process that ran it (ComfyUI reads its memory
# options once, when comfy.model_management is first imported: a fresh process is needed).
PRINT_COMFYUI_MEMORY_SETTINGS = """
import json, os, sys
from trainer_core import cli
code = cli.main(sys.argv[1:])
import comfy.model_management as mm
from comfy.cli_args import args
print(json.dumps({"code": code, "lowvram": args.lowvram, "novram": args.novram, "reserve_vram": args.reserve_vram,
                  "reserved_bytes": mm.EXTRA_RESERVED_VRAM, "lowvram_available": mm.lowvram_available,
                  "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}))
"""


def comfyui_memory_settings(*arguments: str) -> dict:
    command = [sys.executable, "-c", PRINT_COMFYUI_MEMORY_SETTINGS, *arguments]
    env = {key: value for key, value in os.environ.items() if key not in ("CUDA_VISIBLE_DEVICES", "LOCAL_RANK")}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env | {"COMFYUI_PATH": str(COMFY_HOST)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_comfyuis_memory_options_reach_comfyui(files, tmp_path):
    # --resume without a checkpoint ends the run right after ComfyUI is imported, before any model loads.
    path = write(tmp_path, short_form(files))
    given = comfyui_memory_settings("train", str(path), "--cpu", "--resume", "--reserve-vram", "3", "--lowvram",
                                    "--cuda-device", "1")
    assert given == {"code": cli.EXIT_CONFIG, "lowvram": True, "novram": False, "reserve_vram": 3.0,
                     "reserved_bytes": 3 * 2**30, "lowvram_available": True, "visible": "1"}
    plain = comfyui_memory_settings(str(path), "--cpu", "--resume", "--novram")
    assert (plain["lowvram"], plain["novram"], plain["reserve_vram"], plain["visible"]) == (False, True, None, None)
    assert plain["reserved_bytes"] != 3 * 2**30  # ComfyUI's own default for the platform


@pytest.mark.parametrize("arguments, expected", [
    (["--reserve-vram", "-1"], "--reserve-vram: give the GB to keep free, 0 or more, not -1.0"),
    (["--cuda-device", "-2"], "--cuda-device: give a GPU's index, 0 or more, not -2"),
    (["--lowvram", "--novram"], "argument --novram: not allowed with argument --lowvram"),
])
def test_wrong_memory_options_are_refused_saying_why(capsys, arguments, expected):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "any.yaml", *arguments])
    assert exit_.value.code == cli.EXIT_CONFIG and expected in capsys.readouterr().err


def test_cuda_device_is_refused_under_torchrun(capsys, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit):
        cli.parse_arguments(["train", "any.yaml", "--cuda-device", "1"])
    assert "choose the GPUs with CUDA_VISIBLE_DEVICES" in capsys.readouterr().err


def test_the_resume_command_keeps_the_memory_options():
    arguments = cli.parse_arguments(["train", "my.yaml", "--lowvram", "--reserve-vram", "2.5", "--cuda-device", "0"])
    expected = "lora-train train my.yaml --lowvram --reserve-vram 2.5 --cuda-device 0 --resume"
    assert cli.resume_command(arguments) == expected


def test_the_progress_line_shows_the_peak_vram_where_there_is_one():
    from trainer_core.headless import TerminalProgress
    from trainer_core.job import Event

    stream = io.StringIO()
    progress = TerminalProgress(stream)
    step = {"step": 3, "total_steps": 10, "loss": 0.125, "lr": 1e-4, "images_per_second": 2.5, "eta_seconds": 65.0}
    progress.show(Event("step", step | {"peak_vram_bytes": 6_979_321_856}))
    progress.show(Event("step", step | {"peak_vram_bytes": None}))
    on_gpu, on_cpu = stream.getvalue().splitlines()
    assert on_gpu == "step 3/10  loss 0.1250  lr 1.00e-04  2.50 img/s  ETA 0:01:05  peak VRAM 6.50 GiB"
    assert on_cpu == "step 3/10  loss 0.1250  lr 1.00e-04  2.50 img/s  ETA 0:01:05"


# -- several datasets, masks, regularisation, differential output preservation -----------------------


def with_two_datasets(files: Path, root: Path) -> dict:
    """The short form with masks on the subject dataset (each image's shape white, the background black), a
    regularisation dataset of two more images (loss_multiplier 0.5) and differential output preservation."""
    masks = root / "masks"
    masks.mkdir(parents=True)
    for image in sorted((files / "data").glob("*.png")):
        mask = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
        mask.save(masks / image.name)
    graph_data.write_dataset(root / "class_images", count=2)
    config = short_form(files)
    config["datasets"][0] |= {"mask_path": str(masks), "num_repeats": 2}
    config["datasets"].append({"folder_path": str(root / "class_images"), "is_reg": True, "loss_multiplier": 0.5,
                               "resolution": 64})
    config["train"] |= {"diff_output_preservation": True, "diff_output_preservation_class": "shape",
                        "diff_output_preservation_multiplier": 0.5}
    return config


def test_lora_train_trains_on_two_datasets_with_masks_regularisation_and_preservation(files, tmp_path, caplog):
    path = write(tmp_path, with_two_datasets(files, tmp_path))
    with caplog.at_level(logging.INFO):
        assert cli.main(["train", str(path), "--cpu"]) == 0
    subjects = len(graph_data.SUBJECTS)
    assert f"dataset {files / 'data'}: {subjects} images, {2 * subjects} samples per epoch, {2 * subjects} masked" \
        in caplog.text
    assert f"dataset {tmp_path / 'class_images'}: 2 images, 2 samples per epoch (buckets" in caplog.text
    lora = tmp_path / "out" / "tiny" / "tiny.safetensors"
    with safetensors.safe_open(str(lora), framework="pt") as file:
        metadata = file.metadata()
    # kohya's counts are of the trained images (2 repeats each), not the regularisation images.
    assert metadata["ss_num_train_images"] == str(2 * subjects)
    assert list(json.loads(metadata["ss_tag_frequency"])) == ["data"]
    weights = safetensors.torch.load_file(lora)
    assert all(tensor.isfinite().all() for tensor in weights.values())


def set_in_dataset(index: int, key: str, value):
    def change(config: dict) -> None:
        config["datasets"][index][key] = value
    return change


@pytest.mark.parametrize("change, line_text, expected", [
    (set_in_dataset(1, "loss_multiplier", 0), "loss_multiplier:",
     "datasets[1].loss_multiplier: must be a number in (0, 100.0], got 0.0"),
    (set_key("trigger_word", ""), "diff_output_preservation:",
     "train.diff_output_preservation: replaces the trigger word by the class word: set trigger_word too"),
    (set_in_dataset(0, "num_repeats", 0), "num_repeats:", "datasets[0].num_repeats: must be >= 1, got 0"),
])
def test_a_wrong_dataset_setting_is_refused_naming_its_entry_and_line(files, tmp_path, caplog, change, line_text,
                                                                     expected):
    config = with_two_datasets(files, tmp_path)
    change(config)
    path = write(tmp_path, config)
    assert cli.main(["train", str(path), "--cpu"]) == cli.EXIT_CONFIG
    assert f"config.yaml:{line_of(path, line_text)}: {expected}" in caplog.text


def test_torchrun_with_masks_regularisation_and_preservation_trains_the_lora_of_one_process(files, tmp_path):
    """Each process's shard carries its samples' masks, loss weights and class-word conditionings."""
    config = with_two_datasets(files, tmp_path / "data")
    config["save"]["dtype"] = "float32"
    del config["sample"]
    one, two, _ = train_in_one_and_in_two_processes(config, tmp_path)
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=key)
