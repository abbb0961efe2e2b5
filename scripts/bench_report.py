#!/usr/bin/env python3
"""Plots and tables for BENCHMARKS.md from one run of the end-to-end benchmark (benches/e2e.rs).

Reads the run's raw CSV (every run of every round) and its markdown tables, writes SVG plots,
and replaces the generated section of BENCHMARKS.md (between the two marker lines) with the
plots, the tables and the commands that reproduce them. Python 3 standard library only.

    scripts/bench_report.py --csv target/bench-results/e2e-runs.csv \\
        --md target/bench-results/e2e.md --out docs/bench --benchmarks BENCHMARKS.md

Plots (medians over rounds; thin lines and dots show every round):
- p99-demo.svg, p99-node.svg: heavy-tailed mix, p99 latency against offered load, one line
  per system.
- churn.svg: connection churn, conn/s per system; where wrk measured the same instance, its
  bar is drawn under the load generator's.
- keepalive.svg: keep-alive spread, most minus fewest connections per worker.
"""

import argparse
import csv
import math
import os
import shutil
import statistics
import sys
from html import escape

BEGIN = "<!-- bench:generated:begin (scripts/bench.sh rewrites everything up to the end marker) -->"
END = "<!-- bench:generated:end -->"

# One colour per system, stable across plots (Okabe-Ito and Tableau hues, readable on white).
PALETTE = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9",
    "#7F7F7F", "#8C564B", "#1F77B4", "#BCBD22", "#17BECF", "#9467BD",
]
FONT = "font-family:DejaVu Sans,Helvetica,Arial,sans-serif"


def load_rows(path):
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f)]


def fnum(v):
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


class Run:
    """The successful runs of one CSV, indexed by (system, scenario)."""

    def __init__(self, rows):
        self.rows = [r for r in rows if r.get("ok") == "true"]
        self.systems = []  # in first-seen order, demo group first
        self.group = {}
        for r in rows:
            if r["system"] not in self.group:
                self.group[r["system"]] = r.get("group") or "demo"
                self.systems.append(r["system"])
        order = {"demo": 0, "node": 1}
        self.systems.sort(key=lambda s: order.get(self.group[s], 2))

    def values(self, system, scenario, field):
        out = []
        for r in self.rows:
            if r["system"] == system and r["scenario"] == scenario:
                v = fnum(r.get(field))
                if v is not None:
                    out.append(v)
        return out

    def median(self, system, scenario, field):
        v = self.values(system, scenario, field)
        return statistics.median(v) if v else None

    def offered(self, group, scenario):
        v = [fnum(r.get("offered_per_s")) for r in self.rows
             if self.group.get(r["system"]) == group and r["scenario"] == scenario]
        v = [x for x in v if x is not None]
        return statistics.median(v) if v else None

    def in_group(self, group):
        return [s for s in self.systems if self.group[s] == group]


def color_of(systems):
    """One colour per policy or peer: `least-conn` and `least-conn+node` share theirs."""
    bases = []
    for s in systems:
        b = s.split("+")[0]
        if b not in bases:
            bases.append(b)
    return {s: PALETTE[bases.index(s.split("+")[0]) % len(PALETTE)] for s in systems}


