#!/usr/bin/env python3
"""Turn the raw JSONL written by bench/compare.sh into latest.{json,md,svg}.

Usage:
    python3 bench/report.py RAW.jsonl OUTDIR --command "bench/compare.sh ..." [--quick]

RAW.jsonl holds one JSON object per line.  Every measurement record has
"server" ("derpd" or "derper"), "scenario" and "rep" (1-based int), plus
scenario-specific fields (numbers unless noted):

  static      binary_bytes, rss_idle_kib, hwm_idle_kib, version (str)
  throughput  pairs, size, seconds, sent, received, pps, mbps, drop_pct,
              server_cpu_s, cpu_us_per_packet, server_cpu_util,
              loadgen_cpu_util, bottleneck (str: server|loadgen|neither)
              (closed loop: each sender keeps a window of packets in flight)
  flood       the same fields, open loop (senders never wait): what is
              delivered and dropped when offered more than the relay carries
  fight       the throughput fields plus fight_fps: the same closed loop
              while two connections of one key send alternately (a
              duplicate-key fight); cpu_us_per_packet is the other pairs'
  latency     load_pct (25|50|75), rate_pps, probe_rate, samples, lost,
              p50_us, p99_us, p999_us, server_cpu_s, cpu_us_per_packet
  idle        clients, rss_before_kib, rss_after_kib, hwm_kib,
              rss_per_client_kib, connect_s
  logins      concurrency, seconds, logins, failures, logins_per_s,
              server_cpu_s, cpu_us_per_login
  allocs      derpd only, its glibc build with bench/alloc-count.c preloaded:
              kind "packets" (a throughput run, allocs_per_packet) or "logins"
              (a logins run, allocs_per_login)

One extra record {"scenario": "machine", "cpu_model", "cores", "kernel",
"date", "derper_version", "derpd_version", "derpd_target", "derpd_flags", "loadgen"} has no
server/rep.
Unknown fields are ignored; numeric fields may be missing or null.

Records are grouped by (server, scenario, sub-key), the sub-key being
load_pct for latency, clients for idle, kind for allocs and "all" otherwise; each numeric
field is reduced to its median, min, max and n over the repetitions.
With --quick the outputs are named quick.* instead of latest.*.
"""
import argparse
import json
import math
import os
import statistics
import sys
from collections import Counter, defaultdict
from xml.sax.saxutils import escape

SERVERS = ("derpd", "derper")
SUBKEY = {"latency": "load_pct", "idle": "clients", "allocs": "kind"}
# Headline metrics for the SVG chart: key, label, better is.
HEADLINE = [
    ("cpu_us_per_packet", "CPU µs per delivered packet", "lower"),
    ("mbps", "delivered Mbps at saturation", "higher"),
    ("p99_us", "p99 latency µs", "lower"),
    ("rss_idle_kib", "idle RSS (KiB)", "lower"),
    ("rss_per_client_kib", "RSS per idle client (KiB)", "lower"),
    ("logins_per_s", "logins per second", "higher"),
    ("binary_bytes", "stripped binary size (bytes)", "lower"),
]


def die(msg):
    sys.exit(f"report.py: error: {msg}")


def is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def rnd(x):
    """Round to 3 significant digits (but never below integer precision)."""
    if x is None or isinstance(x, int):
        return x
    if x == int(x) and abs(x) < 2**53:
        return int(x)
    if abs(x) >= 100:
        return round(x)
    return round(x, 2 - int(math.floor(math.log10(abs(x)))))


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def load_raw(path):
    machine, groups, n_lines = {}, defaultdict(list), 0
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        die(f"cannot read {path}: {e}")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        n_lines += 1
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            die(f"{path}:{lineno}: not valid JSON ({e.msg})")
        if not isinstance(rec, dict):
            die(f"{path}:{lineno}: expected a JSON object")
        scen, server = rec.get("scenario"), rec.get("server")
        if scen == "machine":
            machine = {k: v for k, v in rec.items() if k != "scenario"}
            continue
        if server not in SERVERS or not isinstance(scen, str):
            print(f"report.py: warning: {path}:{lineno}: skipping record "
                  f"(server={server!r}, scenario={scen!r})", file=sys.stderr)
            continue
        sub = "all"
        if scen in SUBKEY:
            sub = rec.get(SUBKEY[scen])
            if isinstance(sub, str) and sub:
                pass  # a named kind (allocs: "packets", "logins")
            elif not is_num(sub):
                print(f"report.py: warning: {path}:{lineno}: {scen} record "
                      f"without {SUBKEY[scen]}, skipped", file=sys.stderr)
                continue
            else:
                sub = str(rnd(sub))
        groups[(server, scen, sub)].append(rec)
    if n_lines == 0:
        die(f"{path} is empty")
    if not machine:
        print(f"report.py: warning: {path}: no machine record", file=sys.stderr)
    return machine, groups


