"""Hostile and clumsy input, each attack made for real (issue 14, rows 5 and 7 to 11): damaged dataset cache
entries in a real cache folder, caption text kept out of `output/`, save requests and bad bodies sent to a live
headless ComfyUI over HTTP, and broken or malicious configs given to `lora-train` as a real subprocess."""

import json
import logging
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import graph_data
import pytest
import safetensors
import safetensors.torch
import torch
import yaml
from conftest import COMFY_HOST, REPO_ROOT
from live_server import ComfyServer
from test_cli import short_form
from test_data import CountingCLIP, CountingVAE
from test_graph import tiny_loader, training_graph, unique
from tiny_encoders import build_clip, build_vae
from tiny_models import MODEL_FACTORIES

from trainer_core import cli
from trainer_core.data import DEFAULT_CACHE_FOLDER, DatasetConfig, build_samples
from trainer_core.export import list_checkpoints
from trainer_core.headless import TerminalProgress
from trainer_core.job import Event

TIMEOUT_S = 300

# -- row 5: a damaged cache entry is a cache miss ------------------------------------------------------------


def build_sdxl(dataset: Path, output: Path):
    """Samples of `dataset` for the tiny SDXL, cached under `output`; and the counting encoders."""
    patcher, clip, vae = MODEL_FACTORIES["sdxl_eps"](), CountingCLIP(build_clip("sdxl")), CountingVAE(build_vae(4))
    config = DatasetConfig(folder=str(dataset), resolution=64)
    samples, report = build_samples(config, patcher, clip, vae, input_dir=dataset, output_dir=output)
    return {sample.key: sample for sample in samples}, report, clip, vae


def test_a_damaged_cache_entry_is_computed_again_with_a_warning_naming_it(tmp_path, caplog):
    dataset = graph_data.write_dataset(tmp_path / "dataset", count=3)
    output = tmp_path / "output"
    first, _, _, _ = build_sdxl(dataset, output)
    latents = sorted((output / DEFAULT_CACHE_FOLDER / "latents").glob("*.safetensors"))
    texts = sorted((output / DEFAULT_CACHE_FOLDER / "text").glob("*.safetensors"))
    assert len(latents) == 3 and len(texts) == 3

    # Swapped files: two sound entries, each in the other's place.
    swapped = latents[0].read_bytes()
    latents[0].write_bytes(latents[1].read_bytes())
    latents[1].write_bytes(swapped)
    # One flipped byte in the tensor data (the file's last byte).
    damaged = bytearray(latents[2].read_bytes())
    damaged[-1] ^= 0x5A
    latents[2].write_bytes(bytes(damaged))
    # A tensor missing, the header as the cache wrote it.
    with safetensors.safe_open(str(texts[0]), framework="pt") as file:
        metadata = file.metadata()
        cond = {"cond": file.get_tensor("cond")}
    safetensors.torch.save_file(cond, str(texts[0]), metadata)
    # A folder in the entry's place, and a file cut short (unreadable as safetensors).
    texts[1].unlink()
    (texts[1] / "inside").mkdir(parents=True)
    texts[2].write_bytes(texts[2].read_bytes()[:40])

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer_core.data"):
        second, report, clip, vae = build_sdxl(dataset, output)
    assert (vae.encoded, clip.encoded) == (3, 3), "every damaged entry is computed again"
    assert (report.latents_cached, report.captions_cached) == (0, 0)
    for path, problem in [(latents[0], "holds another entry's tensors"), (latents[1], "holds another entry's tensors"),
                          (latents[2], "does not match its content hash"), (texts[0], "holds cond, not cond, pooled"),
                          (texts[1], "is not a file"), (texts[2], "is unreadable")]:
        assert f"cache entry {path} (" in caplog.text and problem in caplog.text, (path, problem, caplog.text)
    assert "00_red_circle.png" in caplog.text, "a latent entry's warning names its image"
    for key, sample in first.items():
        assert torch.equal(second[key].latents, sample.latents), f"{key} trained on another image's latents"
        assert all(torch.equal(second[key].conditioning[k], v) for k, v in sample.conditioning.items())

    # Rewritten: the next run reads every entry from the cache.
    third, report, clip, vae = build_sdxl(dataset, output)
    assert (vae.encoded, clip.encoded) == (0, 0) and (report.latents_cached, report.captions_cached) == (3, 3)
    assert all(torch.equal(third[key].latents, sample.latents) for key, sample in first.items())


# -- row 7: no caption text under output/ --------------------------------------------------------------------


