// The usage dashboard: polls /dashboard/api/summary and fills the page. Money arrives as exact strings and is
// shown as is; no arithmetic on money here (bar heights use the integer nano-dollars).
(function () {
  "use strict";
  var POLL_MS = 5000;
  var last = null;  // the previous reading of the router's request counter, for requests per second

  function $(id) { return document.getElementById(id); }

  function cell(tag, text, cls) {
    var node = document.createElement(tag);
    node.textContent = text === null || text === undefined ? "–" : String(text);
    if (cls) node.className = cls;
    return node;
  }

  // columns: [heading, field, numeric?]; rows get data-* attributes from ``keys``
  function table(id, columns, rows, keys) {
    var t = $(id), head = document.createElement("tr");
    columns.forEach(function (c) { head.appendChild(cell("th", c[0], c[2] ? "n" : "")); });
    var out = [head];
    rows.forEach(function (r) {
      var tr = document.createElement("tr");
      (keys || []).forEach(function (k) {
        tr.setAttribute("data-" + k.replace(/_/g, "-"), r[k] === null ? "" : r[k]);
      });
      columns.forEach(function (c) {
        var td = cell("td", typeof c[1] === "function" ? c[1](r) : r[c[1]], c[2] ? "n" : "");
        td.setAttribute("data-field", typeof c[1] === "function" ? c[0] : c[1]);
        tr.appendChild(td);
      });
      out.push(tr);
    });
    if (!rows.length) out.push(cell("tr", "nothing yet", "muted"));
    t.replaceChildren.apply(t, out);
  }

  function card(id, value, label) {
    var div = document.createElement("div");
    div.className = "card";
    var v = cell("div", value, "v");
    v.id = id;
    div.appendChild(v);
    div.appendChild(cell("div", label, "l"));
    return div;
  }

  function ms(seconds) { return seconds === null || seconds === undefined ? null : (seconds * 1000).toFixed(1) + " ms"; }

  function charts(usage, days) {
    var cats = [], today = new Date();
    for (var i = days - 1; i >= 0; i--) {
      cats.push(new Date(Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), today.getUTCDate() - i))
        .toISOString().slice(0, 10));
    }
    var models = usage.by_model.map(function (m) { return m.model; });
    function series(field, label) {
      return models.map(function (model) {
        var values = cats.map(function () { return 0; }), labels = cats.map(function () { return "0"; });
        usage.by_day_model.forEach(function (r) {
          var i = cats.indexOf(r.day);
          if (r.model === model && i >= 0) { values[i] = r[field]; labels[i] = String(r[label]); }
        });
        return {name: model, values: values, labels: labels};
      });
    }
    InferplaneCharts.stackedBars($("chart-tokens"), {categories: cats, series: series("total_tokens", "total_tokens"),
                                                     unit: "tokens", title: "tokens per day"});
    InferplaneCharts.stackedBars($("chart-spend"), {categories: cats, series: series("cost_nanodollars", "cost"),
                                                    unit: "USD", title: "spend per day",
                                                    tickFormat: function (n) { return "$" + +(n / 1e9).toPrecision(3); }});
  }

  function render(d) {
    var u = d.usage, t = u.totals;
    $("who").textContent = (d.viewer.admin ? "admin: every key" : "key " + d.viewer.name + " (" + d.viewer.key_id +
                            ")");
    $("days").textContent = d.days;
    var cards = [card("total-requests", t.requests, "requests"), card("total-cancelled", t.cancelled_requests,
                 "cancelled"), card("total-prompt-tokens", t.prompt_tokens, "prompt tokens"),
                 card("total-cached-tokens", t.cached_tokens, "cached prompt tokens"),
                 card("total-completion-tokens", t.completion_tokens, "completion tokens"),
                 card("total-cost", t.cost, "spend (USD)")];
    $("totals").replaceChildren.apply($("totals"), cards);
    charts(u, d.days);
    var lat = d.latency;
    if (lat && !lat.unavailable) {
      var rps = null;
      if (last) rps = ((lat.requests.total - last.total) / Math.max(d.time - last.time, 1e-3)).toFixed(2);
      last = {total: lat.requests.total, time: d.time};
      $("latency").replaceChildren(
        card("rps", rps === null ? "…" : rps, "requests / s (live)"),
        card("router-requests", lat.requests.total, "requests (router)"),
        card("router-errors", lat.requests.errors, "errors"),
        card("ttft-p50", ms(lat.ttft_s.p50), "TTFT p50"), card("ttft-p90", ms(lat.ttft_s.p90), "TTFT p90"),
        card("ttft-p99", ms(lat.ttft_s.p99), "TTFT p99"), card("itl-p50", ms(lat.itl_s.p50), "inter-token p50"),
        card("itl-p90", ms(lat.itl_s.p90), "inter-token p90"), card("itl-p99", ms(lat.itl_s.p99), "inter-token p99"));
    } else {
      $("latency-section").hidden = !lat;
      if (lat) $("latency").replaceChildren(cell("p", lat.unavailable, "error"));
    }
    var sums = [["requests", "requests", 1], ["cancelled", "cancelled_requests", 1], ["prompt tokens", "prompt_tokens", 1],
                ["cached", "cached_tokens", 1], ["completion tokens", "completion_tokens", 1],
                ["spend (USD)", "cost", 1]];
    table("by-model", [["model", "model"]].concat(sums), u.by_model, ["model"]);
    table("by-key", [["key", "key_id"], ["name", "name"]].concat(sums), u.by_key, ["key_id"]);
    table("keys", [["key", "key_id"], ["name", "name"], ["tenant", "tenant"], ["scopes", function (k) {
      return k.scopes.join(", "); }], ["budget (USD)", function (k) { return k.budget && k.budget.limit + " / " +
      k.budget.period; }, 1], ["spent", function (k) { return k.budget && k.budget.spent; }, 1],
      ["left", function (k) { return k.budget && k.budget.left; }, 1],
      ["state", function (k) { return k.revoked ? "revoked" : "active"; }]], d.keys, ["key_id"]);
    table("recent", [["time (UTC)", function (r) { return r.created_at.slice(0, 19).replace("T", " "); }],
      ["request id", "request_id"], ["trace id", "trace_id"], ["key", "key_id"], ["model", "model"], ["tier", "service_tier"],
      ["prompt", "prompt_tokens", 1], ["cached", "cached_tokens", 1], ["completion", "completion_tokens", 1],
      ["finish", "finish_reason"], ["TTFT ms", "ttft_ms", 1],
      ["latency ms", "latency_ms", 1], ["cost (USD)", "cost", 1]], d.recent, ["request_id", "key_id"]);
    table("rows", [["date", "date"], ["key", "key_id"], ["model", "model"], ["tier", "service_tier"]].concat(sums),
          u.rows, ["date", "key_id", "model", "service_tier"]);
    $("updated").textContent = "updated " + new Date(d.time * 1000).toISOString().slice(11, 19) + " UTC";
    $("board").hidden = false;
    $("signin").hidden = true;
    document.body.setAttribute("data-state", "ready");
  }

  function poll() {
    fetch("/dashboard/api/summary", {credentials: "same-origin", cache: "no-store"}).then(function (resp) {
      if (resp.status === 401) {
        $("board").hidden = true;
        $("signin").hidden = false;
        document.body.setAttribute("data-state", "signin");
        return null;
      }
      return resp.json().then(function (body) {
        if (!resp.ok) throw new Error(body.error ? body.error.message : resp.statusText);
        $("error").textContent = "";
        render(body);
        setTimeout(poll, POLL_MS);
      });
    }).catch(function (err) {
      $("error").textContent = "Could not read the usage: " + err.message;
      document.body.setAttribute("data-state", "error");
      setTimeout(poll, POLL_MS);
    });
  }

  poll();
})();
