// The dashboard's script (served at /dashboard/app.js; no build step, no library).
// Every second it fetches /dashboard/state.json and refills the page's tables and
// totals, which the server rendered first (so the page works with scripts off).
// It keeps the last 10 minutes of totals and draws requests/s (ok and errors) as
// inline SVG. Data is only ever put in the page with textContent or as SVG
// attributes built here, never as HTML: request bodies are attacker-controlled.
'use strict';
(function () {
  var POLL_MS = 1000;
  var WINDOW_MS = 10 * 60 * 1000;
  var samples = []; // {t, ok, errors}
  var updates = 0;
  var SVG = 'http://www.w3.org/2000/svg';

  function $(id) { return document.getElementById(id); }

  // Same rules as page.rs `duration` and `time`.
  function duration(ms) {
    if (ms === null || ms === undefined) return '–';
    var a = Math.abs(ms), sign = ms < 0 ? '-' : '';
    if (a < 1000) return sign + a + ' ms';
    if (a < 60000) return sign + (a / 1000).toFixed(1) + ' s';
    if (a < 3600000) return sign + (a / 60000).toFixed(1) + ' min';
    return sign + (a / 3600000).toFixed(1) + ' h';
  }
  function time(ms) {
    if (ms === null || ms === undefined) return '–';
    return new Date(ms).toISOString().slice(0, 19).replace('T', ' ') + ' UTC';
  }

  // Replaces the rows of tbody `id`: each row is {cls, cells}; cells are text.
  function fill(id, rows, columns) {
    var body = $(id);
    if (!body) return;
    // Says (to people and to the browser test) that these rows are the script's.
    body.setAttribute('data-filled', 'script');
    while (body.firstChild) body.removeChild(body.firstChild);
    if (rows.length === 0) {
      var tr = document.createElement('tr');
      tr.className = 'empty';
      var td = document.createElement('td');
      td.colSpan = columns;
      td.textContent = 'none';
      tr.appendChild(td);
      body.appendChild(tr);
      return;
    }
    rows.forEach(function (r) {
      var tr = document.createElement('tr');
      tr.className = r.cls;
      r.cells.forEach(function (c) {
        var td = document.createElement('td');
        td.textContent = String(c);
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
  }

  function setText(id, text) {
    var el = $(id);
    if (el) el.textContent = String(text);
  }

  function render(s) {
    var t = s.totals;
    ['alive', 'dead', 'requests', 'ok', 'errors', 'timeouts', 'panics', 'cache_hits',
      'queue_length', 'delayed'].forEach(function (k) { setText('t-' + k, t[k]); });
    setText('t-workers', t.workers_busy + '/' + t.workers_total);
    setText('t-oldest_waiting_ms', duration(t.oldest_waiting_ms));
    setText('serving', s.serving);
    fill('instances', s.instances.map(function (i) {
      var status = i.alive ? 'alive' : 'dead';
      return {
        cls: status,
        cells: [i.name, status, i.host, i.pid, i.version, duration(i.uptime_secs * 1000),
          i.workers_busy + '/' + i.workers_total, i.hung, i.in_hand,
          duration(i.heartbeat_age_ms), duration(i.seen_ago_ms),
          i.requests + ' (' + i.ok + ' ok, ' + i.errors + ' errors)']
      };
    }), 12);
    fill('waiting', s.waiting.map(function (w) {
      return { cls: '', cells: [w.id, w.func, w.user, w.source, w.size, w.args, duration(w.age_ms)] };
    }), 7);
    fill('delayed', s.delayed.map(function (w) {
      return {
        cls: '',
        cells: [w.id, w.func, w.user, w.source, w.size, w.args, time(w.due_ms), duration(w.due_in_ms)]
      };
    }), 8);
    fill('cron', s.cron.map(function (c) {
      return {
        cls: c.outcome,
        cells: [c.entry, c.func, c.outcome, c.message, time(c.at_ms), duration(c.duration_ms),
          c.instance, c.runs + ' (' + c.count_ok + ' ok, ' + c.count_error + ' errors, ' +
          c.count_timeout + ' timeouts)']
      };
    }), 8);
    var ms = function (v) { return v === null || v === undefined ? '–' : '≤ ' + v + ' ms'; };
    fill('functions', s.functions.map(function (f) {
      return {
        cls: '',
        cells: [f.name, f.calls, f.ok, f.errors, f.timeouts, f.panics, f.refused,
          ms(f.p50_ms), ms(f.p95_ms), ms(f.p99_ms)]
      };
    }), 10);
    samples.push({ t: s.now_ms, ok: t.ok, errors: t.errors });
    while (samples.length && samples[0].t < s.now_ms - WINDOW_MS) samples.shift();
    chart();
  }

  // Requests/s (ok and errors) between consecutive samples, as two polylines.
  function chart() {
    var box = $('chart');
    if (!box || samples.length < 2) return;
    var W = 600, H = 120, end = samples[samples.length - 1].t;
    var rates = [];
    for (var i = 1; i < samples.length; i++) {
      var a = samples[i - 1], b = samples[i], dt = (b.t - a.t) / 1000;
      if (dt <= 0) continue;
      // Counters drop when an instance leaves: no negative rates.
      rates.push({ t: b.t, ok: Math.max(0, (b.ok - a.ok) / dt), errors: Math.max(0, (b.errors - a.errors) / dt) });
    }
    var max = 1;
    rates.forEach(function (r) { max = Math.max(max, r.ok, r.errors); });
    var svg = document.createElementNS(SVG, 'svg');
    svg.setAttribute('viewBox', '0 0 ' + W + ' ' + (H + 14));
    svg.setAttribute('class', 'chart');
    [['ok', 'ok'], ['errors', 'errors']].forEach(function (k) {
      var pts = rates.map(function (r) {
        var x = W - ((end - r.t) / WINDOW_MS) * W;
        var y = H - (r[k[0]] / max) * H;
        return x.toFixed(1) + ',' + y.toFixed(1);
      }).join(' ');
      var line = document.createElementNS(SVG, 'polyline');
      line.setAttribute('points', pts);
      line.setAttribute('class', 'line-' + k[1]);
      svg.appendChild(line);
    });
    var label = document.createElementNS(SVG, 'text');
    label.setAttribute('x', '2');
    label.setAttribute('y', String(H + 12));
    label.textContent = 'requests/s over the last 10 minutes: ok (green), errors (red); top ' + max.toFixed(1) + '/s';
    svg.appendChild(label);
    while (box.firstChild) box.removeChild(box.firstChild);
    box.appendChild(svg);
  }

  function tick() {
    fetch('/dashboard/state.json', { cache: 'no-store', credentials: 'same-origin' })
      .then(function (r) {
        if (!r.ok) throw new Error('HTTP ' + r.status);
        return r.json();
      })
      .then(function (s) {
        render(s);
        updates += 1;
        var st = $('status');
        st.textContent = 'live, updated ' + time(s.now_ms);
        st.setAttribute('data-live', String(updates));
        st.className = 'live';
      })
      .catch(function (e) {
        var st = $('status');
        st.textContent = 'not updated: ' + e.message;
        st.className = 'stale';
      })
      .then(function () { setTimeout(tick, POLL_MS); });
  }

  tick();
})();
