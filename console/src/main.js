// twinhub's web console: sign in with a token, the owner's devices live, a device's twin, its
// events, a plot from the log's history, and commands. Everything goes over the bus (bus.js)
// with the user's token; nothing here is trusted more than any application. Device content is
// the devices' to say: it is only ever shown as text (textContent), never as HTML.
import uPlot from "uplot";
import { ApiError, Bus } from "./bus.js";

const TOKEN_KEY = "twinhub.token";
const MAX_EVENTS = 200;
const HISTORY_MS = 60 * 60 * 1000; // the plot reads the last hour of the log

let bus = null;
let config = null;
let page = null; // the current page's cleanup

// -- small DOM helpers ------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const json = (v) => (v === undefined ? "" : JSON.stringify(v, null, 1));
const app = () => document.getElementById("app");

/** An error as the API names it: its code, then its message. */
function errorBox(e) {
  const code = e instanceof ApiError ? e.code : "error";
  const detail = e instanceof ApiError ? e.detail : String(e?.message || e);
  return el("div", { class: "error", role: "alert", "data-code": code }, el("b", { text: code }), " ", detail);
}

function show(target, node) {
  target.replaceChildren(node);
}

// -- sign in ----------------------------------------------------------------------------------

function takeTokenFromFragment() {
  // the one-time link of `twinhub up`: #token=...; kept for this tab only, gone from the URL
  const m = location.hash.match(/^#token=([^&]+)/);
  if (!m) return null;
  const token = decodeURIComponent(m[1]);
  history.replaceState(null, "", location.pathname + location.search + "#/");
  return token;
}

async function signIn(token) {
  const b = await Bus.connect(config.nats_ws_url, token, config.owner_claim || "sub");
  bus = b;
  sessionStorage.setItem(TOKEN_KEY, token);
  document.getElementById("whoami").textContent = `owner ${b.owner}`;
  const conn = document.getElementById("conn");
  conn.dataset.state = "connected";
  conn.textContent = "connected";
  (async () => {
    for await (const s of b.nc.status()) {
      if (s.type === "disconnect" || s.type === "reconnecting") {
        conn.dataset.state = "reconnecting";
        conn.textContent = "reconnecting";
      } else if (s.type === "reconnect") {
        conn.dataset.state = "connected";
        conn.textContent = "connected";
      }
    }
  })();
  b.nc.closed().then(() => {
    if (bus === b) {
      conn.dataset.state = "closed";
      conn.textContent = "disconnected (token expired?)";
    }
  });
  document.getElementById("signout").hidden = false;
}

async function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  const b = bus;
  bus = null;
  await leavePage();
  if (b) await b.close();
  document.getElementById("whoami").textContent = "";
  document.getElementById("conn").textContent = "";
  document.getElementById("conn").dataset.state = "signed-out";
  document.getElementById("signout").hidden = true;
  location.hash = "#/";
  route();
}

function signInPage(error) {
  const status = el("div", { id: "signin-status" }, error ? errorBox(error) : null);
  const area = el("textarea", { name: "token", rows: 5, placeholder: "eyJ…", autocomplete: "off" });
  const form = el(
    "form",
    {
      id: "signin",
      onsubmit: async (ev) => {
        ev.preventDefault();
        status.replaceChildren(el("span", { class: "muted", text: "signing in…" }));
        try {
          await signIn(area.value.trim());
          route();
        } catch (e) {
          status.replaceChildren(errorBox(e));
        }
      },
    },
    el("h2", { text: "Sign in" }),
    el("p", {
      class: "muted",
      text: "Paste a twinhub application token (e.g. `twinhub token --owner dev`). It is the NATS connection token: you get what any application of its owner gets.",
    }),
    area,
    el("p", {}, el("button", { type: "submit", text: "sign in" })),
    status,
  );
  show(app(), el("section", {}, form));
}

// -- pages ------------------------------------------------------------------------------------

async function leavePage() {
  const p = page;
  page = null;
  if (p) await p();
}

