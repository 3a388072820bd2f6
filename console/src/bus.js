// The console's side of the bus: a NATS connection over WebSocket with the user's token, the
// command API (request/reply), and event streams read from the log with a position (the
// resync contract: README "Subscriptions"). It does what twinhub_client does in Python, with
// the same permissions as any application: the auth callout admits the token as its owner.
import { headers, wsconnect } from "@nats-io/nats-core";
import { AckPolicy, DeliverPolicy, jetstream, jetstreamManager } from "@nats-io/jetstream";

export const API_PREFIX = "twinhub.api.v1"; // proto/api.py
export const JS_PREFIX = "twinhub.js.API"; // proto/api.py APP_JS_PREFIX
export const STREAM = "TWINHUB_EVENTS"; // eventstore/layout.py DEFAULT_STREAM
const TIMEOUT_MS = 10000;

/** An error as the API names it (proto/api.py ErrorCode), or "unavailable" for the bus. */
export class ApiError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
    this.detail = message;
  }
}

/** A JWT's claims, unverified (the auth callout verifies the token). */
export function tokenClaims(token) {
  const part = String(token).split(".")[1];
  if (!part) throw new ApiError("unauthorized", "not a JWT");
  const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
  const bin = atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4));
  return JSON.parse(new TextDecoder().decode(Uint8Array.from(bin, (c) => c.charCodeAt(0))));
}

const SAFE = /^[A-Za-z0-9\-_/:=@+,]+$/;

/** proto/subjects.py escape_token: any string as one subject token. */
export function escapeToken(value) {
  if (SAFE.test(value)) return value;
  if (value === "") return "~";
  let out = "";
  for (const b of new TextEncoder().encode(value)) {
    const ch = String.fromCharCode(b);
    out += SAFE.test(ch) ? ch : "~" + b.toString(16).toUpperCase().padStart(2, "0");
  }
  return out;
}

/** proto/subjects.py unescape_token. */
export function unescapeToken(token) {
  if (token === "~") return "";
  if (!token.includes("~")) return token;
  const bytes = [];
  for (let i = 0; i < token.length; ) {
    if (token[i] === "~") {
      bytes.push(parseInt(token.slice(i + 1, i + 3), 16));
      i += 3;
    } else {
      bytes.push(token.charCodeAt(i));
      i += 1;
    }
  }
  return new TextDecoder().decode(Uint8Array.from(bytes));
}

