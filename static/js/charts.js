/* Report pages (fairness, privacy budget): draw the server's Plotly figures once.
 *
 * The figures arrive embedded in the page (json_script "page-figures", key -> figure); each is
 * drawn into the element #chart-<key>. Every chart has its numbers in a table next to it.
 */
(function () {
  "use strict";

  var holder = document.getElementById("page-figures");
  if (!holder || !window.Plotly) {
    return;
  }
  var config = {
    responsive: true,
    displaylogo: false,
    modeBarButtonsToRemove: ["select2d", "lasso2d", "toImage"],
  };
  var figures = JSON.parse(holder.textContent);
  Object.keys(figures).forEach(function (key) {
    var el = document.getElementById("chart-" + key);
    if (el) {
      window.Plotly.newPlot(el, figures[key].data, figures[key].layout, config);
    }
  });
})();
