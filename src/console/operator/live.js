// tollgate console: the live parts of its pages. Every page reads fine without this script.
// Ledger tail: a table with `data-tail` polls that URL for newer records and puts each row it
// does not show yet at the top. Text is set with textContent, never parsed as HTML.
(function () {
  "use strict";
  var table = document.querySelector("table[data-tail]");
  if (!table || !window.fetch) return;
  var body = table.tBodies[0];
  var url = table.getAttribute("data-tail");
  var newest = table.getAttribute("data-newest") || "";
  var seen = {};
  Array.prototype.forEach.call(body.rows, function (tr) { seen[tr.getAttribute("data-id")] = true; });
  var cells = ["time", "request_id", "key", "project", "model", "chain", "retries", "status", "bucket", "tokens", "cost"];
  var numeric = { retries: true, tokens: true, cost: true };
  function rowOf(r) {
    var tr = document.createElement("tr");
    tr.setAttribute("data-id", r.request_id);
    cells.forEach(function (c) {
      var td = document.createElement("td");
      if (numeric[c]) td.className = "num";
      if (c === "status") td.className = r.status === "completed" ? "ok" : "bad";
      if (c === "request_id") {
        var a = document.createElement("a");
        a.href = "/console/ledger/" + encodeURIComponent(r.request_id);
        var code = document.createElement("code");
        code.textContent = r.request_id;
        a.appendChild(code);
        td.appendChild(a);
      } else {
        td.textContent = String(r[c]);
      }
      tr.appendChild(td);
    });
    return tr;
  }
  function poll() {
    var u = url + (newest ? "&after=" + encodeURIComponent(newest) : "");
    fetch(u, { credentials: "same-origin", headers: { accept: "application/json" } })
      .then(function (res) { return res.ok ? res.json() : null; })
      .then(function (d) {
        if (!d) return;
        if (d.newest && d.newest > newest) newest = d.newest;
        d.rows.slice().reverse().forEach(function (r) {
          if (seen[r.request_id]) return;
          seen[r.request_id] = true;
          body.insertBefore(rowOf(r), body.firstChild);
        });
      })
      .catch(function () {})
      .then(function () { setTimeout(poll, 2000); });
  }
  setTimeout(poll, 2000);
})();
