// inferplane's chart helper: stacked bar charts as inline SVG, no dependencies (the dashboard works offline).
//   InferplaneCharts.stackedBars(element, {categories: ["2026-12-05", ...],
//     series: [{name: "tiny-llama", values: [3, 0, ...], labels: ["3", "0", ...]}], unit: "tokens"})
// ``values`` only size the bars; ``labels`` (exact strings from the server, e.g. money) are what the tooltips show.
(function (root) {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7"];

  function el(name, attrs, text) {
    var node = document.createElementNS(NS, name);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function niceMax(value) {
    if (!(value > 0)) return 1;
    var step = Math.pow(10, Math.floor(Math.log10(value)));
    var factors = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < factors.length; i++) if (factors[i] * step >= value) return factors[i] * step;
    return 10 * step;
  }

  function stackedBars(container, spec) {
    var width = spec.width || 640, height = spec.height || 220;
    var left = 56, right = 8, top = 10, bottom = 48;
    var cats = spec.categories, series = spec.series;
    var totals = cats.map(function (_, i) {
      return series.reduce(function (sum, s) { return sum + (s.values[i] || 0); }, 0);
    });
    var max = niceMax(Math.max.apply(null, totals.concat([0])));
    var plotW = width - left - right, plotH = height - top - bottom;
    var svg = el("svg", {viewBox: "0 0 " + width + " " + height, width: "100%", role: "img",
                         "aria-label": spec.title || "chart", "class": "ip-chart"});
    for (var t = 0; t <= 4; t++) {  // grid lines and y labels
      var y = top + plotH - (plotH * t) / 4;
      svg.appendChild(el("line", {x1: left, x2: width - right, y1: y, y2: y, stroke: "#ddd"}));
      var tick = (max * t) / 4;
      svg.appendChild(el("text", {x: left - 6, y: y + 4, "text-anchor": "end", "font-size": 11, fill: "#555"},
                         spec.tickFormat ? spec.tickFormat(tick) : String(+tick.toPrecision(3))));
    }
    var band = plotW / Math.max(cats.length, 1), barW = Math.max(2, band * 0.7);
    cats.forEach(function (cat, i) {
      var x = left + band * i + (band - barW) / 2, base = top + plotH;
      series.forEach(function (s, j) {
        var v = s.values[i] || 0;
        if (v <= 0) return;
        var h = (plotH * v) / max;
        base -= h;
        var rect = el("rect", {x: x, y: base, width: barW, height: h, fill: PALETTE[j % PALETTE.length]});
        rect.appendChild(el("title", {}, cat + " · " + s.name + ": " + (s.labels ? s.labels[i] : v) +
                            (spec.unit ? " " + spec.unit : "")));
        svg.appendChild(rect);
      });
      if (cats.length <= 16 || i % Math.ceil(cats.length / 16) === 0) {
        svg.appendChild(el("text", {x: x + barW / 2, y: top + plotH + 14, "text-anchor": "middle", "font-size": 10,
                                    fill: "#555"}, String(cat).slice(5)));
      }
    });
    series.forEach(function (s, j) {  // legend
      var lx = left + j * 150, ly = height - 12;
      svg.appendChild(el("rect", {x: lx, y: ly - 9, width: 10, height: 10, fill: PALETTE[j % PALETTE.length]}));
      svg.appendChild(el("text", {x: lx + 14, y: ly, "font-size": 11, fill: "#333"}, s.name));
    });
    container.replaceChildren(svg);
    return svg;
  }

  root.InferplaneCharts = {stackedBars: stackedBars, palette: PALETTE};
})(window);
