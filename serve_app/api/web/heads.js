// Custom heads on the page: pick one (GET /v1/heads), see its labels, cross-validated metrics
// and confusion matrix (GET /v1/heads/NAME), and the next recognition uses it (head=NAME).
// Plain browser JavaScript; uses app.js's helpers ($, api, el, showError).
"use strict";

async function loadHeads() {
  const select = $("head");
  try {
    const response = await api("v1/heads");
    const body = await response.json();
    if (!response.ok) throw new Error(`${response.status} ${body.error?.code || ""}`);
    select.replaceChildren(new Option("the model's own (nine emotions)", ""));
    for (const head of body.heads) {
      select.add(new Option(`${head.name} @${head.latest} — ${head.labels.join(", ")}`, head.name));
    }
    select.disabled = body.heads.length === 0;
  } catch (err) {
    select.replaceChildren(new Option("the model's own (nine emotions)", ""));
    select.disabled = true;
  }
}

async function showHead() {
  const name = $("head").value;
  $("head-box").hidden = !name;
  if (!name) return;
  const response = await api(`v1/heads/${encodeURIComponent(name)}`);
  const head = await response.json();
  if (!response.ok) return showError(`${response.status} ${head.error?.code || ""}: ${head.error?.message || ""}`);
  const overall = head.metrics?.overall || {};
  const metric = (key) => (typeof overall[key] === "number" ? overall[key].toFixed(3) : "–");
  $("head-title").textContent = `${head.name} @${head.revision} (${head.kind})`;
  $("head-metrics").textContent = `UA ${metric("ua")} · WA ${metric("wa")} · macro F1 ` +
    `${metric("macro_f1")} · labels: ${head.labels.join(", ")}`;
  drawConfusion($("head-confusion"), overall.confusion);
}

// Rows: the true label; columns: the predicted one; shade: the row's share (recall).
function drawConfusion(svg, confusion) {
  svg.replaceChildren();
  if (!confusion || !Array.isArray(confusion.matrix)) return;
  const labels = confusion.labels, cell = 40, left = 110, top = 90;
  const size = labels.length * cell;
  svg.setAttribute("viewBox", `0 0 ${left + size + 10} ${top + size + 10}`);
  labels.forEach((label, i) => {
    svg.append(el("text", { x: left - 6, y: top + i * cell + cell / 2 + 4, "text-anchor": "end" }, label));
    svg.append(el("text", { x: left + i * cell + cell / 2, y: top - 6,
      transform: `rotate(-45 ${left + i * cell + cell / 2} ${top - 6})` }, label));
    const total = confusion.matrix[i].reduce((sum, n) => sum + n, 0) || 1;
    confusion.matrix[i].forEach((count, j) => {
      const share = count / total;
      svg.append(el("rect", { class: "cell", x: left + j * cell, y: top + i * cell, width: cell - 1,
        height: cell - 1, fill: `rgba(47, 111, 222, ${0.08 + 0.92 * share})`,
        "data-true": label, "data-predicted": labels[j] }));
      svg.append(el("text", { x: left + j * cell + cell / 2, y: top + i * cell + cell / 2 + 4,
        "text-anchor": "middle", fill: share > 0.5 ? "#fff" : "#1d2433" }, String(count)));
    });
  });
}

$("head").addEventListener("change", showHead);
loadHeads();