class Svg:
    def __init__(self, width, height, title):
        self.w, self.h = width, height
        self.parts = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img">',
            f"<title>{escape(title)}</title>",
            f'<rect width="{width}" height="{height}" fill="white"/>',
        ]

    def text(self, x, y, s, size=12, anchor="start", weight="normal", fill="#222", rotate=None):
        tr = f' transform="rotate({rotate} {x:.1f} {y:.1f})"' if rotate is not None else ""
        self.parts.append(
            f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'font-weight="{weight}" fill="{fill}" style="{FONT}"{tr}>{escape(str(s))}</text>'
        )

    def line(self, x1, y1, x2, y2, stroke="#000", width=1.0, dash=None, opacity=1.0):
        d = f' stroke-dasharray="{dash}"' if dash else ""
        self.parts.append(
            f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}" '
            f'stroke-width="{width}" stroke-opacity="{opacity}"{d}/>'
        )

    def rect(self, x, y, w, h, fill, opacity=1.0, stroke=None, pattern=None):
        s = f' stroke="{stroke}"' if stroke else ""
        f = f"url(#{pattern})" if pattern else fill
        self.parts.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{max(h, 0):.1f}" '
            f'fill="{f}" fill-opacity="{opacity}"{s}/>'
        )

    def circle(self, x, y, r, fill, opacity=1.0):
        self.parts.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{fill}" fill-opacity="{opacity}"/>'
        )

    def polyline(self, pts, stroke, width=2.0, dash=None):
        d = f' stroke-dasharray="{dash}"' if dash else ""
        p = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        self.parts.append(
            f'<polyline points="{p}" fill="none" stroke="{stroke}" stroke-width="{width}"{d}/>'
        )

    def raw(self, s):
        self.parts.append(s)

    def save(self, path):
        with open(path, "w") as f:
            f.write("\n".join(self.parts + ["</svg>"]) + "\n")


def nice_log_ticks(lo, hi):
    ticks = []
    e = math.floor(math.log10(lo))
    while 10 ** e <= hi * 1.0001:
        for m in (1, 2, 5):
            t = m * 10 ** e
            if lo * 0.9999 <= t <= hi * 1.0001:
                ticks.append(t)
        e += 1
    return ticks


def nice_linear_ticks(hi, n=5):
    if hi <= 0:
        return [0, 1]
    raw = hi / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=mag * 10)
    top = math.ceil(hi / step) * step
    return [i * step for i in range(int(round(top / step)) + 1)]


def fmt_tick(v):
    if v >= 1000:
        return f"{v / 1000:g}k"
    return f"{v:g}"


def plot_p99(run, group, levels, path, title, colors):
    systems = [s for s in run.in_group(group)
               if any(run.values(s, f"heavy{p}", "p99_us") for p in levels)]
    if not systems:
        return False
    W, H = 760, 440
    left, right, top, bottom = 70, 200, 50, 60
    pw, ph = W - left - right, H - top - bottom
    all_ms = [v / 1000 for s in systems for p in levels
              for v in run.values(s, f"heavy{p}", "p99_us")]
    lo = max(min(all_ms) * 0.8, 0.1)
    hi = max(all_ms) * 1.25
    lo = 10 ** math.floor(math.log10(lo))
    ylog = lambda v: top + ph - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * ph
    xs = {p: left + (i + 0.5) * pw / len(levels) for i, p in enumerate(levels)}
    svg = Svg(W, H, title)
    svg.text(left, 24, title, size=15, weight="bold")
    for t in nice_log_ticks(lo, hi):
        y = ylog(t)
        svg.line(left, y, left + pw, y, stroke="#ddd")
        svg.text(left - 8, y + 4, fmt_tick(t), size=11, anchor="end", fill="#555")
    svg.line(left, top, left, top + ph, stroke="#444")
    svg.line(left, top + ph, left + pw, top + ph, stroke="#444")
    svg.text(18, top + ph / 2, "p99 latency, ms (log scale)", size=12, anchor="middle", rotate=-90)
    for p in levels:
        rate = run.offered(group, f"heavy{p}")
        svg.text(xs[p], top + ph + 20, f"{p} % of capacity", size=12, anchor="middle")
        if rate:
            svg.text(xs[p], top + ph + 36, f"{rate:.0f} req/s", size=11, anchor="middle", fill="#555")
    n = len(systems)
    for k, s in enumerate(systems):
        c = colors[s]
        off = (k - (n - 1) / 2) * 4  # a few px apart so round dots don't hide each other
        pts = []
        for p in levels:
            for v in run.values(s, f"heavy{p}", "p99_us"):
                svg.circle(xs[p] + off, ylog(v / 1000), 2.5, c, opacity=0.35)
            m = run.median(s, f"heavy{p}", "p99_us")
            if m is not None:
                pts.append((xs[p] + off, ylog(m / 1000)))
        dash = "6,3" if s.startswith("node-cluster") else None
        if pts:
            svg.polyline(pts, c, width=2.2, dash=dash)
            for x, y in pts:
                svg.circle(x, y, 4, c)
        ly = top + 10 + k * 20
        svg.line(left + pw + 16, ly, left + pw + 40, ly, stroke=c, width=2.5, dash=dash)
        svg.text(left + pw + 46, ly + 4, s, size=12)
    svg.text(left + pw + 16, top + 10 + n * 20 + 10,
             "line: median of rounds", size=10, fill="#555")
    svg.text(left + pw + 16, top + 10 + n * 20 + 24,
             "faint dots: each round", size=10, fill="#555")
    svg.save(path)
    return True


