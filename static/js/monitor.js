/* Run monitor: draws the server's Plotly figures and keeps them current.
 *
 * The figures arrive embedded in the page (json_script). While the run is active the page
 * listens on /ws/live/; when an event names this run it re-fetches the run's figures, tables
 * and summary as JSON and redraws them in place (no reload). Reconnects with backoff.
 */
(function () {
  "use strict";

  var root = document.getElementById("monitor");
  if (!root || !window.Plotly) {
    return;
  }
  var runId = Number(root.dataset.run);
  var liveUrl = root.dataset.liveUrl;
  var stateEl = document.getElementById("live-state");
  var config = {
    responsive: true,
    displaylogo: false,
    modeBarButtonsToRemove: ["select2d", "lasso2d", "toImage"],
  };

  function setState(state, text) {
    if (stateEl) {
      stateEl.dataset.state = state;
      stateEl.textContent = text;
    }
  }

  function draw(figures, points) {
    Object.keys(figures).forEach(function (key) {
      var el = document.getElementById("chart-" + key);
      if (!el) {
        return;
      }
      var fig = figures[key];
      window.Plotly.react(el, fig.data, fig.layout, config);
      if (points && key in points) {
        el.dataset.points = String(points[key]);
      }
    });
  }

  draw(JSON.parse(document.getElementById("run-figures").textContent));

  var socket = null;
  var fetching = false;
  var pending = false;

  function apply(data) {
    draw(data.figures, data.points);
    Object.keys(data.tables).forEach(function (key) {
      var holder = document.getElementById("table-" + key);
      if (holder) {
        holder.innerHTML = data.tables[key];
      }
    });
    var summary = document.getElementById("run-summary");
    if (summary) {
      summary.innerHTML = data.summary; // status badge, waiting notice, silos: all as of now
    }
    var toolbar = document.getElementById("run-toolbar");
    if (toolbar && typeof data.toolbar === "string") {
      toolbar.innerHTML = data.toolbar; // "Models (n)" once the run has a model version
    }
    root.dataset.rounds = String(data.rounds_completed);
    root.dataset.refreshes = String(Number(root.dataset.refreshes || 0) + 1);
    root.dataset.active = data.active ? "true" : "false";
    if (!data.active) {
      setState("finished", "run " + data.status);
      if (socket) {
        socket.onclose = null;
        socket.close();
        socket = null;
      }
    }
  }

  function refresh() {
    if (fetching) {
      pending = true; // one more fetch after this one: never miss the last event
      return;
    }
    fetching = true;
    fetch(liveUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.json();
      })
      .then(apply)
      .catch(function () {
        setState("stale", "live: update failed, retrying on the next event");
      })
      .finally(function () {
        fetching = false;
        if (pending) {
          pending = false;
          refresh();
        }
      });
  }

  var delay = 1000;

  function connect() {
    var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(scheme + window.location.host + "/ws/live/");
    socket.onopen = function () {
      delay = 1000;
      setState("connected", "live");
      refresh(); // catch up on whatever happened before the socket was open
    };
    socket.onmessage = function (message) {
      var event;
      try {
        event = JSON.parse(message.data);
      } catch (err) {
        return;
      }
      if (event.run === runId) {
        refresh();
      }
    };
    socket.onclose = function (event) {
      if (event.code === 4401) {
        setState("off", "live: sign in again for updates");
        return;
      }
      setState("reconnecting", "live: reconnecting…");
      window.setTimeout(connect, delay);
      delay = Math.min(delay * 2, 30000);
    };
  }

  if (root.dataset.active === "true" && "WebSocket" in window) {
    connect();
  } else {
    setState("finished", "run finished");
  }
})();
