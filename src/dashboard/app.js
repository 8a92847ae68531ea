// The dashboard's script (served at /dashboard/app.js; no build step, no library).
// Every second it fetches /dashboard/state.json and refills the page's tables and
// totals, which the server rendered first (so the page works with scripts off).
// It keeps the last 10 minutes of totals and draws requests/s (ok and errors) and
// the p50/p99 call duration as inline SVG. Data is only ever put in the page with
// textContent or as attributes built here, never as HTML: request bodies are
// attacker-controlled. When the server put a CSRF token in the page (the user may
// act), rows get action buttons, and a click posts the action to
// /dashboard/action with the token in X-Cerbas-Csrf.
'use strict';
(function () {
  var POLL_MS = 1000;
  var WINDOW_MS = 10 * 60 * 1000;
  var samples = []; // {t, ok, errors, buckets}
  var updates = 0;
  var SVG = 'http://www.w3.org/2000/svg';
  var tokenMeta = document.querySelector('meta[name="cerbas-csrf"]');
  var TOKEN = tokenMeta ? tokenMeta.getAttribute('content') : null;
  var timer = null;

  function $(id) { return document.getElementById(id); }

  // The last cell of a row: its buttons, each {action, key, value, label}
  // (same markup as page.rs `row_with`).
  function buttonCell(buttons) {
    var td = document.createElement('td');
    td.className = 'actions';
    buttons.forEach(function (b) {
      var el = document.createElement('button');
      el.type = 'button';
      el.setAttribute('data-action', b.action);
      el.setAttribute('data-' + b.key, String(b.value));
      el.textContent = b.label;
      td.appendChild(el);
    });
    return td;
  }

  // Posts the action a button describes, says what came of it, then refreshes.
  function act(button) {
    var body = { action: button.getAttribute('data-action') };
    ['id', 'entry', 'instance'].forEach(function (k) {
      var v = button.getAttribute('data-' + k);
      if (v !== null) body[k] = v;
    });
    button.disabled = true;
    var st = $('action-status');
    fetch('/dashboard/action', {
      method: 'POST',
      cache: 'no-store',
      credentials: 'same-origin',
      headers: { 'Content-Type': 'application/json', 'X-Cerbas-Csrf': TOKEN },
      body: JSON.stringify(body)
    }).then(function (r) {
      return r.json().then(function (j) { return { ok: r.ok, j: j }; },
        function () { return { ok: false, j: { error: 'HTTP ' + r.status } }; });
    }).then(function (a) {
      st.textContent = a.ok ? a.j.done : 'not done: ' + a.j.error;
      st.className = a.ok ? 'done' : 'failed';
    }).catch(function (e) {
      st.textContent = 'not done: ' + e.message;
      st.className = 'failed';
    }).then(function () {
      button.disabled = false;
      if (timer !== null) { clearTimeout(timer); timer = null; }
      tick();
    });
  }

  if (TOKEN) {
    document.addEventListener('click', function (e) {
      var t = e.target;
      if (t && t.tagName === 'BUTTON' && t.hasAttribute('data-action')) act(t);
    });
  }

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
      // Every column of the table's head (an "actions" one too, when there).
      var head = body.parentNode ? body.parentNode.querySelectorAll('thead th').length : 0;
      td.colSpan = head || columns;
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
      if (TOKEN && r.buttons) tr.appendChild(buttonCell(r.buttons));
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
      var status = !i.alive ? 'dead' : (i.paused ? 'paused' : 'alive');
      var pause = i.paused ? 'resume' : 'pause';
      return {
        cls: status,
        cells: [i.name, status, i.host, i.pid, i.version, duration(i.uptime_secs * 1000),
          i.workers_busy + '/' + i.workers_total, i.hung, i.in_hand,
          duration(i.heartbeat_age_ms), duration(i.seen_ago_ms),
          i.requests + ' (' + i.ok + ' ok, ' + i.errors + ' errors)'],
        buttons: i.alive ? [{ action: pause, key: 'instance', value: i.name, label: pause }] : []
      };
    }), 12);
    fill('waiting', s.waiting.map(function (w) {
      return {
        cls: '',
        cells: [w.id, w.func, w.user, w.source, w.size, w.args, duration(w.age_ms)],
        buttons: [{ action: 'delete', key: 'id', value: w.id, label: 'delete' }]
      };
    }), 7);
    fill('delayed', s.delayed.map(function (w) {
      return {
        cls: '',
        cells: [w.id, w.func, w.user, w.source, w.size, w.args, time(w.due_ms), duration(w.due_in_ms)],
        buttons: [{ action: 'run', key: 'id', value: w.id, label: 'run now' },
          { action: 'delete', key: 'id', value: w.id, label: 'delete' }]
      };
    }), 8);
    // Same cells as page.rs `cron_cells`.
    fill('cron', s.cron.map(function (c) {
      return {
        cls: c.outcome,
        cells: [c.entry, c.func, c.schedule, time(c.next_ms), c.outcome, c.message,
          time(c.at_ms), duration(c.duration_ms), c.instance,
          c.runs + ' (' + c.count_ok + ' ok, ' + c.count_error + ' errors, ' +
          c.count_timeout + ' timeouts)'],
        buttons: c.here ? [{ action: 'cron', key: 'entry', value: c.entry, label: 'run now' }] : []
      };
    }), 10);
    var ms = function (v) { return v === null || v === undefined ? '–' : '≤ ' + v + ' ms'; };
    fill('functions', s.functions.map(function (f) {
      return {
        cls: '',
        cells: [f.name, f.calls, f.ok, f.errors, f.timeouts, f.panics, f.refused, f.cache_hits,
          ms(f.p50_ms), ms(f.p95_ms), ms(f.p99_ms), f.recent_calls, f.recent_errors,
          ms(f.recent_p50_ms), ms(f.recent_p95_ms), ms(f.recent_p99_ms)]
      };
    }), 16);
    fill('errors', s.errors.map(function (e) {
      return {
        cls: '',
        cells: [time(e.at_ms), e.id === null || e.id === undefined ? '(http)' : e.id, e.func,
          e.user, e.message, e.instance]
      };
    }), 6);
    fill('proxies', s.proxies.map(function (p) {
      return {
        cls: p.state,
        cells: [p.name, p.prefix, p.target, p.state, p.requests, p.failures, p.refused]
      };
    }), 7);
    samples.push({ t: s.now_ms, ok: t.ok, errors: t.errors, buckets: t.buckets || [] });
    while (samples.length && samples[0].t < s.now_ms - WINDOW_MS) samples.shift();
    chart();
  }

  // The q quantile of the calls counted in bucket deltas: the upper bound of its
  // bucket in ms (same rule as functions.rs `quantile`), null without calls.
  function quantile(delta, q) {
    var total = 0;
    delta.forEach(function (n) { total += n; });
    if (total <= 0) return null;
    var rank = Math.max(1, Math.ceil(q * total)), seen = 0;
    for (var i = 0; i < delta.length; i++) {
      seen += delta[i];
      if (seen >= rank) return Math.pow(2, Math.min(i, 16));
    }
    return null;
  }

  // One chart: series of {t, v} per key, as polylines, with a label.
  function plot(svg, top, H, rates, keys, end, text) {
    var W = 600, max = 1;
    rates.forEach(function (r) { keys.forEach(function (k) { if (r[k] !== null) max = Math.max(max, r[k]); }); });
    keys.forEach(function (k) {
      var pts = rates.filter(function (r) { return r[k] !== null; }).map(function (r) {
        var x = W - ((end - r.t) / WINDOW_MS) * W;
        var y = top + H - (r[k] / max) * H;
        return x.toFixed(1) + ',' + y.toFixed(1);
      }).join(' ');
      var line = document.createElementNS(SVG, 'polyline');
      line.setAttribute('points', pts);
      line.setAttribute('class', 'line-' + k);
      svg.appendChild(line);
    });
    var label = document.createElementNS(SVG, 'text');
    label.setAttribute('x', '2');
    label.setAttribute('y', String(top + H + 12));
    label.textContent = text(max);
    svg.appendChild(label);
  }

  // Requests/s (ok and errors), then p50 and p99 call duration, between
  // consecutive samples, over the last 10 minutes.
  function chart() {
    var box = $('chart');
    if (!box || samples.length < 2) return;
    var H = 100, end = samples[samples.length - 1].t;
    var rates = [];
    for (var i = 1; i < samples.length; i++) {
      var a = samples[i - 1], b = samples[i], dt = (b.t - a.t) / 1000;
      if (dt <= 0) continue;
      // Counters drop when an instance leaves: no negative rates.
      var delta = b.buckets.map(function (n, j) { return Math.max(0, n - (a.buckets[j] || 0)); });
      rates.push({
        t: b.t,
        ok: Math.max(0, (b.ok - a.ok) / dt),
        errors: Math.max(0, (b.errors - a.errors) / dt),
        p50: quantile(delta, 0.5),
        p99: quantile(delta, 0.99)
      });
    }
    var svg = document.createElementNS(SVG, 'svg');
    svg.setAttribute('viewBox', '0 0 600 ' + (2 * H + 40));
    svg.setAttribute('class', 'chart');
    plot(svg, 0, H, rates, ['ok', 'errors'], end, function (max) {
      return 'requests/s over the last 10 minutes: ok (green), errors (red); top ' + max.toFixed(1) + '/s';
    });
    plot(svg, H + 20, H, rates, ['p50', 'p99'], end, function (max) {
      return 'call duration: p50 (blue), p99 (orange), bucket upper bounds; top ' + max + ' ms';
    });
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
      .then(function () {
        if (timer === null) timer = setTimeout(function () { timer = null; tick(); }, POLL_MS);
      });
  }

  tick();
})();