async function route() {
  await leavePage();
  if (!bus) {
    signInPage();
    return;
  }
  const m = location.hash.match(/^#\/device\/(.+)$/);
  if (m) await devicePage(decodeURIComponent(m[1]));
  else await devicesPage();
}

// The device list: list with a position, then every later event of the owner from it.
async function devicesPage() {
  const rows = new Map(); // device_id -> {twin, tr}
  const tbody = el("tbody", { id: "device-rows" });
  const status = el("div", { id: "list-status" });
  const search = el("input", { type: "search", placeholder: "filter by id or name", name: "q" });
  const online = el(
    "select",
    { name: "online" },
    el("option", { value: "", text: "all" }),
    el("option", { value: "true", text: "online" }),
    el("option", { value: "false", text: "offline" }),
  );
  const applyFilter = () => {
    const q = search.value.toLowerCase();
    for (const { twin, tr } of rows.values()) {
      const hit =
        (!q || twin.device_id.toLowerCase().includes(q) || (twin.name || "").toLowerCase().includes(q)) &&
        (!online.value || String(!!twin.online) === online.value);
      tr.hidden = !hit;
    }
  };
  search.addEventListener("input", applyFilter);
  online.addEventListener("change", applyFilter);
  show(
    app(),
    el(
      "section",
      {},
      el("h2", { text: "Devices" }),
      el("div", { class: "filters" }, search, online),
      status,
      el(
        "table",
        { id: "devices" },
        el("thead", {}, el("tr", {}, ["device", "name", "state", "sync", "last change", "position"].map((h) => el("th", { text: h })))),
        tbody,
      ),
    ),
  );

  const render = (entry) => {
    const t = entry.twin;
    const tr = el(
      "tr",
      { "data-device": t.device_id },
      el("td", { class: "id" }, el("a", { href: `#/device/${encodeURIComponent(t.device_id)}`, text: t.device_id })),
      el("td", { text: t.name || "" }),
      el("td", { class: t.online ? "online" : "offline", "data-field": "online", text: t.online ? "online" : "offline" }),
      el("td", { "data-field": "sync", text: t.sync_state || "" }),
      el("td", { "data-field": "updated", text: t.updated_at || "" }),
      el("td", { "data-field": "position", text: t.position ?? "" }),
    );
    if (entry.tr) entry.tr.replaceWith(tr);
    else tbody.append(tr);
    entry.tr = tr;
    applyFilter();
  };

  let position = null;
  try {
    let after;
    do {
      const pageOf = await bus.call("devices-list", after ? { limit: 100, after_id: after } : { limit: 100 });
      position = position === null ? pageOf.position : Math.min(position, pageOf.position);
      for (const twin of pageOf.devices) {
        const entry = { twin, tr: null };
        rows.set(twin.device_id, entry);
        render(entry);
      }
      after = pageOf.next_after_id;
    } while (after);
  } catch (e) {
    status.replaceChildren(errorBox(e));
    return;
  }
  status.replaceChildren(el("span", { class: "muted", text: `${rows.size} devices; live from position ${position}` }));

  const fetching = new Set();
  const sub = await bus.stream(bus.filter(), { after: position }, (ev) => {
    const entry = rows.get(ev.device);
    if (!entry) {
      if (!fetching.has(ev.device)) {
        // a device new to the list: its twin, then its later events
        fetching.add(ev.device);
        bus
          .call("twin-get", { device_id: ev.device })
          .then((r) => {
            if (rows.has(ev.device)) return;
            const e2 = { twin: { ...r.twin, position: r.position }, tr: null };
            rows.set(ev.device, e2);
            render(e2);
          })
          .catch(() => {})
          .finally(() => fetching.delete(ev.device));
      }
      return;
    }
    if (ev.position <= (entry.twin.position || 0)) return; // the twin has it already
    const t = { ...entry.twin, position: ev.position, updated_at: ev.time || entry.twin.updated_at };
    if (ev.kind === "device-online") t.online = true;
    else if (ev.kind === "device-offline") t.online = false;
    else if (ev.kind === "twin-sync-state") t.sync_state = ev.data?.state;
    else if (ev.kind === "device-unregistered") t.deleted = true;
    entry.twin = t;
    render(entry);
  });
  page = () => sub.stop();
}

function numericSeries(content, prefix, out) {
  if (typeof content === "number") out[prefix] = content;
  else if (typeof content === "boolean") out[prefix] = content ? 1 : 0;
  else if (content && typeof content === "object" && !Array.isArray(content)) {
    for (const [k, v] of Object.entries(content)) {
      if (k === "ts" || k === "seq") continue; // the simulator's clocks, not values
      numericSeries(v, prefix ? `${prefix} ${k}` : k, out);
    }
  }
  return out;
}

// The plot: numeric values of resource-changed events, from the log's history and live.
class Plot {
  constructor(target) {
    this.target = target;
    this.points = new Map(); // position -> {t, values}
    this.plot = null;
    this.keys = [];
    this.pending = false;
  }

  add(ev) {
    if (ev.kind !== "resource-changed" || this.points.has(ev.position)) return;
    const values = numericSeries(ev.data?.content, ev.resource, {});
    if (!Object.keys(values).length) return;
    const t = (Date.parse(ev.time) || Date.now()) / 1000;
    this.points.set(ev.position, { t, values });
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => {
        this.pending = false;
        this.draw();
      });
    }
  }

  draw() {
    const pts = [...this.points.values()].sort((a, b) => a.t - b.t);
    const keys = [...new Set(pts.flatMap((p) => Object.keys(p.values)))].sort();
    const last = {};
    const data = [pts.map((p) => p.t), ...keys.map(() => [])];
    for (const p of pts) {
      keys.forEach((k, i) => {
        if (k in p.values) last[k] = p.values[k];
        data[i + 1].push(k in last ? last[k] : null);
      });
    }
    this.target.dataset.points = String(pts.length);
    if (!this.plot || keys.join("|") !== this.keys.join("|")) {
      this.plot?.destroy();
      this.keys = keys;
      const palette = ["#2a6", "#26c", "#c62", "#a2c", "#cb2", "#2bb"];
      this.plot = new uPlot(
        {
          width: Math.max(320, this.target.clientWidth - 10),
          height: 220,
          series: [{}, ...keys.map((k, i) => ({ label: k, stroke: palette[i % palette.length], paths: uPlot.paths.stepped({ align: 1 }) }))],
        },
        data,
        this.target,
      );
    } else {
      this.plot.setData(data);
    }
  }

  destroy() {
    this.plot?.destroy();
  }
}

