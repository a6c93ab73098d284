// The live training panel on the Train LoRA node: loss chart (with the validation loss where the dataset holds
// images out), learning rate, step, speed, ETA, peak VRAM
// (on CUDA), the newest sample images, the Save now / Stop and save actions, and a notice where ComfyUI's
// allocator keeps the steps from CUDA graphs. It follows the pack's
// websocket events (`lora_trainer.*`) and, when a page opens or reloads, redraws from /lora_trainer/status.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { LossChart, smoothed } from "./loss_chart.js";

const NODE_TYPE = "LoraTrainer_TrainLoRA";
const WIDGET_NAME = "lora_trainer_panel";
const EVENT_KINDS = ["started", "step", "validation", "sample", "saved", "done", "error"];
const COMPILING = "compiling the model's blocks: the first step takes a minute or two";
const STRIP_LENGTH = 8;
const PANEL_HEIGHT = 360;
const STATUS_TEXT = { running: "training", finished: "finished", stopped: "stopped, checkpoint saved", failed: "failed" };

const STYLE = `
.lora-panel { display: flex; flex-direction: column; gap: 6px; height: 100%; box-sizing: border-box;
  padding: 6px; font: 12px sans-serif; color: var(--input-text, #ddd);
  background: var(--comfy-input-bg, #222); border-radius: 6px; overflow: hidden; }
.lora-panel .lora-stats { display: grid; grid-template-columns: repeat(3, 1fr); gap: 2px 10px; }
.lora-panel .lora-stats b { font-weight: 600; }
.lora-panel .lora-stats span { color: var(--descrip-text, #999); }
.lora-panel .lora-chart { flex: 1 1 auto; min-height: 120px; width: 100%; color: var(--descrip-text, #999); }
.lora-panel .lora-row { display: flex; gap: 6px; align-items: center; }
.lora-panel .lora-row .lora-grow { flex: 1; }
.lora-panel button { font: inherit; padding: 2px 8px; border-radius: 4px; cursor: pointer;
  border: 1px solid var(--border-color, #555); background: var(--comfy-menu-bg, #333); color: inherit; }
.lora-panel button:disabled { opacity: 0.4; cursor: default; }
.lora-panel .lora-strip { display: flex; gap: 4px; height: 64px; overflow-x: auto; }
.lora-panel .lora-strip figure { margin: 0; position: relative; flex: 0 0 auto; cursor: zoom-in; }
.lora-panel .lora-strip img { height: 64px; width: 64px; object-fit: cover; border-radius: 3px; }
.lora-panel .lora-strip figcaption { position: absolute; bottom: 0; left: 0; right: 0; font-size: 9px;
  text-align: center; background: rgba(0, 0, 0, 0.55); color: #fff; }
.lora-panel .lora-message { min-height: 1em; color: var(--descrip-text, #999); }
.lora-panel .lora-notice { color: var(--descrip-text, #999); font-style: italic; }
.lora-lightbox { position: fixed; inset: 0; z-index: 10000; display: flex; flex-direction: column;
  align-items: center; justify-content: center; gap: 8px; background: rgba(0, 0, 0, 0.85); color: #eee;
  font: 14px sans-serif; cursor: zoom-out; }
.lora-lightbox img { max-width: 90vw; max-height: 80vh; image-rendering: auto; }
`;

function element(tag, properties = {}, children = []) {
  const node = Object.assign(document.createElement(tag), properties);
  node.append(...children);
  return node;
}

function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const pad = (n) => String(n).padStart(2, "0");
  return h ? `${h}:${pad(m)}:${pad(s % 60)}` : `${m}:${pad(s % 60)}`;
}

// Bytes as GiB, as the terminal shows them; "" for none (a run off CUDA has no peak to show).
function formatMemory(bytes) {
  return Number.isFinite(bytes) ? `${(bytes / 2 ** 30).toFixed(2)} GiB` : "";
}

function viewUrl(image) {
  const query = new URLSearchParams({ filename: image.filename, subfolder: image.subfolder, type: image.type });
  return api.apiURL(`/view?${query}`);
}

function showLightbox(sample) {
  const box = element("div", { className: "lora-lightbox" }, [
    element("img", { src: viewUrl(sample.image), alt: sample.prompt }),
    element("div", { textContent: `step ${sample.step}: ${sample.prompt}` }),
  ]);
  box.addEventListener("click", () => box.remove());
  document.body.append(box);
}

