// The loss chart of a job: training loss per logged step, validation loss per evaluation, and a
// vertical line at the step whose weights were published (or the best so far while it trains).

import uPlot from "../vendor/uplot-1.6.32/uPlot.esm.js";

function css(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

// A uPlot plugin drawing the marked step as a dashed vertical line with its label.
function markPlugin(chart) {
  return {
    hooks: {
      draw: [
        (u) => {
          if (chart.mark === null) return;
          const x = u.valToPos(chart.mark.step, "x", true);
          if (!Number.isFinite(x)) return;
          const { ctx } = u;
          const { top, height } = u.bbox;
          ctx.save();
          ctx.strokeStyle = css("--mark");
          ctx.fillStyle = css("--mark");
          ctx.lineWidth = 2 * uPlot.pxRatio;
          ctx.setLineDash([6 * uPlot.pxRatio, 4 * uPlot.pxRatio]);
          ctx.beginPath();
          ctx.moveTo(x, top);
          ctx.lineTo(x, top + height);
          ctx.stroke();
          ctx.font = `${12 * uPlot.pxRatio}px system-ui, sans-serif`;
          ctx.textAlign = x > u.bbox.left + u.bbox.width / 2 ? "right" : "left";
          const pad = (ctx.textAlign === "right" ? -6 : 6) * uPlot.pxRatio;
          ctx.fillText(chart.mark.label, x + pad, top + 14 * uPlot.pxRatio);
          ctx.restore();
        },
      ],
    },
  };
}

export class LossChart {
  constructor(box) {
    this.box = box;
    this.train = new Map(); // step -> loss (a resumed run's repeated steps replace the earlier values)
    this.val = new Map();
    this.mark = null;
    this.plot = null;
    this.resize = new ResizeObserver(() => this.plot && this.plot.setSize(this.size()));
    this.resize.observe(box);
  }

  size() {
    const width = Math.max(240, this.box.clientWidth);
    return { width, height: width < 500 ? 240 : 320 };
  }

  add(kind, step, value) {
    if (step === null || step === undefined || value === null || value === undefined) return;
    (kind === "val" ? this.val : this.train).set(step, value);
  }

  setMark(mark) {
    this.mark = mark;
  }

  data() {
    const steps = [...new Set([...this.train.keys(), ...this.val.keys()])].sort((a, b) => a - b);
    return [steps, steps.map((s) => this.train.get(s) ?? null), steps.map((s) => this.val.get(s) ?? null)];
  }

  draw() {
    const data = this.data();
    this.box.dataset.trainPoints = String(this.train.size);
    this.box.dataset.valPoints = String(this.val.size);
    this.box.dataset.mark = this.mark ? String(this.mark.step) : "";
    if (!data[0].length) return;
    if (this.plot) {
      this.plot.setData(data);
      this.plot.redraw(false);
      return;
    }
    const axis = { stroke: css("--muted"), grid: { stroke: css("--line"), width: 1 }, ticks: { stroke: css("--line") } };
    const opts = {
      ...this.size(),
      scales: { x: { time: false } },
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
      series: [
        { label: "step" },
        { label: "training loss", stroke: css("--train"), width: 2, spanGaps: true, points: { show: false } },
        { label: "validation loss", stroke: css("--val"), width: 2, spanGaps: true, points: { show: true, size: 7, fill: css("--val") } },
      ],
      axes: [
        { ...axis, label: "step" },
        { ...axis, label: "loss", size: 56 },
      ],
      plugins: [markPlugin(this)],
    };
    this.plot = new uPlot(opts, data, this.box);
  }

  destroy() {
    this.resize.disconnect();
    this.plot?.destroy();
  }
}
