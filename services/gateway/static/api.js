/* The gateway's JSON API and SSE streams, as the dashboard's pages use them: the API key
   (kept in localStorage) goes in X-API-Key, errors come back as the API's
   {"error": {code, message, violations}}, and a stream resumes after the last seq seen. */
"use strict";

const KEY_STORE = "mlxu.apiKey";

function apiKey() {
  return localStorage.getItem(KEY_STORE) || "";
}

class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || `HTTP_${status}`;
    this.violations = error.violations || [];
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (apiKey()) headers["X-API-Key"] = apiKey();
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, { code: "UNAVAILABLE", message: `the gateway is not answering (${e.message})` });
  }
  const text = await resp.text();
  let data = {};
  try {
    data = text ? JSON.parse(text) : {};
  } catch (e) {
    data = { error: { message: text.slice(0, 300) } };
  }
  if (!resp.ok) throw new ApiError(resp.status, data.error || {});
  return data;
}

/* Follow an SSE stream: handler(eventName, data, seq) for each event, onEnd() after the
   "end" event. Without an API key the browser's EventSource does it (and reconnects with
   Last-Event-ID by itself); EventSource cannot send headers, so with a key the stream is
   read with fetch and resumed with Last-Event-ID the same way. Returns a stop function. */
function follow(path, names, handler, onEnd, onStatus) {
  const status = onStatus || (() => {});
  let lastSeq = 0;
  let stopped = false;
  const deliver = (name, raw, id) => {
    if (id) lastSeq = Number(id);
    if (name === "end") {
      stopped = true;
      status("finished");
      if (onEnd) onEnd();
      return;
    }
    handler(name, JSON.parse(raw), Number(id || 0));
  };
  if (!apiKey()) {
    const es = new EventSource(path);
    es.onopen = () => status("live");
    for (const n of [...names, "end"]) {
      es.addEventListener(n, (e) => {
        if (n === "end") es.close();
        deliver(n, e.data, e.lastEventId);
      });
    }
    es.addEventListener("error", (e) => {
      if (e.data) {  // the gateway's own "error" event: the stream is over
        es.close();
        stopped = true;
        showError(new ApiError(500, JSON.parse(e.data).error || {}));
        status("stopped");
      } else if (!stopped) {
        status("reconnecting…");
      }
    });
    return () => { stopped = true; es.close(); };
  }
  const controller = new AbortController();
  (async () => {
    while (!stopped) {
      try {
        const headers = { "X-API-Key": apiKey(), Accept: "text/event-stream" };
        if (lastSeq) headers["Last-Event-ID"] = String(lastSeq);
        const resp = await fetch(path, { headers, signal: controller.signal });
        if (!resp.ok) {
          const body = await resp.json().catch(() => ({}));
          throw new ApiError(resp.status, body.error || {});
        }
        status("live");
        const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          let cut;
          while ((cut = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, cut);
            buf = buf.slice(cut + 2);
            let name = "message", id = "", data = "";
            for (const line of block.split("\n")) {
              if (line.startsWith("event: ")) name = line.slice(7);
              else if (line.startsWith("id: ")) id = line.slice(4);
              else if (line.startsWith("data: ")) data += line.slice(6);
            }
            if (!data) continue;
            if (name === "error") {
              stopped = true;
              throw new ApiError(500, JSON.parse(data).error || {});
            }
            deliver(name, data, id);
          }
        }
      } catch (e) {
        if (controller.signal.aborted) return;
        if (e instanceof ApiError && e.status !== 0 && e.status < 500) {
          stopped = true;
          showError(e);
          status("stopped");
          return;
        }
      }
      if (!stopped) {
        status("reconnecting…");
        await new Promise((r) => setTimeout(r, 2000));  // the gateway's SSE retry
      }
    }
  })();
  return () => { stopped = true; controller.abort(); };
}

/* --- small DOM helpers: text always goes in as text, never as HTML --- */

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function errorBox(err) {
  const box = [h("strong", {}, err.code || "ERROR"), " ", err.message];
  if (err.violations && err.violations.length) {
    box.push(h("ul", { class: "violations" },
      err.violations.map((v) => h("li", {}, h("code", {}, v.field), ": ", v.description))));
  }
  if (err.status === 401) box.push(h("p", {}, "Enter an API key at the top right."));
  return box;
}

function showError(err, where) {
  const el = where || document.getElementById("error");
  if (!err) { el.hidden = true; el.replaceChildren(); return; }
  el.replaceChildren(...errorBox(err));
  el.hidden = false;
}

function short(enumName) {  // "RUN_STATE_RUNNING" -> "running"
  return String(enumName || "").replace(/^(RUN|STAGE|JOB)_STATE_/, "").replace(/^CHECKPOINT_KIND_/, "").toLowerCase();
}

function badge(enumName) {
  const s = short(enumName) || "unknown";
  return h("span", { class: `state s-${s}` }, s);
}

function when(ts) {
  if (!ts) return "–";
  const d = new Date(ts);
  return isNaN(d) ? ts : d.toLocaleString([], { dateStyle: "short", timeStyle: "medium" });
}

function eta(seconds) {
  const s = Number(seconds || 0);
  if (!(s > 0)) return "–";
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

function num(v) {
  const x = Number(v);
  if (!Number.isFinite(x)) return String(v);
  if (x !== 0 && (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e5)) return x.toExponential(3);
  return Number.isInteger(x) ? String(x) : x.toFixed(4);
}

const TERMINAL = new Set(["succeeded", "failed", "cancelled", "skipped"]);