def hbar_chart(path, title, rows, unit, note, colors, value_fmt):
    """rows: (label, group, [(series, median, [round values], colour, pattern)])."""
    bar_h, gap, group_gap = 14, 3, 14
    left, right, top = 170, 90, 50
    W = 780
    pw = W - left - right
    height = top
    layout = []
    last_group = None
    for label, group, bars in rows:
        if group != last_group:
            height += 24
            layout.append(("group", group, height))
            last_group = group
        layout.append(("row", (label, bars), height))
        height += len(bars) * (bar_h + gap) + group_gap
    H = height + 64
    vals = [v for _, _, bars in rows for b in bars for v in ([b[1]] + b[2]) if v is not None]
    ticks = nice_linear_ticks(max(vals) if vals else 1)
    xmax = ticks[-1]
    x = lambda v: left + v / xmax * pw
    svg = Svg(W, H, title)
    svg.raw('<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
            'patternTransform="rotate(45)"><rect width="6" height="6" fill="white"/>'
            '<line x1="0" y1="0" x2="0" y2="6" stroke="#555" stroke-width="2.5"/></pattern></defs>')
    svg.text(16, 24, title, size=15, weight="bold")
    for t in ticks:
        svg.line(x(t), top + 10, x(t), height, stroke="#e3e3e3")
        svg.text(x(t), height + 16, fmt_tick(t), size=11, anchor="middle", fill="#555")
    svg.text(left + pw / 2, height + 34, unit, size=12, anchor="middle")
    for kind, data, y in layout:
        if kind == "group":
            svg.text(16, y - 4, data, size=12, weight="bold", fill="#444")
            continue
        label, bars = data
        svg.text(left - 8, y + bar_h - 2, label, size=12, anchor="end")
        for i, (series, med, each, colour, pattern) in enumerate(bars):
            by = y + i * (bar_h + gap)
            if med is not None:
                if pattern:
                    svg.rect(left, by, x(med) - left, bar_h, colour, pattern=pattern, stroke=colour)
                else:
                    svg.rect(left, by, x(med) - left, bar_h, colour, opacity=0.85)
                # Right of the bar and of its rounds' range, so the label never sits on a dot.
                svg.text(x(max([med] + each)) + 6, by + bar_h - 3,
                         f"{value_fmt(med)}{' ' + series if series else ''}", size=10.5, fill="#333")
            if len(each) > 1:
                svg.line(x(min(each)), by + bar_h / 2, x(max(each)), by + bar_h / 2,
                         stroke="#111", width=1.2)
            for v in each:
                svg.circle(x(v), by + bar_h / 2, 2.2, "#111", opacity=0.8)
    svg.line(left, top + 10, left, height, stroke="#444")
    svg.text(16, H - 6, note, size=10, fill="#555")
    svg.save(path)


def plot_churn(run, path, colors):
    rows = []
    for s in run.systems:
        lg = run.values(s, "churn", "throughput_per_s")
        if not lg:
            continue
        bars = [("loadgen" if run.values(s, "churn-wrk", "throughput_per_s") else "",
                 statistics.median(lg), lg, colors[s], None)]
        wrk = run.values(s, "churn-wrk", "throughput_per_s")
        if wrk:
            bars.append(("wrk", statistics.median(wrk), wrk, colors[s], "hatch"))
        rows.append((s, f"{run.group[s]} group", bars))
    if not rows:
        return False
    hbar_chart(path, "Connection churn: a new connection per request (closed loop)", rows,
               "connections per second (median of rounds)",
               "Solid: the load generator; hatched: wrk on the same instance. "
               "Dots: each round; line: their range.",
               colors, lambda v: f"{v:,.0f}")
    return True


