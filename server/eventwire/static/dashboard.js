/* eventwire live dashboard.
 *
 * Reads three routes of the admin listener: /v1/sites (the chooser),
 * /v1/sites/{site}/summary (open sessions, Redis' clock) and the live relay
 * /v1/live?stream=summary (one WebSocket): the server's rollups of the last
 * five minutes (a snapshot, then a tick a second with the seconds that
 * changed), the newest few hundred entries of both streams, then the feed,
 * sampled by the server above about 20 entries a second. The counts never
 * depend on the feed, so they are exact at any rate and the first load stays
 * small. On a reconnect (a server restart, a network drop) a new snapshot
 * replaces the counts; feed entries the page already has are skipped (the
 * last id per stream and partition, `p`).
 *
 * The range selector's longer ranges (1 hour, 24 hours, 7 days) read the
 * rollups the persist worker stored, through /v1/sites/{site}/rollups?range=R
 * (refreshed every 15 s to 5 min); the feed and the rejected panel stay live
 * whatever the range. Stored figures go by `received`, the server's clock when
 * it took the event; rejected events are never stored, so those ranges show
 * none.
 *
 * Counts (the chart, events/s, totals, top tables) go by stream id time:
 * the millisecond part of each entry's id, when Redis stored it, on Redis'
 * clock. The page learns Redis' clock from the relay's hello and the summary.
 *
 * The admin token, when the server wants one, is asked for on the page, kept
 * in sessionStorage (this tab only) and sent as a Bearer header (fetch) or a
 * WebSocket subprotocol (the relay): never in a URL.
 *
 * Plain script, no build step, nothing loaded from elsewhere; every text from
 * the streams goes into the page as text, never as HTML.
 */
"use strict";

