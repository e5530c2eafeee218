// Refreshes the in-flight table every second. Values are set as text, never as markup.
(function () {
  "use strict";
  var cols = ["id", "key", "project", "task", "model", "route", "bucket", "started", "tokens", "cost", "held"];
  var num = { tokens: 1, cost: 1, held: 1 };
  function render(rows) {
    var body = document.querySelector("#inflight tbody");
    if (!body) { return; }
    while (body.firstChild) { body.removeChild(body.firstChild); }
    rows.forEach(function (r) {
      var tr = document.createElement("tr");
      tr.setAttribute("data-request", r.id);
      cols.forEach(function (c) {
        var td = document.createElement("td");
        if (num[c]) { td.className = "num " + c; }
        if (c === "id") {
          var a = document.createElement("a");
          a.href = "/console/ledger/" + encodeURIComponent(r.id);
          var code = document.createElement("code");
          code.textContent = r.id;
          a.appendChild(code);
          td.appendChild(a);
        } else {
          td.textContent = String(r[c]);
        }
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
    var none = document.getElementById("none-open");
    if (none) { none.style.display = rows.length ? "none" : ""; }
  }
  function tick() {
    fetch("/console/inflight.json", { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (v) { if (v && v.rows) { render(v.rows); } })
      .catch(function () {})
      .then(function () { setTimeout(tick, 1000); });
  }
  setTimeout(tick, 1000);
})();