def plot_keepalive(run, path, colors):
    rows = []
    for s in run.systems:
        v = run.values(s, "keepalive", "conn_spread")
        if v:
            rows.append((s, f"{run.group[s]} group",
                         [("", statistics.median(v), v, colors[s], None)]))
    if not rows:
        return False
    hbar_chart(path, "Keep-alive spread: long-lived connections per worker, most − fewest", rows,
               "connections (of 200 clients; 0 = exactly even)",
               "Bar: median of rounds. Dots: each round.", colors, lambda v: f"{v:g}")
    return True


def shift_headings(md):
    """e2e.md's headings one level down (its # title is dropped: BENCHMARKS.md has its own)."""
    out = []
    for line in md.splitlines():
        if line.startswith("# "):
            continue
        if line.startswith("#"):
            line = "#" + line
        out.append(line)
    return "\n".join(out).strip("\n")


def generated_section(run, md_text, plots, out_rel):
    lines = [BEGIN, ""]
    lines.append("Generated by `scripts/bench.sh` from this run's "
                 f"[`{out_rel}/e2e-runs.csv`]({out_rel}/e2e-runs.csv) "
                 "(every run of every round) and tables; edit the script, not this section.")
    lines.append("")
    for name, alt in plots:
        lines.append(f"![{alt}]({out_rel}/{name})")
        lines.append("")
    lines.append(shift_headings(md_text))
    lines.append("")
    lines.append(END)
    return "\n".join(lines)


def splice(benchmarks, section):
    with open(benchmarks) as f:
        text = f.read()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        new = head + section + tail
    else:
        sys.exit(f"{benchmarks}: no generated section (the lines {BEGIN!r} and {END!r})")
    with open(benchmarks, "w") as f:
        f.write(new)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", required=True, help="the run's e2e-runs.csv")
    ap.add_argument("--md", help="the run's e2e.md (tables); needed with --benchmarks")
    ap.add_argument("--out", required=True, help="directory for the SVGs and a copy of the CSV")
    ap.add_argument("--benchmarks", help="BENCHMARKS.md whose generated section is replaced")
    args = ap.parse_args()

    try:
        rows = load_rows(args.csv)
    except OSError as e:
        sys.exit(f"cannot read {args.csv}: {e}")
    if not rows or "system" not in rows[0]:
        sys.exit(f"{args.csv}: no runs")
    run = Run(rows)
    os.makedirs(args.out, exist_ok=True)
    colors = color_of(run.systems)
    levels = sorted({int(r["scenario"][5:]) for r in run.rows if r["scenario"].startswith("heavy")})
    plots = []
    if plot_churn(run, os.path.join(args.out, "churn.svg"), colors):
        plots.append(("churn.svg", "Churn conn/s per system, load generator and wrk"))
    for group, what in (("demo", "demo worker"), ("node", "node app")):
        name = f"p99-{group}.svg"
        if plot_p99(run, group, levels, os.path.join(args.out, name),
                    f"p99 against offered load, heavy-tailed mix: {what}", colors):
            plots.append((name, f"p99 against offered load, {group} group"))
    if plot_keepalive(run, os.path.join(args.out, "keepalive.svg"), colors):
        plots.append(("keepalive.svg", "Keep-alive connection spread per system"))
    csv_copy = os.path.join(args.out, "e2e-runs.csv")
    if os.path.abspath(csv_copy) != os.path.abspath(args.csv):
        shutil.copyfile(args.csv, csv_copy)
    for name, _ in plots:
        print(f"wrote {os.path.join(args.out, name)}")

    if args.benchmarks:
        if not args.md:
            sys.exit("--benchmarks needs --md")
        with open(args.md) as f:
            md_text = f.read()
        out_rel = os.path.relpath(args.out, os.path.dirname(os.path.abspath(args.benchmarks)))
        splice(args.benchmarks, generated_section(run, md_text, plots, out_rel))
        print(f"updated the generated section of {args.benchmarks}")


if __name__ == "__main__":
    main()
