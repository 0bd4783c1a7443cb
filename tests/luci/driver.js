// tests/packages/luci/ drives the LuCI page with this script, as a person would: it loads the view,
// reads every field and the status, types an invalid value and saves (nothing may be written),
// then edits fields of several kinds and clicks Save & Apply. It reports what it saw to
// /test/report; the test checks that and the ubus calls the page made.
'use strict';

(function() {
	var result = { steps: [] };

	function post(path, obj) {
		return fetch(path, { method: 'POST', body: JSON.stringify(obj) });
	}
	function sleep(ms) { return new Promise(function(r) { setTimeout(r, ms); }); }
	function waitFor(what, cond, ms) {
		var deadline = Date.now() + (ms || 10000);
		return (function again() {
			var v = cond();
			if (v) return Promise.resolve(v);
			if (Date.now() > deadline) return Promise.reject(new Error('timed out waiting for ' + what));
			return sleep(20).then(again);
		})();
	}
	function $(id) { return document.getElementById(id); }
	function widget(opt) { return $('widget.cbid.derpd.main.' + opt); }
	function text(id) { var e = $(id); return e ? e.textContent : null; }
	function setValue(opt, v) {
		var el = widget(opt);
		el.value = v;
		el.dispatchEvent(new Event('input', { bubbles: true }));
		el.dispatchEvent(new Event('change', { bubbles: true }));
	}
	function setChecked(opt, on) {
		var el = widget(opt);
		el.checked = on;
		el.dispatchEvent(new Event('change', { bubbles: true }));
	}
	function addListItem(opt, v) {
		setValue(opt, v);
		$('cbid.derpd.main.' + opt).querySelector('.cbi-button-add').click();
	}
	function fields() {
		return Array.prototype.map.call(document.querySelectorAll('#view .cbi-value'), function(f) {
			var name = f.getAttribute('data-name'), w = widget(name), box = $('cbid.derpd.main.' + name);
			var value = w == null ? null
				: w.type == 'checkbox' ? (w.checked ? '1' : '0')
				: (box && box.classList.contains('cbi-dynlist'))
					? Array.prototype.map.call(box.querySelectorAll('.item > input'), function(i) { return i.value; })
					: w.value;
			return { name: name, widget: f.getAttribute('data-widget'), value: value,
				visible: f.style.display != 'none', invalid: !!(w && w.classList.contains('cbi-input-invalid')),
				tab: f.parentNode.getAttribute('data-tab') };
		});
	}
	function status() {
		var v = function(id) { var e = $(id); return e ? e.value : null; };
		return {
			running: text('derpd-running'), version: text('derpd-version'), clients: text('derpd-clients'),
			connections: text('derpd-connections'), traffic: text('derpd-traffic'), totals: text('derpd-totals'),
			stun: text('derpd-stun'), error: text('derpd-error'),
			policy: v('derpd-policy'), headscale: v('derpd-headscale'), node: v('derpd-node'), region: v('derpd-region')
		};
	}
	function click(cls) {
		document.body.removeAttribute('data-last-action');
		document.querySelector('.cbi-page-actions .' + cls).click();
		return waitFor(cls, function() { return document.body.getAttribute('data-last-action'); });
	}

	L.loadView('derpd/config').then(function() {
		result.tabs = Array.prototype.map.call(document.querySelectorAll('.cbi-tabmenu li'), function(li) { return li.textContent; });
		result.initial = { fields: fields(), status: status() };

		// Invalid input: marked, and Save writes nothing.
		setValue('http_port', 'eighty');
		setValue('hostname', 'not a host!');
		setValue('handshake_timeout', '10 seconds');
		return post('/test/mark', { name: 'invalid-save' }).then(function() { return click('cbi-button-save'); });
	}).then(function(action) {
		var n = $('notification');
		result.steps.push({ step: 'invalid', action: action,
			invalid: fields().filter(function(f) { return f.invalid; }).map(function(f) { return f.name; }),
			notification: n ? n.textContent : null });
		if (n) n.parentNode.removeChild(n);

		// A bad list entry is refused, a good one is added.
		addListItem('mesh_with', 'bad peer!');
		var bad = $('cbid.derpd.main.mesh_with').querySelectorAll('.item').length;
		addListItem('mesh_with', 'derp2.example.com/203.0.113.9/sha256-raw:' + new Array(33).join('ab'));

		setValue('http_port', '8080');
		setValue('hostname', '192.0.2.10');
		setValue('handshake_timeout', '30s');
		setValue('max_clients', '100');
		setValue('certdir', '');
		setValue('log_level', 'debug');
		setChecked('verify_clients', true);
		setChecked('stun', false);
		result.steps.push({ step: 'edited', bad_list_items: bad, fields: fields() });
		return post('/test/mark', { name: 'save-apply' }).then(function() { return click('cbi-button-apply'); });
	}).then(function(action) {
		var n = $('notification');
		result.steps.push({ step: 'saved', action: action, notification: n ? n.textContent : null, fields: fields() });
		// Let one status poll run (the rates need two samples).
		return sleep(5500);
	}).then(function() {
		result.final_status = status();
		// Validation probes: which values each field accepts (the test asks derpd's parsers).
		return fetch('/test/cases').then(function(r) { return r.json(); });
	}).then(function(cases) {
		result.probes = {};
		Object.keys(cases).forEach(function(opt) {
			var box = $('cbid.derpd.main.' + opt), before = widget(opt).value;
			result.probes[opt] = cases[opt].map(function(v) {
				if (box && box.classList.contains('cbi-dynlist')) {
					var n = box.querySelectorAll('.item').length;
					addListItem(opt, v);
					var items = box.querySelectorAll('.item');
					if (items.length == n) { setValue(opt, ''); return [ v, false ]; }
					items[items.length - 1].querySelector('.cbi-button-remove').click();
					return [ v, true ];
				}
				setValue(opt, v);
				return [ v, !widget(opt).classList.contains('cbi-input-invalid') ];
			});
			setValue(opt, before);
		});
	}).catch(function(e) {
		result.driver_error = String(e && e.stack ? e.stack : e);
	}).then(function() {
		window.scrollTo(0, 0);
		return post('/test/report', result);
	}).then(function() {
		document.body.setAttribute('data-driver-done', '1');
	});
})();
