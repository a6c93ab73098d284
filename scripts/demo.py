"""`make demo`: a LoRA trained in a live ComfyUI with this pack, in about a minute on a CPU.

No real model weights are at hand, so the demo makes its own with the test suite's factories
(tests/graph_data.py): a tiny SD 3.5-shaped diffusion model, a CLIP-L and a VAE with random weights,
and a dataset of coloured shapes. It starts a headless ComfyUI whose folders live in `demo/`, queues
the SD 3.5 example workflow (example_workflows/train_sd35_lora.json) pointed at those files with tiny
settings, prints the training steps as they arrive over the websocket, then where the results are.
The server keeps running for a browser until Ctrl+C; `--exit` stops it when the run is done.
Random weights give noise images: the demo shows the machinery, not a LoRA worth keeping.
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))
# The test models take their configs from bench/ in the root; appended, so ComfyUI's own `nodes` module comes
# before the pack's `nodes/` package.
sys.path.append(str(REPO_ROOT))

from live_server import comfy_host_path, running_comfy_server  # noqa: E402

HOST = comfy_host_path()
sys.path.insert(0, str(HOST))

import comfy.options  # noqa: E402

# ComfyUI parses sys.argv only when asked to; this script's own arguments are not for it.
comfy.options.enable_args_parsing(False)

from comfy.cli_args import args  # noqa: E402

# The tiny model files are built on the CPU, like the server runs.
args.cpu = True

from graph_data import write_dataset, write_sd3_loader_files  # noqa: E402
from workflows import TINY_RUN, nodes_of, set_inputs, ui_to_api  # noqa: E402

log = logging.getLogger("demo")

EXAMPLE = REPO_ROOT / "example_workflows" / "train_sd35_lora.json"
NAME = "demo_sd35_lora"
DATASET = "demo_dataset"
STEPS = 20


def demo_graph(object_info: dict, model_files: dict[str, str]) -> dict:
    """The SD 3.5 example as an API-format graph, on the demo's files and at tiny sizes."""
    graph = ui_to_api(json.loads(EXAMPLE.read_text()), object_info)
    set_inputs(graph, TINY_RUN)
    set_inputs(graph, {
        "LoraTrainer_Dataset": {"folder": DATASET},
        "LoraTrainer_TrainLoRA": {"output_name": NAME, "steps": STEPS, "save_every": STEPS // 2,
                                  "sample_every": STEPS // 2},
    })
    # CLIP-L alone: ComfyUI's loaders would build CLIP-G and T5 at full size (see tests/graph_data.py).
    files = dict.fromkeys(("checkpoint", "text_encoder_2", "text_encoder_3"), "(none)") | model_files
    for node in nodes_of(graph, "LoraTrainer_LoadBaseModel"):
        node["inputs"].update(files)
    return graph


def follow(events, prompt_id: str) -> None:
    """Logs the run's training steps and saves as they arrive, until the run ends."""
    seen = 0
    ends = ("execution_success", "execution_error", "execution_interrupted")
    while True:
        messages = events.messages()
        for message in messages[seen:]:
            kind, data = message["type"], message["data"]
            if kind == "lora_trainer.step":
                log.info("step %d/%d  loss %.4f", data["step"], data["total_steps"], data["loss"])
            elif kind == "lora_trainer.saved":
                log.info("saved %s: %s", data["kind"], data["path"])
            elif kind in ends and data.get("prompt_id") == prompt_id:
                return
        seen = len(messages)
        events.server.check_alive()
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=REPO_ROOT / "demo",
                        help="where the demo's models, dataset, outputs and server log go (default: demo/)")
    parser.add_argument("--exit", action="store_true", help="stop ComfyUI when the run is done")
    options = parser.parse_args()
    # ComfyUI configured the root logger on import; the demo speaks in plain lines.
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    root = options.folder.resolve()

    log.info("Writing tiny model files and a dataset into %s ...", root)
    model_files = write_sd3_loader_files(root / "models")
    write_dataset(root / "input" / DATASET)

    log.info("Starting ComfyUI from %s (log: %s) ...", HOST, root / "server.log")
    with running_comfy_server(root) as server:
        log.info("ComfyUI is up at %s; queueing %s with tiny settings.", server.url, EXAMPLE.name)
        graph = demo_graph(server.get_json("/object_info"), model_files)
        with server.events() as events:
            prompt_id = events.post_prompt(graph)
            follow(events, prompt_id)
        entry = server.wait_for(prompt_id)
        images = [server.output_dir / image["subfolder"] / image["filename"]
                  for output in entry["outputs"].values() for image in output.get("images", [])]
        log.info("\nDone. Look at:")
        lora = server.models_dir / "loras" / NAME / f"{NAME}.safetensors"
        log.info("  the LoRA, in ComfyUI's LoRA Loader list:  %s", lora)
        log.info("  checkpoints to resume from:                %s", server.output_dir / NAME / "checkpoints")
        log.info("  previews made while training:              %s", server.output_dir / NAME / "samples")
        log.info("  the image through LoRA Loader + KSampler:  %s", ", ".join(map(str, images)))
        if options.exit:
            return 0
        log.info("\nComfyUI keeps running at %s: open it to see the run in the queue history, and the", server.url)
        log.info("examples under Workflow > Browse Templates. Press Ctrl+C to stop it.")
        try:
            while server.process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            log.info("Stopping ComfyUI.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
