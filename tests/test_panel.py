"""The live training panel: the run records and routes behind it (in-process and over HTTP), and the
panel itself in Debian's headless Chromium against the live server, following a tiny Flux run of the
Flux example workflow: chart, sample strip, reload mid-run, Stop and save, and the resumed run.
"""

import importlib
import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
from browser import (
    CHROMIUM,
    SETTINGS,
    chromium_page,
    fit_view,
    panel_data,
    save_screenshot,
    set_widgets,
    wait_for_graph,
)
from graph_data import write_dataset
from live_server import ComfyServer, ComfyServerError
from test_server import PACK_MODULE, import_pack

from trainer_core.trainer import ALLOCATOR_NOTICE

REPO_ROOT = Path(__file__).resolve().parents[1]
FLUX_EXAMPLE = REPO_ROOT / "example_workflows" / "train_flux_lora.json"
TIMEOUT_MS = 240_000
PANEL = ".lora-panel"
# Long enough to be stopped by the test; samples and validates often, so the strip and the validation line
# fill early (the Flux example holds a tenth of the dataset out: one of its four images).
PANEL_RUN = {
    "LoraTrainer_Dataset": {"resolution": 64},
    "LoraTrainer_TrainLoRA": {"steps": 100_000, "save_every": 0, "sample_every": 3, "sample_size": 64,
                              "warmup_steps": 1, "optimizer": "adamw", "precision": "fp32", "learning_rate": 1e-3,
                              "validation_every": 2},
    "KSampler": {"steps": 2},
    "EmptySD3LatentImage": {"width": 64, "height": 64},
}
@pytest.fixture(scope="module")
def live_runs():
    import_pack()
    return importlib.import_module(f"{PACK_MODULE}.nodes.live_runs")


def event(kind: str, /, **data):
    from trainer_core.job import Event

    return Event(kind, data)


def step_event(step: int, loss: float, peak_vram_bytes: int | None = None, blocks_swapped: int = 0, notice: str = ""):
    return event("step", step=step, total_steps=10, loss=loss, lr=1e-4, images_per_second=2.0, eta_seconds=3.0,
                 elapsed_seconds=1.5, peak_vram_bytes=peak_vram_bytes, blocks_swapped=blocks_swapped, notice=notice)


# -- the run record ------------------------------------------------------------------------------------


def test_a_run_record_keeps_what_a_reloaded_page_needs(live_runs, tmp_path: Path) -> None:
    output = tmp_path / "output"
    run = live_runs.RunRecord("7", "my_lora", 10, job=None, output_dir=output, checkpoint_hook=None)
    sample_file = output / "my_lora" / "samples" / "step000002_00.png"

    sent = [run.record(event("started", step=0, total_steps=10, compiling=True))]
    assert run.snapshot()["compiling"] and run.snapshot()["status"] == "running"
    assert run.snapshot()["notice"] == "", "the notice comes with the steps, once the run has planned its memory"
    sent += [run.record(step_event(1, 0.5, notice="steps run without graphs")),
             run.record(step_event(2, 0.25, notice="steps run without graphs"))]
    sent.append(run.record(event("sample", step=2, images=torch.zeros(1, 8, 8, 3), files=[str(sample_file)],
                                 prompts=["a cat"])))
    sent.append(run.record(event("saved", kind="checkpoint", path=str(output / "x"), lora="y", step=2)))
    sent.append(run.record(event("done", cancelled=True, step=2)))

    assert all(data["run_id"] == run.run_id and data["node"] == "7" for data in sent)
    assert "images" in sent[3] and not isinstance(sent[3]["images"][0], torch.Tensor)
    snapshot = run.snapshot()
    json.dumps(snapshot)  # what the status route sends
    assert snapshot["history"] == {"step": [1, 2], "loss": [0.5, 0.25], "lr": [1e-4, 1e-4],
                                   "validation": {"step": [], "loss": []}}
    assert (snapshot["step"], snapshot["total_steps"], snapshot["status"]) == (2, 10, "stopped")
    assert (snapshot["images_per_second"], snapshot["eta_seconds"], snapshot["compiling"]) == (2.0, 3.0, False)
    # The notice holds for the whole run, after its steps and its end too.
    assert snapshot["notice"] == "steps run without graphs"
    assert snapshot["samples"] == [{"step": 2, "prompt": "a cat", "image": {
        "filename": "step000002_00.png", "subfolder": "my_lora/samples", "type": "output"}}]
    assert snapshot["saves"] == [{"kind": "checkpoint", "step": 2}]


