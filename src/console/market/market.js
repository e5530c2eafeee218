// tollgate marketplace: refreshes each route's live cells (breaker state, last probe, last
// failure, recent success rate and latency median) twice a second from GET /market/state, so a
// route going down or coming back shows without a reload. The page reads fine without it.
(function () {
  "use strict";
  var root = document.querySelector("[data-market]");
  if (!root || !window.fetch) { return; }
  var publicView = root.getAttribute("data-scope") === "public";

  function apply(s) {
    var byRoute = {};
    (s.routes || []).forEach(function (r) { byRoute[r.route] = r.cells; });
    document.querySelectorAll("[data-route][data-field]").forEach(function (el) {
      var cells = byRoute[el.getAttribute("data-route")];
      var field = el.getAttribute("data-field");
      if (!cells || !(field in cells)) { return; }
      if (el.textContent !== cells[field]) { el.textContent = cells[field]; }
      if (field === "state") { el.className = "state-" + cells.state; }
    });
    if (publicView) {
      (s.models || []).forEach(function (m) {
        document.querySelectorAll("[data-verdict][data-live]").forEach(function (el) {
          if (el.getAttribute("data-verdict") !== m.model) { return; }
          el.textContent = m.verdict;
          el.className = "verdict " + (m.callable ? "ok" : "bad");
        });
      });
    }
    root.setAttribute("data-updated", String(Date.now()));
  }

  function tick() {
    fetch("/market/state", { cache: "no-store", credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (s) { if (s) { apply(s); } })
      .catch(function () {})
      .then(function () { setTimeout(tick, 500); });
  }
  tick();
})();
