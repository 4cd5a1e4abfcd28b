/*! eventwire tracker 1.0 | plain JavaScript, no dependency, no build step */
/*
 * Install with one tag:
 *   <script src="https://HOST/tracker.js" data-site="shop" async></script>
 *
 * What this file owns: the browser half of docs/protocol.md sections 1-4. It keeps
 * every event in localStorage until the server has acked it, numbers events per
 * producer (one producer per tab, kept in sessionStorage), sends them in
 * batches over one lazily opened WebSocket, resends the unacked ones after
 * `welcome.acked`, and resends the queues that closed or crashed tabs left
 * behind, under their own producer ids, so the server's de-duplication keeps
 * delivery exactly-once in the stream. When the page is hidden or goes away,
 * the unacked events also go by navigator.sendBeacon to the server's HTTP
 * listener (protocol section 14), same producer and seqs, and stay queued
 * until acked: a tab closed before its socket opened still delivers them.
 *
 * Storage layout (prefix `ew.{site}.`):
 *   localStorage   q.{producer}  {s: last seq given, t: heartbeat ms, c: 1 once
 *                                 its tab hid, o: id of the page holding it,
 *                                 d: events dropped, e: [unacked events]}
 *                  uuid          the customer (data-uuid-store="local")
 *                  optout        "1" after eventwire.optOut()
 *   sessionStorage producer      this tab's producer id
 *   cookie         ew_{site}     the customer (data-uuid-store="cookie", default)
 * data-consent="pending": memory only, no socket, until consent(true) (README
 * "Customers"); data-cookieless="true": everything in sessionStorage.
 */