def test_a_run_record_keeps_the_validation_losses_beside_the_steps(live_runs, tmp_path: Path) -> None:
    run = live_runs.RunRecord("7", "my_lora", 10, job=None, output_dir=tmp_path, checkpoint_hook=None)
    for step in (1, 2, 3, 4):
        run.record(step_event(step, 1.0 / step))
        if step % 2 == 0:
            sent = run.record(event("validation", step=step, total_steps=10, validation_loss=0.1 * step))
    assert sent["validation_loss"] == 0.4 and sent["run_id"] == run.run_id
    history = run.snapshot()["history"]
    # The steps' lists as before, one entry per step; the evaluations apart.
    assert (history["step"], history["loss"]) == ([1, 2, 3, 4], [1.0, 0.5, 1 / 3, 0.25])
    assert history["validation"] == {"step": [2, 4], "loss": [0.2, 0.4]}


def test_a_run_record_keeps_the_newest_peak_vram_and_none_off_cuda(live_runs, tmp_path: Path) -> None:
    run = live_runs.RunRecord("7", "my_lora", 10, job=None, output_dir=tmp_path, checkpoint_hook=None)
    run.record(step_event(1, 0.5))
    assert run.snapshot()["peak_vram_bytes"] is None
    sent = run.record(step_event(2, 0.25, peak_vram_bytes=6_979_321_856, blocks_swapped=16))
    assert sent["peak_vram_bytes"] == run.snapshot()["peak_vram_bytes"] == 6_979_321_856
    # Block swap's count, for a page that reloads mid-run.
    assert sent["blocks_swapped"] == run.snapshot()["blocks_swapped"] == 16


def test_a_sample_outside_the_output_folder_is_never_pointed_at(live_runs, tmp_path: Path) -> None:
    run = live_runs.RunRecord("7", "x", 10, job=None, output_dir=tmp_path / "output", checkpoint_hook=None)
    outside = tmp_path / "elsewhere" / "secret.png"
    escaping = tmp_path / "output" / ".." / "elsewhere" / "secret.png"

    data = run.record(event("sample", step=1, files=[str(outside), str(escaping)], prompts=["a", "b"]))

    assert data["images"] == [None, None]
    assert [s["image"] for s in run.snapshot()["samples"]] == [None, None]


def test_a_failed_run_keeps_its_message_but_not_its_traceback(live_runs, tmp_path: Path) -> None:
    run = live_runs.RunRecord("3", "x", 10, job=None, output_dir=tmp_path, checkpoint_hook=None)
    data = run.record(event("error", message="out of memory", traceback="Traceback ..."))
    assert "traceback" not in data
    assert (run.snapshot()["status"], run.snapshot()["error"]) == ("failed", "out of memory")


def test_the_run_list_keeps_the_newest_finished_runs_and_every_running_one(live_runs, tmp_path: Path) -> None:
    runs = live_runs.LiveRuns(kept=1)
    records = [runs.add(live_runs.RunRecord(str(i % 2), "x", 1, None, tmp_path, None)) for i in range(3)]
    for record in records[1:]:
        record.record(event("done", cancelled=False, step=1))
    newest = runs.add(live_runs.RunRecord("1", "x", 1, None, tmp_path, None))

    assert runs.find(records[0].run_id) is records[0], "a running run is never dropped"
    assert runs.find(records[1].run_id) is None
    assert runs.newest() is newest and runs.newest("0") is records[2] and runs.newest("9") is None