def aggregate(groups):
    """-> {server: {scenario: {subkey: {field: {median,min,max,n}}}}}"""
    out = {s: {} for s in SERVERS}
    for (server, scen, sub), records in sorted(groups.items()):
        values, bottlenecks = defaultdict(list), []
        for rec in records:
            for k, v in rec.items():
                if k in ("rep", "server", "scenario"):
                    continue
                if is_num(v):
                    values[k].append(v)
                elif k == "bottleneck" and isinstance(v, str):
                    bottlenecks.append(v)
        fields = {k: {"median": rnd(statistics.median(v)), "min": rnd(min(v)),
                      "max": rnd(max(v)), "n": len(v)}
                  for k, v in sorted(values.items())}
        if bottlenecks:
            fields["bottleneck"] = bottlenecks
        out[server].setdefault(scen, {})[sub] = fields
    for s in SERVERS:
        if not out[s]:
            die(f"no records at all for server {s!r}")
    return out


def stat(agg, server, scen, sub, field):
    return agg[server].get(scen, {}).get(sub, {}).get(field)


def med(agg, server, scen, sub, field):
    st = stat(agg, server, scen, sub, field)
    return st["median"] if st else None


def subkeys(agg, server, scen, other=None):
    """Sub-keys (strings) of a scenario, numerically sorted; union with `other`."""
    keys = set(agg[server].get(scen, {})) | set(agg[other].get(scen, {}) if other else ())
    return sorted(keys, key=float)


def pick_subkey(agg, scen, prefer=None):
    """Per-server sub-key for a headline: common key (preferred, else largest),
    falling back to the server's own (preferred, else largest)."""
    common = set(subkeys(agg, "derpd", scen)) & set(subkeys(agg, "derper", scen))
    pick = {}
    for s in SERVERS:
        pool = common or set(subkeys(agg, s, scen))
        pick[s] = None if not pool else (prefer if prefer in pool else max(pool, key=float))
    return pick


def build_summary(agg, machine, command):
    p99_at = pick_subkey(agg, "latency", prefer="50")
    idle_at = pick_subkey(agg, "idle")
    where = {"cpu_us_per_packet": ("throughput", None), "mbps": ("throughput", None),
             "p99_us": ("latency", p99_at), "rss_idle_kib": ("static", None),
             "rss_per_client_kib": ("idle", idle_at), "logins_per_s": ("logins", None),
             "binary_bytes": ("static", None), "drop_pct": ("flood", None)}
    doc = {}
    for s in SERVERS:
        doc[s] = {}
        for key, (scen, at) in where.items():
            sub = at[s] if at else "all"
            doc[s][key] = med(agg, s, scen, sub, key) if sub else None
        doc[s]["details"] = agg[s]
    ratios = {}
    for key, (scen, at) in where.items():
        if key != "drop_pct":  # compare only like with like (same load / client count)
            same = not at or at["derpd"] == at["derper"]
            ratios[key] = ratio(doc["derpd"][key], doc["derper"][key]) if same else None
    ratios["cpu_us_per_login"] = ratio(med(agg, "derpd", "logins", "all", "cpu_us_per_login"),
                                       med(agg, "derper", "logins", "all", "cpu_us_per_login"))
    for load in subkeys(agg, "derpd", "latency", "derper"):
        for f in ("p50_us", "p99_us", "p999_us"):
            ratios[f"{f}@{load}"] = ratio(med(agg, "derpd", "latency", load, f),
                                          med(agg, "derper", "latency", load, f))
    for n in subkeys(agg, "derpd", "idle", "derper"):
        ratios[f"rss_per_client_kib@{n}"] = ratio(
            med(agg, "derpd", "idle", n, "rss_per_client_kib"),
            med(agg, "derper", "idle", n, "rss_per_client_kib"))
    d, r = doc["derpd"], ratios

    def goal(text, key, limit, use_ratio, higher=False):
        v = r.get(key) if use_ratio else d[key]
        met = None if v is None else (v >= limit if higher else v <= limit)
        return {"goal": text, ("ratio" if use_ratio else "value"): v, "met": met}
    doc["ratios"] = ratios
    # Issue 20's goals, for the static musl build the packages ship.
    doc["goals"] = {
        "cpu_us_per_packet": goal("<= 1/3 of derper", "cpu_us_per_packet", 1 / 3, True),
        "mbps": goal(">= 3x derper at saturation", "mbps", 3, True, higher=True),
        f"p99_us@{p99_at['derpd'] if p99_at else '?'}": goal(
            "<= 1/2 of derper at 50 % load", "p99_us", 1 / 2, True),
        "logins_per_s": goal(">= 2x derper", "logins_per_s", 2, True, higher=True),
        "rss_per_client_kib": goal("<= 8 KiB", "rss_per_client_kib", 8, False),
        "rss_idle_kib": goal("<= 2 MiB", "rss_idle_kib", 2 * 1024, False),
    }
    doc["machine"] = machine
    doc["command"] = command
    doc["reps"] = max((st["n"] for s in SERVERS for scen in agg[s].values()
                       for sub in scen.values() for st in sub.values()
                       if isinstance(st, dict)), default=0)
    doc["_p99_load"] = p99_at  # used by the renderers, removed before writing
    return doc


