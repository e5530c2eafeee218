// tollgate console: the live parts of its pages; every page reads fine without this script.
// - In flight: `#inflight` is refreshed every second from /console/inflight.json.
// - Ledger tail: a table with `data-tail` polls that URL every 2 s for newer records and puts
//   each row it does not show yet at the top.
// Values are set as text (textContent), never parsed as markup.
(function () {
  "use strict";
  if (!window.fetch) return;

  // Polls the URL `url()` gives every `ms` milliseconds (counted from the previous answer) and
  // hands each JSON answer to `use`; failures are skipped until the next turn.
  function poll(url, ms, use) {
    function tick() {
      fetch(url(), { credentials: "same-origin", cache: "no-store", headers: { accept: "application/json" } })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (v) { if (v) use(v); })
        .catch(function () {})
        .then(function () { setTimeout(tick, ms); });
    }
    setTimeout(tick, ms);
  }

  // A row of `cols` from `r`: the `idCol` column links to the request's page; `classOf(c, r)`
  // gives a cell's class.
  function row(r, cols, idCol, classOf) {
    var tr = document.createElement("tr");
    cols.forEach(function (c) {
      var td = document.createElement("td");
      var cls = classOf(c, r);
      if (cls) td.className = cls;
      if (c === idCol) {
        var a = document.createElement("a");
        a.href = "/console/ledger/" + encodeURIComponent(r[c]);
        var code = document.createElement("code");
        code.textContent = r[c];
        a.appendChild(code);
        td.appendChild(a);
      } else {
        td.textContent = String(r[c]);
      }
      tr.appendChild(td);
    });
    return tr;
  }

  var inflight = document.querySelector("#inflight tbody");
  if (inflight) {
    var openCols = ["id", "key", "project", "task", "model", "route", "bucket", "started", "tokens", "cost", "held"];
    var openNum = { tokens: 1, cost: 1, held: 1 };
    if (document.querySelector("#inflight[data-fleet]")) openCols.splice(1, 0, "instance");
    poll(function () { return "/console/inflight.json"; }, 1000, function (v) {
      if (!v.rows) return;
      while (inflight.firstChild) inflight.removeChild(inflight.firstChild);
      v.rows.forEach(function (r) {
        var tr = row(r, openCols, "id", function (c) { return openNum[c] ? "num " + c : ""; });
        tr.setAttribute("data-request", r.id);
        inflight.appendChild(tr);
      });
      var none = document.getElementById("none-open");
      if (none) none.style.display = v.rows.length ? "none" : "";
    });
  }

  var table = document.querySelector("table[data-tail]");
  if (table) {
    var body = table.tBodies[0];
    var url = table.getAttribute("data-tail");
    var newest = table.getAttribute("data-newest") || "";
    var seen = {};
    Array.prototype.forEach.call(body.rows, function (tr) { seen[tr.getAttribute("data-id")] = true; });
    var tailCols = ["time", "request_id", "key", "project", "model", "chain", "retries", "status", "bucket", "tokens", "cost"];
    var tailNum = { retries: 1, tokens: 1, cost: 1 };
    var tailClass = function (c, r) {
      if (c === "status") return r.status === "completed" ? "ok" : "bad";
      return tailNum[c] ? "num" : "";
    };
    poll(function () { return url + (newest ? "&after=" + encodeURIComponent(newest) : ""); }, 2000, function (d) {
      if (d.newest && d.newest > newest) newest = d.newest;
      (d.rows || []).slice().reverse().forEach(function (r) {
        if (seen[r.request_id]) return;
        seen[r.request_id] = true;
        var tr = row(r, tailCols, "request_id", tailClass);
        tr.setAttribute("data-id", r.request_id);
        body.insertBefore(tr, body.firstChild);
      });
    });
  }
})();