def test_the_panel_actions_say_what_is_wrong_with_a_request(live_runs) -> None:
    def refused(body) -> tuple[int, str]:
        with pytest.raises(live_runs.RequestError) as error:
            live_runs.stop_and_save(body)
        return error.value.status, str(error.value)

    assert refused(None)[0] == 400 and "run_id" in refused(None)[1]
    assert refused({"run_id": 5}) == refused(None)
    assert refused({"run_id": "../../etc"}) == (400, "run_id must be 32 hex digits, not '../../etc'")
    unknown = uuid.uuid4().hex
    assert refused({"run_id": unknown}) == (404, f"no run {unknown} on this server")
    with pytest.raises(live_runs.RequestError, match="node must be a node id"):
        live_runs.status_of({"node": "<script>"})


# -- the routes on the live server -----------------------------------------------------------------------


def http_error(server: ComfyServer, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + path, data=body, method=method)
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=30)
    return error.value.code, json.loads(error.value.read())


def test_the_routes_refuse_bad_input_with_a_message(comfy_server: ComfyServer) -> None:
    assert http_error(comfy_server, "GET", "/lora_trainer/status?node=..%2F..") == (
        400, {"error": "node must be a node id such as '12' or '5:3', not '../..'"})
    code, answer = http_error(comfy_server, "POST", "/lora_trainer/save_now", b"not json")
    assert code == 400 and "run_id" in answer["error"]
    unknown = uuid.uuid4().hex
    assert http_error(comfy_server, "POST", "/lora_trainer/stop", json.dumps({"run_id": unknown}).encode()) == (
        404, {"error": f"no run {unknown} on this server"})
    assert comfy_server.get_json("/lora_trainer/status?node=99999") == {"run": None}


# -- the panel in the browser ------------------------------------------------------------------------


def wait_for_panel(page, condition: str) -> dict:
    """Waits until `condition` (JS over `d`, the panel's data attributes) holds; returns them."""
    script = f"() => {{ const d = document.querySelector('{PANEL}')?.dataset; return d && ({condition}); }}"
    page.wait_for_function(script, timeout=TIMEOUT_MS)
    return panel_data(page)


def flux_example_on_tiny_flux() -> dict:
    """The Flux example as saved, with the test-only loader of a tiny Flux in place of Load Base Model
    (ComfyUI's loaders detect Flux only at full width)."""
    workflow = json.loads(FLUX_EXAMPLE.read_text())
    (loader,) = [node for node in workflow["nodes"] if node["type"] == "LoraTrainer_LoadBaseModel"]
    loader.update(type="TestTinyModelLoader", widgets_values=["flux_dev"])
    return workflow


def validation_pixels(page) -> int:
    """Pixels of the chart's canvas in the validation line's colour (#ffa94d)."""
    return page.evaluate(f"""() => {{
        const canvas = document.querySelector("{PANEL} canvas");
        const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        let count = 0;
        for (let i = 0; i < data.length; i += 4) {{
            if (Math.abs(data[i] - 255) < 24 && Math.abs(data[i + 1] - 169) < 24 && Math.abs(data[i + 2] - 77) < 24
                && data[i + 3] > 200) count++;
        }}
        return count;
    }}""")


def queue(page, settings: dict) -> None:
    set_widgets(page, settings)
    page.get_by_test_id("queue-button").first.click()


