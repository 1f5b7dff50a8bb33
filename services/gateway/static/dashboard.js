/* The dashboard's pages. Each reads the gateway's JSON API (lists are polled: they have no
   stream) and follows a run or a job over its SSE stream. */
"use strict";

const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);

function jobLink(service, jobId) {
  return jobId ? h("a", { href: `/ui/jobs/${service}/${jobId}` }, jobId) : "–";
}

function runLink(runId) {
  return runId ? h("a", { href: `/ui/runs/${runId}`, class: "run-link" }, runId) : "–";
}

function fill(table, rows, empty) {
  const body = table.tBodies[0];
  const cols = table.tHead.rows[0].cells.length;
  body.replaceChildren(...(rows.length ? rows
    : [h("tr", { class: "empty" }, h("td", { colspan: cols }, empty))]));
}

async function poll(load) {
  for (;;) {
    try {
      await load();
      showError(null);
    } catch (e) {
      showError(e);
    }
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

/* --- Runs: the list, and the form that creates a run from a template --- */

function currentStage(run) {
  return (run.stages || []).find((s) => short(s.state) === "running");
}

function runRow(run, names) {
  const cur = currentStage(run);
  const stages = (run.stages || []).map((s) => h("span", { class: `chip s-${short(s.state)}` }, s.name));
  const progress = cur && cur.job ? `${cur.name}: ${Number(cur.job.step || 0)} / ${Number(cur.job.total_steps || 0)}` : "";
  return h("tr", { "data-run-id": run.run_id },
    h("td", {}, runLink(run.run_id), h("div", { class: "muted" }, names[run.pipeline_id] || run.pipeline_id)),
    h("td", {}, badge(run.state)),
    h("td", {}, stages),
    h("td", {}, progress),
    h("td", {}, when(run.create_time)),
    h("td", { class: "path" }, (run.result && run.result.path) || run.error || ""));
}

async function loadRuns() {
  const [runs, pipes] = await Promise.all([
    api("GET", "/v1/runs?page_size=50"),
    api("GET", "/v1/pipelines?page_size=100"),
  ]);
  const names = Object.fromEntries((pipes.pipelines || []).map((p) => [p.pipeline_id, p.name]));
  fill($("runs-table"), (runs.runs || []).map((r) => runRow(r, names)), "No runs yet: create one above.");
}

async function setupCreateForm() {
  const select = $("f-template");
  const desc = $("template-desc");
  const byName = {};
  try {
    const { templates } = await api("GET", "/v1/workflows/templates");
    for (const t of templates) {
      byName[t.name] = t;
      select.append(h("option", { value: t.name }, `${t.name} (${t.stages.join(" → ")})`));
    }
  } catch (e) {
    showError(e);
  }
  const describe = () => { desc.textContent = (byName[select.value] || {}).description || ""; };
  select.addEventListener("change", describe);
  describe();
  $("create-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const box = $("create-error");
    const status = $("create-status");
    showError(null, box);
    const body = { template: select.value, auto_configure: $("f-auto").checked };
    for (const [field, id] of [["name", "f-name"], ["base_model", "f-base"], ["dataset_path", "f-dataset"]]) {
      const v = $(id).value.trim();
      if (v) body[field] = v;
    }
    const raw = $("f-overrides").value.trim();
    if (raw) {
      try {
        body.overrides = JSON.parse(raw);
      } catch (e) {
        showError({ code: "INVALID_ARGUMENT", message: "overrides: not valid JSON",
          violations: [{ field: "overrides", description: e.message }] }, box);
        return;
      }
    }
    $("f-submit").disabled = true;
    status.textContent = "creating…";
    try {
      // The gateway's own endpoints: create the pipeline, then run it.
      const p = await api("POST", "/v1/workflows/from-template", body);
      const r = await api("POST", `/v1/pipelines/${p.pipeline_id}/run`);
      status.replaceChildren("Started ", runLink(r.run_id), ` (pipeline ${p.name}).`);
      status.dataset.runId = r.run_id;
      await loadRuns();
    } catch (e) {
      status.textContent = "";
      showError(e, box);
    } finally {
      $("f-submit").disabled = false;
    }
  });
}

/* --- Pipelines, jobs, models: lists --- */

async function loadPipelines() {
  const { pipelines } = await api("GET", "/v1/pipelines?page_size=100");
  fill($("pipelines-table"), pipelines.map((p) => h("tr", {},
    h("td", {}, p.name), h("td", {}, h("code", {}, p.pipeline_id)),
    h("td", {}, p.stages.map((s, i) => h("span", { class: "chip" }, `${s} (${p.kinds[i]})`))),
    h("td", { class: "path" }, p.base_model), h("td", { class: "path" }, p.dataset_path || "–"),
    h("td", {}, when(p.created_at)),
    h("td", {}, h("button", { onclick: async () => {
      try {
        const r = await api("POST", `/v1/pipelines/${p.pipeline_id}/run`);
        location.href = `/ui/runs/${r.run_id}`;
      } catch (e) { showError(e); }
    } }, "Run")))), "No pipelines yet.");
}

async function loadJobs() {
  const lists = await Promise.allSettled(SERVICES.map((s) => api("GET", `/v1/jobs/${s}?page_size=50`)));
  const jobs = [];
  const failed = [];
  lists.forEach((r, i) => {
    if (r.status === "fulfilled") jobs.push(...(r.value.jobs || []).map((j) => ({ ...j, service: SERVICES[i] })));
    else failed.push(r.reason);
  });
  jobs.sort((a, b) => String(b.create_time).localeCompare(String(a.create_time)));
  fill($("jobs-table"), jobs.map((j) => {
    const m = j.metrics || {};
    const loss = m.train_loss ?? m.loss;
    return h("tr", { "data-job-id": j.job_id },
      h("td", {}, jobLink(j.service, j.job_id)), h("td", {}, j.service), h("td", {}, j.kind),
      h("td", {}, badge(j.state)),
      h("td", {}, `${Number(j.step || 0)} / ${Number(j.total_steps || 0)}`),
      h("td", {}, loss === undefined ? "–" : num(loss)),
      h("td", {}, TERMINAL.has(short(j.state)) ? "–" : eta(j.eta_seconds)),
      h("td", {}, when(j.create_time)));
  }), "No jobs yet.");
  if (failed.length) throw failed[0];
}

async function loadModels() {
  const { models } = await api("GET", "/v1/models?page_size=100");
  const rows = [];
  for (const m of models) {
    const versions = m.versions || [];
    if (!versions.length) rows.push(h("tr", {}, h("td", {}, m.name), h("td", { colspan: 6, class: "muted" }, "no versions")));
    for (const v of versions) {
      const lin = v.lineage || {};
      rows.push(h("tr", { "data-model": m.name },
        h("td", {}, m.name), h("td", {}, `v${v.version}`),
        h("td", {}, (v.aliases || []).map((a) => h("span", { class: "chip" }, a))),
        h("td", { class: "path" }, v.base_model || "–"),
        h("td", { class: "path" }, (v.checkpoint && v.checkpoint.path) || "–"),
        h("td", {}, runLink(lin.run_id)), h("td", {}, when(v.create_time))));
    }
  }
  fill($("models-table"), rows, "No registered models yet (register one with POST /v1/models or `mlxu models register`).");
}

/* --- A run: one live view per stage --- */

function setupCancel(label, path, refresh) {
  const btn = $("cancel");
  btn.addEventListener("click", async () => {
    if (!confirm(`${label}?`)) return;
    btn.disabled = true;
    try {
      await api("POST", path, { reason: "cancelled from the dashboard" });
      await refresh();
    } catch (e) {
      showError(e);
    } finally {
      btn.disabled = false;
    }
  });
  return (live) => { btn.hidden = !live; };
}

function runPage() {
  const runId = document.body.dataset.runId;
  const views = new Map();
  let timer = null;
  const showCancel = setupCancel("Cancel this run", `/v1/runs/${runId}/cancel`, () => refresh());

  function view(stage) {
    if (!views.has(stage.name)) {
      const kind = String(stage.kind || "").replace(/^STAGE_KIND_/, "").toLowerCase();
      views.set(stage.name, new StageView($("stages"), stage.name, kind));
    }
    return views.get(stage.name);
  }

  async function refresh() {
    let run;
    try {
      ({ run } = await api("GET", `/v1/runs/${runId}`));
    } catch (e) {
      showError(e);
      return;
    }
    const state = short(run.state);
    const el = $("run-state");
    el.textContent = state;
    el.className = `state s-${state}`;
    $("run-pipeline").replaceChildren(h("code", {}, run.pipeline_id));
    const cur = currentStage(run);
    $("run-current").textContent = cur ? cur.name : (TERMINAL.has(state) ? "–" : "waiting");
    $("run-eta").textContent = cur && cur.job ? eta(cur.job.eta_seconds) : "–";
    showCancel(!TERMINAL.has(state));
    showError(run.error ? { code: state.toUpperCase(), message: run.error } : null, $("run-error"));
    $("run-result").replaceChildren(...(run.result && run.result.path
      ? ["Result: ", h("code", { class: "path" }, run.result.path)] : []));
    for (const s of run.stages || []) {
      const v = view(s);
      v.setState(s.state);
      if (s.job) v.setStep(s.job.step, s.job.total_steps);
      if (s.job && !v.charts.size) v.setEta(s.job.eta_seconds);
      v.setLinks(...(s.job_id ? [h("span", { class: "label" }, "job"), jobLink(s.service, s.job_id)] : []),
        ...(s.cached_from ? [h("span", { class: "muted" }, ` cached from ${s.cached_from}`)] : []));
      const notes = [];
      if (s.result && s.result.path) notes.push(h("div", {}, "checkpoint: ", h("code", { class: "path" }, s.result.path)));
      if (s.error) notes.push(h("div", { class: "error" }, s.error));
      v.setNote(...notes);
    }
  }

  function later() {  // a state change: read the run again (once per burst of events)
    clearTimeout(timer);
    timer = setTimeout(refresh, 200);
  }

  refresh().then(() => {
    follow(`/v1/runs/${runId}/events`, ["run_state_change", "stage_state_change", "job_event"],
      (name, data) => {
        if (name !== "job_event") { later(); return; }
        const { stage, event } = data.job_event;
        const v = view({ name: stage });
        if (event.progress) {
          v.progress(event.progress);
          if (!v.done) $("run-eta").textContent = eta(event.progress.eta_seconds);
        } else if (event.state_change || event.checkpoint) {
          later();
        }
      },
      () => refresh(),
      (s) => { $("live").textContent = s; });
  });
}

/* --- A job: its live view and its checkpoints --- */

function jobPage() {
  const { service, jobId } = document.body.dataset;
  const v = new StageView($("job-stage"), "Curves", "");
  const checkpoints = [];
  const showCancel = setupCancel("Cancel this job", `/v1/jobs/${service}/${jobId}/cancel`, () => refresh());

  function show(job) {
    const state = short(job.state);
    $("job-state").textContent = state;
    $("job-state").className = `state s-${state}`;
    $("job-kind").textContent = job.kind;
    $("job-step").textContent = `${Number(job.step || 0)} / ${Number(job.total_steps || 0)}`;
    $("job-eta").textContent = TERMINAL.has(state) ? "–" : eta(job.eta_seconds);
    v.setState(job.state);
    v.setStep(job.step, job.total_steps);
    const runId = (job.labels || {})["mlxu.run_id"];
    $("job-run").replaceChildren(runId ? runLink(runId) : "–");
    showCancel(!TERMINAL.has(state));
    showError(job.error ? { code: state.toUpperCase(), message: job.error } : null, $("job-error"));
    const final = job.result && job.result.path;
    v.setNote(...(final ? ["result: ", h("code", { class: "path" }, final)] : []));
  }

  function addCheckpoint(c) {
    if (checkpoints.some((x) => x.path === c.path)) return;
    checkpoints.push(c);
    fill($("checkpoints-table"), checkpoints.map((x) => h("tr", {},
      h("td", {}, Number(x.step || 0)), h("td", {}, short(x.kind)),
      h("td", { class: "path" }, x.path),
      h("td", {}, Object.entries(x.metrics || {}).map(([k, val]) => `${k} ${num(val)}`).join(", ")),
      h("td", {}, when(x.create_time)))), "None yet.");
  }

  async function refresh() {
    try {
      const { job } = await api("GET", `/v1/jobs/${service}/${jobId}`);
      show(job);
      for (const c of [job.latest_checkpoint, job.result]) if (c && c.path) addCheckpoint(c);
    } catch (e) {
      showError(e);
    }
  }

  refresh().then(() => {
    follow(`/v1/jobs/${service}/${jobId}/events`, ["state_change", "progress", "checkpoint", "log"],
      (name, data) => {
        if (data.job) show(data.job);
        const ev = data.event || {};
        if (ev.progress) v.progress(ev.progress);
        if (ev.checkpoint) addCheckpoint(ev.checkpoint);
      },
      () => refresh(),
      (s) => { $("live").textContent = s; });
  });
}

/* --- wiring --- */

const SERVICES = (document.body.dataset.services || "training,distillation,rlhf").split(",");

function setupKey() {
  const input = $("api-key");
  input.value = apiKey();
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const v = input.value.trim();
    if (v) localStorage.setItem(KEY_STORE, v); else localStorage.removeItem(KEY_STORE);
    location.reload();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  setupKey();
  const page = document.body.dataset.page;
  if (page === "runs") { setupCreateForm(); poll(loadRuns); }
  else if (page === "pipelines") poll(loadPipelines);
  else if (page === "jobs") poll(loadJobs);
  else if (page === "models") poll(loadModels);
  else if (page === "run") runPage();
  else if (page === "job") jobPage();
});
