/* A stage's (or a job's) live view: its state, step and ETA, its latest metrics, and one
   uPlot chart per group of curves (loss, reward, KL) that the trainer reports. */
"use strict";

const GROUPS = [  // [group, title, which metrics it plots]
  ["loss", "Loss", (m) => m === "train_loss" || m === "val_loss"],
  ["reward", "Reward", (m) => /reward/.test(m) && !/_tokens$/.test(m)],
  ["kl", "KL", (m) => /(^|_)kl(_|$)/.test(m) && !/_tokens$/.test(m)],
];
// Shown up front; every other metric a trainer reports is one click away.
const HEADLINE = new Set(["train_loss", "val_loss", "learning_rate", "tokens_per_second"]);
const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777"];

function groupOf(metric) {
  const g = GROUPS.find(([, , test]) => test(metric));
  return g ? g[0] : null;
}

class Chart {
  constructor(parent, group, title) {
    this.group = group;
    this.steps = [];                // x: the optimiser step of each report
    this.values = new Map();        // metric -> array aligned with steps (null = not reported)
    // Reports repeat the last held-out figures until the next evaluation: a val_* value
    // equal to the one before it is that repeat, not a new evaluation, and is not plotted.
    this.lastVal = new Map();
    this.el = h("div", { class: "chart", "data-chart": group, "data-points": "0", "data-series": "" },
      h("div", { class: "chart-title" }, title));
    parent.append(this.el);
    this.plot = null;
    this.pending = false;
  }

  add(step, metrics) {
    let i = this.steps.indexOf(step);
    if (i < 0) {
      i = this.steps.length;
      this.steps.push(step);
      for (const arr of this.values.values()) arr.push(null);
    }
    for (const [name, v] of Object.entries(metrics)) {
      if (name.startsWith("val_")) {
        if (this.lastVal.get(name) === Number(v)) continue;
        this.lastVal.set(name, Number(v));
      }
      if (!this.values.has(name)) {
        this.values.set(name, this.steps.map(() => null));
        this.destroy();  // a new series: build the plot again with it
      }
      this.values.get(name)[i] = Number(v);
    }
    this.schedule();
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this.draw(); });
  }

  data() {
    const order = this.steps.map((s, i) => [s, i]).sort((a, b) => a[0] - b[0]);
    const xs = order.map(([s]) => s);
    return [xs, ...[...this.values.values()].map((arr) => order.map(([, i]) => arr[i]))];
  }

  draw() {
    const data = this.data();
    const names = [...this.values.keys()];
    this.el.dataset.points = String(data[0].length);
    this.el.dataset.series = names.join(",");
    if (!this.plot) {
      const width = Math.max(280, this.el.clientWidth - 16);
      const opts = {
        width, height: 220,
        scales: { x: { time: false } },
        axes: [{ label: "step" }, { size: 60 }],
        series: [{ label: "step" }, ...names.map((n, k) => ({
          label: n, stroke: COLORS[k % COLORS.length], width: 2, spanGaps: true,
          points: { show: n.startsWith("val_") ? true : undefined },
        }))],
        legend: { live: true },
      };
      this.plot = new uPlot(opts, data, this.el);
    } else {
      this.plot.setData(data);
    }
  }

  destroy() {
    if (this.plot) { this.plot.destroy(); this.plot = null; }
  }
}

class StageView {
  constructor(parent, title, subtitle) {
    this.charts = new Map();
    this.latest = {};
    this.state = h("span", { class: "state" }, "…");
    this.step = h("span", { class: "step" }, "–");
    this.eta = h("span", { class: "eta" }, "–");
    this.links = h("span", { class: "links" });
    this.metrics = h("dl", { class: "metrics" });
    this.more = h("dl", { class: "metrics" });
    this.moreBox = h("details", { class: "more", hidden: true }, h("summary", {}, "all metrics"), this.more);
    this.note = h("div", { class: "note" });
    this.chartsEl = h("div", { class: "charts" });
    this.el = h("section", { class: "stage", "data-stage": title },
      h("header", {}, h("h2", {}, title, " ", h("span", { class: "muted" }, subtitle || "")),
        this.state, h("span", { class: "label" }, "step"), this.step,
        h("span", { class: "label" }, "ETA"), this.eta, this.links),
      this.metrics, this.moreBox, this.chartsEl, this.note);
    parent.append(this.el);
  }

  setState(enumName) {
    const s = short(enumName) || "unknown";
    this.state.textContent = s;
    this.state.className = `state s-${s}`;
    this.done = TERMINAL.has(s);
    if (this.done) this.eta.textContent = "–";
  }

  setStep(step, total) {
    const t = Number(total || 0);
    this.step.textContent = t ? `${Number(step || 0)} / ${t}` : String(Number(step || 0));
  }

  setEta(seconds) {
    this.eta.textContent = this.done ? "–" : eta(seconds);
  }

  setLinks(...nodes) { this.links.replaceChildren(...nodes); }

  setNote(...nodes) { this.note.replaceChildren(...nodes); }

  showMetrics(metrics) {
    Object.assign(this.latest, metrics);
    const row = (k) => [h("dt", {}, k), h("dd", { "data-metric": k }, num(this.latest[k]))];
    const names = Object.keys(this.latest).sort();
    const top = names.filter((k) => HEADLINE.has(k) || groupOf(k));
    const rest = names.filter((k) => !top.includes(k));
    this.metrics.replaceChildren(...top.flatMap(row));
    this.more.replaceChildren(...rest.flatMap(row));
    this.moreBox.hidden = !rest.length;
  }

  progress(p) {  // a Progress event (proto JSON: int64 fields are strings)
    const step = Number(p.step || 0);
    this.setStep(step, p.total_steps);
    this.setEta(p.eta_seconds);
    const metrics = p.metrics || {};
    this.showMetrics(metrics);
    const byGroup = {};
    for (const [k, v] of Object.entries(metrics)) {
      const g = groupOf(k);
      if (g) (byGroup[g] = byGroup[g] || {})[k] = v;
    }
    for (const [g, title] of GROUPS) {
      if (!byGroup[g]) continue;
      if (!this.charts.has(g)) this.charts.set(g, new Chart(this.chartsEl, g, title));
      this.charts.get(g).add(step, byGroup[g]);
    }
  }
}