def test_the_panel_follows_a_flux_run_reloads_stops_and_resumes(comfy_server: ComfyServer, tmp_path: Path) -> None:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: run `make browser`")
    write_dataset(comfy_server.input_dir / "panel_dataset")
    comfy_server.post_json("/settings", SETTINGS)
    name = f"panel-{uuid.uuid4().hex[:8]}"
    shots = tmp_path / "screenshots"
    workflow = flux_example_on_tiny_flux()
    settings = PANEL_RUN | {
        "LoraTrainer_Dataset": PANEL_RUN["LoraTrainer_Dataset"] | {"folder": "panel_dataset"},
        "LoraTrainer_TrainLoRA": PANEL_RUN["LoraTrainer_TrainLoRA"] | {"output_name": name},
    }

    with comfy_server.events() as events, chromium_page(comfy_server.url, workflow, FLUX_EXAMPLE.name) as page:
        assert page.locator(PANEL).count() == 1, "the Train LoRA node has the panel"
        # It may show an earlier run of a node with this id (the session's server has run the example).
        earlier = panel_data(page)["runId"]
        fit_view(page, only=["LoraTrainer_TrainLoRA"])
        queue(page, settings)

        running = wait_for_panel(page, f"d.runId !== '{earlier}' && Number(d.points) >= 4 && Number(d.samples) >= 1 "
                                       "&& Number(d.validationPoints) >= 2")
        # The newest sample leads the strip, loaded from the file the run saved (64 px previews).
        page.wait_for_function(f"""() => {{
            const img = document.querySelector("{PANEL} .lora-strip img");
            return img && img.complete && img.naturalWidth === 64;
        }}""", timeout=TIMEOUT_MS)
        strip_image = page.locator(f"{PANEL} .lora-strip img").first
        save_screenshot(page, shots / "1-running.png")
        strip_image.click()
        lightbox = page.locator(".lora-lightbox")
        assert lightbox.locator("div").inner_text().startswith("step ")
        save_screenshot(page, shots / "2-enlarged.png")
        lightbox.click()
        assert lightbox.count() == 0

        page.get_by_role("button", name="Save now").click()
        page.get_by_text("checkpoint saved at step").wait_for()
        (saved,) = [m["data"] for m in events.messages("lora_trainer.saved") if m["data"]["run_id"] == running["runId"]]
        assert saved["kind"] == "checkpoint"
        assert (comfy_server.output_dir / name / "checkpoints" / f"step-{saved['step']:06d}" / "resume.json").is_file()

        page.reload()
        wait_for_graph(page, len(workflow["nodes"]))
        reloaded = wait_for_panel(page, f"d.runId === '{running['runId']}' && Number(d.points) >= {running['points']}")
        assert reloaded["status"] == "running"
        history = comfy_server.get_json("/lora_trainer/status")["run"]["history"]
        assert history["step"][:int(running["points"])] == list(range(1, int(running["points"]) + 1))
        save_screenshot(page, shots / "3-reloaded.png")

        fit_view(page, only=["LoraTrainer_TrainLoRA"])
        page.get_by_role("button", name="Stop and save").click()
        stopped = wait_for_panel(page, "d.status === 'stopped'")
        save_screenshot(page, shots / "4-stopped.png")

        events.wait_for(lambda m: m["type"] == "lora_trainer.done" and m["data"]["run_id"] == running["runId"])
        steps = [m["data"] for m in events.messages("lora_trainer.step") if m["data"]["run_id"] == running["runId"]]
        run = comfy_server.get_json("/lora_trainer/status")["run"]
        history = run["history"]
        assert float(stopped["lastLoss"]) == steps[-1]["loss"] == history["loss"][-1]
        # The validation loss: every second step's, drawn as the chart's second (orange) line, its newest shown.
        validation = history["validation"]
        assert validation["step"] == list(range(2, history["step"][-1] + 1, 2))
        assert int(stopped["validationPoints"]) == len(validation["loss"])
        assert float(stopped["lastValidationLoss"]) == validation["loss"][-1]
        assert validation_pixels(page) > 20, "the chart draws the validation line"
        assert page.locator(f"{PANEL} .lora-stats > div", has_text="validation").is_visible()
        assert int(stopped["points"]) == len(history["loss"]) == history["step"][-1]
        # This socket can miss broadcasts around the page's reload (once on 0.3.75 it got 15 of the 18 step
        # events the panel drew; cause not traced); every step it did get is in the run's history.
        by_step = dict(zip(history["step"], history["loss"], strict=True))
        assert all(by_step[s["step"]] == s["loss"] for s in steps)
        stop_step = run["step"]
        assert run["saves"] == [{"kind": "checkpoint", "step": step} for step in (saved["step"], stop_step)]
        assert (comfy_server.output_dir / name / "checkpoints" / f"step-{stop_step:06d}").is_dir()
        with pytest.raises(ComfyServerError, match="has already ended"):
            comfy_server.post_json("/lora_trainer/stop", {"run_id": running["runId"]})

        queue(page, {"LoraTrainer_TrainLoRA": {"resume_from": "latest", "steps": stop_step + 2, "sample_every": 0}})
        finished = wait_for_panel(page, f"d.runId !== '{running['runId']}' && d.status === 'finished'")
        save_screenshot(page, shots / "5-resumed.png")
        peak_cell = page.locator(f"{PANEL} .lora-stats > div", has_text="peak VRAM")
        assert finished["peakVram"] == "" and peak_cell.is_hidden(), "a run on the CPU shows no peak VRAM"
        swapped_cell = page.locator(f"{PANEL} .lora-stats > div", has_text="blocks swapped")
        assert finished["blocksSwapped"] == "" and swapped_cell.is_hidden(), "a run without block swap says nothing"
        # A run on CUDA sends its peak with every step; this server trains on the CPU, so the page is handed
        # one such event as the websocket hands it over.
        node = comfy_server.get_json("/lora_trainer/status")["run"]["node"]
        cuda_step = {"run_id": finished["runId"], "node": node, "step": stop_step + 3, "total_steps": stop_step + 3,
                     "loss": 0.5, "lr": 1e-3, "images_per_second": 1.0, "eta_seconds": 0.0,
                     "peak_vram_bytes": 6_979_321_856, "blocks_swapped": 16}
        page.evaluate("(detail) => window.comfyAPI.api.api.dispatchCustomEvent('lora_trainer.step', detail)",
                      cuda_step)
        assert wait_for_panel(page, "d.peakVram !== ''")["peakVram"] == "6.50 GiB"
        assert peak_cell.is_visible() and peak_cell.inner_text().split() == ["peak", "VRAM", "6.50", "GiB"]
        assert panel_data(page)["blocksSwapped"] == "16"
        assert swapped_cell.is_visible() and swapped_cell.inner_text().split() == ["blocks", "swapped", "16"]
        # A run whose steps ComfyUI's default allocator (cudaMallocAsync) keeps from CUDA graphs says so with its
        # steps; this server's runs are on the CPU, so the page is handed such a run's start and first step.
        notice_line = page.locator(f"{PANEL} .lora-notice")
        assert finished["notice"] == "" and notice_line.is_hidden(), "a run with its steps recorded says nothing"
        async_run = {"run_id": "under-cuda-malloc-async", "node": node, "step": 0, "total_steps": 5}
        page.evaluate("(detail) => window.comfyAPI.api.api.dispatchCustomEvent('lora_trainer.started', detail)",
                      async_run | {"compiling": False})
        page.evaluate("(detail) => window.comfyAPI.api.api.dispatchCustomEvent('lora_trainer.step', detail)",
                      cuda_step | async_run | {"step": 1, "notice": ALLOCATOR_NOTICE})
        assert wait_for_panel(page, "d.notice !== ''")["notice"] == ALLOCATOR_NOTICE
        assert notice_line.is_visible() and "--disable-cuda-malloc" in notice_line.inner_text()
        assert not page.errors, f"the page raised: {page.errors}"

    resumed = comfy_server.get_json("/lora_trainer/status")["run"]
    assert resumed["run_id"] == finished["runId"]
    assert resumed["history"]["step"] == [stop_step + 1, stop_step + 2], "the next run resumed from the checkpoint"
    assert (comfy_server.models_dir / "loras" / name / f"{name}.safetensors").is_file()