def test_no_caption_text_lands_in_the_cache_even_through_a_symlink_out_of_the_dataset(tmp_path):
    dataset = graph_data.write_dataset(tmp_path / "dataset", count=2)
    secret = "private notes 7f3a: the password is hunter2"
    outside = tmp_path / "elsewhere" / "notes.txt"
    outside.parent.mkdir()
    outside.write_text(secret)
    (caption,) = [p for p in dataset.glob("00_*.txt")]
    caption.unlink()
    caption.symlink_to(outside)
    output = tmp_path / "output"
    samples, report, _, _ = build_sdxl(dataset, output)
    assert report.captions[caption.with_suffix(".png").name] == [(1.0, secret)], "the linked caption is trained on"

    written = [p for p in output.rglob("*") if p.is_file()]
    assert len([p for p in written if p.parent.name == "text"]) == 2
    for word in ("hunter2", "7f3a", "a green square"):
        assert not [p for p in written if word.encode() in p.read_bytes()], f"{word!r} is stored under output/"


# -- row 8: save requests coalesce ---------------------------------------------------------------------------


def test_forty_save_requests_write_one_checkpoint_per_step_boundary(comfy_server: ComfyServer) -> None:
    graph_data.write_dataset(comfy_server.input_dir / "faults_dataset")
    name = unique("save-burst")
    graph = training_graph(tiny_loader("flux_dev"), "faults_dataset", name, steps=100_000, save_every=0, keep_last=0,
                           sample_prompts="")
    with comfy_server.events() as events:
        prompt_id = events.post_prompt(graph)
        started = events.wait_for(lambda m: m["type"] == "lora_trainer.step", timeout=TIMEOUT_S)
        run_id = started["data"]["run_id"]
        answers = []

        def ask() -> None:
            answers.append(comfy_server.post_json("/lora_trainer/save_now", {"run_id": run_id}))

        clients = [threading.Thread(target=ask) for _ in range(40)]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        events.wait_for(lambda m: m["type"] == "lora_trainer.saved" and m["data"]["run_id"] == run_id,
                        timeout=TIMEOUT_S)
        comfy_server.post_json("/lora_trainer/stop", {"run_id": run_id})
        assert events.wait_until_done(prompt_id, timeout=TIMEOUT_S) == "execution_interrupted"

    assert len(answers) == 40 and all(answer["save_requested"] for answer in answers)
    saves = [m["data"] for m in events.messages("lora_trainer.saved") if m["data"]["run_id"] == run_id]
    steps = [save["step"] for save in saves]
    assert all(save["kind"] == "checkpoint" for save in saves)
    assert len(steps) == len(set(steps)), f"two checkpoints at one step: {steps}"
    folders = list_checkpoints(comfy_server.output_dir / name / "checkpoints")
    assert [folder.name for folder in folders] == [f"step-{step:06d}" for step in sorted(steps)]


# -- row 9: every route answers 4xx to a bad body ------------------------------------------------------------