def fmt(x):
    if x is None:
        return "—"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def cell(st):
    if not st:
        return "—"
    if st["n"] > 1:
        return f"{fmt(st['median'])} ({fmt(st['min'])}–{fmt(st['max'])})"
    return fmt(st["median"])


def table_rows(agg):
    """(label, scenario, subkey, field, better) for every table row."""
    rows = [("CPU µs per delivered packet", "throughput", "all", "cpu_us_per_packet", "lower"),
            ("delivered Mbps at saturation", "throughput", "all", "mbps", "higher"),
            ("CPU µs per delivered packet during a duplicate-key fight", "fight", "all",
             "cpu_us_per_packet", "lower"),
            ("delivered Mbps under flood (open loop)", "flood", "all", "mbps", "higher"),
            ("drop % under flood", "flood", "all", "drop_pct", "lower")]
    for load in subkeys(agg, "derpd", "latency", "derper"):
        for f, name in (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")):
            rows.append((f"{name} µs at {load} % load", "latency", load, f, "lower"))
    rows.append(("idle RSS (KiB)", "static", "all", "rss_idle_kib", "lower"))
    for n in subkeys(agg, "derpd", "idle", "derper"):
        rows.append((f"RSS per idle client (KiB), {n} clients", "idle", n,
                     "rss_per_client_kib", "lower"))
    rows += [("logins per second", "logins", "all", "logins_per_s", "higher"),
             ("CPU µs per login", "logins", "all", "cpu_us_per_login", "lower"),
             ("heap allocations per relayed packet (derpd's glibc build, counted)", "allocs",
              "packets", "allocs_per_packet", "lower"),
             ("heap allocations per login (derpd's glibc build, counted)", "allocs", "logins",
              "allocs_per_login", "lower"),
             ("stripped binary size (bytes)", "static", "all", "binary_bytes", "lower")]
    return rows


def render_md(doc, agg):
    m = doc["machine"]
    out = [f"# derpd vs derper — {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, "
           f"{m.get('date', '?')}, derper {m.get('derper_version', '?')}, "
           f"{m.get('derpd_version', 'derpd ?')} ({m.get('derpd_target', 'target not recorded')})"
           f" — `{doc['command']}`", "",
           "| metric | derpd | derper | derpd/derper | better is |",
           "|---|---:|---:|---:|---|"]
    for label, scen, sub, field, better in table_rows(agg):
        a, b = stat(agg, "derpd", scen, sub, field), stat(agg, "derper", scen, sub, field)
        r = ratio(a and a["median"], b and b["median"])
        out.append(f"| {label} | {cell(a)} | {cell(b)} | "
                   f"{'—' if r is None else f'{r:.3f}'} | {better} |")
    out += ["", "Load levels are % of derper's saturation packet rate.", "", "## Goals", ""]
    for key, g in doc["goals"].items():
        kind = "ratio" if "ratio" in g else "value"
        mark = {True: "✅", False: "❌", None: "❔"}[g["met"]]
        unit = "× derper" if kind == "ratio" else " KiB"
        val = "no data" if g[kind] is None else f"{kind} {fmt(g[kind])}{unit}"
        out.append(f"- {mark} `{key}` {g['goal']}: {val}")
    parts = []
    for scen in ("throughput", "flood", "logins"):
        for s in SERVERS:
            c = Counter(stat(agg, s, scen, "all", "bottleneck") or [])
            parts.append(f"{scen} {s}: " + (", ".join(f"{k} ×{v}" for k, v in sorted(c.items()))
                                            if c else "unknown"))
    out += ["", "Bottleneck (which side used ≥ 90 % of its CPU): " + "; ".join(parts),
            f"repetitions: {doc['reps']} (cells show median (min–max) when n > 1)", ""]
    return "\n".join(out)


def render_svg(doc):
    m, width, left, plot_w, top, row_h = doc["machine"], 720, 250, 340, 78, 50
    height = top + row_h * len(HEADLINE) + 40
    ratios = [doc["ratios"].get(k) for k, _, _ in HEADLINE]
    xmax = min(3.0, max([1.0] + [r for r in ratios if r is not None]))
    xmax = math.ceil(xmax * 1.1 * 2) / 2  # round up to a 0.5 step, with headroom
    xmax = min(xmax, 3.0)

    def x(v):
        return left + plot_w * min(v, xmax) / xmax

    def text(tx, ty, s, size=12, anchor="start", fill="#222", weight="normal"):
        return (f'<text x="{tx:.1f}" y="{ty:.1f}" font-size="{size}" text-anchor="{anchor}" '
                f'fill="{fill}" font-weight="{weight}">{escape(str(s))}</text>')
    title = f"derpd relative to derper — {m.get('cpu_model', '?')}, {m.get('date', '?')}"
    el = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
          f'viewBox="0 0 {width} {height}" font-family="sans-serif">',
          f'<rect width="{width}" height="{height}" fill="white"/>',
          text(width / 2, 24, title, 15, "middle", weight="bold"),
          text(width / 2, 44, f"derper = 1.0 (grey); medians of up to {doc['reps']} reps; "
               "green = derpd better, orange = derpd worse", 11, "middle", "#555")]
    bottom = top + row_h * len(HEADLINE)
    step = 0.5 if xmax <= 2 else 1.0
    t = 0.0
    while t <= xmax + 1e-9:
        el.append(f'<line x1="{x(t):.1f}" y1="{top - 8}" x2="{x(t):.1f}" y2="{bottom}" '
                  f'stroke="#eee"/>')
        el.append(text(x(t), bottom + 16, f"{t:g}×", 10, "middle", "#666"))
        t += step
    for i, (key, label, better) in enumerate(HEADLINE):
        y = top + i * row_h
        if key == "p99_us":
            load = doc["_p99_load"]["derpd"]
            label = f"p99 latency µs at {load} % load" if load else label
        el.append(text(left - 10, y + 14, label, 12, "end", weight="bold"))
        el.append(text(left - 10, y + 30, f"({better} is better)", 11, "end", "#666"))
        a, b, r = doc["derpd"][key], doc["derper"][key], doc["ratios"].get(key)
        bars = [("derper", 1.0 if b is not None else None, b, "#9e9e9e"),
                ("derpd", r, a, None)]
        for j, (name, rv, raw, colour) in enumerate(bars):
            by = y + 4 + j * 20
            if rv is None:
                el.append(text(left + 4, by + 12, f"{name}: no data", 11, fill="#999"))
                continue
            if colour is None:
                good = rv <= 1 if better == "lower" else rv >= 1
                colour = "#2e9e5b" if good else "#e07b39"
            el.append(f'<rect x="{left}" y="{by}" width="{x(rv) - left:.1f}" height="16" '
                      f'fill="{colour}"><title>{escape(name)}</title></rect>')
            label = f"{rv:.2f}× ({fmt(raw)})"
            if rv > xmax:  # clipped at the edge: print the number inside the bar
                el.append(text(x(rv) - 5, by + 12, label + " ▶", 11, "end", "white", "bold"))
            else:
                el.append(text(x(rv) + 5, by + 12, label, 11))
    el.append(f'<line x1="{x(1):.1f}" y1="{top - 8}" x2="{x(1):.1f}" y2="{bottom}" '
              f'stroke="#333" stroke-width="1.5" stroke-dasharray="4 3"/>')
    el.append("</svg>")
    return "\n".join(el) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("raw", help="raw JSONL written by bench/compare.sh")
    ap.add_argument("outdir", help="directory for latest.{json,md,svg}")
    ap.add_argument("--command", required=True, help="the compare.sh command line, for the record")
    ap.add_argument("--quick", action="store_true", help="write quick.* instead of latest.*")
    args = ap.parse_args()

    machine, groups = load_raw(args.raw)
    agg = aggregate(groups)
    doc = build_summary(agg, machine, args.command)
    md, svg = render_md(doc, agg), render_svg(doc)
    del doc["_p99_load"]

    os.makedirs(args.outdir, exist_ok=True)
    stem = os.path.join(args.outdir, "quick" if args.quick else "latest")
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, sort_keys=False, ensure_ascii=False)
        f.write("\n")
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(md)
    with open(stem + ".svg", "w", encoding="utf-8") as f:
        f.write(svg)
    print(md)


if __name__ == "__main__":
    main()
