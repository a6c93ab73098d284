"""Takes the README's screenshot, docs/graph.png: an example workflow in ComfyUI's page, in headless Chromium.

It starts a headless ComfyUI with this pack through the demo's server helper (scripts/demo.py: same
host folder, CPU mode, the server's folders in a temp folder), opens the page in Chromium with the
workflow as the one open tab, fits the view to the graph, saves the picture and stops the server.
Nothing is queued and no model file is needed: the loaders' widgets show the names the workflow holds.

It needs two things that `make test` does not install (nothing is downloaded at run time):
    apt-get install chromium                      # Debian's Chromium, run from /usr/bin/chromium
    .venv/bin/python -m pip install playwright    # the package and its driver; no `playwright install`
then: .venv/bin/python scripts/screenshot.py [--workflow example_workflows/train_sd35_lora.json] [--out x.jpg]
"""

import argparse
import importlib.util
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

# Importing the demo sets up the import paths (tests/, the ComfyUI host) the way `make demo` runs.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo import HOST, REPO_ROOT, running_comfy_server  # noqa: E402

log = logging.getLogger("screenshot")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DEFAULT_WORKFLOW = REPO_ROOT / "example_workflows" / "train_flux_lora.json"
DEFAULT_OUT = REPO_ROOT / "docs" / "graph.png"
PAGE_TIMEOUT_MS = 120_000
# Seconds for the last frames (fonts, links) to be drawn after the view is set.
SETTLE_S = 1.0

# A fresh user folder would open the template browser on a blank workflow; the minimap and the canvas
# statistics would cover nodes.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}
# The page reopens the workflow the browser's storage holds, as its only tab, named after the file; the
# "Nodes 2.0" banner remembers there that it was dismissed.
STORAGE = """([workflow, name]) => {
    localStorage.setItem("workflow", workflow);
    localStorage.setItem("Comfy.PreviousWorkflow", name);
    localStorage.setItem("vueNodesBannerDismissed", "true");
}"""
# The output end of the sampler chain may run off the right edge: the training nodes, LoRA Loader and
# KSampler are what the picture is about, and they stay readable that way.
LEFT_OUT_OF_FIT = ("VAEDecode", "SaveImage")

# Ready once the app has its canvas, knows this pack's nodes and has reopened the whole workflow.
GRAPH_READY = """(count) => {
    const app = window.app ?? window.comfyAPI?.app?.app;
    return Boolean(app?.canvas && window.LiteGraph?.registered_node_types?.LoraTrainer_TrainLoRA
                   && app.graph?.nodes.length === count);
}"""

# Fits the nodes (title bars included) into the part of the canvas that no menu covers (the frontend's
# .graph-canvas-panel), aligned to its top left corner. A screen point is (canvas point + offset) * scale.
FIT_VIEW = """({leftOut, margin}) => {
    const app = window.app ?? window.comfyAPI.app.app;
    const title = window.LiteGraph.NODE_TITLE_HEIGHT;
    const nodes = app.graph.nodes.filter((n) => !leftOut.includes(n.type));
    const left = Math.min(...nodes.map((n) => n.pos[0])) - margin;
    const top = Math.min(...nodes.map((n) => n.pos[1] - title)) - margin;
    const right = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])) + margin;
    const bottom = Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + margin;
    const panel = document.querySelector(".graph-canvas-panel").getBoundingClientRect();
    const scale = Math.min(panel.width / (right - left), panel.height / (bottom - top));
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [panel.left / scale - left, panel.top / scale - top];
    app.canvas.setDirty(true, true);
    return {types: app.graph.nodes.map((n) => n.type), scale};
}"""


def take_screenshot(url: str, workflow_path: Path, out: Path, width: int, height: int) -> dict:
    """Opens ComfyUI at `url` in headless Chromium with the workflow file as its tab, fits the view and
    saves `out` (JPEG for a .jpg name, else PNG). Returns the node types on the canvas and the zoom."""
    from playwright.sync_api import sync_playwright

    workflow = json.loads(workflow_path.read_text())
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            page.add_init_script(f"({STORAGE})({json.dumps([json.dumps(workflow), workflow_path.name])})")
            page.goto(url)
            page.wait_for_function(GRAPH_READY, arg=len(workflow["nodes"]))
            shown = page.evaluate(FIT_VIEW, {"leftOut": list(LEFT_OUT_OF_FIT), "margin": 16})
            time.sleep(SETTLE_S)
            out.parent.mkdir(parents=True, exist_ok=True)
            if out.suffix.lower() in (".jpg", ".jpeg"):
                page.screenshot(path=str(out), type="jpeg", quality=85)
            else:
                page.screenshot(path=str(out), type="png")
        finally:
            browser.close()
    return shown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflow", type=Path, default=DEFAULT_WORKFLOW, help="a UI-format workflow file")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="the picture, .png or .jpg (default: docs/graph.png)")
    parser.add_argument("--width", type=int, default=1600, help="page width in pixels (default: %(default)s)")
    parser.add_argument("--height", type=int, default=900, help="page height in pixels (default: %(default)s)")
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    # Both checked before ComfyUI starts, which takes a while.
    if not Path(CHROMIUM).is_file():
        parser.error(f"no Chromium at {CHROMIUM}: apt-get install chromium")
    if importlib.util.find_spec("playwright") is None:
        parser.error("no playwright package: .venv/bin/python -m pip install playwright")

    with tempfile.TemporaryDirectory(prefix="lora-trainer-screenshot-") as folder:
        log.info("Starting ComfyUI from %s ...", HOST)
        with running_comfy_server(Path(folder)) as server:
            server.post_json("/settings", SETTINGS)
            log.info("ComfyUI is up at %s; opening %s in Chromium.", server.url, options.workflow.name)
            shown = take_screenshot(server.url, options.workflow, options.out, options.width, options.height)
    log.info("Saved %s (%d KB) at zoom %.2f: %s", options.out, options.out.stat().st_size // 1024, shown["scale"],
             ", ".join(shown["types"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
