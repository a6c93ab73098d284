// A loss chart drawn on a canvas: the raw values faint, an exponential moving average on top,
// step on x, loss on y (linear or log), and the validation loss (a held-out set's, every few steps)
// as a second line with a dot at each evaluation. No library: a line chart this small is not worth a vendor.

const SMOOTHING = 0.9;
const MARGIN = { left: 52, right: 10, top: 10, bottom: 22 };
const COLORS = { raw: "rgba(110, 170, 255, 0.35)", smooth: "#6eaaff", validation: "#ffa94d",
  grid: "rgba(128, 128, 128, 0.25)" };

// EMA with the start-up bias removed, so the first points are not pulled toward zero.
export function smoothed(values, weight = SMOOTHING) {
  const out = [];
  let average = 0;
  values.forEach((value, index) => {
    average = weight * average + (1 - weight) * value;
    out.push(average / (1 - weight ** (index + 1)));
  });
  return out;
}

function formatLoss(value) {
  if (value === 0) return "0";
  const magnitude = Math.abs(value);
  return magnitude >= 1000 || magnitude < 0.001 ? value.toExponential(1) : value.toPrecision(3);
}

export class LossChart {
  constructor(canvas) {
    this.canvas = canvas;
    this.steps = [];
    this.losses = [];
    this.validation = { step: [], loss: [] };
    this.logScale = false;
  }

  // `validation`: {step, loss} of the validation loss's evaluations (empty without a held-out set).
  setData(steps, losses, validation = { step: [], loss: [] }) {
    this.steps = steps;
    this.losses = losses;
    this.validation = validation;
    this.draw();
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const context = canvas.getContext("2d");
    context.setTransform(ratio, 0, 0, ratio, 0, 0);
    context.clearRect(0, 0, width, height);
    const style = getComputedStyle(canvas);
    context.font = `10px ${style.fontFamily || "sans-serif"}`;
    context.fillStyle = style.color;

    // Log scale skips values it cannot draw (a loss of exactly 0).
    const usable = this.losses.map((loss, i) => [this.steps[i], loss])
      .filter(([, loss]) => Number.isFinite(loss) && (!this.logScale || loss > 0));
    if (usable.length === 0) {
      context.textAlign = "center";
      context.fillText("waiting for the first step…", width / 2, height / 2);
      return;
    }
    const steps = usable.map(([step]) => step);
    const raw = usable.map(([, loss]) => loss);
    const smooth = smoothed(raw);
    const validated = this.validation.loss.map((loss, i) => [this.validation.step[i], loss])
      .filter(([, loss]) => Number.isFinite(loss) && (!this.logScale || loss > 0));
    const toY = this.logScale ? Math.log10 : (v) => v;
    // A loop, not Math.min(...): a long run has more points than a call takes arguments.
    let low = Infinity;
    let high = -Infinity;
    for (const value of [...raw, ...validated.map(([, loss]) => loss)]) {
      low = Math.min(low, toY(value));
      high = Math.max(high, toY(value));
    }
    if (high - low < 1e-12) {
      low -= 0.5;
      high += 0.5;
    }
    const first = steps[0];
    // A validation at the end of a run may come after the last logged step.
    const last = Math.max(steps[steps.length - 1], first + 1, ...validated.map(([step]) => step));
    const plotWidth = width - MARGIN.left - MARGIN.right;
    const plotHeight = height - MARGIN.top - MARGIN.bottom;
    const x = (step) => MARGIN.left + ((step - first) / (last - first)) * plotWidth;
    const y = (value) => MARGIN.top + (1 - (toY(value) - low) / (high - low)) * plotHeight;

    context.strokeStyle = COLORS.grid;
    context.lineWidth = 1;
    context.textAlign = "right";
    context.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const level = low + ((high - low) * i) / 4;
      const py = MARGIN.top + (1 - i / 4) * plotHeight;
      context.beginPath();
      context.moveTo(MARGIN.left, py);
      context.lineTo(width - MARGIN.right, py);
      context.stroke();
      context.fillText(formatLoss(this.logScale ? 10 ** level : level), MARGIN.left - 4, py);
    }
    context.textBaseline = "top";
    context.textAlign = "left";
    context.fillText(String(first), MARGIN.left, height - MARGIN.bottom + 6);
    context.textAlign = "right";
    context.fillText(`step ${steps[steps.length - 1]}`, width - MARGIN.right, height - MARGIN.bottom + 6);

    // More points than pixel columns: one vertex per column is all a line can show.
    const stride = Math.max(1, Math.floor(steps.length / Math.max(1, plotWidth)));
    const line = (values, color, lineWidth) => {
      context.strokeStyle = color;
      context.lineWidth = lineWidth;
      context.beginPath();
      for (let i = 0; i < values.length; i += stride) {
        const px = x(steps[i]);
        const py = y(values[i]);
        if (i === 0) context.moveTo(px, py);
        else context.lineTo(px, py);
      }
      const end = values.length - 1;
      context.lineTo(x(steps[end]), y(values[end]));
      context.stroke();
    };
    line(raw, COLORS.raw, 1);
    line(smooth, COLORS.smooth, 2);
    // Evaluations are few (every N steps): every one is drawn, joined by a line.
    if (validated.length) {
      context.strokeStyle = COLORS.validation;
      context.fillStyle = COLORS.validation;
      context.lineWidth = 2;
      context.beginPath();
      validated.forEach(([step, loss], i) => (i ? context.lineTo(x(step), y(loss)) : context.moveTo(x(step), y(loss))));
      context.stroke();
      for (const [step, loss] of validated) {
        context.beginPath();
        context.arc(x(step), y(loss), 2.5, 0, 2 * Math.PI);
        context.fill();
      }
    }
  }
}
