"""The pack in a live headless ComfyUI: it imports cleanly and every node it registers is served."""

import asyncio
import importlib.util
import re
import sys
import uuid
from pathlib import Path

import pytest
from live_server import ComfyServer, ComfyServerError

REPO_ROOT = Path(__file__).resolve().parents[1]
# ComfyUI's own words when it cannot load a custom node folder (nodes.py, load_custom_node and
# init_external_custom_nodes); each such line names the folder.
IMPORT_FAILURE_MARKERS = ("IMPORT FAILED", "Cannot import", "Error while calling comfy_entrypoint", "skipping", "Skip ")
TRACEBACK_FRAME = re.compile(r'^\s*File "([^"]+)", line \d+')
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
# A loader node and its file input for each model folder the live server gets.
FOLDER_LOADERS = {
    "checkpoints": ("CheckpointLoaderSimple", "ckpt_name"),
    "loras": ("LoraLoader", "lora_name"),
    "vae": ("VAELoader", "vae_name"),
    "text_encoders": ("CLIPLoader", "clip_name"),
    "clip": ("CLIPLoader", "clip_name"),
    "diffusion_models": ("UNETLoader", "unet_name"),
}


PACK_MODULE = "comfyui_lora_trainer"


def import_pack():
    """The pack as ComfyUI imports it: a package from its folder (its node modules are imported
    relative to it, e.g. `comfyui_lora_trainer.nodes.live_runs`, since ComfyUI's own `nodes` module
    comes first on sys.path)."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    spec.loader.exec_module(pack)
    return pack


def pack_nodes() -> list:
    """The node classes the pack registers, read from its own entry point as ComfyUI reads them."""
    pack = import_pack()

    async def node_list():
        extension = await pack.comfy_entrypoint()
        return await extension.get_node_list()

    return asyncio.run(node_list())


def pack_node_ids() -> list[str]:
    return [node.GET_SCHEMA().node_id for node in pack_nodes()]


def pack_folders(server: ComfyServer) -> list[str]:
    """How the server names the pack: the custom_nodes entries that lead to this repo."""
    custom_nodes = server.host_dir / "custom_nodes"
    folders = [str(entry) for entry in custom_nodes.iterdir() if entry.resolve() == REPO_ROOT]
    assert folders, f"the pack is not installed in {custom_nodes}: run `make host` (it links the repo there)"
    return folders


def is_pack_source(path: str, server: ComfyServer) -> bool:
    if not Path(path).is_absolute():  # "<frozen importlib._bootstrap>" and the like
        return False
    resolved = Path(path).resolve()
    # The host and the venv may live inside the repo (.comfyui, .venv); their frames are not the pack's.
    elsewhere = (server.host_dir.resolve(), Path(sys.prefix).resolve())
    return resolved.is_relative_to(REPO_ROOT) and not any(resolved.is_relative_to(p) for p in elsewhere)


def test_object_info_serves_every_node_of_the_pack(comfy_server: ComfyServer) -> None:
    node_ids = pack_node_ids()
    assert "LoraTrainer_LoraConfig" in node_ids

    object_info = comfy_server.get_json("/object_info")
    missing = sorted(set(node_ids) - set(object_info))
    assert not missing, f"/object_info lacks {missing}; server log tail:\n{comfy_server.log_tail()}"
    served_from_pack = {
        node_id for node_id, info in object_info.items()
        if info["python_module"] in {f"custom_nodes.{Path(f).name}" for f in pack_folders(comfy_server)}
    }
    assert served_from_pack == set(node_ids)


def test_server_log_shows_the_pack_imported(comfy_server: ComfyServer) -> None:
    folders = pack_folders(comfy_server)
    log = comfy_server.log_text()
    # Custom nodes load before this line; later tracebacks belong to prompts other tests ran on the shared server.
    lines = log[: log.find("Starting server")].splitlines()

    failures = [
        line for line in lines
        if any(folder in line for folder in folders) and any(marker in line for marker in IMPORT_FAILURE_MARKERS)
    ]
    frames = [m[1] for line in lines if (m := TRACEBACK_FRAME.match(line)) and is_pack_source(m[1], comfy_server)]
    assert not failures and not frames, (
        "the server failed to import the pack:\n" + "\n".join(failures + frames) + f"\nlog: {comfy_server.log_path}"
    )
    # Newer hosts put the level in front, in colour ("\x1b[32m[INFO]\x1b[0m    0.0 seconds: ...").
    timings = [re.compile(rf"(?:\[[A-Z]+\])?\s*[\d.]+ seconds: {re.escape(folder)}") for folder in folders]
    imported = any(timing.fullmatch(ANSI_COLOUR.sub("", line)) for line in lines for timing in timings)
    assert imported, f"no import time logged for {folders}; log: {comfy_server.log_path}"


@pytest.mark.parametrize("folder", FOLDER_LOADERS)
def test_loader_nodes_list_files_of_the_test_model_folders(comfy_server: ComfyServer, folder: str) -> None:
    node, file_input = FOLDER_LOADERS[folder]
    probe = comfy_server.models_dir / folder / f"probe-{uuid.uuid4().hex[:8]}.safetensors"
    probe.touch()
    try:
        choices = comfy_server.get_json(f"/object_info/{node}")[node]["input"]["required"][file_input][0]
    finally:
        probe.unlink()
    assert probe.name in choices


def test_a_prompt_runs_and_writes_its_output(comfy_server: ComfyServer) -> None:
    prefix = f"live-{uuid.uuid4().hex[:8]}"
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0xFF0000}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }
    entry = comfy_server.wait_for(comfy_server.post_prompt(graph), timeout=60)

    saved = entry["outputs"]["2"]["images"]
    assert [image["filename"] for image in saved] == [path.name for path in comfy_server.output_dir.glob(f"{prefix}*")]


def test_a_failing_prompt_raises_with_the_node_and_its_error(comfy_server: ComfyServer) -> None:
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        # ComfyUI refuses at run time to save outside its output folder.
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "../escape"}},
    }
    prompt_id = comfy_server.post_prompt(graph)

    with pytest.raises(ComfyServerError, match=r"node 2 \(SaveImage\) raised .*outside the output folder"):
        comfy_server.wait_for(prompt_id, timeout=60)


def test_an_invalid_graph_is_refused_with_the_reason(comfy_server: ComfyServer) -> None:
    with pytest.raises(ComfyServerError, match="400.*NoSuchNode"):
        comfy_server.post_prompt({"1": {"class_type": "NoSuchNode", "inputs": {}}})
