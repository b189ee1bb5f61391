// stallscope web UI: the little script the pages need, loaded from the UI itself (the
// Content-Security-Policy allows no inline script). Pages work without it; it adds range
// selection on a service's timeline and zoom, search and reset on flame graphs.
(function () {
  'use strict';

  function svgPoint(svg, evt) {
    var point = svg.createSVGPoint();
    point.x = evt.clientX;
    point.y = evt.clientY;
    return point.matrixTransform(svg.getScreenCTM().inverse());
  }

  function isoSeconds(unixSeconds) {
    return new Date(unixSeconds * 1000).toISOString().replace('.000Z', 'Z');
  }

  // A drag across the timeline selects a range: the page reloads with it (a stable URL).
  function initTimeline(svg) {
    var from = Number(svg.dataset.from);
    var until = Number(svg.dataset.until);
    var step = Number(svg.dataset.step);
    var left = Number(svg.dataset.left);
    var right = Number(svg.dataset.right);
    var href = svg.dataset.href;
    var selection = svg.querySelector('rect.sel');
    var start = null;
    function clamp(x) { return Math.min(right, Math.max(left, x)); }
    function timeAt(x) { return from + (clamp(x) - left) / (right - left) * (until - from); }
    svg.addEventListener('mousedown', function (evt) {
      if (evt.button !== 0 || evt.target.closest('a')) { return; }
      start = clamp(svgPoint(svg, evt).x);
      selection.setAttribute('x', start);
      selection.setAttribute('width', 0);
      evt.preventDefault();
    });
    window.addEventListener('mousemove', function (evt) {
      if (start === null) { return; }
      var x = clamp(svgPoint(svg, evt).x);
      selection.setAttribute('x', Math.min(start, x));
      selection.setAttribute('width', Math.abs(x - start));
    });
    window.addEventListener('mouseup', function (evt) {
      if (start === null) { return; }
      var x = clamp(svgPoint(svg, evt).x);
      var a = Math.min(start, x);
      var b = Math.max(start, x);
      start = null;
      if (b - a < 3) { return; }
      // Whole buckets, aligned like the chart's (from the range's start).
      var t0 = from + Math.floor((timeAt(a) - from) / step) * step;
      var t1 = from + Math.ceil((timeAt(b) - from) / step) * step;
      if (t1 <= t0) { t1 = t0 + step; }
      window.location.href = href + (href.indexOf('?') >= 0 ? '&' : '?') +
        'sel_from=' + encodeURIComponent(isoSeconds(t0)) +
        '&sel_until=' + encodeURIComponent(isoSeconds(t1));
    });
  }

  function charWidth(svg) {
    var probe = document.createElementNS('http://www.w3.org/2000/svg', 'text');
    probe.setAttribute('class', 'probe');
    probe.textContent = 'mmmmmmmmmmmmmmmmmmmm';
    var group = svg.querySelector('g.fr') || svg;
    group.appendChild(probe);
    var width = probe.getComputedTextLength() / 20;
    group.removeChild(probe);
    return width > 0 ? width : 7.2;
  }

  // Flame graphs: click a frame to zoom into it (its ancestors stay, spanning the width),
  // search by substring or regular expression (matches turn purple; the share of the
  // total they cover is shown), reset.
  function initFlame(svg) {
    var total = Number(svg.dataset.total) || 1;
    var frames = Array.prototype.map.call(svg.querySelectorAll('g.fr'), function (g) {
      var title = g.querySelector('title').textContent;
      return {
        g: g,
        x: Number(g.dataset.x),
        w: Number(g.dataset.w),
        d: Number(g.dataset.d),
        rect: g.querySelector('rect'),
        text: g.querySelector('text'),
        title: title,
        name: title.split('\n')[0].replace(/ \(kernel\)$/, '')
      };
    });
    var details = document.getElementById('flame-details');
    var search = document.getElementById('flame-search');
    var reset = document.getElementById('flame-reset');
    var matched = document.getElementById('flame-matched');
    var width = charWidth(svg);
    var view = frames.length ? frames[0] : { x: 0, w: total, d: 0 };

    function layout() {
      var pixels = svg.getBoundingClientRect().width || 1200;
      frames.forEach(function (f) {
        var x = 0;
        var w = 0;
        var hidden = false;
        var ancestor = false;
        if (f.d < view.d) {
          if (f.x <= view.x && f.x + f.w >= view.x + view.w) {
            x = 0; w = 1; ancestor = true;
          } else {
            hidden = true;
          }
        } else if (f.x >= view.x && f.x + f.w <= view.x + view.w) {
          x = (f.x - view.x) / view.w;
          w = f.w / view.w;
        } else {
          hidden = true;
        }
        f.g.classList.toggle('hidden', hidden);
        f.g.classList.toggle('ancestor', ancestor);
        if (hidden) { return; }
        f.rect.setAttribute('x', (x * 100).toFixed(4) + '%');
        f.rect.setAttribute('width', (w * 100).toFixed(4) + '%');
        f.text.setAttribute('x', (x * 100 + 0.15).toFixed(4) + '%');
        var fits = Math.floor((w * pixels - 6) / width);
        f.text.textContent = fits < 3 ? '' :
          (f.name.length > fits ? f.name.slice(0, fits - 2) + '..' : f.name);
      });
    }

    function setQuery(term) {
      if (!window.history || !window.history.replaceState) { return; }
      var url = new URL(window.location.href);
      if (term) { url.searchParams.set('q', term); } else { url.searchParams.delete('q'); }
      window.history.replaceState(null, '', url.toString());
    }

    function find(term) {
      var test;
      if (!term) {
        test = null;
      } else {
        try {
          var pattern = new RegExp(term, 'i');
          test = function (name) { return pattern.test(name); };
        } catch (e) {
          var lower = term.toLowerCase();
          test = function (name) { return name.toLowerCase().indexOf(lower) >= 0; };
        }
      }
      var hits = [];
      frames.forEach(function (f) {
        var hit = test !== null && f.d > 0 && test(f.name);
        f.g.classList.toggle('match', hit);
        if (hit) { hits.push(f); }
      });
      // Nested matches count once: frames of a tree are nested or disjoint.
      hits.sort(function (a, b) { return a.x - b.x || b.w - a.w; });
      var covered = 0;
      var end = -1;
      hits.forEach(function (f) {
        if (f.x >= end) { covered += f.w; end = f.x + f.w; }
      });
      matched.textContent = test === null ? '' :
        hits.length + ' frames, ' + (covered / total * 100).toFixed(1) + '% of the total';
      setQuery(term);
    }

    frames.forEach(function (f) {
      f.g.addEventListener('click', function () {
        view = f;
        layout();
      });
      f.g.addEventListener('mouseenter', function () {
        details.textContent = f.title.replace(/\n/g, ' · ');
      });
    });
    if (search) {
      var timer = null;
      search.addEventListener('input', function () {
        window.clearTimeout(timer);
        timer = window.setTimeout(function () { find(search.value.trim()); }, 150);
      });
    }
    if (reset) {
      reset.addEventListener('click', function () {
        view = frames.length ? frames[0] : view;
        if (search) { search.value = ''; }
        find('');
        layout();
      });
    }
    window.addEventListener('resize', layout);
    document.addEventListener('keydown', function (evt) {
      if (evt.key === 'Escape' && frames.length) { view = frames[0]; layout(); }
    });
    layout();
    if (search && search.value.trim()) { find(search.value.trim()); }
  }

  Array.prototype.forEach.call(document.querySelectorAll('svg.timeline'), initTimeline);
  Array.prototype.forEach.call(document.querySelectorAll('svg.flame'), initFlame);
}());