def send(server: ComfyServer, method: str, path: str, body: bytes | None = None) -> tuple[int, str]:
    request = urllib.request.Request(server.url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


NESTED = b'{"run_id": ' + b"[" * 3000 + b"]" * 3000 + b"}"
BAD_BODIES = {
    "nested arrays": NESTED,
    "nested objects": b'{"a":' * 2000 + b"1" + b"}" * 2000,
    "not UTF-8": b'{"run_id": "\xff\xfe"}',
    "not JSON": b"run_id=1",
    "empty": b"",
    "a list": b'["' + uuid.uuid4().hex.encode() + b'"]',
    "a string": b'"run_id"',
    "null": b"null",
    "a number run_id": b'{"run_id": 5}',
    "a list run_id": b'{"run_id": ["a"]}',
    "an object run_id": b'{"run_id": {"$ne": ""}}',
    "NaN run_id": b'{"run_id": NaN}',
}


@pytest.mark.parametrize("route", ["save_now", "stop"])
def test_every_bad_body_gets_a_4xx_with_a_message_never_a_500(comfy_server: ComfyServer, route: str) -> None:
    answers = {kind: send(comfy_server, "POST", f"/lora_trainer/{route}", body) for kind, body in BAD_BODIES.items()}
    for kind, (code, text) in answers.items():
        assert code == 400, (kind, code, text[:300])
        assert "run_id" in json.loads(text)["error"], kind
    huge = json.dumps({"run_id": uuid.uuid4().hex, "padding": "x" * (2 << 20)}).encode()
    code, text = send(comfy_server, "POST", f"/lora_trainer/{route}", huge)
    assert (code, json.loads(text)["error"].split(";")[0]) == (413, "the body is larger than 16 KiB")
    code, text = send(comfy_server, "GET", "/lora_trainer/status?node=%ff%fe")
    assert code == 400 and "node must be a node id" in json.loads(text)["error"]
    comfy_server.check_alive()


# -- rows 10 and 11: lora-train refuses a broken or malicious config with exit 2 and FILE:LINE: key ----------


def lora_train(config: Path, *options: str, memory_limit: int | None = None) -> subprocess.CompletedProcess:
    """`python -m trainer_core train CONFIG --cpu` as a process of its own; `memory_limit` caps its address
    space (bytes), so that a config which would grow it gigabytes fails fast instead of filling the machine."""

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    command = [sys.executable, "-m", "trainer_core", "train", str(config), "--cpu", *options]
    return subprocess.run(command, cwd=REPO_ROOT, env=os.environ | {"COMFYUI_PATH": str(COMFY_HOST)},
                          capture_output=True, text=True, timeout=TIMEOUT_S,
                          preexec_fn=limit if memory_limit else None)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Tiny SD3 + CLIP-L + VAE files under `models/`, a captioned dataset in `data/`, and a text file."""
    root = tmp_path_factory.mktemp("fault_files")
    graph_data.write_sd3_loader_files(root / "models")
    graph_data.write_dataset(root / "data", count=2)
    (root / "notes.safetensors").write_text("these are my notes, not weights\n")
    (root / "notes.pt").write_text("these are my notes, not weights\n")
    return root


def line_of(path: Path, text: str) -> int:
    """The 1-based line of `path` (any bytes) where `text` first occurs."""
    return next(i for i, line in enumerate(path.read_bytes().split(b"\n"), 1) if text.encode() in line)


def write_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def refused(result: subprocess.CompletedProcess, message: str) -> None:
    """Exit 2 with `message` logged as an error, and no traceback."""
    assert result.returncode == cli.EXIT_CONFIG, result.stderr[-3000:]
    assert f"ERROR {message}" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def model_files(files: Path, **replaced: str) -> dict:
    """The model section of the tiny SD3's diffusion-model, CLIP-L and VAE files, with `replaced` paths."""
    model = {"name_or_path": str(files / "models/diffusion_models/tiny_sd3.safetensors"),
             "vae_path": str(files / "models/vae/tiny_vae_16ch.safetensors"),
             "text_encoder_paths": [str(files / "models/text_encoders/clip_l.safetensors")]}
    return model | replaced


@pytest.mark.parametrize("model, key, message", [
    ({"name_or_path": "notes.safetensors"}, "model.name_or_path",
     "notes.safetensors cannot be loaded as a checkpoint (Error while deserializing header"),
    ("notes.safetensors as model", "model.name_or_path",
     "notes.safetensors cannot be loaded as a diffusion model (Error while deserializing header"),
    ("the VAE as model", "model.name_or_path",
     "tiny_vae_16ch.safetensors cannot be loaded as a diffusion model (ERROR: Could not detect model type"),
    ("notes.pt as VAE", "model.vae_path", "notes.pt cannot be loaded as a VAE ("),
    ("notes.safetensors as text encoder", "model.text_encoder_paths[1]",
     "notes.safetensors cannot be loaded as a text encoder (Error while deserializing header"),
])
def test_a_file_that_is_not_what_its_key_says_is_refused_naming_the_key(files, tmp_path, model, key, message):
    sections = {
        "notes.safetensors as model": {"name_or_path": str(files / "notes.safetensors")},
        "the VAE as model": {"name_or_path": str(files / "models/vae/tiny_vae_16ch.safetensors")},
        "notes.pt as VAE": {"vae_path": str(files / "notes.pt")},
        "notes.safetensors as text encoder": {"text_encoder_paths": [
            str(files / "models/text_encoders/clip_l.safetensors"), str(files / "notes.safetensors")]},
    }
    model = {"name_or_path": str(files / model["name_or_path"])} if isinstance(model, dict) else model_files(
        files, **sections[model])
    config = short_form(files, model=model)
    del config["sample"]
    path = write_config(tmp_path, config)
    result = lora_train(path)
    written_key = key.split("[")[0].rsplit(".", 1)[1] + ":"
    refused(result, f"{path}:{line_of(path, written_key)}: {key}: ")
    assert message in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out").exists(), "nothing is written for a refused config"


def edited(files: Path, tmp_path: Path, edit) -> Path:
    """The tiny SD3 config as YAML text, changed by `edit` (text -> text or bytes)."""
    config = short_form(files, model=model_files(files))
    del config["sample"]
    path = write_config(tmp_path, config)
    changed = edit(path.read_text())
    if isinstance(changed, str):
        path.write_text(changed)
    else:
        path.write_bytes(changed)
    return path


@pytest.mark.parametrize("edit, line_text, message", [
    # A binary file, a Latin-1 one, and one with a control character.
    (lambda text: b"\x89PNG\r\n\x1a\n\x00\x00" + text.encode(), None,
     "1: byte 0x89 is not UTF-8 text: give the YAML config file, saved as UTF-8"),
    (lambda text: text.replace("trigger_word: shp", "trigger_word: caf\u00e9").encode("latin-1"), "trigger_word",
     "byte 0xe9 is not UTF-8 text"),
    (lambda text: text.replace("trigger_word: shp", "trigger_word: sh\x00p"), "trigger_word",
     "is not valid YAML: special characters are not allowed"),
    (lambda text: text.replace("name: tiny", "name: !!python/object/apply:os.system ['touch PWNED']"), "name:",
     "name: the tag !!python/object/apply:os.system is refused"),
    (lambda text: text.replace("lr: 0.001", "lr: 1.0e+38"), "lr:", "train.lr: must be <= 10.0, got 1e+38"),
    (lambda text: text.replace("lr: 0.001", "lr: .inf"), "lr:", "train.lr: expected a finite number, got inf"),
    (lambda text: text.replace("steps: 4", "steps: 1000000000000000000000000000000"), "steps:",
     "train.steps: must be <= 1000000, got 1000000000000000000000000000000"),
    (lambda text: text.replace("  lr: 0.001\n", "  lr: 0.001\n  lr: 0.5\n"), "lr: 0.5",
     "train.lr: is written twice, on lines"),
    (lambda text: text.replace("training_folder: out", "training_folder: /"), "training_folder:",
     "training_folder: '/' is the root of the file system: give a folder for this run's files"),
])
def test_a_broken_or_malicious_config_exits_2_naming_file_line_and_key(files, tmp_path, edit, line_text, message):
    path = edited(files, tmp_path, edit)
    # The root as training folder is asked of --print-config, which reads the config as a run does: a
    # build without the check would otherwise write into / when this test runs against it.
    result = lora_train(path, *(["--print-config"] if "root of the file system" in message else []))
    line = line_of(path, line_text) if line_text else None
    refused(result, f"{path}:{line}: {message}" if line else f"{path}:{message}")
    assert not (tmp_path / "PWNED").exists() and not (REPO_ROOT / "PWNED").exists()
    if "twice" in message:
        assert f"lines {line - 1} and {line}: keep one" in result.stderr
    assert not (tmp_path / "out").exists(), "nothing is written for a refused config"


def test_an_eta_too_long_for_a_clock_is_shown_as_text():
    """`steps` is bounded, but a very slow run's ETA still must not overflow mid-run."""
    shown = []
    progress = TerminalProgress(stream=type("Lines", (), {"write": shown.append, "flush": lambda self: None})())
    for eta in (1e30, float("inf"), 5.0):
        progress.show(Event("step", {"step": 2, "total_steps": 1_000_000, "loss": 0.5, "lr": 1e-4,
                                     "images_per_second": 1e-20, "eta_seconds": eta}))
    assert [line.split("ETA ")[1] for line in shown] == ["more than 9999 days\n", "?\n", "0:00:05\n"]


LAUGHS = "".join(f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 9)}]\n" for n in range(1, 10))


