// A stand-in of LuCI's client-side runtime (luci.js, form.js, uci.js, rpc.js, ui.js, dom.js,
// poll) for tests/packages/luci/: only what openwrt/luci-app-derpd's view uses, with LuCI's names,
// call shapes and DOM ids, written from LuCI's documented API (LuCI's own runtime is in no
// package registry). It loads a view as LuCI does: fetch the source, resolve its leading
// 'require x' statements, run it as a function body, instantiate the class it returns.
// The browser talks JSON-RPC 2.0 to /ubus/ like LuCI: params [sid, object, method, args],
// result [status, data].
'use strict';

(function(window, document) {
	var sid = '00000000000000000000000000000000';
	var rpcId = 1;

	function isObj(v) { return v != null && typeof v == 'object' && !Array.isArray(v); }

	// ---- classes: X.extend({...}) with __init__ as the constructor ----
	function extend(Base, props) {
		function C() {
			if (typeof this.__init__ == 'function')
				this.__init__.apply(this, arguments);
		}
		C.prototype = Object.create(Base.prototype);
		C.prototype.constructor = C;
		for (var k in props)
			C.prototype[k] = props[k];
		C.extend = function(p) { return extend(C, p); };
		return C;
	}
	function BaseClass() {}
	BaseClass.extend = function(p) { return extend(BaseClass, p); };

	// ---- dom ----
	var dom = {
		elem: function(e) { return e instanceof Node; },
		create: function(html, attr, data) {
			var elem;
			if (!isObj(attr) || attr instanceof Node) { data = attr; attr = null; }
			if (Array.isArray(html)) {
				elem = document.createDocumentFragment();
				html.forEach(function(h) { elem.appendChild(dom.create(h)); });
			}
			else if (html instanceof Node)
				elem = html;
			else
				elem = document.createElement(html);
			for (var k in (attr || {})) {
				var v = attr[k];
				if (v == null || v === false) continue;
				if (typeof v == 'function' && k != 'value')
					elem.addEventListener(k, v);
				else if (k == 'value' && 'value' in elem)
					elem.value = v;
				else
					elem.setAttribute(k, isObj(v) ? JSON.stringify(v) : v);
			}
			dom.append(elem, data);
			return elem;
		},
		append: function(node, children) {
			if (children == null) return null;
			if (Array.isArray(children)) {
				children.forEach(function(c) { dom.append(node, c); });
				return node.lastChild;
			}
			if (children instanceof Node)
				return node.appendChild(children);
			if (typeof children == 'function')
				return dom.append(node, children(node));
			return node.appendChild(document.createTextNode(String(children)));
		},
		content: function(node, children) {
			while (node.firstChild) node.removeChild(node.firstChild);
			return dom.append(node, children);
		}
	};
	window.E = function() { return dom.create.apply(dom, arguments); };
	window._ = function(s) { return s; };
	window.N_ = function(n, s, p) { return n == 1 ? s : p; };

	// Errors in the page go to the test.
	function report(kind, msg) {
		try {
			var x = new XMLHttpRequest();
			x.open('POST', '/test/error', false);
			x.send(JSON.stringify({ kind: kind, message: String(msg) }));
		} catch (e) {}
	}
	window.addEventListener('error', function(ev) {
		report('error', (ev.message || ev.error) + ' at ' + ev.filename + ':' + ev.lineno);
	});
	window.addEventListener('unhandledrejection', function(ev) {
		report('unhandledrejection', ev.reason && ev.reason.stack ? ev.reason.stack : ev.reason);
	});

	// ---- rpc ----
	var rpc = {
		calls: [],
		call: function(object, method, args) {
			var req = { jsonrpc: '2.0', id: rpcId++, method: 'call', params: [ sid, object, method, args || {} ] };
			return fetch('/ubus/', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(req) })
				.then(function(r) { return r.json(); })
				.then(function(reply) {
					if (reply.error)
						throw new Error('RPC error: ' + reply.error.message);
					var res = reply.result;
					if (!Array.isArray(res) || res[0] != 0)
						throw new Error('ubus ' + object + '.' + method + ' failed with status ' + (res && res[0]));
					return res[1];
				});
		},
		declare: function(opts) {
			return function() {
				var args = {}, argv = arguments;
				(opts.params || []).forEach(function(p, i) { if (argv[i] !== undefined) args[p] = argv[i]; });
				return rpc.call(opts.object, opts.method, args).then(function(data) {
					if (opts.expect) {
						for (var key in opts.expect) {
							var def = opts.expect[key];
							if (key != '') data = (data || {})[key];
							if (data == null || typeof data != typeof def || Array.isArray(data) != Array.isArray(def))
								data = def;
							break;
						}
					}
					return typeof opts.filter == 'function' ? opts.filter(data) : data;
				});
			};
		}
	};

	// ---- uci ----
	var callUciGet = rpc.declare({ object: 'uci', method: 'get', params: [ 'config' ], expect: { values: {} } });
	var uci = {
		state: {}, changes: {}, deletes: {},
		load: function(config) {
			return callUciGet(config).then(function(values) { uci.state[config] = values; return values; });
		},
		get: function(config, sid, opt) {
			var c = uci.changes[config], d = uci.deletes[config];
			if (opt == null) return (uci.state[config] || {})[sid];
			if (d && d[sid] && d[sid].indexOf(opt) >= 0) return null;
			if (c && c[sid] && opt in c[sid]) return c[sid][opt];
			var s = (uci.state[config] || {})[sid];
			return s ? s[opt] : null;
		},
		set: function(config, sid, opt, val) {
			if (val == null || val === '' || (Array.isArray(val) && !val.length))
				return uci.unset(config, sid, opt);
			var c = (uci.changes[config] = uci.changes[config] || {});
			(c[sid] = c[sid] || {})[opt] = val;
			var d = (uci.deletes[config] || {})[sid];
			if (d && d.indexOf(opt) >= 0) d.splice(d.indexOf(opt), 1);
		},
		// As LuCI's uci.js: a delete only for an option the section has (or was given).
		unset: function(config, sid, opt) {
			var c = (uci.changes[config] || {})[sid], s = (uci.state[config] || {})[sid];
			if (!(s && s.hasOwnProperty(opt)) && !(c && c.hasOwnProperty(opt))) return;
			if (c) delete c[opt];
			var d = (uci.deletes[config] = uci.deletes[config] || {});
			d[sid] = d[sid] || [];
			if (d[sid].indexOf(opt) < 0) d[sid].push(opt);
		},
		// LuCI's uci.save(): the staged changes to rpcd as `uci set` and `uci delete` calls.
		save: function() {
			var tasks = [];
			Object.keys(uci.changes).forEach(function(config) {
				Object.keys(uci.changes[config]).forEach(function(s) {
					if (Object.keys(uci.changes[config][s]).length)
						tasks.push(rpc.call('uci', 'set', { config: config, section: s, values: uci.changes[config][s] }));
				});
			});
			Object.keys(uci.deletes).forEach(function(config) {
				Object.keys(uci.deletes[config]).forEach(function(s) {
					if (uci.deletes[config][s].length)
						tasks.push(rpc.call('uci', 'delete', { config: config, section: s, options: uci.deletes[config][s] }));
				});
			});
			var configs = Object.keys(uci.changes).concat(Object.keys(uci.deletes));
			uci.changes = {};
			uci.deletes = {};
			return Promise.all(tasks).then(function() {
				return Promise.all(configs.filter(function(c, i) { return configs.indexOf(c) == i; }).map(uci.load));
			});
		},
		// Real LuCI applies through `uci apply` with a rollback timer and `uci confirm`; the
		// stand-in commits.
		apply: function(configs) {
			return Promise.all(configs.map(function(c) { return rpc.call('uci', 'commit', { config: c }); }));
		}
	};

	// ---- ui ----
	var ui = {
		addNotification: function(title, children, cls) {
			var n = E('div', { 'class': 'alert-message ' + (cls || ''), 'id': 'notification' }, [
				title ? E('h4', {}, [ title ]) : null, E('div', {}, children)
			].filter(function(x) { return x; }));
			document.getElementById('maincontent').insertBefore(n, document.getElementById('view'));
			return n;
		},
		showModal: function(title, children) { return ui.addNotification(title, children, 'danger'); },
		changes: { apply: function() { return uci.apply(ui.changed); } },
		changed: []
	};

	// ---- poll ----
	var poll = {
		add: function(fn, interval) { setInterval(fn, (interval || 5) * 1000); },
		start: function() {}, stop: function() {}
	};

	// ---- validation: the datatypes the view uses, LuCI's names ----
	function isIPv4(v) {
		var p = v.split('.');
		return p.length == 4 && p.every(function(x) { return /^[0-9]{1,3}$/.test(x) && +x <= 255; });
	}
	function isIPv6(v) { return /^[0-9a-fA-F:.]+$/.test(v) && v.indexOf(':') >= 0 && v.split('::').length <= 2; }
	function isHostname(v) {
		return v.length <= 253 && /^[a-zA-Z0-9_]([a-zA-Z0-9_-]{0,61}[a-zA-Z0-9_])?(\.[a-zA-Z0-9_]([a-zA-Z0-9_-]{0,61}[a-zA-Z0-9_])?)*\.?$/.test(v);
	}
	function checkDatatype(dt, v) {
		var m;
		if (dt == 'port') return /^[0-9]+$/.test(v) && +v <= 65535 || _('Expecting: valid port value');
		if (dt == 'uinteger') return /^[0-9]+$/.test(v) || _('Expecting: non-negative integer value');
		if (dt == 'ufloat') return /^[0-9]+(\.[0-9]+)?$/.test(v) || _('Expecting: non-negative value');
		if (dt == 'host') return isIPv4(v) || isIPv6(v) || isHostname(v) || _('Expecting: valid hostname or IP address');
		if (dt == 'uciname') return /^[a-zA-Z0-9_]+$/.test(v) || _('Expecting: valid UCI identifier');
		if ((m = /^range\((-?[0-9]+),(-?[0-9]+)\)$/.exec(dt)))
			return /^-?[0-9]+(\.[0-9]+)?$/.test(v) && +v >= +m[1] && +v <= +m[2] || _('Expecting: value between %d and %d').replace('%d', m[1]).replace('%d', m[2]);
		throw new Error('stand-in: unknown datatype ' + dt);
	}

	// ---- form ----
	var form = {};

	var AbstractValue = BaseClass.extend({
		__init__: function(map, section, option, title, description) {
			this.map = map; this.section = section; this.option = option;
			this.title = title || ''; this.description = description || '';
			this.deps = []; this.rmempty = true; this.retain = false;
		},
		depends: function(field, value) {
			var d = {};
			if (isObj(field)) d = field; else d[field] = value;
			this.deps.push(d);
		},
		cbid: function(sid) { return 'cbid.' + this.map.config + '.' + sid + '.' + this.option; },
		cfgvalue: function(sid) { return uci.get(this.map.config, sid, this.ucioption || this.option); },
		formvalue: function(sid) {
			var el = document.getElementById('widget.' + this.cbid(sid));
			return el ? el.value : null;
		},
		textvalue: function(sid) { return this.cfgvalue(sid); },
		isActive: function(sid) {
			if (!this.deps.length) return true;
			var self = this;
			return this.deps.some(function(d) {
				return Object.keys(d).every(function(k) {
					var o = self.section.children.filter(function(c) { return c.option == k; })[0];
					return o && o.isActive(sid) && String(o.formvalue(sid)) == String(d[k]);
				});
			});
		},
		// true or an error message.
		validateValue: function(sid, value) {
			if (value == null || value === '' || (Array.isArray(value) && !value.length)) return true;
			var vals = Array.isArray(value) ? value : [ value ];
			for (var i = 0; i < vals.length; i++) {
				var r = this.datatype ? checkDatatype(this.datatype, vals[i]) : true;
				if (r === true && typeof this.validate == 'function') r = this.validate(sid, vals[i]);
				if (r !== true) return r;
			}
			return true;
		},
		isValid: function(sid) { return this.validateValue(sid, this.formvalue(sid)) === true; },
		write: function(sid, v) { uci.set(this.map.config, sid, this.ucioption || this.option, v); },
		remove: function(sid) { uci.unset(this.map.config, sid, this.ucioption || this.option); },
		// LuCI's rules: an invalid active field rejects the save; an empty one is removed
		// (rmempty, the default), a changed one written; an inactive one is removed unless
		// `retain` is set.
		parse: function(sid) {
			var active = this.isActive(sid);
			if (active && !this.isValid(sid))
				return Promise.reject(new TypeError(_('Option "%s" contains an invalid input value.').replace('%s', this.title || this.option)));
			if (!active) {
				if (!this.retain) this.remove(sid);
				return Promise.resolve();
			}
			var fval = this.formvalue(sid), cval = this.cfgvalue(sid);
			if (fval == null || fval === '' || (Array.isArray(fval) && !fval.length)) {
				if (this.rmempty || this.optional) this.remove(sid);
				return Promise.resolve();
			}
			if (this.forcewrite || JSON.stringify(cval) != JSON.stringify(fval))
				this.write(sid, fval);
			return Promise.resolve();
		},
		markValidity: function(sid, input) {
			var r = this.validateValue(sid, this.formvalue(sid));
			input.classList.toggle('cbi-input-invalid', r !== true);
			input.title = r === true ? '' : r;
		},
		renderFrame: function(sid, widget) {
			var desc = this.description ? E('div', { 'class': 'cbi-value-description' }, [ this.description ]) : null;
			return E('div', {
				'class': 'cbi-value', 'id': 'cbi-' + this.map.config + '-' + sid + '-' + this.option,
				'data-name': this.option, 'data-widget': this.widgetName
			}, [
				E('label', { 'class': 'cbi-value-title', 'for': 'widget.' + this.cbid(sid) }, [ this.title ]),
				E('div', { 'class': 'cbi-value-field' }, [ widget, desc ].filter(function(x) { return x; }))
			]);
		},
		value: function(key, label) {
			this.keylist = this.keylist || []; this.vallist = this.vallist || [];
			this.keylist.push(String(key)); this.vallist.push(label != null ? label : key);
		}
	});

	form.Value = AbstractValue.extend({
		widgetName: 'CBI.Value',
		renderWidget: function(sid) {
			var self = this, v = this.cfgvalue(sid);
			var input = E('input', {
				'type': this.password ? 'password' : 'text', 'class': 'cbi-input-text',
				'id': 'widget.' + this.cbid(sid), 'name': this.cbid(sid),
				'placeholder': this.placeholder != null ? String(this.placeholder) : null,
				'value': v != null ? v : (this.default != null ? this.default : '')
			});
			['input', 'blur', 'change'].forEach(function(ev) {
				input.addEventListener(ev, function() { self.markValidity(sid, input); self.section.updateDepends(sid); });
			});
			return input;
		}
	});

	form.TextValue = form.Value.extend({
		widgetName: 'CBI.TextValue',
		renderWidget: function(sid) {
			var self = this, v = this.cfgvalue(sid);
			var ta = E('textarea', { 'class': 'cbi-input-textarea', 'id': 'widget.' + this.cbid(sid), 'rows': this.rows || 5 }, [ v != null ? v : '' ]);
			ta.addEventListener('input', function() { self.markValidity(sid, ta); });
			return ta;
		}
	});

	form.ListValue = AbstractValue.extend({
		widgetName: 'CBI.ListValue',
		renderWidget: function(sid) {
			var self = this, v = this.cfgvalue(sid);
			if (v == null) v = this.default;
			var sel = E('select', { 'class': 'cbi-input-select', 'id': 'widget.' + this.cbid(sid) },
				(this.keylist || []).map(function(k, i) {
					return E('option', { 'value': k, 'selected': k == v ? 'selected' : null }, [ self.vallist[i] ]);
				}));
			sel.addEventListener('change', function() { self.section.updateDepends(sid); });
			return sel;
		}
	});

	form.Flag = AbstractValue.extend({
		widgetName: 'CBI.Flag',
		enabled: '1', disabled: '0',
		__init__: function() {
			AbstractValue.prototype.__init__.apply(this, arguments);
			this.default = this.disabled;
		},
		formvalue: function(sid) {
			var el = document.getElementById('widget.' + this.cbid(sid));
			return el ? (el.checked ? this.enabled : this.disabled) : null;
		},
		// LuCI's Flag: written whenever active (changed or not), removed when it equals the
		// default and rmempty is set.
		parse: function(sid) {
			if (this.isActive(sid)) {
				var fval = this.formvalue(sid);
				if (fval == this.default && (this.optional || this.rmempty)) this.remove(sid);
				else this.write(sid, fval);
			}
			else if (!this.retain)
				this.remove(sid);
			return Promise.resolve();
		},
		renderWidget: function(sid) {
			var self = this, v = this.cfgvalue(sid);
			if (v == null) v = this.default;
			var cb = E('input', {
				'type': 'checkbox', 'class': 'cbi-input-checkbox',
				'id': 'widget.' + this.cbid(sid), 'name': this.cbid(sid),
				'checked': (v == this.enabled || v == 'true' || v == 'on' || v == 'yes') ? 'checked' : null
			});
			cb.addEventListener('change', function() { self.section.updateDepends(sid); });
			return cb;
		}
	});

	form.DynamicList = AbstractValue.extend({
		widgetName: 'CBI.DynamicList',
		formvalue: function(sid) {
			var box = document.getElementById(this.cbid(sid));
			if (!box) return null;
			return Array.prototype.map.call(box.querySelectorAll('.item > input[type="hidden"]'), function(i) { return i.value; });
		},
		cfgvalue: function(sid) {
			var v = AbstractValue.prototype.cfgvalue.call(this, sid);
			return v == null ? null : (Array.isArray(v) ? v : [ v ]);
		},
		renderWidget: function(sid) {
			var self = this, box = E('div', { 'class': 'cbi-dynlist', 'id': this.cbid(sid) });
			var addItem = function(val) {
				var item = E('div', { 'class': 'item' }, [
					E('span', {}, [ val ]),
					E('input', { 'type': 'hidden', 'value': val }),
					E('button', { 'class': 'cbi-button cbi-button-remove', 'click': function(ev) {
						ev.preventDefault(); box.removeChild(item); self.markValidity(sid, add);
					} }, [ '×' ])
				]);
				box.insertBefore(item, box.querySelector('.add-item'));
			};
			var add = E('input', { 'type': 'text', 'class': 'cbi-input-text', 'id': 'widget.' + this.cbid(sid),
				'placeholder': this.placeholder != null ? String(this.placeholder) : null });
			box.appendChild(E('div', { 'class': 'add-item' }, [
				add,
				E('button', { 'class': 'cbi-button cbi-button-add', 'click': function(ev) {
					ev.preventDefault();
					if (add.value === '') return;
					var r = self.validateValue(sid, add.value);
					add.classList.toggle('cbi-input-invalid', r !== true);
					add.title = r === true ? '' : r;
					if (r !== true) return;
					addItem(add.value); add.value = '';
				} }, [ '+' ])
			]));
			(this.cfgvalue(sid) || []).forEach(addItem);
			return box;
		}
	});

	var AbstractSection = BaseClass.extend({
		__init__: function(map, sectiontype, title, description) {
			this.map = map; this.sectiontype = sectiontype;
			this.title = title || ''; this.description = description || '';
			this.children = []; this.tabs = null;
		},
		tab: function(name, title) {
			this.tabs = this.tabs || [];
			this.tabs.push({ name: name, title: title });
		},
		option: function(cls, option, title, description) {
			if (typeof cls != 'function' || !(cls.prototype instanceof AbstractValue))
				throw new TypeError('Class must be a descendant of AbstractValue');
			var o = new cls(this.map, this, option, title, description);
			this.children.push(o);
			return o;
		},
		taboption: function(tab, cls, option, title, description) {
			if (!(this.tabs || []).some(function(t) { return t.name == tab; }))
				throw new Error('Tab "' + tab + '" not declared');
			var o = this.option(cls, option, title, description);
			o.tab = tab;
			return o;
		},
		parse: function() {
			var self = this;
			return Promise.all(this.cfgsections().reduce(function(all, sid) {
				return all.concat(self.children.map(function(o) { return o.parse(sid); }));
			}, []));
		},
		updateDepends: function(sid) {
			this.children.forEach(function(o) {
				var el = document.getElementById('cbi-' + o.map.config + '-' + sid + '-' + o.option);
				if (el) el.style.display = o.isActive(sid) ? '' : 'none';
			});
		},
		renderSection: function(sid) {
			var self = this, body = E('div', { 'class': 'cbi-section-node', 'id': 'cbi-' + this.map.config + '-' + sid });
			if (this.tabs) {
				var menu = E('ul', { 'class': 'cbi-tabmenu' });
				this.tabs.forEach(function(t, i) {
					var pane = E('div', { 'class': 'cbi-tabcontainer', 'id': 'container.' + self.map.config + '.' + sid + '.' + t.name, 'data-tab': t.name, 'data-tab-title': t.title,
						'style': i ? 'display:none' : null });
					self.children.filter(function(o) { return o.tab == t.name; }).forEach(function(o) {
						pane.appendChild(o.renderFrame(sid, o.renderWidget(sid)));
					});
					menu.appendChild(E('li', { 'class': 'tabmenu-item-' + t.name + (i ? '' : ' cbi-tab'), 'data-tab': t.name }, [
						E('a', { 'href': '#', 'click': function(ev) {
							ev.preventDefault();
							body.querySelectorAll('.cbi-tabcontainer').forEach(function(p) { p.style.display = p.getAttribute('data-tab') == t.name ? '' : 'none'; });
							menu.querySelectorAll('li').forEach(function(li) { li.className = 'tabmenu-item-' + li.getAttribute('data-tab') + (li.getAttribute('data-tab') == t.name ? ' cbi-tab' : ' cbi-tab-disabled'); });
						} }, [ t.title ])
					]));
					body.appendChild(pane);
				});
				body.insertBefore(menu, body.firstChild);
			}
			else {
				this.children.forEach(function(o) { body.appendChild(o.renderFrame(sid, o.renderWidget(sid))); });
			}
			return body;
		},
		render: function() {
			var self = this;
			var el = E('div', { 'class': 'cbi-section', 'id': 'cbi-' + this.map.config + '-' + this.sectiontype }, [
				this.title ? E('h3', {}, [ this.title ]) : null,
				this.description ? E('div', { 'class': 'cbi-section-descr' }, [ this.description ]) : null
			].filter(function(x) { return x; }));
			this.cfgsections().forEach(function(sid) { el.appendChild(self.renderSection(sid)); });
			return el;
		}
	});

	form.NamedSection = AbstractSection.extend({
		__init__: function(map, section_id, sectiontype, title, description) {
			AbstractSection.prototype.__init__.call(this, map, sectiontype, title, description);
			this.section = section_id;
		},
		cfgsections: function() { return uci.get(this.map.config, this.section) ? [ this.section ] : []; }
	});

	form.TypedSection = AbstractSection.extend({
		cfgsections: function() {
			var vals = uci.state[this.map.config] || {}, type = this.sectiontype;
			return Object.keys(vals).filter(function(s) { return vals[s]['.type'] == type; });
		}
	});

	form.Map = BaseClass.extend({
		__init__: function(config, title, description) {
			this.config = config; this.title = title || ''; this.description = description || '';
			this.children = [];
		},
		section: function(cls) {
			var args = Array.prototype.slice.call(arguments, 1);
			var s = Object.create(cls.prototype);
			cls.apply(s, [ this ].concat(args));
			this.children.push(s);
			return s;
		},
		load: function() { return uci.load(this.config); },
		parse: function() { return Promise.all(this.children.map(function(s) { return s.parse(); })); },
		save: function() {
			var self = this;
			return this.parse()
				.then(function() { ui.changed = [ self.config ]; return uci.save(); })
				.then(function() { return self.renderContents(); })
				.catch(function(e) {
					ui.showModal(_('Save error'), [ E('p', {}, [ _('An error occurred while saving the form:') ]), E('p', {}, [ E('em', {}, [ e.message ]) ]) ]);
					return Promise.reject(e);
				});
		},
		renderContents: function() {
			var self = this;
			var el = this.root || E('div', { 'class': 'cbi-map', 'id': 'cbi-' + this.config });
			dom.content(el, [
				this.title ? E('h2', { 'name': 'content' }, [ this.title ]) : null,
				this.description ? E('div', { 'class': 'cbi-map-descr' }, [ this.description ]) : null
			].filter(function(x) { return x; }).concat(this.children.map(function(s) { return s.render(); })));
			el.__map = this;
			this.root = el;
			this.children.forEach(function(s) { s.cfgsections().forEach(function(sid) { s.updateDepends(sid); }); });
			return el;
		},
		render: function() {
			var self = this;
			return this.load().then(function() {
				var el = self.renderContents();
				// Dependencies need the widgets in the document to read their values.
				setTimeout(function() { self.children.forEach(function(s) { s.cfgsections().forEach(function(sid) { s.updateDepends(sid); }); }); }, 0);
				return el;
			});
		}
	});

	// ---- view ----
	var view = BaseClass.extend({
		__init__: function() {
			var self = this, vp = document.getElementById('view');
			dom.content(vp, E('div', { 'class': 'spinning' }, [ _('Loading view…') ]));
			this.ready = Promise.resolve(this.load())
				.then(function(data) { return self.render(data); })
				.then(function(nodes) {
					dom.content(vp, nodes);
					vp.appendChild(self.addFooter());
					document.body.setAttribute('data-view-ready', '1');
				})
				.catch(function(e) {
					report('view', e && e.stack ? e.stack : e);
					throw e;
				});
		},
		load: function() {},
		render: function() {},
		maps: function() {
			return Array.prototype.map.call(document.querySelectorAll('#view .cbi-map'), function(m) { return m.__map; });
		},
		handleSave: function() {
			return Promise.all(this.maps().map(function(m) { return m.save(); }));
		},
		handleSaveApply: function() {
			return this.handleSave().then(function() { return ui.changes.apply(); });
		},
		handleReset: function() {
			return Promise.all(this.maps().map(function(m) { return m.load().then(function() { return m.renderContents(); }); }));
		},
		addFooter: function() {
			var self = this, btn = function(cls, label, fn) {
				return E('button', { 'class': 'cbi-button ' + cls, 'click': function(ev) {
					ev.preventDefault();
					fn.call(self).then(function() { document.body.setAttribute('data-last-action', cls + ':ok'); },
						function(e) { document.body.setAttribute('data-last-action', cls + ':failed'); });
				} }, [ label ]);
			};
			return E('div', { 'class': 'cbi-page-actions' }, [
				btn('cbi-button-apply', _('Save & Apply'), this.handleSaveApply), ' ',
				btn('cbi-button-save', _('Save'), this.handleSave), ' ',
				btn('cbi-button-reset', _('Reset'), this.handleReset)
			]);
		}
	});

	// ---- the loader ----
	var builtin = { baseclass: BaseClass, view: view, form: form, uci: uci, rpc: rpc, ui: ui, dom: dom, poll: poll };
	var L = {
		env: { resource: '/luci-static/resources' },
		Class: BaseClass,
		dom: dom, ui: ui, rpc: rpc, uci: uci, poll: poll,
		resource: function(p) { return L.env.resource + '/' + p; },
		resolveDefault: function(p, def) { return Promise.resolve(p).catch(function() { return def; }); },
		bind: function(fn, self) { var a = Array.prototype.slice.call(arguments, 2); return function() { return fn.apply(self, a.concat(Array.prototype.slice.call(arguments))); }; },
		isObject: isObj,
		error: function(type, msg) { var e = new Error(msg); e.name = type; throw e; },
		require: function(name) {
			if (name in builtin) return Promise.resolve(builtin[name]);
			var url = L.resource(name.replace(/\./g, '/') + '.js');
			return fetch(url).then(function(r) {
				if (!r.ok) throw new Error('HTTP ' + r.status + ' loading ' + url);
				return r.text();
			}).then(function(src) {
				var re = /^\s*(?:'use strict';\s*)?'require ([a-zA-Z0-9_.]+)(?: as ([a-zA-Z_$][a-zA-Z0-9_$]*))?';/;
				var deps = [], names = [], rest = src.replace(/^\s*'use strict';/, ''), m;
				while ((m = re.exec(rest))) {
					deps.push(m[1]);
					names.push(m[2] || m[1].replace(/.*\./, ''));
					rest = rest.slice(m[0].length);
				}
				return Promise.all(deps.map(L.require)).then(function(mods) {
					var fn = new Function([ '_', 'N_' ].concat(names).join(','), "'use strict';\n" + src);
					var res = fn.apply(L, [ window._, window.N_ ].concat(mods));
					builtin[name] = res;
					return res;
				});
			});
		}
	};
	window.L = L;

	// Loads and instantiates a view, as LuCI's `view` dispatcher action does.
	L.loadView = function(path) {
		return L.require('view.' + path.replace(/\//g, '.')).then(function(V) {
			if (typeof V != 'function') throw new TypeError('view ' + path + ' did not return a class');
			var v = new V();
			return v.ready.then(function() { return v; });
		});
	};
})(window, document);