// Consumer names are capabilities (README "Applications on the bus"): random, never guessable.
function randomName() {
  const b = crypto.getRandomValues(new Uint8Array(16));
  return "con_" + Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

/** One event read from the log: its position, CloudEvents type, subject parts and data. */
function toEvent(m) {
  const h = m.headers;
  const parts = m.subject.split(".");
  let data = null;
  try {
    data = m.json();
  } catch {
    data = m.string();
  }
  return {
    position: m.seq,
    type: h?.get("ce-type") || "",
    time: h?.get("ce-time") || "",
    correlation: h?.get("ce-correlationid") || "",
    device: unescapeToken(parts[3] || ""),
    kind: parts[4] || "",
    resource: parts[5] && parts[5] !== "_" ? unescapeToken(parts.slice(5).join(".")) : "",
    data,
  };
}

export class Bus {
  constructor(nc, token, session) {
    this.nc = nc;
    this.token = token;
    this.session = session;
    this.jsm = null;
    this.js = null;
  }

  /** Connect with ``token`` as the connection token (the auth callout admits it). */
  static async connect(wsUrl, token, ownerClaim = "sub") {
    let owner;
    try {
      owner = tokenClaims(token)[ownerClaim];
    } catch {
      throw new ApiError("unauthorized", "that is not a twinhub token (a JWT)");
    }
    if (typeof owner !== "string" || !owner) {
      throw new ApiError("unauthorized", `the token has no ${ownerClaim} claim`);
    }
    let nc;
    try {
      nc = await wsconnect({
        servers: wsUrl,
        token,
        inboxPrefix: `_INBOX.${escapeToken(owner)}`,
        name: "twinhub-console",
        maxReconnectAttempts: -1,
        reconnectTimeWait: 500,
        timeout: TIMEOUT_MS,
      });
    } catch (e) {
      throw new ApiError("unauthorized", `NATS refused the connection (is the token valid?): ${e.message}`);
    }
    const bus = new Bus(nc, token, null);
    try {
      bus.session = await bus.call("session", {});
      bus.jsm = await jetstreamManager(nc, { apiPrefix: JS_PREFIX, checkAPI: false });
      bus.js = jetstream(nc, { apiPrefix: JS_PREFIX });
    } catch (e) {
      await nc.close().catch(() => {});
      throw e;
    }
    return bus;
  }

  get owner() {
    return this.session.owner;
  }

  async close() {
    await this.nc.close().catch(() => {});
  }

  /** Call API operation ``op``: its result, or an ApiError with the API's code. */
  async call(op, request) {
    const h = headers();
    h.set("Authorization", `Bearer ${this.token}`);
    h.set("Twinhub-Deadline", String(Date.now() + TIMEOUT_MS));
    let msg;
    try {
      msg = await this.nc.request(`${API_PREFIX}.${op}`, JSON.stringify(request), {
        timeout: TIMEOUT_MS,
        headers: h,
      });
    } catch (e) {
      throw new ApiError("unavailable", `no answer on ${API_PREFIX}.${op}: ${e.message}`);
    }
    let reply;
    try {
      reply = msg.json();
    } catch {
      throw new ApiError("unavailable", `unreadable reply on ${op}`);
    }
    if (!reply.ok) {
      const err = reply.error || { code: "internal", message: "error reply without an error" };
      throw new ApiError(err.code, err.message);
    }
    return reply.result;
  }

  /** The subject filter of the owner's events, of one device, of one kind. */
  filter(device, kind) {
    const base = this.session.events.replace(/>$/, "");
    if (device === undefined) return this.session.events;
    if (kind === undefined) return `${base}${escapeToken(device)}.>`;
    return `${base}${escapeToken(device)}.${kind}.>`;
  }

  /**
   * Read the events under ``filter`` from the log, in order, each once, calling ``onEvent``:
   * from ``after`` + 1 (a position the caller read, e.g. a twin's) or from ``since`` (a Date),
   * on until ``stop()``. A temporary consumer of the owner's subjects, deleted on stop (and by
   * the server when the page goes away: inactive_threshold).
   */
  async stream(filter, { after, since }, onEvent) {
    const name = randomName();
    const config = {
      name,
      filter_subject: filter,
      ack_policy: AckPolicy.None,
      mem_storage: true,
      inactive_threshold: 60 * 1e9,
    };
    if (since !== undefined) {
      config.deliver_policy = DeliverPolicy.StartTime;
      config.opt_start_time = since.toISOString();
    } else {
      config.deliver_policy = DeliverPolicy.StartSequence;
      config.opt_start_seq = (after || 0) + 1;
    }
    try {
      await this.jsm.consumers.add(STREAM, config);
    } catch (e) {
      throw new ApiError("forbidden", `cannot read ${filter} from the log: ${e.message}`);
    }
    const consumer = await this.js.consumers.get(STREAM, name);
    const messages = await consumer.consume({ max_messages: 256 });
    let stopped = false;
    const done = (async () => {
      for await (const m of messages) {
        if (stopped) break;
        try {
          onEvent(toEvent(m), m.info.pending);
        } catch (e) {
          console.error("event handler", e);
        }
      }
    })();
    return {
      async stop() {
        stopped = true;
        await messages.close().catch(() => {});
        await consumer.delete().catch(() => {});
        await done.catch(() => {});
      },
    };
  }
}
