'use strict';
'require view';
'require form';
'require uci';
'require rpc';
'require ui';
'require dom';
'require poll';

// Services → DERP relay: whether derpd runs, its clients and traffic now, the DERPMap entry to
// paste (from derpd's /debug/ pages, through the rpcd plugin luci.derpd), and every option of
// /etc/config/derpd in tabs.

var callServiceList = rpc.declare({
	object: 'service',
	method: 'list',
	params: [ 'name' ],
	expect: { '': {} }
});

var callStatus = rpc.declare({
	object: 'luci.derpd',
	method: 'status',
	expect: { '': {} }
});

// Go durations as derpd takes them: 0, 10s, 1m30s, 500ms, 1.5h.
function validateDuration(section_id, value) {
	if (value == '' || value == '0' || /^(([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|µs|ms|s|m|h))+$/.test(value))
		return true;
	return _('Expecting a duration such as 10s, 1m30s or 500ms');
}

function validateAbsPath(section_id, value) {
	if (value == '' || /^\/[^\s]*$/.test(value))
		return true;
	return _('Expecting an absolute path');
}

function isIPv4(v) {
	var p = v.split('.');
	return p.length == 4 && p.every(function(x) { return /^[0-9]{1,3}$/.test(x) && +x <= 255; });
}

function isIPv6(v) {
	var halves = v.split('::');
	if (halves.length > 2 || !/^[0-9a-fA-F:.]+$/.test(v))
		return false;
	var groups = [].concat.apply([], halves.map(function(h) { return h == '' ? [] : h.split(':'); }));
	var last = groups[groups.length - 1] || '';
	var words = groups.length + (last.indexOf('.') >= 0 ? 1 : 0);
	return groups.every(function(g, i) {
		return /^[0-9a-fA-F]{1,4}$/.test(g) || (i == groups.length - 1 && isIPv4(g));
	}) && (halves.length == 2 ? words < 8 : words == 8);
}

function isPort(p, allowZero) {
	return /^[0-9]{1,5}$/.test(p) && +p <= 65535 && (allowZero || +p > 0);
}

// derpd's -a: ":443", "1.2.3.4:443" or "[::1]:443".
function validateListen(section_id, value) {
	var m = /^(.*):([^:\]]*)$/.exec(value);
	if (value == '' || (m && isPort(m[2], true) &&
	    (m[1] == '' || isIPv4(m[1]) || (/^\[.*\]$/.test(m[1]) && isIPv6(m[1].slice(1, -1))))))
		return true;
	return _('Expecting :port, IPv4:port or [IPv6]:port');
}

// mesh_with: host[:port][/dialhost][/sha256-raw:HEX], as derpd parses it.
function validateMeshPeer(section_id, value) {
	var pins = 0, parts = [];
	if (value == '')
		return true;
	value.split('/').forEach(function(p) {
		if (p.indexOf('sha256-raw:') == 0)
			pins += /^sha256-raw:[0-9a-fA-F]{64}$/.test(p) ? 1 : 2;
		else
			parts.push(p);
	});
	var name = /^(\[([^\]]*)\]|[A-Za-z0-9._-]+)(:([0-9]+))?$/.exec(parts[0] || '');
	var dial = parts[1];
	if (pins <= 1 && parts.length >= 1 && parts.length <= 2 && name &&
	    (name[2] == null || isIPv6(name[2])) && (name[4] == null || isPort(name[4], false)) &&
	    (dial == null || /^[A-Za-z0-9._-]+$/.test(dial) || isIPv6(dial.replace(/^\[(.*)\]$/, '$1'))))
		return true;
	return _('Expecting host[:port][/dialhost][/sha256-raw:HEX]');
}

function validateURL(section_id, value) {
	if (value == '' || /^https?:\/\/[^\s\/]+(\/\S*)?$/.test(value))
		return true;
	return _('Expecting an http:// or https:// URL');
}

function formatBytes(n) {
	var units = [ 'B', 'KiB', 'MiB', 'GiB', 'TiB' ], i = 0;
	n = +n || 0;
	while (n >= 1024 && i < units.length - 1) {
		n /= 1024;
		i++;
	}
	return (i ? n.toFixed(1) : String(n)) + ' ' + units[i];
}

function formatUptime(s) {
	s = +s || 0;
	var d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
	return (d ? d + 'd ' : '') + (d || h ? h + 'h ' : '') + m + 'm ' + (s % 60) + 's';
}