class TrainPanel {
  constructor(node) {
    this.node = node;
    this.refreshing = false;
    this.refreshAgain = false;
    this.reset(null);
    const stat = (label) => {
      const value = element("b", { textContent: "–" });
      return [value, element("div", {}, [element("span", { textContent: `${label} ` }), value])];
    };
    const [step, stepCell] = stat("step");
    const [loss, lossCell] = stat("loss");
    const [smooth, smoothCell] = stat("smoothed");
    const [lr, lrCell] = stat("lr");
    const [speed, speedCell] = stat("img/s");
    const [eta, etaCell] = stat("ETA");
    const [peak, peakCell] = stat("peak VRAM");
    const [swapped, swappedCell] = stat("blocks swapped");
    const [validation, validationCell] = stat("validation");
    this.fields = { step, loss, smooth, lr, speed, eta, peak, swapped, validation };
    this.peakCell = peakCell;
    this.swappedCell = swappedCell;
    this.validationCell = validationCell;
    this.canvas = element("canvas", { className: "lora-chart" });
    this.chart = new LossChart(this.canvas);
    this.logToggle = element("input", { type: "checkbox", title: "Logarithmic loss axis" });
    this.logToggle.addEventListener("change", () => {
      this.chart.logScale = this.logToggle.checked;
      this.chart.draw();
    });
    this.statusLine = element("span", { className: "lora-grow" });
    this.saveButton = element("button", { textContent: "Save now", title: "Save a resumable checkpoint at the next step" });
    this.stopButton = element("button", { textContent: "Stop and save", title: "End the run at the next step with a resumable checkpoint" });
    this.saveButton.addEventListener("click", () => this.act("save_now", "checkpoint requested…"));
    this.stopButton.addEventListener("click", () => this.act("stop", "stopping after this step…"));
    this.strip = element("div", { className: "lora-strip" });
    this.message = element("div", { className: "lora-message" });
    // What the run says for its whole length: steps held back from CUDA graphs by ComfyUI's allocator.
    this.notice = element("div", { className: "lora-notice" });
    this.root = element("div", { className: "lora-panel" }, [
      element("div", { className: "lora-stats" }, [stepCell, lossCell, smoothCell, lrCell, speedCell, etaCell, validationCell, peakCell, swappedCell]),
      this.canvas,
      element("div", { className: "lora-row" }, [
        element("label", {}, [this.logToggle, " log"]), this.statusLine, this.saveButton, this.stopButton,
      ]),
      this.strip,
      this.notice,
      this.message,
    ]);
    new ResizeObserver(() => this.chart.draw()).observe(this.canvas);
    this.render();
  }

  reset(runId) {
    this.runId = runId;
    this.status = null;
    this.total = 0;
    this.history = { step: [], loss: [], lr: [] };
    this.validation = { step: [], loss: [] };
    this.rates = {};
    this.samples = [];
    this.noticeText = "";
  }

  // A whole run, from the status route.
  load(run) {
    if (!run) return;
    this.reset(run.run_id);
    this.status = run.status;
    this.total = run.total_steps;
    const { validation, ...history } = run.history;
    this.history = history;
    // A server from before validation losses sends none.
    this.validation = validation ?? { step: [], loss: [] };
    this.rates = run;
    this.samples = run.samples.filter((s) => s.image);
    // A server from before notices sends none.
    this.noticeText = run.notice ?? "";
    this.message.textContent = run.error ?? (run.compiling ? COMPILING : "");
    this.render();
  }

  // One websocket event.
  apply(kind, data) {
    if (this.refreshing) {
      // The answer in flight may predate this event: ask again once it is in.
      this.refreshAgain = true;
      return;
    }
    if (data.run_id !== this.runId) {
      // A run this page has not followed from its start: take what came before from the server.
      if (kind !== "started") {
        this.refresh();
        return;
      }
      this.reset(data.run_id);
    }
    if (kind === "started") {
      this.status = "running";
      this.total = data.total_steps;
      this.message.textContent = data.compiling ? COMPILING : "";
      this.noticeText = "";
    } else if (kind === "step") {
      if (this.message.textContent === COMPILING) this.message.textContent = "";
      // A server from before notices sends none.
      this.noticeText = data.notice ?? "";
      this.status = "running";
      this.total = data.total_steps;
      for (const key of Object.keys(this.history)) this.history[key].push(data[key]);
      this.rates = data;
    } else if (kind === "validation") {
      this.validation.step.push(data.step);
      this.validation.loss.push(data.validation_loss);
    } else if (kind === "sample") {
      data.images.forEach((image, i) => {
        if (image) this.samples.push({ step: data.step, prompt: data.prompts[i], image });
      });
    } else if (kind === "saved") {
      this.message.textContent = data.kind === "lora" ? `saved ${data.name}` : `checkpoint saved at step ${data.step}`;
    } else if (kind === "done") {
      this.status = data.cancelled ? "stopped" : "finished";
    } else if (kind === "error") {
      this.status = "failed";
      this.message.textContent = data.message;
    }
    this.render();
  }

  // Redraws from the server's record of the run. Events that arrive meanwhile are not applied on top
  // of an answer that may already hold them (or miss them); another request follows instead.
  async refresh() {
    if (this.refreshing) {
      this.refreshAgain = true;
      return;
    }
    this.refreshing = true;
    try {
      do {
        this.refreshAgain = false;
        const response = await api.fetchApi(`/lora_trainer/status?node=${encodeURIComponent(this.node.id)}`);
        if (response.ok) this.load((await response.json()).run);
      } while (this.refreshAgain);
    } finally {
      this.refreshing = false;
    }
  }