(() => {
  // Seconds covered by the chart, the totals and the top actions.
  const WINDOW_S = 300;
  // Events/s is the average over this many complete seconds.
  const RATE_S = 10;
  // Feed entries kept in the page for the feed and customer timelines (~1 KiB each).
  const HISTORY_KEEP = 20000;
  const REJECTED_KEEP = 2000;
  const FEED_ROWS = 200;
  const REJECTED_ROWS = 100;
  const TIMELINE_ROWS = 300;
  const TOP_N = 10;
  const SUMMARY_EVERY_MS = 2000;
  const RENDER_EVERY_MS = 250;
  const RETRY_FIRST_MS = 250;
  const RETRY_MAX_MS = 4000;
  const LIVE_PROTOCOL = "eventwire.live.v1";
  const TOKEN_PROTOCOL = "eventwire.token.";
  const TOKEN_KEY = "eventwire.admin_token";
  const SVG = "http://www.w3.org/2000/svg";
  // The ranges: 5 minutes live from the relay, the others from the store.
  const RANGES = {
    "5m": { seconds: 300, label: "last 5 minutes", short: "5 min", axis: ["−5 min", "−4", "−3", "−2", "−1", "now"] },
    "1h": { seconds: 3600, label: "last hour", short: "1 h", axis: ["−60 min", "−45", "−30", "−15", "now"], refresh: 15000 },
    "24h": { seconds: 86400, label: "last 24 hours", short: "24 h", axis: ["−24 h", "−18", "−12", "−6", "now"], refresh: 60000 },
    "7d": {
      seconds: 604800,
      label: "last 7 days",
      short: "7 d",
      axis: ["−7 d", "−6", "−5", "−4", "−3", "−2", "−1", "now"],
      refresh: 300000,
    },
  };
  const LIVE_TEXT = {
    "rate-rejected-note": "average of the last 10 s",
    "total-title": "Last 5 minutes",
    "chart-title": "Events per second, last 5 minutes",
  };
  let range = "5m";

  const $ = (id) => document.getElementById(id);

  // ---- stream ids and clocks ------------------------------------------------

  function idMs(id) {
    return Number(id.slice(0, id.indexOf("-")));
  }

  // Whether stream id a comes after b (sequence parts may exceed 2**53).
  function idAfter(a, b) {
    const am = idMs(a);
    const bm = idMs(b);
    if (am !== bm) return am > bm;
    return BigInt(a.slice(a.indexOf("-") + 1)) > BigInt(b.slice(b.indexOf("-") + 1));
  }

  // Redis' clock minus this browser's, in ms.
  let clockOffset = 0;
  const serverNow = () => Date.now() + clockOffset;

  function clock(ms) {
    if (typeof ms !== "number" || !isFinite(ms)) return "--:--:--";
    const d = new Date(ms);
    const pad = (n, w = 2) => String(n).padStart(w, "0");
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
  }

  // ---- access -------------------------------------------------------------------

  let token = sessionStorage.getItem(TOKEN_KEY) || "";

  class NeedToken extends Error {}

  function authHeaders() {
    return token ? { Authorization: "Bearer " + token } : {};
  }

  function b64url(text) {
    let bin = "";
    for (const byte of new TextEncoder().encode(text)) bin += String.fromCharCode(byte);
    return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function protocols() {
    return token ? [LIVE_PROTOCOL, TOKEN_PROTOCOL + b64url(token)] : [LIVE_PROTOCOL];
  }

  async function getJSON(path) {
    const response = await fetch(path, { headers: authHeaders(), cache: "no-store" });
    if (response.status === 401) throw new NeedToken(path);
    if (!response.ok) throw new Error(`HTTP ${response.status}: ${(await response.text()).trim()}`);
    return response.json();
  }

  let asking = null;

  // Show the sign-in dialog; resolves once a token was entered.
  function askToken() {
    if (asking) return asking;
    const refused = token !== "";
    asking = new Promise((resolve) => {
      setStatus("signin", "sign-in needed");
      $("login-error").hidden = !refused;
      $("login-form").onsubmit = (e) => {
        e.preventDefault();
        token = $("token").value.trim();
        sessionStorage.setItem(TOKEN_KEY, token);
        $("login").close();
        $("signout").hidden = false;
        asking = null;
        resolve();
      };
      if (!$("login").open) $("login").showModal();
    });
    return asking;
  }

  // After a relay connection failed before opening: find out whether the token is why.
  async function checkAccess() {
    try {
      await getJSON("/v1/sites");
      return true;
    } catch (e) {
      if (e instanceof NeedToken) {
        await askToken();
        return true;
      }
      return false; // the server is away: keep backing off
    }
  }

  // ---- the relay ------------------------------------------------------------------

  class LiveStream {
    constructor(site, kind, since, onMessage) {
      this.site = site;
      this.kind = kind;
      this.since = since;
      // The position: one id per partition (one in all when the site is not split).
      this.position = [];
      // The last entry id seen, in all and per partition.
      this.last = null;
      this.lastIn = new Map();
      this.onMessage = onMessage;
      this.retry = RETRY_FIRST_MS;
      this.ready = false;
      this.stopped = false;
      this.timer = null;
      this.ws = null;
      this.open();
    }

    url() {
      const url = new URL("/v1/live", location.href);
      url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
      url.searchParams.set("site", this.site);
      url.searchParams.set("stream", this.kind);
      // A summary viewer starts with a snapshot: it takes no since.
      if (this.kind !== "summary") url.searchParams.set("since", this.since);
      return url.href;
    }

    open() {
      const ws = new WebSocket(this.url(), protocols());
      let opened = false;
      this.ws = ws;
      ws.onopen = () => {
        opened = true;
      };
      ws.onmessage = (e) => {
        let msg;
        try {
          msg = JSON.parse(e.data);
        } catch {
          return;
        }
        // Ids of different partitions are not ordered against each other.
        const part = typeof msg.p === "number" ? msg.p : 0;
        if (msg.type === "event" || msg.type === "rejected") {
          // A new snapshot resends the newest entries: skip those already here.
          // Ids are ordered within one stream's partition only.
          const key = `${msg.type}:${part}`;
          const last = this.lastIn.get(key);
          if (last !== undefined && !idAfter(msg.id, last)) return;
          this.lastIn.set(key, msg.id);
          this.last = msg.id;
        }
        if (typeof msg.id === "string") {
          // With p: that partition's id; without: the whole position.
          if (typeof msg.p === "number") this.position[msg.p] = msg.id;
          else this.position = msg.id.split(",");
          this.since = this.position.join(",");
        }
        if (msg.type === "ready") {
          this.ready = true;
          this.retry = RETRY_FIRST_MS;
          updateStatus();
        }
        this.onMessage(msg, this);
      };
      ws.onclose = async () => {
        if (this.stopped || this.ws !== ws) return;
        this.ready = false;
        updateStatus();
        const delay = this.retry * (0.5 + Math.random() / 2);
        this.retry = Math.min(this.retry * 2, RETRY_MAX_MS);
        if (!opened) await checkAccess();
        if (this.stopped) return;
        this.timer = setTimeout(() => {
          if (!this.stopped) this.open();
        }, delay);
      };
    }

    close() {
      this.stopped = true;
      clearTimeout(this.timer);
      if (this.ws) this.ws.close(1000);
    }
  }

  // ---- what the page holds --------------------------------------------------------

  let view = null;

  function newView(site) {
    return {
      site,
      seconds: new Map(), // second -> the server's counts {t, accepted, rejected: {code: n}, started, ended}
      top: null, // the server's top tables {actions, pages, customers}: {total, rows: [key, count, error]}
      feedEvery: 1,
      history: [], // {id, ev}: accepted events, oldest first
      rejected: [], // {id, rec}: rejected records, oldest first
      streams: [],
      paused: false,
      pausedNew: 0,
      openId: null,
      timeline: null,
      timelineUuids: new Set(),
      missed: 0,
      dirty: { feed: true, rejected: true, timeline: true, numbers: true },
      summaryTimer: null,
      stored: null, // the range view of /v1/sites/{site}/rollups, once read
      storedTimer: null,
    };
  }

  function rejectedIn(s) {
    let n = 0;
    for (const code in s.rejected || {}) n += s.rejected[code];
    return n;
  }

  function onMessage(msg, stream) {
    switch (msg.type) {
      case "hello":
        clockOffset = msg.now - Date.now();
        break;
      case "snapshot":
        clockOffset = msg.now - Date.now();
        view.seconds = new Map(msg.seconds.map((s) => [s.t, s]));
        view.top = msg.top;
        view.feedEvery = msg.feed_every;
        view.dirty.numbers = true;
        backfilling(msg.backfilling === true);
        if (msg.since > msg.now - msg.window * 1000 + 1000) {
          notice(
            "since",
            `The streams hold entries from ${clock(msg.since)} only (retention): the counts start there.`,
          );
        }
        break;
      case "tick":
        // The whole counts of each second that changed: they replace what the page had.
        for (const s of msg.seconds) view.seconds.set(s.t, s);
        view.top = msg.top;
        view.feedEvery = msg.feed_every;
        view.dirty.numbers = true;
        backfilling(msg.backfilling === true);
        break;
      case "event":
        addEvent(msg.id, msg.event);
        break;
      case "rejected":
        addRejected(msg.id, msg.event);
        break;
      case "trimmed":
        notice(
          `trimmed-${stream.kind}`,
          msg.first
            ? `The ${stream.kind} stream no longer holds entries before ${clock(idMs(msg.first))} ` +
              "(retention); the counts start there."
            : `The ${stream.kind} stream was trimmed empty (retention).`,
        );
        break;
      case "lagged":
        view.missed += msg.missed;
        notice(
          "lagged",
          `This page fell behind: the feed skipped ${view.missed} entries. ` +
            "The counts come from the server and miss nothing.",
        );
        break;
      default:
        break;
    }
  }

  // The server is still counting the window's past: its seconds come with the ticks.
  function backfilling(on) {
    $("total").dataset.complete = String(!on);
    const el = document.querySelector('.notice[data-key="backfill"]');
    if (on) notice("backfill", "Counting the last 5 minutes from the streams: older seconds fill in as they are counted.");
    else if (el) el.remove();
  }

  function addEvent(id, ev) {
    const item = { id, ev };
    view.history.push(item);
    if (view.history.length > HISTORY_KEEP) view.history.splice(0, view.history.length - HISTORY_KEEP);
    if (view.paused) {
      if (feedFilter(item)) view.pausedNew += 1;
    } else {
      view.dirty.feed = true;
    }
    if (view.timeline !== null) {
      // A merge into the customer seen live: the alias' events join the timeline.
      if (ev.action === "client.identify" || ev.action === "client.alias") {
        const p = ev.params || {};
        if (p.merged === true && ev.uuid === view.timeline && p.previous_uuid) {
          view.timelineUuids.add(String(p.previous_uuid));
          view.dirty.timeline = true;
        }
      }
      if (view.timelineUuids.has(ev.uuid)) view.dirty.timeline = true;
    }
    view.dirty.numbers = true;
  }

  function addRejected(id, rec) {
    view.rejected.push({ id, rec });
    if (view.rejected.length > REJECTED_KEEP) view.rejected.splice(0, view.rejected.length - REJECTED_KEEP);
    view.dirty.rejected = true;
    if (view.timeline !== null && view.timelineUuids.has(rec.uuid)) view.dirty.timeline = true;
    view.dirty.numbers = true;
  }

  // ---- filters -----------------------------------------------------------------------

  let actionRe = null;
  let uuidFilter = "";

  // The relay's glob: * any run, ? one character, matched in full.
  function globRe(glob) {
    const body = glob.replace(/[.+^${}()|\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".");
    try {
      return new RegExp(`^${body}$`);
    } catch {
      return null;
    }
  }

  // Humans by default: bots' events (stored with "bot": true) are counted and shown only when asked.
  let showBots = false;

  function feedFilter(item) {
    if (!showBots && item.ev.bot === true) return false;
    if (uuidFilter && item.ev.uuid !== uuidFilter) return false;
    return actionRe === null || actionRe.test(String(item.ev.action));
  }

  function readFilters() {
    const glob = $("filter-action").value.trim();
    actionRe = glob ? globRe(glob) : null;
    uuidFilter = $("filter-uuid").value.trim();
    showBots = $("show-bots").checked;
    view.dirty.feed = true;
    view.dirty.numbers = true;
    render();
  }

  // ---- rendering ------------------------------------------------------------------------

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    if (cls) td.className = cls;
    td.textContent = text;
    tr.appendChild(td);
    return td;
  }

  function whoButton(uuid) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "who";
    b.dataset.uuid = uuid;
    b.textContent = uuid;
    return b;
  }

  function renderFeed() {
    const body = $("feed").tBodies[0];
    const fragment = document.createDocumentFragment();
    let shown = 0;
    for (let i = view.history.length - 1; i >= 0 && shown < FEED_ROWS; i--) {
      const item = view.history[i];
      if (!feedFilter(item)) continue;
      shown += 1;
      const ev = item.ev;
      const tr = document.createElement("tr");
      tr.className = "event" + (view.openId === item.id ? " open" : "");
      tr.dataset.id = item.id;
      tr.dataset.uuid = ev.uuid;
      tr.dataset.action = ev.action;
      cell(tr, clock(ev.time), "time");
      cell(tr, "").appendChild(whoButton(String(ev.uuid)));
      cell(tr, String(ev.action), "action");
      cell(tr, ev.label == null ? "" : String(ev.label));
      fragment.appendChild(tr);
      if (view.openId === item.id) {
        const more = document.createElement("tr");
        more.className = "params";
        const td = cell(more, "");
        td.colSpan = 4;
        const pre = document.createElement("pre");
        pre.textContent = JSON.stringify(
          { params: ev.params, session: ev.session, producer: ev.producer, seq: ev.seq, id: item.id },
          null,
          2,
        );
        td.appendChild(pre);
        fragment.appendChild(more);
      }
    }
    body.replaceChildren(fragment);
    $("feed-empty").hidden = shown > 0;
    $("feed-empty").textContent = view.history.length ? "No event matches the filters." : "Waiting for events…";
  }

  function renderRejected() {
    const body = $("rejected").tBodies[0];
    const fragment = document.createDocumentFragment();
    const rows = view.rejected.slice(-REJECTED_ROWS).reverse();
    for (const { id, rec } of rows) {
      const tr = document.createElement("tr");
      tr.dataset.id = id;
      tr.dataset.code = rec.code;
      cell(tr, clock(rec.received), "time");
      const who = cell(tr, "");
      if (rec.uuid) who.appendChild(whoButton(String(rec.uuid)));
      cell(tr, String(rec.code), "code");
      cell(tr, String(rec.detail ?? ""), "reason");
      fragment.appendChild(tr);
    }
    body.replaceChildren(fragment);
    $("rejected-empty").hidden = rows.length > 0;
  }

  // Timeline order: when the server received it; within one frame, by seq. Ids of
  // the two streams come from two counters and do not order them against each other.
  function newerFirst(x, y) {
    const a = x.ev || x.rec;
    const b = y.ev || y.rec;
    if (a.received !== b.received) return b.received - a.received;
    if (a.producer === b.producer && a.seq !== b.seq) return b.seq - a.seq;
    return idAfter(x.id, y.id) ? -1 : 1;
  }

  function renderTimeline() {
    const aside = $("timeline");
    if (view.timeline === null) {
      aside.hidden = true;
      return;
    }
    aside.hidden = false;
    const uuid = view.timeline;
    const uuids = view.timelineUuids;
    $("timeline-uuid").textContent = uuid;
    const items = [];
    for (const item of view.history) if (uuids.has(item.ev.uuid)) items.push({ id: item.id, ev: item.ev });
    for (const item of view.rejected) if (uuids.has(item.rec.uuid)) items.push({ id: item.id, rec: item.rec });
    items.sort(newerFirst);
    const fragment = document.createDocumentFragment();
    for (const item of items.slice(0, TIMELINE_ROWS)) {
      const li = document.createElement("li");
      li.dataset.id = item.id;
      const when = document.createElement("span");
      when.className = "when";
      const what = document.createElement("span");
      what.className = "what";
      const label = document.createElement("span");
      label.className = "label";
      if (item.ev) {
        when.textContent = clock(item.ev.time);
        what.textContent = String(item.ev.action);
        // The server's default label for most actions is the action itself.
        label.textContent = item.ev.label == null || item.ev.label === item.ev.action ? "" : String(item.ev.label);
      } else {
        li.className = "rejected";
        when.textContent = clock(item.rec.received);
        what.textContent = `rejected: ${item.rec.code}`;
        label.textContent = String(item.rec.detail ?? "");
      }
      li.append(when, what, label);
      // Each row shows the uuid it was recorded under when it is an alias of the customer.
      const recorded = (item.ev || item.rec).uuid;
      if (recorded !== uuid) {
        const who = document.createElement("span");
        who.className = "alias";
        who.textContent = `as ${recorded}`;
        li.dataset.uuid = recorded;
        li.append(who);
      }
      fragment.appendChild(li);
    }
    $("timeline-list").replaceChildren(fragment);
    const first = view.history.length ? clock(idMs(view.history[0].id)) : null;
    const aliases = uuids.size - 1;
    $("timeline-note").textContent =
      `${items.length} entries seen by this page` +
      (first ? ` since ${first}` : "") +
      (aliases ? `, with ${aliases} merged uuid${aliases > 1 ? "s" : ""}` : "") +
      ", newest first.";
  }

  function renderNumbers() {
    if (range !== "5m") {
      renderStored();
      return;
    }
    const nowSec = Math.floor(serverNow() / 1000);
    const oldest = nowSec - WINDOW_S + 1;
    for (const second of view.seconds.keys()) if (second < oldest) view.seconds.delete(second);

    let total = 0;
    let totalRejected = 0;
    let rate = 0;
    let rateRejected = 0;
    let rateBots = 0;
    let peak = 0;
    let started = 0;
    let ended = 0;
    const codes = new Map();
    for (const [second, s] of view.seconds) {
      if (second > nowSec) continue;
      const a = accepted(s);
      const r = rejectedIn(s);
      if (second >= nowSec - RATE_S && second < nowSec) rateBots += s.bots || 0;
      total += a;
      totalRejected += r;
      started += s.started || 0;
      ended += s.ended || 0;
      peak = Math.max(peak, a + r);
      if (second >= nowSec - RATE_S && second < nowSec) {
        rate += a;
        rateRejected += r;
      }
      for (const code in s.rejected || {}) codes.set(code, (codes.get(code) || 0) + s.rejected[code]);
    }
    const from = (nowSec - RATE_S) * 1000;
    const to = nowSec * 1000;
    setFigure($("rate"), rate, (rate / RATE_S).toFixed(1), from, to);
    setFigure($("rate-rejected"), rateRejected, (rateRejected / RATE_S).toFixed(1), from, to);
    setFigure($("rate-bots"), rateBots, (rateBots / RATE_S).toFixed(1), from, to);
    $("rate-who").textContent = showBots ? " humans and bots" : " humans";
    setFigure($("total"), total, total.toLocaleString("en"), oldest * 1000, (nowSec + 1) * 1000);
    $("total-rejected").textContent = totalRejected.toLocaleString("en");
    $("total-rejected").dataset.count = String(totalRejected);
    $("sessions-flow").textContent = `${started.toLocaleString("en")} started · ${ended.toLocaleString("en")} ended in 5 min`;
    $("sessions-flow").dataset.started = String(started);
    $("sessions-flow").dataset.ended = String(ended);
    renderCodes(codes);
    renderChart(nowSec, peak);
    const top = view.top || {};
    renderTop("top", top.actions, "action", "events");
    renderTop("top-pages", top.pages, "page", "page views");
    renderTop("top-customers", top.customers, "uuid", "events");
    for (const name of ["mediums", "sources", "countries", "devices", "browsers"]) {
      renderTop("top-" + name, top[name], "key", "sessions");
    }
    $("feed-sampling").textContent =
      view.feedEvery > 1 ? `The feed shows every ${view.feedEvery}th entry (the rate is above what can be read); counts are exact.` : "";
  }

  // A second's accepted events: humans only unless bots are asked for.
  function accepted(s) {
    return (s.accepted || 0) - (showBots ? 0 : s.bots || 0);
  }

  function renderCodes(codes) {
    const sorted = [...codes].sort((x, y) => y[1] - x[1] || (x[0] < y[0] ? -1 : 1));
    const fragment = document.createDocumentFragment();
    for (const [code, n] of sorted) {
      const li = document.createElement("li");
      li.dataset.code = code;
      li.dataset.count = String(n);
      const name = document.createElement("span");
      name.className = "code";
      name.textContent = code;
      li.append(name, ` ${n.toLocaleString("en")}`);
      fragment.appendChild(li);
    }
    $("codes").replaceChildren(fragment);
  }

  function setFigure(el, count, text, from, to) {
    el.textContent = text;
    el.dataset.count = String(count);
    el.dataset.from = String(from);
    el.dataset.to = String(to);
  }

  // The chart's three horizontal grid lines, at a quarter, half and three
  // quarters of its scale (span: the pixel height of the scale's top).
  function gridLines(fragment, width, height, span) {
    for (const y of [0.25, 0.5, 0.75]) {
      const line = document.createElementNS(SVG, "line");
      line.setAttribute("class", "grid");
      line.setAttribute("x1", "0");
      line.setAttribute("x2", String(width));
      line.setAttribute("y1", String(height - y * span));
      line.setAttribute("y2", String(height - y * span));
      fragment.appendChild(line);
    }
  }

  function niceCeil(n) {
    if (n <= 5) return 5;
    const power = 10 ** Math.floor(Math.log10(n));
    for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= n) return step * power;
    return 10 * power;
  }

  function renderChart(nowSec, peak) {
    const svg = $("chart");
    const width = 900;
    const height = 180;
    const slot = width / WINDOW_S;
    const top = niceCeil(peak);
    const scale = (height - 4) / top;
    const fragment = document.createDocumentFragment();
    gridLines(fragment, width, height, top * scale);
    for (const [second, s] of view.seconds) {
      if (second > nowSec) continue;
      const x = (second - (nowSec - WINDOW_S + 1)) * slot;
      const a = accepted(s);
      const r = rejectedIn(s);
      const title = `${clock(second * 1000).slice(0, 8)}  ${a} accepted, ${r} rejected`;
      let y = height;
      for (const [kind, n] of [["a", a], ["r", r]]) {
        if (!n) continue;
        const h = n * scale;
        y -= h;
        const rect = document.createElementNS(SVG, "rect");
        rect.setAttribute("class", kind);
        rect.setAttribute("x", x.toFixed(2));
        rect.setAttribute("y", y.toFixed(2));
        rect.setAttribute("width", (slot * 0.8).toFixed(2));
        rect.setAttribute("height", h.toFixed(2));
        rect.dataset.s = String(second);
        rect.dataset.n = String(n);
        const tip = document.createElementNS(SVG, "title");
        tip.textContent = title;
        rect.appendChild(tip);
        fragment.appendChild(rect);
      }
    }
    svg.replaceChildren(fragment);
    svg.dataset.peak = String(peak);
    $("chart-scale").textContent = `scale 0–${top}/s, lines every ${top / 4}`;
    svg.setAttribute("aria-label", `events per second over the last five minutes; scale 0 to ${top} per second`);
  }

  // One of the server's top tables: [key, count, error] rows, the true count in [count - error, count].
  function renderTop(id, table, attr, what) {
    const rows = table ? table.rows : [];
    const total = table ? table.total : 0;
    const fragment = document.createDocumentFragment();
    const most = rows.length ? rows[0][1] : 1;
    for (const [key, n, error] of rows.slice(0, TOP_N)) {
      const tr = document.createElement("tr");
      tr.dataset[attr] = key;
      tr.dataset.count = String(n);
      tr.dataset.error = String(error);
      if (attr === "uuid") cell(tr, "").appendChild(whoButton(key));
      else cell(tr, key, attr === "action" ? "action" : "key");
      const shown = error ? `${(n - error).toLocaleString("en")}–${n.toLocaleString("en")}` : n.toLocaleString("en");
      cell(tr, shown, "num");
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = `${(100 * n) / most}%`;
      bar.title = `${((100 * n) / Math.max(total, 1)).toFixed(1)}% of ${total.toLocaleString("en")} ${what}`;
      cell(tr, "").appendChild(bar);
      fragment.appendChild(tr);
    }
    $(id).tBodies[0].replaceChildren(fragment);
    $(id + "-empty").hidden = rows.length > 0;
    if (attr !== "action") return;
    const list = document.createDocumentFragment();
    for (const [action] of rows) {
      const option = document.createElement("option");
      option.value = action;
      list.appendChild(option);
    }
    $("actions").replaceChildren(list);
  }

  // ---- ranges read from the store ---------------------------------------------------------------

  function when(ms) {
    const d = new Date(ms);
    const hm = d.toLocaleTimeString("en-GB", { hour: "2-digit", minute: "2-digit" });
    return range === "7d" ? `${d.toLocaleDateString("en-GB", { weekday: "short", day: "numeric" })} ${hm}` : hm;
  }

  function stepText(step) {
    return step >= 3600 ? `${step / 3600} h` : `${step / 60} min`;
  }

  function setAxis(labels) {
    const fragment = document.createDocumentFragment();
    for (const text of labels) {
      const span = document.createElement("span");
      span.textContent = text;
      fragment.appendChild(span);
    }
    $("axis").replaceChildren(fragment);
  }

  // The page's words for the range chosen: titles, notes, axis, empty tables.
  function rangeTexts() {
    const spec = RANGES[range];
    document.body.dataset.range = range;
    for (const b of $("range").querySelectorAll("button")) b.setAttribute("aria-pressed", String(b.dataset.range === range));
    for (const [id, text] of Object.entries(LIVE_TEXT)) $(id).textContent = text;
    if (range !== "5m") {
      $("rate-note").textContent = `accepted, average of the ${spec.label}`;
      $("rate-rejected-note").textContent = "not stored: the 5 min view counts them";
      $("total-title").textContent = spec.label.replace(/^l/, "L");
      $("chart-title").textContent = `Events, ${spec.label}`;
      $("rate-rejected").textContent = "–";
      $("rate-rejected").dataset.count = "";
      $("codes").replaceChildren();
    }
    for (const el of document.querySelectorAll(".range-label")) el.textContent = spec.label;
    for (const id of ["top-empty", "top-pages-empty", "top-customers-empty"]) {
      const el = $(id);
      if (el.dataset.live === undefined) el.dataset.live = el.textContent;
      el.textContent = el.dataset.live.replace("the last 5 minutes", range === "5m" ? "the last 5 minutes" : `the ${spec.label}, as stored`);
    }
    setAxis(spec.axis);
  }

  function selectRange(name) {
    if (!RANGES[name]) name = "5m";
    range = name;
    if (view) {
      clearInterval(view.storedTimer);
      view.stored = null;
      history.replaceState(null, "", `#site=${encodeURIComponent(view.site)}` + (range === "5m" ? "" : `&range=${range}`));
      if (range !== "5m") {
        fetchStored();
        view.storedTimer = setInterval(fetchStored, RANGES[range].refresh);
      }
      view.dirty.numbers = true;
    }
    document.querySelectorAll('.notice[data-key="stored"], .notice[data-key="stored-behind"]').forEach((el) => el.remove());
    rangeTexts();
    render();
  }

  async function fetchStored() {
    const site = view.site;
    const name = range;
    try {
      const data = await getJSON(`/v1/sites/${encodeURIComponent(site)}/rollups?range=${name}`);
      if (!view || view.site !== site || range !== name) return;
      view.stored = data;
      document.querySelector('.notice[data-key="stored"]')?.remove();
      const behind = data.newest === null ? null : data.now - data.newest;
      if (behind === null) notice("stored-behind", `Nothing stored for ${site} in the ${RANGES[name].label}: is the persist worker running?`);
      else if (behind > 3 * 60000) notice("stored-behind", `The store has counted up to ${when(data.newest + 60000)}: the persist worker is behind or stopped.`);
      else document.querySelector('.notice[data-key="stored-behind"]')?.remove();
    } catch (e) {
      if (e instanceof NeedToken) await askToken();
      else if (view && view.site === site && range === name) notice("stored", `The ${RANGES[name].label} cannot be read from the store (${e.message}).`);
    }
    if (view) view.dirty.numbers = true;
  }

  function renderStored() {
    const data = view.stored;
    const spec = RANGES[range];
    const t = data ? data.totals : {};
    const accepted = t.accepted || 0;
    const seconds = data ? Math.max(1, (data.now - data.since) / 1000) : 1;
    const from = data ? data.since : 0;
    const to = data ? data.now : 0;
    setFigure($("rate"), accepted, data ? (accepted / seconds).toFixed(2) : "…", from, to);
    setFigure($("rate-bots"), t.bots || 0, data ? ((t.bots || 0) / seconds).toFixed(2) : "…", from, to);
    setFigure($("total"), accepted, data ? accepted.toLocaleString("en") : "…", from, to);
    $("total").dataset.complete = String(data !== null);
    $("sessions-flow").textContent = `${(t.started || 0).toLocaleString("en")} started · ${(t.ended || 0).toLocaleString("en")} ended in ${spec.short}`;
    $("sessions-flow").dataset.started = String(t.started || 0);
    $("sessions-flow").dataset.ended = String(t.ended || 0);
    renderStoredChart(data);
    const top = data ? data.top : {};
    renderTop("top", top.actions, "action", "events");
    renderTop("top-pages", top.pages, "page", "page views");
    renderTop("top-customers", top.customers, "uuid", "events");
    $("feed-sampling").textContent = "";
    $("range-hint").textContent = data
      ? `Each bar is ${stepText(data.step)} of received time (the server's clock when it took the event), ` +
        `as the persist worker stored it, from ${when(data.since)}; top tables from ${when(data.top_since)}, ` +
        `each count at most its shown upper bound. Newest minute stored: ${data.newest === null ? "none" : when(data.newest)}.`
      : "Reading the store…";
  }

  function renderStoredChart(data) {
    const svg = $("chart");
    const width = 900;
    const height = 180;
    const spec = RANGES[range];
    const step = data ? data.step : 60;
    const slots = spec.seconds / step;
    const bars = data ? data.buckets : [];
    const peak = bars.reduce((m, b) => Math.max(m, b.accepted || 0), 0);
    const top = niceCeil(peak);
    const scale = (height - 4) / top;
    const fragment = document.createDocumentFragment();
    const w = width / slots;
    gridLines(fragment, width, height, top * scale);
    for (const b of bars) {
      const n = b.accepted || 0;
      if (!n) continue;
      const rect = document.createElementNS(SVG, "rect");
      rect.setAttribute("class", "a");
      rect.setAttribute("x", (((b.t - data.since) / 1000 / step) * w).toFixed(2));
      rect.setAttribute("y", (height - n * scale).toFixed(2));
      rect.setAttribute("width", (w * 0.8).toFixed(2));
      rect.setAttribute("height", (n * scale).toFixed(2));
      rect.dataset.t = String(b.t);
      rect.dataset.n = String(n);
      const tip = document.createElementNS(SVG, "title");
      tip.textContent = `${when(b.t)}  ${n} accepted, ${b.started || 0} sessions started`;
      rect.appendChild(tip);
      fragment.appendChild(rect);
    }
    svg.replaceChildren(fragment);
    svg.dataset.peak = String(peak);
    $("chart-scale").textContent = `scale 0–${top} per ${stepText(step)}, lines every ${top / 4}`;
    svg.setAttribute("aria-label", `events per ${stepText(step)} over the ${spec.label}; scale 0 to ${top}`);
  }

  let lastNumbers = 0;

  function render() {
    if (!view) return;
    const d = view.dirty;
    if (d.feed && !view.paused) {
      renderFeed();
      d.feed = false;
    }
    if (d.rejected) {
      renderRejected();
      d.rejected = false;
    }
    if (d.timeline) {
      renderTimeline();
      d.timeline = false;
    }
    $("paused-count").textContent = view.paused ? `${view.pausedNew} new while paused` : "";
    // Numbers move with the clock too: once a second, or sooner when events came.
    const now = Date.now();
    if (d.numbers || now - lastNumbers >= 1000) {
      renderNumbers();
      d.numbers = false;
      lastNumbers = now;
    }
  }

  // ---- status and notices -----------------------------------------------------------------

  function setStatus(state, text) {
    const el = $("status");
    el.dataset.state = state;
    el.textContent = text;
  }

  function updateStatus() {
    if (!view || asking) return;
    const streams = view.streams;
    if (streams.length && streams.every((s) => s.ready)) setStatus("live", "live");
    else if (streams.some((s) => s.last !== null || s.retry > RETRY_FIRST_MS)) setStatus("reconnecting", "reconnecting…");
    else setStatus("connecting", "connecting…");
  }

  function notice(key, text) {
    let el = document.querySelector(`.notice[data-key="${key}"]`);
    if (!el) {
      el = document.createElement("div");
      el.className = "notice";
      el.dataset.key = key;
      const span = document.createElement("span");
      const close = document.createElement("button");
      close.type = "button";
      close.textContent = "dismiss";
      close.addEventListener("click", () => el.remove());
      el.append(span, close);
      $("notices").appendChild(el);
    }
    el.firstChild.textContent = text;
  }

  // ---- summary (open sessions, Redis' clock) ---------------------------------------------------

  /** Warn while the persist backlog is at 80 % of max_backlog or more (frames are refused at it). */
  function backlogNotice(backlog, max) {
    const el = document.querySelector('.notice[data-key="backlog"]');
    if (!max || backlog == null || backlog < 0.8 * max) {
      if (el) el.remove();
      return;
    }
    const pct = Math.min(100, Math.floor((100 * backlog) / max));
    notice("backlog", `Persist backlog ${backlog.toLocaleString("en")} of ${max.toLocaleString("en")} ` +
      `(${pct} %): the store is behind. ` +
      (backlog >= max ? "New events are being refused (nack unavailable) until the workers catch up."
        : "At the cap new events are refused (nack unavailable) until the workers catch up."));
  }

  async function refreshSummary() {
    const site = view.site;
    const asked = Date.now();
    try {
      const summary = await getJSON(`/v1/sites/${encodeURIComponent(site)}/summary`);
      if (!view || view.site !== site) return;
      clockOffset = summary.now - (asked + Date.now()) / 2;
      $("sessions").textContent = summary.open_sessions.toLocaleString("en");
      $("sessions").dataset.count = String(summary.open_sessions);
      $("sessions-note").textContent = "now";
      backlogNotice(summary.backlog, summary.max_backlog);
    } catch (e) {
      if (e instanceof NeedToken) await askToken();
      else $("sessions-note").textContent = "server unreachable; last known";
    }
  }

  // ---- site choice ------------------------------------------------------------------------------

  function selectSite(site) {
    if (view) {
      for (const stream of view.streams) stream.close();
      clearInterval(view.summaryTimer);
      clearInterval(view.storedTimer);
    }
    document.querySelectorAll(".notice").forEach((el) => el.remove());
    view = newView(site);
    document.title = `${site} · eventwire live`;
    $("sessions").textContent = "–";
    readFilters();
    // The server counts the window; the page gets its rollups and the newest entries.
    view.streams = [new LiveStream(site, "summary", "now", onMessage)];
    updateStatus();
    refreshSummary();
    view.summaryTimer = setInterval(refreshSummary, SUMMARY_EVERY_MS);
    selectRange(range); // the range's figures of this site
  }

  function openTimeline(uuid) {
    view.timeline = uuid;
    view.timelineUuids = new Set([uuid]);
    view.dirty.timeline = true;
    render();
    // The uuids merged into the customer (and what it merged into) as Redis holds them.
    getJSON(`/v1/sites/${encodeURIComponent(view.site)}/customers/${encodeURIComponent(uuid)}`)
      .then((links) => {
        if (view.timeline !== uuid) return;
        for (const a of links.aliases || []) view.timelineUuids.add(String(a));
        view.dirty.timeline = true;
        render();
      })
      .catch(() => {}); // the timeline still shows the customer's own events
  }

  function bind() {
    $("site").addEventListener("change", (e) => selectSite(e.target.value));
    $("range").addEventListener("click", (e) => {
      const b = e.target.closest("button[data-range]");
      if (b) selectRange(b.dataset.range);
    });
    $("filters").addEventListener("submit", (e) => e.preventDefault());
    $("filter-action").addEventListener("input", readFilters);
    $("filter-uuid").addEventListener("input", readFilters);
    $("show-bots").addEventListener("change", readFilters);
    $("pause").addEventListener("click", () => {
      view.paused = !view.paused;
      view.pausedNew = 0;
      $("pause").setAttribute("aria-pressed", String(view.paused));
      $("pause").textContent = view.paused ? "Resume" : "Pause";
      view.dirty.feed = true;
      render();
    });
    $("feed").tBodies[0].addEventListener("click", (e) => {
      const who = e.target.closest("button.who");
      if (who) {
        openTimeline(who.dataset.uuid);
        return;
      }
      const row = e.target.closest("tr.event");
      if (!row) return;
      view.openId = view.openId === row.dataset.id ? null : row.dataset.id;
      view.dirty.feed = true;
      const wasPaused = view.paused;
      view.paused = false; // opening a row re-renders even while paused
      render();
      view.paused = wasPaused;
    });
    $("rejected").tBodies[0].addEventListener("click", (e) => {
      const who = e.target.closest("button.who");
      if (who) openTimeline(who.dataset.uuid);
    });
    $("timeline-close").addEventListener("click", () => {
      view.timeline = null;
      view.dirty.timeline = true;
      render();
    });
    $("signout").hidden = !token;
    $("signout").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      location.reload();
    });
  }

  async function start() {
    bind();
    let sites = null;
    while (sites === null) {
      try {
        sites = (await getJSON("/v1/sites")).sites;
      } catch (e) {
        if (e instanceof NeedToken) await askToken();
        else {
          setStatus("error", "server unreachable; retrying");
          await new Promise((resolve) => setTimeout(resolve, 2000));
        }
      }
    }
    const select = $("site");
    for (const site of sites) {
      const option = document.createElement("option");
      option.value = site;
      option.textContent = site;
      select.appendChild(option);
    }
    const hash = new URLSearchParams(location.hash.slice(1));
    const wanted = hash.get("site");
    if (RANGES[hash.get("range")]) range = hash.get("range");
    const site = sites.includes(wanted) ? wanted : sites[0];
    if (site === undefined) {
      setStatus("error", "no sites configured");
      return;
    }
    select.value = site;
    selectSite(site);
    setInterval(render, RENDER_EVERY_MS);
  }

  start();
})();