async function devicePage(deviceId) {
  const root = el("div", { id: "device", "data-device": deviceId });
  show(app(), root);
  let twin;
  let position;
  try {
    const r = await bus.call("twin-get", { device_id: deviceId });
    twin = r.twin;
    position = r.position;
  } catch (e) {
    root.replaceChildren(el("section", {}, el("h2", { text: deviceId }), errorBox(e)));
    return;
  }

  const head = el("div", { id: "device-head" });
  const resources = el("tbody", { id: "resources" });
  const pending = el("tbody", { id: "pending" });
  const events = el("ul", { id: "events" });
  const plotBox = el("div", { id: "plot", "data-points": "0" });
  const outcome = el("div", { id: "outcome", "aria-live": "polite" });
  const hrefList = el("datalist", { id: "hrefs" });

  const renderHead = () => {
    head.replaceChildren(
      el("h2", { class: "id", text: twin.name ? `${twin.name} · ${deviceId}` : deviceId }),
      el(
        "p",
        {},
        el("span", { id: "device-online", class: twin.online ? "online" : "offline", text: twin.online ? "online" : "offline" }),
        " · sync ",
        el("span", { id: "device-sync", text: twin.sync_state || "" }),
        " · position ",
        el("span", { id: "device-position", text: String(position) }),
        twin.connection?.remote_address ? ` · from ${twin.connection.remote_address}` : "",
      ),
    );
  };
  const renderTwin = () => {
    const desired = new Map((twin.desired || []).map((d) => [d.href, d]));
    const delta = new Map((twin.delta || []).map((d) => [d.href, d.content]));
    const hrefs = [...new Set([...(twin.links || []).map((l) => l.href), ...(twin.resources || []).map((r) => r.href), ...desired.keys()])].sort();
    const reported = new Map((twin.resources || []).map((r) => [r.href, r]));
    resources.replaceChildren(
      ...hrefs.map((href) => {
        const r = reported.get(href);
        const link = (twin.links || []).find((l) => l.href === href);
        return el(
          "tr",
          { "data-href": href },
          el("td", { class: "id" }, href, link?.rt ? el("div", { class: "muted", text: [].concat(link.rt).join(" ") }) : null),
          el("td", { "data-field": "content" }, el("pre", { text: r ? json(r.content) : "" })),
          el("td", { "data-field": "desired" }, el("pre", { text: desired.has(href) ? json(desired.get(href).content) : "" })),
          el("td", { "data-field": "delta" }, el("pre", { text: delta.has(href) ? json(delta.get(href)) : "" })),
          el("td", { class: "muted", text: r?.updated_at || "" }),
        );
      }),
    );
    hrefList.replaceChildren(...hrefs.map((h) => el("option", { value: h })));
    pending.replaceChildren(
      ...(twin.pending || []).map((c) =>
        el(
          "tr",
          { "data-correlation": c.correlation_id },
          el("td", { class: "id", text: c.correlation_id }),
          el("td", { text: c.op }),
          el("td", { text: c.href }),
          el("td", { text: c.state }),
          el("td", { text: c.expires_at || "" }),
        ),
      ),
    );
  };
  renderHead();
  renderTwin();

  // the twin's pending commands and desired state as the service computes them: asked again
  // (at most every 300 ms) after command and desired-state events
  let refreshTimer = null;
  const refresh = () => {
    if (refreshTimer) return;
    refreshTimer = setTimeout(async () => {
      refreshTimer = null;
      try {
        const r = await bus.call("twin-get", { device_id: deviceId });
        if (r.position >= position) {
          twin = r.twin;
          position = r.position;
          renderHead();
          renderTwin();
        }
      } catch {
        /* shown on the next command */
      }
    }, 300);
  };

  const waiting = new Map(); // correlation id -> label of a command sent from here
  const onEvent = (ev) => {
    plot.add(ev);
    if (ev.position <= position) return; // the twin reflects it
    position = ev.position;
    const li = el("li", { "data-kind": ev.kind, "data-position": ev.position }, `${ev.position} ${ev.time} ${ev.kind} ${ev.resource} ${json(ev.data)}`);
    events.prepend(li);
    while (events.childElementCount > MAX_EVENTS) events.lastElementChild.remove();
    if (ev.kind === "resource-changed") {
      const res = (twin.resources || []).filter((r) => r.href !== ev.resource);
      res.push({ href: ev.resource, content: ev.data?.content, updated_at: ev.time, position: ev.position });
      twin = { ...twin, resources: res };
    } else if (ev.kind === "device-online") twin = { ...twin, online: true };
    else if (ev.kind === "device-offline") twin = { ...twin, online: false };
    else if (ev.kind === "twin-sync-state") twin = { ...twin, sync_state: ev.data?.state };
    if (ev.kind.startsWith("command-") || ev.kind.startsWith("desired-") || ev.kind === "resource-changed") refresh();
    const label = waiting.get(ev.correlation);
    if (label && ["command-succeeded", "command-failed", "command-expired", "command-canceled"].includes(ev.kind)) {
      waiting.delete(ev.correlation);
      const state = ev.kind.slice("command-".length);
      const detail = ev.data?.status ? ` (${ev.data.status})` : "";
      const reason = ev.data?.reason ? ` ${ev.data.reason}` : "";
      outcome.replaceChildren(
        el(
          "div",
          { class: state === "succeeded" ? "ok" : "error", "data-state": state, "data-correlation": ev.correlation },
          `${label}: ${state}${detail}${reason}`,
          ev.data?.content !== undefined ? el("pre", { text: json(ev.data.content) }) : null,
        ),
      );
    }
    renderHead();
    if (ev.kind === "resource-changed" || ev.kind === "twin-sync-state") renderTwin();
  };

  const plot = new Plot(plotBox);

  const send = async (label, op, request, isCommand = true) => {
    outcome.replaceChildren(el("span", { class: "muted", text: `${label}: sending…` }));
    try {
      const r = await bus.call(op, { device_id: deviceId, ...request });
      if (isCommand) {
        waiting.set(r.correlation_id, label);
        outcome.replaceChildren(el("div", { class: "muted", "data-state": "pending", "data-correlation": r.correlation_id }, `${label}: accepted (${r.correlation_id}), waiting for the device…`));
      } else {
        outcome.replaceChildren(el("div", { class: "ok", "data-state": "done" }, `${label}: ${json(r)}`));
      }
      refresh();
    } catch (e) {
      outcome.replaceChildren(errorBox(e));
    }
  };
  const parse = (text, what) => {
    if (text.trim() === "") return undefined;
    try {
      return JSON.parse(text);
    } catch {
      throw new ApiError("bad_request", `${what} is not JSON`);
    }
  };
  const form = (id, fields, onSubmit, button) =>
    el(
      "form",
      {
        id,
        class: "cmd",
        onsubmit: async (ev) => {
          ev.preventDefault();
          const data = Object.fromEntries(new FormData(ev.target).entries());
          try {
            await onSubmit(data);
          } catch (e) {
            outcome.replaceChildren(errorBox(e));
          }
        },
      },
      fields,
      el("button", { type: "submit", text: button }),
    );
  const hrefInput = () => el("input", { name: "href", list: "hrefs", placeholder: "/light/1", required: true, size: 14 });
  const ttl = () => el("input", { name: "ttl", type: "number", value: 60, min: 1, title: "time to live (s)", class: "ttl" });

  const forms = el(
    "section",
    { id: "commands" },
    el("h3", { text: "Commands" }),
    hrefList,
    form("form-update", [hrefInput(), el("input", { name: "content", placeholder: '{"state": true}', required: true }), ttl()], (d) =>
      send(`update ${d.href}`, "update", { href: d.href, content: parse(d.content, "content"), ttl: Number(d.ttl) }), "update"),
    form("form-retrieve", [hrefInput(), ttl()], (d) => send(`retrieve ${d.href}`, "retrieve", { href: d.href, ttl: Number(d.ttl) }), "retrieve"),
    form("form-desired", [hrefInput(), el("input", { name: "content", placeholder: '{"state": false}', required: true })], (d) =>
      send(`desired ${d.href}`, "desired-set", { href: d.href, content: parse(d.content, "content") }, false), "set desired"),
    form("form-clear", [hrefInput()], (d) => send(`clear desired ${d.href}`, "desired-clear", { href: d.href }, false), "clear desired"),
    form("form-rpc", [el("input", { name: "method", placeholder: "method", required: true, size: 12 }), el("input", { name: "params", placeholder: '{"delay": 5}' }), ttl()], (d) =>
      send(`rpc ${d.method}`, "rpc", { method: d.method, params: parse(d.params, "params"), ttl: Number(d.ttl) }), "RPC"),
    form("form-cancel", [el("input", { name: "correlation_id", placeholder: "correlation id (or)", size: 20 }), el("input", { name: "href", list: "hrefs", placeholder: "href (or all)", size: 14 })], (d) => {
      const req = {};
      if (d.correlation_id) req.correlation_id = d.correlation_id;
      if (d.href) req.href = d.href;
      return send("cancel", "cancel", req, false);
    }, "cancel"),
    outcome,
  );

  root.replaceChildren(
    el("section", {}, head),
    el(
      "div",
      { class: "grid" },
      el(
        "section",
        {},
        el("h3", { text: "Twin" }),
        el("table", {}, el("thead", {}, el("tr", {}, ["resource", "reported", "desired", "delta", "updated"].map((h) => el("th", { text: h })))), resources),
      ),
      forms,
    ),
    el("div", { class: "grid" }, el("section", {}, el("h3", { text: "Values (last hour)" }), plotBox), el("section", {}, el("h3", { text: "Pending commands" }), el("table", {}, pending))),
    el("section", {}, el("h3", { text: "Events (live)" }), events),
  );

  const subs = [];
  try {
    // live: every event after the twin's position (the resync contract)
    subs.push(await bus.stream(bus.filter(deviceId), { after: position }, onEvent));
    // the plot's history: the last hour of resource changes, up to the twin's position
    const upTo = position;
    let past = null;
    let pastDone = false;
    past = await bus.stream(bus.filter(deviceId, "resource-changed"), { since: new Date(Date.now() - HISTORY_MS) }, (ev, left) => {
      if (ev.position <= upTo) plot.add(ev);
      if (ev.position >= upTo || left === 0) {
        pastDone = true;
        past?.stop();
      }
    });
    if (pastDone) past.stop();
    subs.push(past);
  } catch (e) {
    events.replaceChildren(el("li", {}, errorBox(e)));
  }
  page = async () => {
    clearTimeout(refreshTimer);
    plot.destroy();
    await Promise.all(subs.map((s) => s.stop()));
  };
}

// -- start ------------------------------------------------------------------------------------

async function main() {
  document.getElementById("signout").addEventListener("click", signOut);
  const fragmentToken = takeTokenFromFragment();
  try {
    config = await (await fetch("config.json", { cache: "no-store" })).json();
  } catch (e) {
    show(app(), errorBox(new ApiError("unavailable", `no console configuration: ${e.message}`)));
    return;
  }
  const token = fragmentToken || sessionStorage.getItem(TOKEN_KEY);
  if (token) {
    try {
      await signIn(token);
    } catch (e) {
      sessionStorage.removeItem(TOKEN_KEY);
      signInPage(e);
      return;
    }
  }
  window.addEventListener("hashchange", route);
  await route();
}

main();