  async act(action, pending) {
    this.message.textContent = pending;
    const response = await api.fetchApi(`/lora_trainer/${action}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ run_id: this.runId }),
    });
    if (!response.ok) this.message.textContent = (await response.json()).error;
  }

  render() {
    const { step, loss, lr } = this.history;
    const count = loss.length;
    const last = count ? loss[count - 1] : null;
    const f = this.fields;
    f.step.textContent = count ? `${step[count - 1]} / ${this.total}` : "–";
    f.loss.textContent = last === null ? "–" : last.toPrecision(4);
    f.smooth.textContent = count ? smoothed(loss).at(-1).toPrecision(4) : "–";
    f.lr.textContent = count ? lr[count - 1].toExponential(2) : "–";
    const speed = this.rates.images_per_second;
    f.speed.textContent = speed ? speed.toFixed(2) : "–";
    f.eta.textContent = this.status === "running" ? formatDuration(this.rates.eta_seconds) : "–";
    const validated = this.validation.loss.length;
    const lastValidation = validated ? this.validation.loss[validated - 1] : null;
    f.validation.textContent = lastValidation === null ? "–" : lastValidation.toPrecision(4);
    this.validationCell.hidden = !validated;
    const peak = formatMemory(this.rates.peak_vram_bytes);
    f.peak.textContent = peak;
    this.peakCell.hidden = !peak;
    // Shown only where block swap keeps blocks off the card (blocks_to_swap, or what auto chose).
    const swapped = this.rates.blocks_swapped;
    f.swapped.textContent = swapped ? String(swapped) : "";
    this.swappedCell.hidden = !swapped;
    this.notice.textContent = this.noticeText;
    this.notice.hidden = !this.noticeText;
    this.statusLine.textContent = this.status ? STATUS_TEXT[this.status] : "no run yet";
    const running = this.status === "running";
    this.saveButton.disabled = !running;
    this.stopButton.disabled = !running;
    this.chart.setData(step, loss, this.validation);
    this.renderStrip();
    // For scripts and tests that read the panel.
    Object.assign(this.root.dataset, {
      runId: this.runId ?? "", status: this.status ?? "", points: String(count), lastLoss: last === null ? "" : String(last),
      samples: String(this.samples.length), peakVram: peak, blocksSwapped: swapped ? String(swapped) : "",
      validationPoints: String(validated), lastValidationLoss: lastValidation === null ? "" : String(lastValidation),
      notice: this.noticeText,
    });
  }

  renderStrip() {
    // Rebuilt only when the samples change, not at every step: the images stay put (no reload, no flicker).
    const shown = `${this.runId}:${this.samples.length}`;
    if (shown === this.stripShows) return;
    this.stripShows = shown;
    const newest = this.samples.slice(-STRIP_LENGTH).reverse();
    this.strip.replaceChildren(...newest.map((sample) => {
      const figure = element("figure", { title: `step ${sample.step}: ${sample.prompt}` }, [
        element("img", { src: viewUrl(sample.image), alt: sample.prompt, loading: "lazy" }),
        element("figcaption", { textContent: String(sample.step) }),
      ]);
      figure.addEventListener("click", () => showLightbox(sample));
      return figure;
    }));
  }
}

const panels = new Map(); // graph node -> TrainPanel

function attachPanel(node) {
  const panel = new TrainPanel(node);
  node.addDOMWidget(WIDGET_NAME, WIDGET_NAME, panel.root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => PANEL_HEIGHT,
    getMaxHeight: () => PANEL_HEIGHT,
  });
  panels.set(node, panel);
  const onRemoved = node.onRemoved;
  node.onRemoved = function (...args) {
    panels.delete(node);
    return onRemoved?.apply(this, args);
  };
  node.setSize([Math.max(node.size[0], 420), node.computeSize()[1]]);
  return panel;
}

function panelFor(nodeId) {
  for (const [node, panel] of panels) if (String(node.id) === String(nodeId)) return panel;
  return null;
}

app.registerExtension({
  name: "LoraTrainer.TrainPanel",

  setup() {
    document.head.append(element("style", { textContent: STYLE }));
    for (const kind of EVENT_KINDS) {
      api.addEventListener(`lora_trainer.${kind}`, ({ detail }) => panelFor(detail.node)?.apply(kind, detail));
    }
    // After a lost connection events may be missing: redraw every panel from the server.
    api.addEventListener("reconnected", () => panels.forEach((panel) => panel.refresh()));
  },

  nodeCreated(node) {
    if (node.comfyClass === NODE_TYPE) attachPanel(node);
  },

  // A node restored from a saved or reloaded workflow has its final id only now.
  loadedGraphNode(node) {
    if (node.comfyClass === NODE_TYPE) panels.get(node)?.refresh();
  },
});