(function () {
  "use strict";

  var CLIENT = "eventwire-js/1.0";
  // The hello's context: the page, and webdriver when automation drives the browser
  // (the server counts such a connection as a bot; docs/protocol.md section 18).
  function pageContext() {
    var c = { url: location.href, referrer: document.referrer, title: document.title };
    if (navigator.webdriver === true) c.webdriver = true;
    return c;
  }
  // Unacked events kept per producer; beyond it the oldest are dropped (and
  // counted in `dropped`). 1000 events of ~300 bytes are ~300 KB of the
  // origin's ~5 MB localStorage.
  var QUEUE_CAP = 1000;
  // Events tracked within this many ms share one frame.
  var BATCH_MS = 100;
  // Events per track frame; the server's welcome.max_batch lowers it.
  var BATCH_MAX = 100;
  // Encoded events per frame: stays well below the server's max_frame_bytes
  // (256 KiB, closed 1009 above it).
  var FRAME_BYTES = 128 * 1024;
  // One encoded event: the server stores at most max_event_bytes (32 KiB),
  // ids and times included (~300 bytes).
  var EVENT_BYTES = 32 * 1024 - 512;
  // Calls held in memory while consent is pending; beyond it the oldest go.
  var HELD_CAP = 100;
  // Frames sent and not answered yet, per connection.
  var INFLIGHT_MAX = 4;
  // Reconnect delay: uniformly random below min(BACKOFF_MAX, BACKOFF_BASE * 2^attempt).
  var BACKOFF_BASE = 500;
  var BACKOFF_MAX = 30000;
  // A live tab rewrites its queue's heartbeat this often. Background tabs may
  // run timers only once a minute, so a queue counts as abandoned (and is
  // adopted by another tab) only after STALE_MS without one, or at once when
  // its tab said goodbye on pagehide.
  var HEARTBEAT_MS = 20000;
  var STALE_MS = 180000;
  // One beacon's body: sendBeacon refuses more than 64 KiB in flight per page.
  var BEACON_BYTES = 60 * 1024;
  // The server's HTTP listener, filled in when the server serves this file
  // (its public_http_url); data-http overrides it, data-http="" turns beacons off.
  var HTTP_URL = /*ew:http_url*/ "";
  var ACTION = /^(?=.{3,32}$)[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+$/;
  var UUID = /^[A-Za-z0-9._:-]{1,64}$/;

  var script =
    document.currentScript || document.querySelector("script[data-site][src*='tracker.js']");
  var data = (script && script.dataset) || {};
  var site = data.site;
  var P = "ew." + site + ".";
  var noop = function () {
    return false;
  };
  var api = {
    track: noop,
    pageVisit: noop,
    identify: noop,
    reset: noop,
    optOut: noop,
    optIn: noop,
    status: noop,
    consent: noop,
  };
  api.push = function (cmd) {
    var f = api[cmd && cmd[0]];
    return f && cmd[0] !== "push" ? f.apply(api, cmd.slice(1)) : fail("unknown command " + cmd);
  };
  var queued = window.eventwire;
  if (queued && queued.track)
    return warn("tracker.js is included twice; the second copy does nothing");
  window.eventwire = api;

  function warn(msg) {
    console.warn("eventwire: " + msg);
    return false;
  }
  function fail(msg) {
    console.error("eventwire: " + msg);
    return false;
  }

  if (!site || !/^[A-Za-z0-9_-]{1,64}$/.test(site)) {
    fail('the script tag needs data-site="SITE" (letters, digits, _ and -)');
    return replay();
  }
  if (data.respectDnt === "true" && (navigator.doNotTrack === "1" || window.doNotTrack === "1")) {
    // Do Not Track: nothing is stored or sent; the API stays, as no-ops.
    return replay();
  }

  var endpoint = data.endpoint || new URL("/v1/track/" + site, script.src).href;
  endpoint = endpoint.replace(/^http/, "ws");
  var httpBase = data.http != null ? data.http : HTTP_URL;
  var beaconEndpoint = httpBase ? httpBase.replace(/\/+$/, "") + "/v1/track/" + site : "";
  var COOKIELESS = data.cookieless === "true";
  var consentState = data.consent === "pending" ? "pending" : "granted";
  var heldCalls = [];
  var heldDropped = 0;
  var LS, SS;
  openStorage();
  // Identifies this page instance as the holder of the queues it works on.
  var ME = rand(8);
  // Tokens stay in memory only: a logged-in page calls identify() on each load.
  var tokens = {};
  // uuids reset() made: their identify says merge: false.
  var fresh = {};
  var own = null;
  var orphans = [];
  var lastRoute = null;
  var lastUrl = document.referrer;
  var seen = new WeakSet();
  var views = window.IntersectionObserver
    ? new IntersectionObserver(onView, { threshold: 0.5 })
    : null;

  // ---- small helpers ---------------------------------------------------------

  function now() {
    return Date.now();
  }

  function rand(n) {
    var b = crypto.getRandomValues(new Uint8Array(n));
    return Array.from(b, function (x) {
      return (x + 256).toString(16).slice(1);
    }).join("");
  }

  function randomUuid() {
    // crypto.randomUUID exists only in secure contexts; build a v4 by hand.
    var h = rand(16);
    return [
      h.slice(0, 8),
      h.slice(8, 12),
      "4" + h.slice(13, 16),
      ((parseInt(h[16], 16) & 3) | 8).toString(16) + h.slice(17, 20),
      h.slice(20),
    ].join("-");
  }

  function storage(name) {
    // Storage can be missing or throw (disabled, sandboxed frame): keep the
    // data in memory then, which still survives reconnects, not reloads.
    try {
      var s = window[name];
      s.setItem(P + "probe", "1");
      s.removeItem(P + "probe");
      return s;
    } catch (e) {
      return memory();
    }
  }

  function openStorage() {
    if (consentState !== "granted") {
      LS = memory();
      SS = memory();
      return;
    }
    SS = storage("sessionStorage");
    LS = COOKIELESS ? SS : storage("localStorage");
  }

  // ["t", action, params, label, time] or ["i", uuid, token]
  function hold(call) {
    heldCalls.push(call);
    if (heldCalls.length > HELD_CAP) heldDropped += heldCalls.splice(0, 1).length;
    return true;
  }

  function memory() {
    var m = {};
    return {
      getItem: function (k) {
        return k in m ? m[k] : null;
      },
      setItem: function (k, v) {
        m[k] = String(v);
      },
      removeItem: function (k) {
        delete m[k];
      },
      key: function (i) {
        return Object.keys(m)[i];
      },
      get length() {
        return Object.keys(m).length;
      },
    };
  }

  function readJson(key) {
    try {
      var r = JSON.parse(LS.getItem(key));
      return r && Array.isArray(r.e) ? r : null;
    } catch (e) {
      return null;
    }
  }

  function bytes(s) {
    return new TextEncoder().encode(s).length;
  }

  function optedOut() {
    return LS.getItem(P + "optout") === "1";
  }

  // ---- identity --------------------------------------------------------------

  var cookieName = "ew_" + site;
  var uuidInStorage = data.uuidStore === "local" || COOKIELESS;
  function storedUuid() {
    if (uuidInStorage) return LS.getItem(P + "uuid");
    var m = document.cookie.match(new RegExp("(?:^|; )" + cookieName + "=([^;]*)"));
    return m && decodeURIComponent(m[1]);
  }

  function storeUuid(u) {
    if (uuidInStorage) {
      if (u) LS.setItem(P + "uuid", u);
      else LS.removeItem(P + "uuid");
      return;
    }
    document.cookie =
      cookieName +
      "=" +
      encodeURIComponent(u || "") +
      "; path=/; SameSite=Lax; max-age=" +
      (u ? 63072000 : 0) +
      (data.cookieDomain ? "; domain=" + data.cookieDomain : "") +
      (location.protocol === "https:" ? "; Secure" : "");
  }

  function uuid() {
    var u = storedUuid();
    if (!u || !UUID.test(u)) storeUuid((u = randomUuid()));
    return u;
  }

  // ---- one producer's queue and its connection -----------------------------

  /**
   * The unacked events of one producer, kept in localStorage, and the
   * WebSocket that delivers them. `mine` is the tab's own queue (takes new
   * events, keeps its socket open); otherwise an adopted queue of a closed
   * tab, deleted once the server has everything.
   */
  function Queue(id, mine) {
    this.id = id;
    this.key = P + "q." + id;
    this.mine = mine;
    this.ws = null;
    this.ready = false;
    this.frames = []; // [first seq, last seq] of each unanswered frame, in order
    this.sent = 0; // highest seq sent on this connection
    this.nacked = 0; // longest retry_after_ms of nacks not resolved yet
    this.attempt = 0;
    this.strikes = 0;
    this.timer = 0; // reconnect
    this.lingering = 0; // batch
    this.stopped = false;
  }

  Queue.prototype.read = function () {
    if (this.stopped) return null;
    var r = readJson(this.key);
    if (r && r.o === ME) return r;
    // The queue was adopted by another tab (this one looked dead) or cleared:
    // stop touching it, or two pages would send under one producer.
    this.stop();
    if (this === own) own = optedOut() ? null : claimOwn(true);
    else this.drop();
    return null;
  };

  Queue.prototype.write = function (r) {
    r.t = now();
    for (;;) {
      try {
        return LS.setItem(this.key, JSON.stringify(r));
      } catch (e) {
        // Over the origin's quota: drop the oldest tenth, counted, and retry.
        // When not even an empty queue fits, the page's other data fills the
        // quota: keep queues in memory from now on (lost on reload, not before).
        if (!r.e.length) {
          LS = memory();
          continue;
        }
        var n = Math.ceil(r.e.length / 10);
        r.e.splice(0, n);
        r.d += n;
      }
    }
  };

  /** Read, change and write back the record; null when it is no longer ours. */
  Queue.prototype.edit = function (change) {
    var r = this.read();
    if (r) {
      change(r);
      this.write(r);
    }
    return r;
  };

  Queue.prototype.add = function (ev) {
    var ok = this.edit(function (r) {
      ev.s = ++r.s;
      r.e.push(ev);
      if (r.e.length > QUEUE_CAP) r.d += r.e.splice(0, r.e.length - QUEUE_CAP).length;
    });
    if (ok) this.soon();
    else if (own) own.add(ev); // lost this producer just now: the new one takes it
  };

  /** Deliver soon: connect when there is no socket, else send after the batch delay. */
  Queue.prototype.soon = function () {
    var q = this;
    if (q.stopped) return;
    if (!q.ws) {
      if (!q.timer) q.connect();
    } else if (!q.lingering) {
      q.lingering = setTimeout(function () {
        q.lingering = 0;
        q.pump(false);
      }, BATCH_MS);
    }
  };

  Queue.prototype.connect = function () {
    var q = this;
    var r = q.read();
    if (!r || q.ws) return;
    if (!q.mine && !r.e.length) return q.finish();
    var ws;
    try {
      ws = new WebSocket(endpoint, "eventwire.v1.json");
    } catch (e) {
      return q.closed(1006, String(e));
    }
    q.ws = ws;
    ws.onopen = function () {
      var cur = q.read();
      if (!cur) return;
      var first = cur.e[0];
      q.uuid = first ? first.u : uuid();
      q.token = tokens[q.uuid];
      q.send({
        type: "hello",
        uuid: q.uuid,
        producer: q.id,
        token: q.token,
        client: CLIENT,
        context: pageContext(),
      });
    };
    ws.onmessage = function (m) {
      if (q.ws !== ws) return;
      var msg;
      try {
        msg = JSON.parse(m.data);
      } catch (e) {
        return;
      }
      var fn = q["on_" + msg.type];
      if (fn) fn.call(q, msg);
    };
    ws.onclose = function (e) {
      if (q.ws === ws) q.closed(e.code, e.reason);
    };
  };

  Queue.prototype.send = function (msg) {
    if (this.ws && this.ws.readyState === 1) this.ws.send(JSON.stringify(msg));
  };

  Queue.prototype.on_welcome = function (w) {
    this.ready = true;
    this.attempt = 0;
    this.max = Math.min(BATCH_MAX, w.max_batch || BATCH_MAX);
    // Everything up to acked is in Redis already: drop it, resend the rest.
    this.edit(function (r) {
      r.e = r.e.filter(function (x) {
        return x.s > w.acked;
      });
      // Never give a seq the server has seen already: it would count as duplicate.
      if (r.s < w.acked) r.s = w.acked;
    });
    this.pump(false);
  };

  Queue.prototype.on_ack = function (a) {
    var f = this.frames.shift();
    if (!f) return;
    (a.rejected || []).forEach(function (x) {
      warn("event " + x.seq + " rejected (" + x.code + "): " + x.detail);
    });
    // Rejected events are final: they leave the queue with the stored ones.
    this.edit(function (r) {
      r.e = r.e.filter(function (x) {
        return x.s < f[0] || x.s > f[1];
      });
    });
    this.pump(false);
  };

  Queue.prototype.on_nack = function (n) {
    var q = this;
    if (!q.frames.shift()) return;
    // The server nacks every later frame too, until the nacked one is resent:
    // wait for all answers, then resend everything unacked after the delay.
    q.nacked = Math.max(q.nacked, n.retry_after_ms || 0, 1);
    if (q.frames.length) return;
    var wait = q.nacked;
    q.timer = setTimeout(function () {
      q.timer = 0;
      q.nacked = 0;
      q.sent = 0;
      q.pump(false);
    }, wait);
  };

  Queue.prototype.on_error = function (e) {
    warn("server closed the connection: " + e.code + ": " + e.detail);
  };

  /**
   * Send what is unsent, in seq order: one track frame per run of events of
   * one customer, an identify before a run of another customer. `all` (on
   * pagehide) ignores the in-flight bound.
   */
  Queue.prototype.pump = function (all) {
    var q = this;
    if (!q.ready || q.nacked) return;
    var r = q.read();
    if (!r) return;
    var e = r.e;
    var i = 0;
    while (i < e.length && e[i].s <= q.sent) i++;
    while (i < e.length && (all || q.frames.length < INFLIGHT_MAX)) {
      q.identify(e[i].u);
      var batch = [];
      var size = 0;
      while (i < e.length && e[i].u === q.uuid && batch.length < q.max) {
        size += e[i].b || 0;
        if (batch.length && size > FRAME_BYTES) break;
        batch.push(e[i++]);
      }
      q.send({
        type: "track",
        events: batch.map(function (x) {
          return { seq: x.s, action: x.a, label: x.l, time: x.t, params: x.p };
        }),
      });
      q.sent = batch[batch.length - 1].s;
      q.frames.push([batch[0].s, q.sent]);
    }
    if (i < e.length) return;
    if (q.mine) q.identify(uuid());
    else if (!e.length && !q.frames.length) q.finish();
  };

  /**
   * The page goes away (or is hidden, and may never come back): send the
   * unacked events by beacon to the HTTP listener, under the same producer
   * and seqs. Only the first run of one customer's events, from the lowest
   * unacked seq, within BEACON_BYTES: beacons may arrive in any order, and the
   * server stores by seq, so a beacon must never carry seqs above ones it
   * leaves out. The events stay queued until an ack or a welcome covers them:
   * what the beacon stored counts as duplicate when the socket sends it again.
   */
  Queue.prototype.beacon = function () {
    if (!beaconEndpoint || !navigator.sendBeacon) return;
    var r = this.read();
    if (!r || !r.e.length) return;
    var u = r.e[0].u;
    var batch = [];
    var size = 0;
    for (var i = 0; i < r.e.length && r.e[i].u === u && batch.length < BATCH_MAX; i++) {
      size += r.e[i].b || 300;
      if (batch.length && size > BEACON_BYTES - 1024) break;
      batch.push(r.e[i]);
    }
    var body = JSON.stringify({
      uuid: u,
      producer: this.id,
      token: tokens[u],
      context: pageContext(),
      events: batch.map(function (x) {
        return { seq: x.s, action: x.a, label: x.l, time: x.t, params: x.p };
      }),
    });
    try {
      // A string goes as text/plain: no CORS preflight, which an unloading page cannot wait for.
      if (bytes(body) <= BEACON_BYTES) navigator.sendBeacon(beaconEndpoint, body);
    } catch (e) {
      // A refused beacon changes nothing: the events are still queued.
    }
  };

  /** Switch the connection to customer u (log-in, log-out, or a fresh token). */
  Queue.prototype.identify = function (u) {
    var t = tokens[u];
    if (u === this.uuid && t === this.token) return;
    if (u === this.uuid && !t) return;
    this.uuid = u;
    this.token = t;
    var msg = { type: "identify", uuid: u, token: t };
    if (fresh[u]) msg.merge = false;
    this.send(msg);
  };

  Queue.prototype.closed = function (code, reason) {
    var q = this;
    var welcomed = q.ready;
    q.ws = null;
    q.ready = false;
    q.frames = [];
    q.sent = 0;
    q.nacked = 0;
    clearTimeout(q.timer);
    clearTimeout(q.lingering);
    q.timer = q.lingering = 0;
    if (q.stopped) return;
    if (code === 1007 || code === 1008 || code === 1009) {
      // A reconnect will meet the same refusal: keep the delay growing.
      q.attempt = Math.max(q.attempt, ++q.strikes);
      warn("connection refused (" + code + " " + reason + "); retrying");
    } else if (welcomed) {
      q.strikes = 0;
    } else if (q.attempt === 2) {
      warn("cannot reach " + endpoint + " (offline, server down or origin not allowed); retrying");
    }
    var bound = Math.min(BACKOFF_MAX, BACKOFF_BASE * Math.pow(2, Math.min(q.attempt++, 16)));
    q.timer = setTimeout(function () {
      q.timer = 0;
      q.connect();
    }, Math.random() * bound);
  };

  /** Connect now if waiting to reconnect (back online, tab visible again). */
  Queue.prototype.retry = function () {
    if (this.ws || this.stopped || !this.timer || this.nacked) return;
    clearTimeout(this.timer);
    this.timer = 0;
    this.connect();
  };

  Queue.prototype.stop = function () {
    this.stopped = true;
    if (this.ws) this.ws.close(1000, "done");
    this.closed(1000, "");
  };

  /** An adopted queue is delivered: delete it and start on the next one. */
  Queue.prototype.finish = function () {
    LS.removeItem(this.key);
    this.stop();
    this.drop();
  };

  Queue.prototype.drop = function () {
    var i = orphans.indexOf(this);
    if (i < 0) return;
    orphans.splice(i, 1);
    if (i === 0 && orphans[0]) orphans[0].connect();
  };

  // ---- tabs: the own queue and adopted ones ----------------------------------

  function held() {
    return (own ? [own] : []).concat(orphans);
  }

  function claim(r) {
    r.o = ME;
    r.c = 0;
    r.t = now();
    return r;
  }

  /**
   * This tab's queue. A reload keeps the tab's producer (sessionStorage) and
   * takes its queue back; a tab whose producer's queue is missing (adopted)
   * or held by a live page (a duplicated tab copies sessionStorage) starts a
   * new producer, so two pages never number events under one producer.
   */
  function claimOwn(fresh) {
    var id = !fresh && SS.getItem(P + "producer");
    var r = id && readJson(P + "q." + id);
    if (!r || (!r.c && r.o !== ME && now() - r.t < STALE_MS)) {
      id = "js-" + rand(12);
      SS.setItem(P + "producer", id);
      r = { s: 0, d: 0, e: [] };
    }
    var q = new Queue(id, true);
    q.write(claim(r));
    if (r.e.length) q.soon();
    return q;
  }

  /** Take over the queues of tabs that are gone; deliver them one after another. */
  function keys(prefix) {
    var out = [];
    for (var i = 0; i < LS.length; i++) {
      var key = LS.key(i);
      if (key && key.indexOf(prefix) === 0) out.push(key);
    }
    return out;
  }

  function adopt() {
    keys(P + "q.").forEach(function (key) {
      var r = readJson(key);
      if (r && (r.o === ME || (!r.c && now() - r.t < STALE_MS))) return;
      if (!r || !r.e.length) return LS.removeItem(key);
      var q = new Queue(key.slice(P.length + 2), false);
      q.write(claim(r));
      orphans.push(q);
      if (orphans.length === 1) q.connect();
    });
  }

  function beat() {
    held().forEach(function (q) {
      q.edit(function () {});
    });
    if (own) adopt();
  }

  function start() {
    own = claimOwn(false);
    adopt();
  }

  function stopAll() {
    held().forEach(function (q) {
      q.stop();
    });
    own = null;
    orphans = [];
  }

  // ---- the API ---------------------------------------------------------------

  function track(action, params, label, at) {
    if (optedOut() || consentState === "denied") return false;
    if (typeof action !== "string" || !ACTION.test(action)) {
      return fail(
        "not sent: invalid action " +
          JSON.stringify(action) +
          " (want context.activity, e.g. product.view: 3-32 chars of A-Z a-z 0-9 _ - with a dot)",
      );
    }
    if (params != null && (typeof params !== "object" || Array.isArray(params))) {
      return fail("not sent: " + action + " params must be an object");
    }
    if (consentState === "pending") {
      try {
        return hold(["t", action, JSON.parse(JSON.stringify(params || {})), label, now()]);
      } catch (err) {
        return fail("not sent: " + action + " params are not JSON: " + err.message);
      }
    }
    var ev = {
      s: 0,
      a: action,
      l: label == null ? undefined : String(label).slice(0, 256),
      t: at || now(),
      p: params || {},
      u: uuid(),
    };
    var json;
    try {
      json = JSON.stringify(ev);
    } catch (err) {
      return fail("not sent: " + action + " params are not JSON: " + err.message);
    }
    ev = JSON.parse(json); // a copy: later changes to params do not leak in
    ev.b = bytes(json);
    if (ev.b > EVENT_BYTES)
      return fail("not sent: " + action + " is over " + EVENT_BYTES + " bytes");
    if (!own) start();
    own.add(ev);
    return true;
  }

  function pageVisit(params) {
    var p = Object.assign(
      { url: location.href, title: document.title, referrer: lastUrl || "" },
      params,
    );
    lastUrl = p.url;
    lastRoute = location.pathname + location.search;
    return track("page.visit", p, "Visited page " + p.title);
  }

  function identify(u, token) {
    if (optedOut() || consentState === "denied") return false;
    if (typeof u !== "string" || !UUID.test(u)) {
      return fail("identify: the uuid must be 1-64 chars of A-Z a-z 0-9 . _ : -");
    }
    if (consentState === "pending") return hold(["i", u, token]);
    if (token) tokens[u] = String(token);
    else delete tokens[u];
    storeUuid(u);
    if (!own) start();
    // Sent once the events before it are sent, so they keep their customer.
    if (own.ready) own.pump(false);
    else own.soon();
    return true;
  }

  function reset() {
    tokens = {};
    var u = randomUuid();
    fresh[u] = true;
    return identify(u);
  }

  function optOut() {
    LS.setItem(P + "optout", "1");
    stopAll();
    storeUuid(null);
    SS.removeItem(P + "producer");
    keys(P).forEach(function (key) {
      if (key !== P + "optout") LS.removeItem(key);
    });
    return true;
  }

  function optIn() {
    LS.removeItem(P + "optout");
    return true;
  }

  // true: start, run the held calls in order; false: drop them (and, after a true, what is stored).
  function setConsent(yes) {
    if (yes) {
      if (consentState === "granted") return true;
      consentState = "granted";
      openStorage();
      var calls = heldCalls;
      heldCalls = [];
      if (optedOut()) return true;
      if (!own) start();
      calls.forEach(function (c) {
        if (c[0] === "t") track(c[1], c[2], c[3], c[4]);
        else identify(c[1], c[2]);
      });
      return true;
    }
    heldCalls = [];
    if (consentState === "granted") {
      stopAll();
      storeUuid(null);
      SS.removeItem(P + "producer");
      keys(P).forEach(function (key) {
        if (key !== P + "optout") LS.removeItem(key);
      });
    }
    consentState = "denied";
    openStorage();
    return true;
  }

  function status() {
    var r = own && readJson(own.key);
    return {
      site: site,
      endpoint: endpoint,
      optedOut: optedOut(),
      uuid: optedOut() ? null : storedUuid(),
      producer: own && own.id,
      connected: !!(own && own.ready),
      queued: r ? r.e.length : 0,
      dropped: r ? r.d : 0,
      adopted: orphans.length,
      consent: consentState,
      cookieless: COOKIELESS,
      held: heldCalls.length,
      heldDropped: heldDropped,
    };
  }

  Object.assign(api, {
    track: track,
    pageVisit: pageVisit,
    identify: identify,
    reset: reset,
    optOut: optOut,
    optIn: optIn,
    status: status,
    consent: setConsent,
  });

  // ---- declarative tracking --------------------------------------------------

  function onView(entries) {
    entries.forEach(function (en) {
      if (en.isIntersecting && en.intersectionRatio >= 0.5) {
        views.unobserve(en.target);
        var id = en.target.getAttribute("data-ew-banner");
        track("banner.view", { banner: id }, "Viewed banner " + id);
      }
    });
  }

  function scan(root) {
    if (root.nodeType !== 1) return;
    var found = Array.from(root.querySelectorAll("[data-ew-banner]"));
    if (root.hasAttribute("data-ew-banner")) found.push(root);
    found.forEach(function (el) {
      if (seen.has(el)) return;
      seen.add(el);
      if (views) views.observe(el);
      var timer = 0;
      el.addEventListener("mouseenter", function () {
        var ms = parseInt(el.getAttribute("data-ew-hover-ms"), 10);
        timer = setTimeout(
          function () {
            var id = el.getAttribute("data-ew-banner");
            track("banner.hover", { banner: id }, "Hovered banner " + id);
          },
          ms >= 0 ? ms : 1000,
        );
      });
      el.addEventListener("mouseleave", function () {
        clearTimeout(timer);
      });
    });
  }

  document.addEventListener(
    "click",
    function (e) {
      var el = e.target.closest && e.target.closest("[data-ew-banner]");
      if (el) {
        var id = el.getAttribute("data-ew-banner");
        track("banner.click", { banner: id }, "Clicked banner " + id);
      }
    },
    true,
  );

  document.addEventListener(
    "submit",
    function (e) {
      var form = e.target;
      var name = form.getAttribute && form.getAttribute("data-ew-form");
      if (!name) return;
      var params = {};
      form.querySelectorAll("[data-ew-field]").forEach(function (el) {
        // Password fields are never sent, tagged or not.
        if (el.type === "password") return;
        if (el.type === "radio" && !el.checked) return;
        params[el.getAttribute("data-ew-field")] = el.type === "checkbox" ? el.checked : el.value;
      });
      params.form = name;
      track("form.submit", params, "Submitted form " + name);
    },
    true,
  );

  // ---- single-page apps --------------------------------------------------------

  function routeChanged(pathOnly) {
    // After the current task, so a title set right after pushState is seen.
    setTimeout(function () {
      var route = location.pathname + (pathOnly ? "" : location.search);
      var last = pathOnly && lastRoute ? lastRoute.split("?")[0] : lastRoute;
      if (route !== last) pageVisit();
    }, 0);
  }

  if (data.spa === "true") {
    ["pushState", "replaceState"].forEach(function (name) {
      var original = history[name];
      history[name] = function () {
        var out = original.apply(this, arguments);
        routeChanged(name === "replaceState");
        return out;
      };
    });
    addEventListener("popstate", function () {
      routeChanged(false);
    });
  }

  // ---- page lifecycle ------------------------------------------------------------

  addEventListener("pagehide", function () {
    held().forEach(function (q) {
      q.pump(true);
      q.beacon();
      // Said goodbye: another tab may adopt what is left at once; a reload
      // of this tab takes it back first if nobody did.
      q.edit(function (r) {
        r.c = 1;
      });
    });
  });
  addEventListener("pageshow", function (e) {
    if (e.persisted && !optedOut()) {
      // Back from the back-forward cache: take the queues back, if still ours.
      held().forEach(function (q) {
        if (
          q.edit(function (r) {
            r.c = 0;
          })
        )
          q.soon();
      });
    }
  });
  function retryAll() {
    held().forEach(function (q) {
      q.retry();
    });
  }
  addEventListener("online", retryAll);
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "visible") retryAll();
    else if (!optedOut()) {
      // A hidden tab may be closed or discarded without another event.
      held().forEach(function (q) {
        q.beacon();
      });
    }
  });
  addEventListener("storage", function (e) {
    if (e.key === P + "optout" && e.newValue === "1") stopAll();
  });
  setInterval(function () {
    if (!optedOut()) beat();
  }, HEARTBEAT_MS);

  if (!optedOut() && consentState === "granted") start();
  replay();
  function ready() {
    if (data.auto !== "false") pageVisit();
    scan(document.documentElement);
    new MutationObserver(function (list) {
      list.forEach(function (m) {
        m.addedNodes.forEach(scan);
      });
    }).observe(document.documentElement, { childList: true, subtree: true });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", ready);
  else ready();

  /** Run the calls queued before this script loaded: eventwire.push(["track", ...]). */
  function replay() {
    if (Array.isArray(queued)) queued.forEach(api.push);
  }
})();
