// The live panel: request rates, errors and p50 / p99 latency per model from /v1/stats polls
// (differences of its counters and histogram buckets between two polls), and a sparkline.

import { $, api, bump, clock, element } from "./common.js";

export const SPARK_POINTS = 60;

function upperBound(le) {
  if (le === null || le === undefined) return Infinity;
  const value = typeof le === "number" ? le : Number(String(le).replace(/^\+?Inf$/i, "Infinity"));
  return Number.isNaN(value) ? Infinity : value;
}

/** The q-quantile of a window's histogram (cumulative [le, count] pairs), interpolated within
 * its bucket as Prometheus' histogram_quantile does; null without observations. */
export function quantile(q, buckets) {
  const total = buckets.length ? buckets[buckets.length - 1][1] : 0;
  if (total <= 0) return null;
  const rank = q * total;
  let [lower, below] = [0, 0];
  for (const [le, count] of buckets) {
    if (count >= rank) {
      if (le === Infinity) return lower;
      return count === below ? le : lower + ((le - lower) * (rank - below)) / (count - below);
    }
    [lower, below] = [le, count];
  }
  return lower;
}

function totals(entry) {
  const requests = entry?.requests || {};
  const all = Object.values(requests).reduce((sum, count) => sum + count, 0);
  return { all, errors: all - (requests.OK || 0) };
}

/** A histogram's cumulative [le, count] pairs, ending with +Inf: /v1/stats may leave that
 * bucket out (JSON has no infinity) since its count is the histogram's `count`. */
function cumulative(latency) {
  const buckets = (latency?.buckets || []).map(([le, count]) => [upperBound(le), count]);
  if (!buckets.length || buckets[buckets.length - 1][0] !== Infinity) {
    buckets.push([Infinity, latency?.count ?? (buckets.length ? buckets[buckets.length - 1][1] : 0)]);
  }
  return buckets;
}

/** The histogram of the observations between two polls. */
export function windowBuckets(now, before) {
  const previous = new Map(cumulative(before?.latency_s).map(([le, n]) => [le, n]));
  return cumulative(now?.latency_s).map(([le, count]) => [le, count - (previous.get(le) || 0)]);
}

export function drawSparkline(canvas, values) {
  const context = canvas.getContext("2d");
  const [width, height] = [canvas.width, canvas.height];
  context.clearRect(0, 0, width, height);
  if (!values.length) return;
  if (values.length === 1) values = [values[0], values[0]]; // a flat stroke rather than a dot
  const peak = Math.max(...values, 1e-9);
  const step = (width - 1) / (SPARK_POINTS - 1);
  const x0 = width - 1 - (values.length - 1) * step;
  const point = (v, i) => [x0 + i * step, height - 2 - ((height - 4) * v) / peak];
  context.beginPath();
  values.forEach((v, i) => (i ? context.lineTo(...point(v, i)) : context.moveTo(...point(v, i))));
  context.strokeStyle = "#3b82f6";
  context.lineWidth = 1.5;
  context.stroke();
  context.lineTo(x0 + (values.length - 1) * step, height);
  context.lineTo(x0, height);
  context.fillStyle = "rgba(59, 130, 246, 0.18)";
  context.fill();
}

function ms(seconds) {
  return seconds === null ? "—" : (1000 * seconds).toFixed(seconds < 0.01 ? 2 : 1);
}

/** A poller of /v1/stats into the #live table, every `intervalMs` (called by its caller).
 * `onUptime(seconds)` hears the server's uptime; `onError(error | null)` hears failed polls. */
export function livePanel({ intervalMs, onUptime, onError }) {
  let before = null; // the previous poll
  const history = new Map(); // model -> requests/s of the last SPARK_POINTS windows

  function row(name, entry, window) {
    const current = totals(entry);
    let cells = ["—", "—", "—", "—"];
    if (window) {
      const previous = totals(window.before.models?.[name]);
      const rate = Math.max(0, current.all - previous.all) / window.dt;
      const errors = Math.max(0, current.errors - previous.errors) / window.dt;
      const buckets = windowBuckets(entry, window.before.models?.[name]);
      const rates = history.get(name) || [];
      rates.push(rate);
      if (rates.length > SPARK_POINTS) rates.shift();
      history.set(name, rates);
      const [p50, p99] = [quantile(0.5, buckets), quantile(0.99, buckets)];
      cells = [rate.toFixed(2), errors.toFixed(2), ms(p50), ms(p99)];
    }
    const spark = element("canvas", { class: "spark", width: "160", height: "28" });
    drawSparkline(spark, history.get(name) || []);
    return element(
      "tr",
      { "data-model": name, "data-rate": cells[0] },
      element("td", {}, name),
      ...cells.map((text) => element("td", { class: "num" }, text)),
      element("td", { class: "num" }, current.all.toLocaleString("en")),
      element("td", {}, spark),
    );
  }

  return async function poll() {
    try {
      const now = await (await api("/v1/stats")).json();
      // A restarted server (uptime went back) starts its counters afresh.
      const window =
        before && now.uptime_s > before.uptime_s ? { dt: now.uptime_s - before.uptime_s, before } : null;
      const names = Object.keys(now.models || {}).sort();
      const body = $("live").tBodies[0];
      body.replaceChildren(...names.map((name) => row(name, now.models[name], window)));
      if (!names.length) {
        const empty = element("td", { colspan: "7", class: "muted" }, "no requests yet");
        body.append(element("tr", {}, empty));
      }
      before = now;
      $("live-updated").textContent = `every ${intervalMs / 1000} s, updated ${clock()}`;
      onUptime(now.uptime_s);
      onError(null);
    } catch (err) {
      onError(err);
    }
    bump($("live-panel"), "polls");
  };
}
