"""ComfyUI's page in Debian's headless Chromium, driven by Playwright (its Python package carries
playwright-core as its driver; Chromium is the system's, so nothing downloads a browser).

Used by the browser tests and by scripts/screenshot.py.
"""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps trying to reach Google's hosts, which
# this offline machine refuses.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAGE_TIMEOUT_MS = 120_000

# A fresh user folder would open the template browser on a blank workflow; the minimap and the canvas
# statistics would cover nodes. POST these to /settings before opening the page.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}
# The page reopens the workflow the browser's storage holds, as its only tab, named after the file; the
# "Nodes 2.0" banner remembers there that it was dismissed.
STORAGE = """([workflow, name]) => {
    if (localStorage.getItem("workflow") === null) {
        localStorage.setItem("workflow", workflow);
        localStorage.setItem("Comfy.PreviousWorkflow", name);
    }
    localStorage.setItem("vueNodesBannerDismissed", "true");
}"""

# Ready once the app has its canvas, knows this pack's nodes and has reopened the whole workflow.
GRAPH_READY = """(count) => {
    const app = window.app ?? window.comfyAPI?.app?.app;
    return Boolean(app?.canvas && window.LiteGraph?.registered_node_types?.LoraTrainer_TrainLoRA
                   && app.graph?.nodes.length === count);
}"""

# Fits the nodes (title bars included) into the part of the canvas that no menu covers (the frontend's
# .graph-canvas-panel), aligned to its top left corner; nodes of the `leftOut` types may run off the
# edge, and where `only` is given just those types are fitted. A screen point is (canvas point + offset)
# * scale.
FIT_VIEW = """({leftOut, only, margin}) => {
    const app = window.app ?? window.comfyAPI.app.app;
    const title = window.LiteGraph.NODE_TITLE_HEIGHT;
    const nodes = app.graph.nodes.filter((n) => !leftOut.includes(n.type) && (!only || only.includes(n.type)));
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

# Sets widget values by node type and widget name, e.g. {"KSampler": {"steps": 4}}.
SET_WIDGETS = """(settings) => {
    const app = window.app ?? window.comfyAPI.app.app;
    for (const node of app.graph.nodes) {
        for (const [name, value] of Object.entries(settings[node.type] ?? {})) {
            const widget = node.widgets.find((w) => w.name === name);
            if (!widget) throw new Error(`${node.type} has no widget ${name}`);
            widget.value = value;
        }
    }
    app.canvas.setDirty(true, true);
}"""


@contextmanager
def chromium_page(url: str, workflow: dict, name: str, width: int = 1600, height: int = 1000,
                  pixel_ratio: float = 1.0) -> Iterator:
    """A Playwright page on ComfyUI at `url` whose open workflow is `workflow` (until the page saves
    another), ready once the graph is on the canvas. Page errors are collected in `page.errors`."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height}, device_scale_factor=pixel_ratio)
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            page.errors = []
            page.on("pageerror", lambda error: page.errors.append(str(error)))
            page.add_init_script(f"({STORAGE})({json.dumps([json.dumps(workflow), name])})")
            page.goto(url)
            wait_for_graph(page, len(workflow["nodes"]))
            yield page
        finally:
            browser.close()


def wait_for_graph(page, node_count: int) -> None:
    page.wait_for_function(GRAPH_READY, arg=node_count)


def fit_view(page, left_out=(), only=None, margin: int = 16) -> dict:
    return page.evaluate(FIT_VIEW, {"leftOut": list(left_out), "only": list(only) if only else None,
                                    "margin": margin})


def set_widgets(page, settings: dict[str, dict]) -> None:
    page.evaluate(SET_WIDGETS, settings)


def panel_data(page) -> dict:
    """The data attributes of the first Train LoRA panel on the page (run id, status, points, last loss,
    samples)."""
    return page.evaluate("() => ({...document.querySelector('.lora-panel').dataset})")


def save_screenshot(page, out: Path, clip: dict | None = None) -> None:
    """JPEG for a .jpg name, else PNG; `clip` ({x, y, width, height}) for part of the page."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() in (".jpg", ".jpeg"):
        page.screenshot(path=str(out), type="jpeg", quality=85, clip=clip)
    else:
        page.screenshot(path=str(out), type="png", clip=clip)
