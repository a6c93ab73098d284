"""Takes the README's screenshots in headless Chromium: docs/graph.png, an example workflow in ComfyUI's
page, and with --panel docs/panel.png, the Train LoRA node's live panel during a run.

It starts a headless ComfyUI with this pack through the demo's server helper (scripts/demo.py: same
host folder, CPU mode, the server's folders in a temp folder), opens the page in Chromium with the
workflow as the one open tab, fits the view, saves the picture and stops the server. For the graph
nothing is queued and no model file is needed: the loaders' widgets show the names the workflow holds.
For the panel it queues the demo's run (the SD 3.5 example on tiny model files) and waits until the
chart and the sample strip have filled.

It needs Debian's Chromium and the playwright package, which `make test` installs (`make browser`).
Then: .venv/bin/python scripts/screenshot.py [--workflow example_workflows/train_sd35_lora.json] [--out x.jpg]
"""

import argparse
import importlib.util
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

# The demo (which sets up the ComfyUI host's import path the way `make demo` runs) and tests/browser.py.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from browser import (  # noqa: E402
    CHROMIUM,
    SETTINGS,
    chromium_page,
    fit_view,
    panel_data,
    save_screenshot,
    set_widgets,
)
from demo import DATASET, EXAMPLE, HOST, REPO_ROOT, demo_graph, running_comfy_server  # noqa: E402
from graph_data import write_dataset, write_sd3_loader_files  # noqa: E402
from workflows import nodes_of, set_inputs  # noqa: E402

log = logging.getLogger("screenshot")

DEFAULT_WORKFLOW = REPO_ROOT / "example_workflows" / "train_flux_lora.json"
DEFAULT_OUT = REPO_ROOT / "docs" / "graph.png"
PANEL_OUT = REPO_ROOT / "docs" / "panel.png"
TRAIN_NODE = "LoraTrainer_TrainLoRA"
# The panel's run: long enough for a curve, samples often enough for a full strip.
PANEL_RUN = {"steps": 120, "sample_every": 12, "save_every": 0, "learning_rate": 1e-3, "warmup_steps": 10}
PANEL_FILLED = """() => {
    const d = document.querySelector(".lora-panel")?.dataset;
    return d && Number(d.points) >= 90 && Number(d.samples) >= 6;
}"""
# The screen rectangle of the first node of a type, title bar included.
NODE_RECT = """(type) => {
    const app = window.app ?? window.comfyAPI.app.app;
    const node = app.graph.nodes.find((n) => n.type === type);
    const {scale, offset} = app.canvas.ds;
    const canvas = app.canvas.canvas.getBoundingClientRect();
    const title = window.LiteGraph.NODE_TITLE_HEIGHT;
    return {x: canvas.left + (node.pos[0] + offset[0]) * scale,
            y: canvas.top + (node.pos[1] - title + offset[1]) * scale,
            width: node.size[0] * scale, height: (node.size[1] + title) * scale};
}"""
# Seconds for the last frames (fonts, links) to be drawn after the view is set.
SETTLE_S = 1.0
# The output end of the sampler chain may run off the right edge: the training nodes, LoRA Loader and
# KSampler are what the picture is about, and they stay readable that way.
LEFT_OUT_OF_FIT = ("VAEDecode", "SaveImage")


def take_screenshot(url: str, workflow_path: Path, out: Path, width: int, height: int) -> dict:
    """Opens ComfyUI at `url` in headless Chromium with the workflow file as its tab, fits the view and
    saves `out` (JPEG for a .jpg name, else PNG). Returns the node types on the canvas and the zoom."""
    workflow = json.loads(workflow_path.read_text())
    with chromium_page(url, workflow, workflow_path.name, width, height) as page:
        shown = fit_view(page, left_out=LEFT_OUT_OF_FIT)
        time.sleep(SETTLE_S)
        save_screenshot(page, out)
    return shown


def take_panel_screenshot(server, out: Path, width: int, height: int) -> dict:
    """Queues the demo's run on tiny SD 3.5 files, with the SD 3.5 example open in the page, and saves a
    picture of the Train LoRA node once its panel has a chart and a strip of samples; then stops the run.
    Returns what the panel shows."""
    model_files = write_sd3_loader_files(server.models_dir)
    write_dataset(server.input_dir / DATASET)
    graph = set_inputs(demo_graph(server.get_json("/object_info"), model_files), {TRAIN_NODE: PANEL_RUN})
    with chromium_page(server.url, json.loads(EXAMPLE.read_text()), EXAMPLE.name, width, height,
                       pixel_ratio=2) as page:
        # The page shows the values the queued graph runs with.
        (train,) = nodes_of(graph, TRAIN_NODE)
        set_widgets(page, {TRAIN_NODE: {k: v for k, v in train["inputs"].items() if not isinstance(v, list)}})
        fit_view(page, only=[TRAIN_NODE])
        prompt_id = server.post_prompt(graph)
        page.wait_for_function(PANEL_FILLED, timeout=0)
        time.sleep(SETTLE_S)
        save_screenshot(page, out, clip=page.evaluate(NODE_RECT, TRAIN_NODE))
        shown = panel_data(page)
    server.post_json("/interrupt", {})
    server.history_entry(prompt_id)
    return shown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflow", type=Path, default=DEFAULT_WORKFLOW, help="a UI-format workflow file")
    parser.add_argument("--panel", action="store_true",
                        help="picture the Train LoRA node's panel during the demo's run instead")
    parser.add_argument("--out", type=Path,
                        help="the picture, .png or .jpg (default: docs/graph.png, with --panel docs/panel.png)")
    parser.add_argument("--width", type=int, default=1600, help="page width in pixels (default: %(default)s)")
    parser.add_argument("--height", type=int, default=900, help="page height in pixels (default: %(default)s)")
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    # Both checked before ComfyUI starts, which takes a while.
    if not Path(CHROMIUM).is_file():
        parser.error(f"no Chromium at {CHROMIUM}: run `make browser`")
    if importlib.util.find_spec("playwright") is None:
        parser.error("no playwright package: run `make browser`")

    with tempfile.TemporaryDirectory(prefix="lora-trainer-screenshot-") as folder:
        log.info("Starting ComfyUI from %s ...", HOST)
        with running_comfy_server(Path(folder)) as server:
            server.post_json("/settings", SETTINGS)
            if options.panel:
                out = options.out or PANEL_OUT
                log.info("ComfyUI is up at %s; training the demo's run with the panel open.", server.url)
                shown = take_panel_screenshot(server, out, options.width, options.height)
                log.info("Saved %s (%d KB): %s", out, out.stat().st_size // 1024, shown)
                return 0
            out = options.out or DEFAULT_OUT
            log.info("ComfyUI is up at %s; opening %s in Chromium.", server.url, options.workflow.name)
            shown = take_screenshot(server.url, options.workflow, out, options.width, options.height)
    log.info("Saved %s (%d KB) at zoom %.2f: %s", out, out.stat().st_size // 1024, shown["scale"],
             ", ".join(shown["types"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