@pytest.mark.parametrize("key, line_text, written", [
    ("name", "name: *l9", "name"),
    ("steps", "steps: *l9", "train.steps"),
    ("prompts", "prompts: *l9", "sample.prompts"),
    ("prompts", "prompts: [a cat, *l9]", "sample.prompts"),
])
def test_an_alias_bomb_in_a_value_is_refused_before_it_grows(files, tmp_path, key, line_text, written):
    """Nine levels of nine aliases: 387 million strings once built, gigabytes once printed. The process
    gets 2 GiB of address space, so a config that builds the value fails instead of filling the machine."""
    config = short_form(files, model=model_files(files))
    path = write_config(tmp_path, config)
    text = "l0: &l0 lol\n" + LAUGHS + path.read_text()
    if key == "name":
        text = text.replace("name: tiny", line_text)
    elif key == "steps":
        text = text.replace("steps: 4", line_text)
    else:
        text = text.replace("prompts:\n  - '[trigger] a red circle'", line_text)
    path.write_text(text)
    assert line_text in text
    result = lora_train(path, memory_limit=2 << 30)
    refused(result, f"{path}:{line_of(path, line_text)}: {written}: is the alias *l9; aliases are refused where ")
    assert len(result.stderr) < 5000 and result.stderr.count("lol") == 0
