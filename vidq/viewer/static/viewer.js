// The video page of vidq's viewer: label lanes, the clip strip, the confidence
// slider and click-to-seek, drawn from the JSON the page embeds (no requests).
// derive() is vidq/segments.py's derive_segments, rule for rule: at the stored
// threshold it gives the stored label_segments rows (tests/viewer checks it).
(function () {
  "use strict";

  var GAP_EPSILON_S = 1e-6;

  // clips: [[clip_index, start, end, [[label_no, class_id, score], ...]], ...]
  // rules: {min_score, min_s, max_gap_s}; labels: label strings by label_no.
  function derive(clips, rules, labels) {
    var ordered = clips.slice().sort(function (a, b) {
      return a[1] - b[1] || a[0] - b[0];
    });
    var open = new Map();
    var done = [];
    function close(run) {
      var sum = 0, peak = -Infinity;
      for (var i = 0; i < run.scores.length; i++) {
        sum += run.scores[i];
        if (run.scores[i] > peak) peak = run.scores[i];
      }
      return {label: run.label, class_id: run.class_id, start: run.start, end: run.end,
              mean: sum / run.scores.length, peak: peak, clips: run.scores.length,
              peak_at: run.peak_at};
    }
    ordered.forEach(function (clip, position) {
      Array.from(open.keys()).forEach(function (classId) {
        var run = open.get(classId);
        if (run.last !== position - 1 || clip[1] - run.end > rules.max_gap_s + GAP_EPSILON_S) {
          done.push(close(run));
          open.delete(classId);
        }
      });
      clip[3].forEach(function (scored) {
        var labelNo = scored[0], classId = scored[1], score = scored[2];
        if (score < rules.min_score) return;
        var mid = (clip[1] + clip[2]) / 2;
        var run = open.get(classId);
        if (run === undefined) {
          open.set(classId, {label: labelNo, class_id: classId, start: clip[1], end: clip[2],
                             scores: [score], last: position, best: score, peak_at: mid});
        } else {
          run.end = Math.max(run.end, clip[2]);
          run.scores.push(score);
          run.last = position;
          if (score > run.best) { run.best = score; run.peak_at = mid; }
        }
      });
    });
    open.forEach(function (run) { done.push(close(run)); });
    var kept = done.filter(function (s) { return (s.end - s.start) + GAP_EPSILON_S >= rules.min_s; });
    function cmp(a, b) { return a < b ? -1 : (a > b ? 1 : 0); }
    kept.sort(function (a, b) {
      return a.start - b.start || cmp(labels[a.label], labels[b.label]) || a.end - b.end;
    });
    return kept;
  }

  function fmt(t) {
    t = Math.max(0, t);
    var h = Math.floor(t / 3600), m = Math.floor((t % 3600) / 60), s = t % 60;
    var ss = s.toFixed(1);
    if (s < 10) ss = "0" + ss;
    return (h ? h + ":" + (m < 10 ? "0" : "") : "") + m + ":" + ss;
  }

  function hue(classId) {
    return (classId * 137.508) % 360;
  }

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function videoPage(data) {
    var player = document.getElementById("player");
    var lanes = document.getElementById("lanes");
    var strip = document.getElementById("strip");
    var slider = document.getElementById("threshold");
    var shown = document.getElementById("threshold-value");
    var command = document.getElementById("command");
    var labels = data.labels;
    var clips = data.clips;
    var duration = data.job.duration_s || 0;
    clips.forEach(function (c) { if (c[2] > duration) duration = c[2]; });
    duration = duration || 1;

    function seek(t) {
      if (!player) return;
      player.currentTime = t;
      state.lastSeek = t;
    }

    function pct(t) { return (100 * t / duration) + "%"; }

    function drawLanes(segments) {
      lanes.textContent = "";
      var byLabel = new Map();
      segments.forEach(function (s) {
        if (!byLabel.has(s.label)) byLabel.set(s.label, []);
        byLabel.get(s.label).push(s);
      });
      // Labels with the most time covered first.
      var order = Array.from(byLabel.keys()).sort(function (a, b) {
        function cover(no) { return byLabel.get(no).reduce(function (t, s) { return t + s.end - s.start; }, 0); }
        return cover(b) - cover(a) || (labels[a] < labels[b] ? -1 : 1);
      });
      order.forEach(function (no) {
        var lane = el("div", "lane");
        lane.setAttribute("role", "group");
        lane.setAttribute("aria-label", labels[no]);
        lane.appendChild(el("span", "lane-label", labels[no]));
        var track = el("div", "track");
        byLabel.get(no).forEach(function (s) {
          var b = el("button", "seg");
          b.type = "button";
          b.style.left = pct(s.start);
          b.style.width = pct(Math.max(s.end - s.start, duration / 2000));
          b.style.opacity = String(0.25 + 0.75 * s.mean);
          b.style.backgroundColor = "hsl(" + hue(s.class_id) + ",65%,42%)";
          var text = labels[no] + " " + fmt(s.start) + "–" + fmt(s.end) + ", mean " +
            s.mean.toFixed(3) + ", peak " + s.peak.toFixed(3) + ", " + s.clips + " clips";
          b.title = text;
          b.setAttribute("aria-label", text);
          b.dataset.start = String(s.start);
          b.dataset.end = String(s.end);
          b.dataset.label = labels[no];
          var mark = el("span", "peak");
          mark.style.left = (100 * (s.peak_at - s.start) / Math.max(s.end - s.start, 1e-9)) + "%";
          b.appendChild(mark);
          b.addEventListener("click", function () { seek(s.start); });
          track.appendChild(b);
        });
        lane.appendChild(track);
        lanes.appendChild(lane);
      });
      if (!order.length) lanes.appendChild(el("p", "note", "No segments at this threshold."));
      lanes.dataset.count = String(segments.length);
      state.segments = segments;
    }

    function drawStrip() {
      var frag = document.createDocumentFragment();
      clips.forEach(function (c, i) {
        var b = el("button", "clip");
        b.type = "button";
        b.tabIndex = i === 0 ? 0 : -1;
        b.style.left = pct(c[1]);
        b.style.width = pct(Math.max(c[2] - c[1], duration / 4000));
        var top = c[3];
        if (top.length) b.style.backgroundColor = "hsl(" + hue(top[0][1]) + ",65%,45%)";
        b.title = fmt(c[1]) + "–" + fmt(c[2]) + "\n" + top.slice(0, 5).map(function (t, r) {
          return (r + 1) + ". " + labels[t[0]] + " " + t[2].toFixed(3);
        }).join("\n");
        b.setAttribute("aria-label", "clip " + c[0] + " at " + fmt(c[1]) +
          (top.length ? ": " + labels[top[0][0]] : ""));
        b.dataset.start = String(c[1]);
        b.addEventListener("click", function () { seek(c[1]); });
        frag.appendChild(b);
      });
      strip.appendChild(frag);
      // One tab stop for the strip; arrow keys move between clips (roving tabindex).
      strip.addEventListener("keydown", function (e) {
        var buttons = strip.querySelectorAll("button.clip");
        var at = Array.prototype.indexOf.call(buttons, document.activeElement);
        if (at < 0) return;
        var next = {ArrowRight: at + 1, ArrowLeft: at - 1, Home: 0, End: buttons.length - 1}[e.key];
        if (next === undefined) return;
        e.preventDefault();
        next = Math.max(0, Math.min(buttons.length - 1, next));
        buttons[at].tabIndex = -1;
        buttons[next].tabIndex = 0;
        buttons[next].focus();
      });
    }

    function update() {
      // The stored threshold as it is; any other on a 0.01 grid, so that the command
      // shown names the very threshold the lanes were derived at.
      var threshold = parseFloat(slider.value);
      var stored = Math.abs(threshold - data.rules.min_score) < 1e-9;
      if (!stored) threshold = Math.round(threshold * 100) / 100;
      shown.textContent = stored ? String(data.rules.min_score) : threshold.toFixed(2);
      command.textContent = "vidq segments --job " + data.job.id +
        (stored ? "" : " --threshold " + threshold.toFixed(2));
      if (stored) {
        drawLanes(data.segments);
      } else {
        var rules = {min_score: threshold, min_s: data.rules.min_s, max_gap_s: data.rules.max_gap_s};
        drawLanes(derive(clips, rules, labels));
      }
    }

    var state = {segments: [], lastSeek: null};
    window.vidq.state = state;
    slider.addEventListener("input", update);
    document.querySelectorAll("button.seek").forEach(function (b) {
      b.addEventListener("click", function () { seek(parseFloat(b.dataset.at)); });
    });
    performance.mark("vidq-start");
    drawStrip();
    performance.mark("vidq-strip");
    update();
    performance.mark("vidq-lanes");
    var m = /(?:^#|&)t=([0-9.]+)/.exec(window.location.hash);
    if (m && player) {
      player.addEventListener("loadedmetadata", function () { seek(parseFloat(m[1])); }, {once: true});
    }
  }

  window.vidq = {derive: derive};
  var holder = document.getElementById("vidq-data");
  if (holder) videoPage(JSON.parse(holder.textContent));
})();