function copyBox(id, text, rows) {
	return E('div', { 'class': 'derpd-copy' }, [
		E('textarea', {
			'id': id,
			'class': 'cbi-input-textarea',
			'readonly': 'readonly',
			'rows': rows,
			'style': 'width:100%;font-family:monospace;font-size:90%',
			'spellcheck': 'false'
		}, [ text ]),
		E('button', {
			'class': 'cbi-button',
			'click': function(ev) {
				var ta = document.getElementById(id);
				ta.select();
				if (navigator.clipboard)
					navigator.clipboard.writeText(ta.value).catch(function() {});
				else
					document.execCommand('copy');
				ev.preventDefault();
			}
		}, [ _('Copy') ])
	]);
}

return view.extend({
	// Bytes at the previous poll, for the rates.
	last: null,

	load: function() {
		return Promise.all([
			uci.load('derpd'),
			L.resolveDefault(callServiceList('derpd'), {}),
			L.resolveDefault(callStatus(), {})
		]);
	},

	// Whether procd runs derpd: service list {name: 'derpd'} → instances.*.running.
	running: function(list) {
		var inst = ((list || {}).derpd || {}).instances || {};
		for (var k in inst)
			if (inst[k].running)
				return inst[k];
		return null;
	},

	renderStatus: function(list, st) {
		var inst = this.running(list), m = (st && st.metrics) || {}, now = Date.now(),
		    rx = '-', tx = '-';

		if (this.last && st && st.metrics && now > this.last.t) {
			var secs = (now - this.last.t) / 1000;
			rx = formatBytes(Math.max(0, (m.derp_bytes_received || 0) - this.last.rx) / secs) + '/s';
			tx = formatBytes(Math.max(0, (m.derp_bytes_sent || 0) - this.last.tx) / secs) + '/s';
		}
		if (st && st.metrics)
			this.last = { t: now, rx: m.derp_bytes_received || 0, tx: m.derp_bytes_sent || 0 };

		var row = function(id, label, value) {
			return E('tr', { 'class': 'tr' }, [
				E('td', { 'class': 'td left', 'width': '33%' }, [ label ]),
				E('td', { 'class': 'td left', 'id': id }, [ value ])
			]);
		};
		var have = st && st.metrics && st.metrics.uptime_sec != null;

		return E('table', { 'class': 'table', 'id': 'derpd-status-table' }, [
			row('derpd-running', _('Service'), inst
				? E('span', { 'style': 'color:green' }, [ _('running') + (inst.pid ? ' (PID ' + inst.pid + ')' : '') ])
				: E('span', { 'style': 'color:red' }, [ _('not running') ])),
			row('derpd-version', _('Version, uptime'), have
				? (st.version || '?') + ', ' + formatUptime(m.uptime_sec) : '-'),
			row('derpd-clients', _('Clients now'), have
				? String(m.derp_clients_local || 0) +
				  (m.derp_clients_remote ? ' (+' + m.derp_clients_remote + ' ' + _('on mesh peers') + ')' : '')
				: '-'),
			row('derpd-connections', _('Connections, mesh links up'), have
				? (m.derp_current_connections || 0) + ', ' + (m.derpd_mesh_links_up || 0) : '-'),
			row('derpd-traffic', _('Traffic now (in / out)'), have ? rx + ' / ' + tx : '-'),
			row('derpd-totals', _('Relayed since start (in / out)'), have
				? formatBytes(m.derp_bytes_received) + ' / ' + formatBytes(m.derp_bytes_sent) +
				  ', ' + (m.derp_packets_received || 0) + ' / ' + (m.derp_packets_sent || 0) + ' ' + _('packets') +
				  ', ' + (m.derp_packets_dropped || 0) + ' ' + _('dropped')
				: '-'),
			row('derpd-stun', _('STUN answers'), have ? String(m['stun_requests/success'] || 0) : '-'),
			row('derpd-refused', _('Logins refused (admission, full)'), have
				? (m.derpd_admission_rejections || 0) + ', ' + (m.derpd_clients_full || 0) : '-'),
			(st && st.error) ? row('derpd-error', _('Status'), E('em', {}, [ st.error ])) : E([])
		]);
	},

	renderDerpMap: function(st) {
		var dm = st && st.derpmap;

		if (!dm || !dm.node)
			return E('div', { 'id': 'derpd-derpmap' }, [
				E('p', {}, [ _('The DERPMap entry appears here once derpd runs with TLS (set a hostname and enable it).') ])
			]);

		return E('div', { 'id': 'derpd-derpmap' }, [
			E('p', {}, [
				_('Clients find this relay through the DERP map of your tailnet: paste one of these where your control server reads it. With an IP address as hostname the node carries the certificate\'s pin (CertName), which changes only when the certificate does. For a region of several relays (mesh), list every node\'s entry in one region.')
			]),
			E('h4', {}, [ _('Tailscale: tailnet policy file') ]),
			E('p', {}, [ _('Admin console → Access controls: paste the "derpMap" member into the top-level object of the policy file.') ]),
			copyBox('derpd-policy', dm.policy_file, 16),
			E('h4', {}, [ _('headscale: derp.paths') ]),
			E('p', {}, [ _('Save as a YAML file on the headscale server and list its path under derp.paths in config.yaml.') ]),
			copyBox('derpd-headscale', dm.headscale_yaml, 11),
			E('h4', {}, [ _('Node and region (JSON)') ]),
			copyBox('derpd-node', JSON.stringify(dm.node), 2),
			copyBox('derpd-region', JSON.stringify(dm.region, null, 2), 8)
		]);
	},

	render: function(data) {
		var self = this, list = data[1], st = data[2], m, s, o;

		// The status and the DERPMap entry stay outside the map: saving re-renders the map.
		m = new form.Map('derpd');

		s = m.section(form.NamedSection, 'main', 'derpd');
		s.anonymous = true;
		s.addremove = false;

		s.tab('relay', _('Relay'));
		s.tab('certs', _('Certificates'));
		s.tab('mesh', _('Mesh'));
		s.tab('access', _('Who may connect'));
		s.tab('limits', _('Limits'));

		/* Relay */
		o = s.taboption('relay', form.Flag, 'enabled', _('Enabled'));
		o.rmempty = false;

		o = s.taboption('relay', form.Value, 'hostname', _('Hostname'),
			_('The name or IP address clients dial: a DNS name (its certificate and key go in the certificate directory), or an IP address (derpd makes a self-signed certificate and shows its pin below).'));
		o.datatype = 'host';
		o.placeholder = '203.0.113.7';

		o = s.taboption('relay', form.Value, 'addr', _('DERP listen address'),
			_('DERP over HTTPS: :port, IPv4:port or [IPv6]:port. TLS on port 443 or with certificate mode manual. LuCI\'s web server holds 443, so derpd listens on 3443 and the firewall forwards the public port to it.'));
		o.placeholder = ':3443';
		o.validate = validateListen;

		o = s.taboption('relay', form.Value, 'http_port', _('HTTP port'),
			_('Plain HTTP for captive-portal checks and the redirect to HTTPS; -1 turns it off.'));
		o.placeholder = '3080';
		o.validate = function(section_id, value) {
			if (value == '' || value == '-1' || (/^[0-9]+$/.test(value) && +value <= 65535))
				return true;
			return _('Expecting a port (0-65535) or -1');
		};

		o = s.taboption('relay', form.Value, 'public_port', _('Public DERP port'),
			_('The port clients dial (the DERP map says it); the firewall forwards it from the zone below to the listen address. Empty: the listen port.'));
		o.datatype = 'port';
		o.placeholder = '443';

		o = s.taboption('relay', form.Value, 'public_http_port', _('Public HTTP port'),
			_('Forwarded to the HTTP port. Empty: the HTTP port itself.'));
		o.datatype = 'port';
		o.placeholder = '80';

		o = s.taboption('relay', form.Flag, 'stun', _('STUN server'));
		o.default = o.enabled;
		o.rmempty = false;

		o = s.taboption('relay', form.Value, 'stun_port', _('STUN port'));
		o.datatype = 'port';
		o.placeholder = '3478';
		o.depends('stun', '1');
		o.retain = true;

		o = s.taboption('relay', form.Flag, 'derp', _('DERP'), _('Serve DERP on /derp; off leaves only STUN and the HTTP pages.'));
		o.default = o.enabled;
		o.rmempty = false;

		o = s.taboption('relay', form.Value, 'home', _('Home page'),
			_('Empty for derpd\'s page, "blank", or an http(s) URL to redirect to.'));
		o.validate = function(section_id, value) {
			return value == 'blank' ? true : validateURL(section_id, value);
		};

		o = s.taboption('relay', form.ListValue, 'log_level', _('Log level'), _('Read the log with: logread -e derpd'));
		o.value('error', _('Error'));
		o.value('warn', _('Warning'));
		o.value('info', _('Info'));
		o.value('debug', _('Debug'));
		o.value('trace', _('Trace'));
		o.default = 'info';

		o = s.taboption('relay', form.Flag, 'firewall', _('Open the firewall'),
			_('Ask fw4 to forward the public ports to derpd and open STUN, from the zone below.'));
		o.rmempty = false;

		o = s.taboption('relay', form.Value, 'firewall_zone', _('Firewall zone'));
		o.datatype = 'uciname';
		o.placeholder = 'wan';
		o.depends('firewall', '1');
		o.retain = true;

		o = s.taboption('relay', form.Value, 'reflection_zone', _('NAT reflection zone'),
			_('Clients in this zone (and network) that dial the router\'s public IPv4 address reach derpd, not LuCI. Empty: no reflection.'));
		o.datatype = 'uciname';
		o.placeholder = 'lan';
		o.depends('firewall', '1');
		o.retain = true;

		/* Certificates */
		o = s.taboption('certs', form.ListValue, 'certmode', _('Certificate mode'),
			_('manual: a certificate and key in the certificate directory, named after the hostname (.crt, .key), or self-signed for an IP address. letsencrypt: derpd gets the certificate from Let\'s Encrypt and renews it (ports 443 and 80 reachable from the internet; package ca-bundle).'));
		o.value('manual', _('manual'));
		o.value('letsencrypt', _('letsencrypt'));
		o.default = 'manual';

		o = s.taboption('certs', form.Flag, 'acme_ip_certs', _('IP address certificate'),
			_('The hostname is the router\'s public IP address: a 6-day certificate for it, renewed by derpd; the derpMap entry needs no pin.'));
		o.depends('certmode', 'letsencrypt');
		o.retain = true;

		o = s.taboption('certs', form.Value, 'acme_email', _('ACME contact email'));
		o.datatype = 'string';
		o.depends('certmode', 'letsencrypt');
		o.retain = true;

		o = s.taboption('certs', form.Value, 'acme_directory', _('ACME directory'),
			_('Another ACME CA\'s directory URL; empty: Let\'s Encrypt.'));
		o.placeholder = 'https://acme-v02.api.letsencrypt.org/directory';
		o.depends('certmode', 'letsencrypt');
		o.retain = true;

		o = s.taboption('certs', form.Value, 'acme_ca_file', _('ACME CA roots'),
			_('PEM file of the roots to trust for that CA; empty: the system\'s.'));
		o.validate = validateAbsPath;
		o.depends('certmode', 'letsencrypt');
		o.retain = true;

		o = s.taboption('certs', form.Value, 'certdir', _('Certificate directory'));
		o.placeholder = '/etc/derpd/certs';
		o.validate = validateAbsPath;

		o = s.taboption('certs', form.Value, 'key_file', _('Relay key file'),
			_('The relay\'s private key (derper\'s format); made on first start.'));
		o.placeholder = '/etc/derpd/derper.key';
		o.validate = validateAbsPath;

		o = s.taboption('certs', form.Flag, 'meta_cert', _('Meta certificate'),
			_('Append the meta-certificate to the TLS chain: clients skip a round trip.'));
		o.default = o.enabled;
		o.rmempty = false;

		/* Mesh */
		o = s.taboption('mesh', form.Value, 'mesh_psk_file', _('Mesh key file'),
			_('The key shared by the relays of a region: 64 hex digits.'));
		o.placeholder = '/etc/derpd/mesh.key';
		o.validate = validateAbsPath;

		o = s.taboption('mesh', form.DynamicList, 'mesh_with', _('Other nodes'),
			_('One per entry: host[:port][/dialhost][/sha256-raw:HEX].'));
		o.placeholder = 'derp2.example.com';
		o.validate = validateMeshPeer;

		/* Who may connect */
		o = s.taboption('access', form.Flag, 'verify_clients', _('Only my tailnet'),
			_('Ask the local tailscaled which nodes are in this router\'s tailnet.'));
		o.rmempty = false;

		o = s.taboption('access', form.Value, 'socket', _('tailscaled socket'));
		o.placeholder = '/var/run/tailscale/tailscaled.sock';
		o.validate = validateAbsPath;
		o.depends('verify_clients', '1');
		o.retain = true;

		o = s.taboption('access', form.Value, 'verify_client_url', _('Admission server URL'),
			_('POST {"NodePublic","Source"}, expect {"Allow":true}.'));
		o.validate = validateURL;

		o = s.taboption('access', form.Flag, 'verify_client_url_fail_open', _('Admit when unreachable'),
			_('Let clients in when the admission server cannot be reached.'));
		o.default = o.enabled;
		o.rmempty = false;

		o = s.taboption('access', form.Value, 'allow_keys_file', _('Allowed keys file'),
			_('One nodekey:<hex> per line; re-read when it changes.'));
		o.placeholder = '/etc/derpd/allow-keys';
		o.validate = validateAbsPath;

		/* Limits */
		o = s.taboption('limits', form.Value, 'buffer_budget_mib', _('Packet buffer memory (MiB)'),
			_('Readers wait when it is used up.'));
		o.datatype = 'range(1,4096)';
		o.placeholder = '16';

		o = s.taboption('limits', form.Value, 'threads', _('Worker threads'), _('0: one per CPU, at most 4.'));
		o.datatype = 'range(0,64)';
		o.placeholder = '0';

		o = s.taboption('limits', form.Value, 'max_clients', _('Most clients'));
		o.datatype = 'uinteger';
		o.placeholder = '2048';

		o = s.taboption('limits', form.Value, 'max_handshakes', _('Most handshakes at once'),
			_('When all are taken, a new connection evicts the one that has come least far.'));
		o.datatype = 'uinteger';
		o.placeholder = '256';

		o = s.taboption('limits', form.Value, 'max_handshakes_per_ip', _('Most handshakes from one address'),
			_('IPv6: one /64. More from it are closed at once.'));
		o.datatype = 'uinteger';
		o.placeholder = '16';

		o = s.taboption('limits', form.Value, 'accept_connection_limit', _('New connections per second'),
			_('Empty: unlimited.'));
		o.datatype = 'ufloat';

		o = s.taboption('limits', form.Value, 'accept_connection_burst', _('New connection burst'));
		o.datatype = 'uinteger';

		o = s.taboption('limits', form.Value, 'rate_config', _('Per-client rate file'),
			_('derper\'s JSON rate configuration; empty: none.'));
		o.validate = validateAbsPath;

		[
			[ 'first_byte_timeout', _('First byte timeout'), '3s' ],
			[ 'handshake_timeout', _('Handshake timeout'), '10s' ],
			[ 'login_timeout', _('Login timeout'), '10s' ],
			[ 'frame_timeout', _('Frame timeout'), '10s' ],
			[ 'tcp_write_timeout', _('TCP write timeout'), '2s' ],
			[ 'tcp_keepalive_time', _('TCP keepalive'), '10m' ],
			[ 'tcp_user_timeout', _('TCP user timeout'), '15s' ]
		].forEach(function(d) {
			o = s.taboption('limits', form.Value, d[0], d[1]);
			o.placeholder = d[2];
			o.validate = validateDuration;
		});

		var statusBox = E('div', { 'id': 'derpd-status' }, [ this.renderStatus(list, st) ]);
		var mapBox = E('div', { 'id': 'derpd-derpmap-box' }, [ this.renderDerpMap(st) ]);

		poll.add(function() {
			return Promise.all([
				L.resolveDefault(callServiceList('derpd'), {}),
				L.resolveDefault(callStatus(), {})
			]).then(function(res) {
				dom.content(statusBox, self.renderStatus(res[0], res[1]));
				dom.content(mapBox, self.renderDerpMap(res[1]));
			});
		}, 5);

		return m.render().then(function(mapEl) {
			return E([], [
				E('h2', { 'name': 'content' }, [ _('DERP relay') ]),
				E('div', { 'class': 'cbi-map-descr' }, [
					_('derpd: a DERP relay and STUN server for Tailscale. Set the hostname, enable it, save and apply, then paste the DERPMap entry shown here into your tailnet policy file or headscale configuration.')
				]),
				E('div', { 'class': 'cbi-section' }, [
					E('h3', {}, [ _('Status') ]),
					statusBox
				]),
				mapEl,
				E('div', { 'class': 'cbi-section' }, [
					E('h3', {}, [ _('DERPMap entry') ]),
					mapBox
				])
			]);
		});
	}
});
