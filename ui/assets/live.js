// Keeps the overview's counts current from the server's event stream. The page works
// without it; this only saves reloading.
(function () {
  var table = document.querySelector("table[data-live]");
  if (!table || !window.EventSource) return;
  var source = new EventSource(table.getAttribute("data-live"));
  source.addEventListener("queues", function (message) {
    var data = JSON.parse(message.data);
    var rows = table.querySelectorAll("tr[data-queue]");
    if (rows.length !== data.queues.length) { location.reload(); return; }
    data.queues.forEach(function (queue) {
      var row = table.querySelector('tr[data-queue="' + CSS.escape(queue.name) + '"]');
      if (!row) { location.reload(); return; }
      row.querySelectorAll("[data-field]").forEach(function (cell) {
        var field = cell.getAttribute("data-field");
        var value = queue[field];
        if (field === "rate" && value === null) value = "–";
        var target = cell.querySelector("a") || cell;
        if (value !== undefined && target.textContent !== String(value)) target.textContent = String(value);
        if (field === "dead_letters") cell.classList.toggle("alert", value > 0);
      });
    });
    table.setAttribute("data-updated", String(Date.now()));
  });
})();
