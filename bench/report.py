#!/usr/bin/env python3
"""Turn the `# RESULT {json}` lines of a bench/vm-bench.sh serial log into results.

    bench/report.py --log SERIAL_LOG --out-dir DIR --stem STEM [--command CMD] [--meta K=V ...]

Writes DIR/STEM.json (every run, the medians, the ratios), DIR/STEM.md (the table) and
DIR/STEM.svg (a bar chart: each target's median against the kernel loop device in the same
cell). Exits 1 when a run failed, a RESULT line does not parse, or there is no result at all
(the files are still written when there is something to write); 2 on a usage error.

Figures: IOPS (reads + writes) for the 4k jobs, MB/s (10^6 bytes/s, reads + writes) for seqwrite.
The median of the runs of each (job, iodepth, numjobs, target) is reported.
"""

import argparse
import json
import re
import statistics
import sys
from html import escape

TARGET_ORDER = ["dv", "dv-hit", "dv-miss", "dv-rc", "dv-2q", "busy", "loop", "null"]
TARGET_LABEL = {
    "dv": "deltavol",
    "dv-hit": "deltavol hit",
    "dv-miss": "deltavol miss",
    "dv-rc": "deltavol read cache",
    "dv-2q": "deltavol 2q",
    "busy": "deltavol busy",
    "loop": "loop",
    "null": "ublk null",
}
TARGET_COLOR = {
    "dv": "#1f77b4",
    "dv-hit": "#2ca02c",
    "dv-miss": "#98df8a",
    "dv-rc": "#17becf",
    "dv-2q": "#9467bd",
    "busy": "#ff7f0e",
    "loop": "#7f7f7f",
    "null": "#d62728",
}
JOB_LABEL = {
    "randwrite": "4k randwrite",
    "randread": "4k randread",
    "seqwrite": "128k seqwrite",
    "randrw": "4k randrw 70/30",
}

# The ratios issue 5 names: (name, numerator cell, denominator cell, target or None).
# A cell is (job, iodepth, numjobs, target).
RATIOS = [
    ("4k randwrite qd32: deltavol / loop", ("randwrite", 32, 1, "dv"), ("randwrite", 32, 1, "loop"), 1.0),
    ("4k randwrite qd32: deltavol / ublk null", ("randwrite", 32, 1, "dv"), ("randwrite", 32, 1, "null"), 0.8),
    ("4k randread qd32, cache hits: deltavol / loop", ("randread", 32, 1, "dv-hit"), ("randread", 32, 1, "loop"), 1.2),
    ("4k randread qd32, read-cache hits (memory): deltavol / loop", ("randread", 32, 1, "dv-rc"), ("randread", 32, 1, "loop"), 1.2),
    ("4k randread qd32, cache misses: deltavol / loop", ("randread", 32, 1, "dv-miss"), ("randread", 32, 1, "loop"), None),
    ("4k randread qd32, cache hits: deltavol / ublk null", ("randread", 32, 1, "dv-hit"), ("randread", 32, 1, "null"), None),
    ("4k randwrite qd32: busy (flush + ship) / quiet", ("randwrite", 32, 1, "busy"), ("randwrite", 32, 1, "dv"), 0.9),
    ("4k randwrite qd1: deltavol / loop", ("randwrite", 1, 1, "dv"), ("randwrite", 1, 1, "loop"), 0.75),
    ("4k randread qd1, cache hits: deltavol / loop", ("randread", 1, 1, "dv-hit"), ("randread", 1, 1, "loop"), 0.75),
    ("4k randread qd1, read-cache hits (memory): deltavol / loop", ("randread", 1, 1, "dv-rc"), ("randread", 1, 1, "loop"), 0.75),
    ("4k randread qd1, cache misses: deltavol / loop", ("randread", 1, 1, "dv-miss"), ("randread", 1, 1, "loop"), None),
    ("128k seqwrite qd32: deltavol / loop", ("seqwrite", 32, 1, "dv"), ("seqwrite", 32, 1, "loop"), None),
    ("4k randrw qd32: deltavol / loop", ("randrw", 32, 1, "dv"), ("randrw", 32, 1, "loop"), None),
    ("4k randwrite qd32, 2 jobs: 2 queues / 1 queue", ("randwrite", 32, 2, "dv-2q"), ("randwrite", 32, 2, "dv"), 1.3),
]

RESULT_RE = re.compile(r"# (RESULT|INFO) (\{.*\})\s*$")
ANSI_RE = re.compile(r"\x1bc|\x1b\[[0-9;?]*[A-Za-z]")


def value_of(run):
    """The figure of one run: MB/s for seqwrite, IOPS otherwise."""
    if run["job"] == "seqwrite":
        return (run.get("read_bw_bytes", 0) + run.get("write_bw_bytes", 0)) / 1e6
    return run.get("read_iops", 0) + run.get("write_iops", 0)


def unit_of(job):
    return "MB/s" if job == "seqwrite" else "IOPS"


def fmt(v, unit):
    if v is None:
        return "–"
    if unit == "MB/s":
        return f"{v:.1f}"
    return f"{v:,.0f}"


def row_label(job, qd, nj):
    return f"{JOB_LABEL.get(job, job)} qd{qd}" + (f" ×{nj} jobs" if nj > 1 else "")


def parse_log(path):
    runs, info, bad = [], {}, []
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", "replace")
    for n, line in enumerate(ANSI_RE.sub("", text.replace("\r", "")).splitlines(), 1):
        m = RESULT_RE.search(line)
        if not m:
            continue
        try:
            obj = json.loads(m.group(2))
        except json.JSONDecodeError as e:
            bad.append(f"line {n}: {e}: {line[:200]}")
            continue
        if m.group(1) == "INFO":
            info.update(obj)
        else:
            runs.append(obj)
    booted = re.search(r"DELTAVOL-VM-BOOTED .*", text)
    if booted:
        info["vm_booted"] = booted.group(0).strip()
    return runs, info, bad


def memory_rows(runs):
    """The daemon's resident memory for a 64 GiB volume against its budget (vm-bench.sh)."""
    out = []
    for r in runs:
        if r.get("job") == "memory" and r.get("hwm_kib") and r.get("budget_kib"):
            out.append({"name": "daemon memory, 64 GiB volume, 64 MiB read cache: peak RSS / budget",
                        "ratio": round(r["hwm_kib"] / r["budget_kib"], 3), "target": 1.0, "max": True,
                        "met": r["hwm_kib"] <= r["budget_kib"], "hwm_kib": r["hwm_kib"],
                        "budget_kib": r["budget_kib"], "rss_kib_after_writes": r.get("rss_kib_after_writes")})
    return out


def summarize(runs):
    cells = {}  # (job, qd, nj) -> target -> [values]
    order = []
    for r in runs:
        if r.get("job") == "memory":
            continue
        key = (r["job"], r["iodepth"], r["numjobs"])
        if key not in cells:
            cells[key] = {}
            order.append(key)
        if r.get("ok"):
            cells[key].setdefault(r["target"], []).append(value_of(r))
    medians = []
    for key in order:
        for t in sorted(cells[key], key=lambda t: TARGET_ORDER.index(t) if t in TARGET_ORDER else 99):
            vals = cells[key][t]
            medians.append({
                "job": key[0], "iodepth": key[1], "numjobs": key[2], "target": t,
                "unit": unit_of(key[0]), "median": statistics.median(vals),
                "min": min(vals), "max": max(vals), "runs": len(vals), "values": vals,
            })
    return order, medians


def median_of(medians, cell):
    for m in medians:
        if (m["job"], m["iodepth"], m["numjobs"], m["target"]) == cell:
            return m["median"]
    return None


def byte_ratios(runs):
    """Issue 5's byte targets, over every measured busy run (each run plus its drain):
    bytes written to the backing file and bytes sent to the data plane per dirty byte."""
    busy = [r for r in runs if r.get("ok") and r.get("target") == "busy" and r.get("dirty_bytes")]
    dirty = sum(r["dirty_bytes"] for r in busy)
    if not dirty:
        return []
    out = []
    for name, key, target in (("busy: bytes written to the backing file / dirty bytes", "backing_bytes", 1.0),
                              ("busy: bytes sent to the data plane / dirty bytes", "sent_bytes", 1.05)):
        r = sum(x.get(key, 0) for x in busy) / dirty
        out.append({"name": name, "ratio": round(r, 4), "target": target, "max": True,
                    "met": r <= target, "dirty_bytes": dirty, "runs": len(busy)})
    return out


def bound_ratios(medians):
    """deltavol against the serial cost of what it must do per I/O: a ublk round trip (the null
    target's time per I/O) plus the loop device's file I/O, i.e. a rate of 1 / (1/null + 1/loop).
    A ratio near 1 means deltavol adds nothing of its own beyond those two; above 1, the two
    overlap (on 2 CPUs, at depth). It shows why "≥ 1.0× loop" needs a ublk round trip much
    cheaper than the file I/O, which qemu TCG does not give."""
    out = []
    for name, job, qd, num in (("4k randwrite qd32: deltavol / serial cost (null + loop)", "randwrite", 32, "dv"),
                               ("4k randread qd32, mirror hits: deltavol / serial cost (null + loop)", "randread", 32, "dv-hit")):
        a = median_of(medians, (job, qd, 1, num))
        n = median_of(medians, (job, qd, 1, "null"))
        lo = median_of(medians, (job, qd, 1, "loop"))
        if a and n and lo:
            bound = 1.0 / (1.0 / n + 1.0 / lo)
            out.append({"name": name, "ratio": round(a / bound, 3), "target": None, "met": None,
                        "serial_rate": round(bound, 1)})
    return out


def ratios(medians):
    out = []
    for name, num, den, target in RATIOS:
        a, b = median_of(medians, num), median_of(medians, den)
        if a is None or b is None or b == 0:
            continue
        r = a / b
        out.append({"name": name, "ratio": round(r, 3), "target": target,
                    "met": None if target is None else r >= target})
    return out


def markdown(order, medians, rats, info, meta):
    targets = [t for t in TARGET_ORDER if any(m["target"] == t for m in medians)]
    lines = []
    kernel = info.get("kernel", "?")
    lines.append(f"Kernel {kernel}, {info.get('cpus', '?')} vCPUs (qemu TCG), "
                 f"fio {info.get('fio', '?')}, {info.get('runtime_s', '?')} s a run after "
                 f"{info.get('ramp_s', '?')} s ramp, {info.get('repeats', '?')} runs a cell "
                 f"interleaved across targets, median; region {info.get('size', '?')} of each device.")
    lines.append("")
    head = ["job"] + [TARGET_LABEL.get(t, t) for t in targets] + ["deltavol / loop", "deltavol / null", "spread"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("| --- |" + " ---: |" * (len(head) - 1))
    for key in order:
        job, qd, nj = key
        unit = unit_of(job)
        row = [f"{row_label(job, qd, nj)} ({unit})"]
        spread = 0.0
        for t in targets:
            v = median_of(medians, (job, qd, nj, t))
            row.append(fmt(v, unit))
            for m in medians:
                if (m["job"], m["iodepth"], m["numjobs"], m["target"]) == (job, qd, nj, t) and m["median"]:
                    spread = max(spread, (m["max"] - m["min"]) / m["median"])
        dv = median_of(medians, (job, qd, nj, "dv")) or median_of(medians, (job, qd, nj, "dv-hit"))
        for base in ("loop", "null"):
            b = median_of(medians, (job, qd, nj, base))
            row.append(f"{dv / b:.2f}×" if dv is not None and b else "–")
        row.append(f"{spread * 100:.0f} %")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("deltavol = the 1-queue volume (for reads: cache hits); spread = the largest (max − min) / "
                 "median over the row's targets.")
    lines.append("")
    if rats:
        lines.append("| ratio (issue 5) | measured | target | |")
        lines.append("| --- | ---: | ---: | --- |")
        for r in rats:
            sign = "≤" if r.get("max") else "≥"
            tgt = f"{sign} {r['target']:.2f}×" if r["target"] is not None else "–"
            met = {True: "met", False: "**not met**", None: ""}[r["met"]]
            lines.append(f"| {r['name']} | {r['ratio']:.2f}× | {tgt} | {met} |")
        lines.append("")
    return "\n".join(lines)


def svg_chart(order, medians, title):
    """Grouped horizontal bars: each target's median / loop's median in the same cell."""
    groups = []
    for key in order:
        base = median_of(medians, key + ("loop",))
        bars = [m for m in medians if (m["job"], m["iodepth"], m["numjobs"]) == key]
        bars.sort(key=lambda m: TARGET_ORDER.index(m["target"]) if m["target"] in TARGET_ORDER else 99)
        if bars:
            groups.append((key, base, bars))
    ratios_all = [m["median"] / base for _, base, bars in groups if base for m in bars]
    xmax = max([1.0] + ratios_all) * 1.12
    left, right, top, bar_h, gap = 190, 150, 56, 13, 14
    width = 960
    plot_w = width - left - right
    height = top + sum(len(b) * bar_h + gap for _, _, b in groups) + 60
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">'
           f'{escape(title)}</text>',
           f'<text x="{width / 2}" y="38" text-anchor="middle" fill="#555">median of each target '
           f'relative to the kernel loop device in the same cell (bar labels: IOPS, or MB/s for seqwrite)</text>']
    # grid
    step = 0.25 if xmax <= 2.5 else 0.5 if xmax <= 5 else 1.0
    x = 0.0
    while x <= xmax:
        px = left + plot_w * x / xmax
        out.append(f'<line x1="{px:.1f}" y1="{top - 6}" x2="{px:.1f}" y2="{height - 50}" '
                   f'stroke="{"#333" if abs(x - 1.0) < 1e-9 else "#ddd"}" '
                   f'stroke-width="{1.5 if abs(x - 1.0) < 1e-9 else 1}"/>')
        out.append(f'<text x="{px:.1f}" y="{height - 36}" text-anchor="middle" fill="#555">{x:g}×</text>')
        x += step
    y = top
    for key, base, bars in groups:
        job, qd, nj = key
        gh = len(bars) * bar_h
        out.append(f'<text x="{left - 8}" y="{y + gh / 2 + 4:.1f}" text-anchor="end" font-weight="bold">'
                   f'{escape(row_label(job, qd, nj))}</text>')
        for m in bars:
            r = m["median"] / base if base else 0
            w = plot_w * r / xmax
            color = TARGET_COLOR.get(m["target"], "#000")
            out.append(f'<rect x="{left}" y="{y + 1}" width="{w:.1f}" height="{bar_h - 2}" fill="{color}">'
                       f'<title>{escape(TARGET_LABEL.get(m["target"], m["target"]))}: '
                       f'{fmt(m["median"], m["unit"])} {m["unit"]}</title></rect>')
            label = f'{TARGET_LABEL.get(m["target"], m["target"])} {fmt(m["median"], m["unit"])}'
            if base:
                label += f' ({r:.2f}×)'
            out.append(f'<text x="{left + w + 4:.1f}" y="{y + bar_h - 3}" fill="#222">{escape(label)}</text>')
            y += bar_h
        y += gap
    # legend
    lx = left
    for t in TARGET_ORDER:
        if any(m["target"] == t for _, _, bars in groups for m in bars):
            out.append(f'<rect x="{lx}" y="{height - 16}" width="10" height="10" fill="{TARGET_COLOR[t]}"/>')
            out.append(f'<text x="{lx + 14}" y="{height - 7}">{escape(TARGET_LABEL[t])}</text>')
            lx += 20 + 7 * len(TARGET_LABEL[t])
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--stem", required=True)
    ap.add_argument("--command", default="")
    ap.add_argument("--meta", action="append", default=[], help="KEY=VALUE recorded in the JSON")
    args = ap.parse_args()

    runs, info, bad = parse_log(args.log)
    meta = dict(kv.split("=", 1) for kv in args.meta if "=" in kv)
    order, medians = summarize(runs)
    rats = ratios(medians) + bound_ratios(medians) + byte_ratios(runs) + memory_rows(runs)
    failed = [r for r in runs if not r.get("ok")]
    problems = [f"unparsable RESULT line: {b}" for b in bad]
    problems += [f"failed run: {r['job']} qd{r['iodepth']} j{r['numjobs']} {r['target']} run {r['run']}"
                 for r in failed]
    if not runs:
        problems.append("no RESULT line in the log")

    if runs:
        stem = f"{args.out_dir}/{args.stem}"
        doc = {"command": args.command, "meta": meta, "info": info, "ratios": rats,
               "medians": medians, "runs": runs, "problems": problems}
        with open(stem + ".json", "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        md = markdown(order, medians, rats, info, meta)
        with open(stem + ".md", "w") as f:
            f.write(f"# deltavol fio benchmark, {meta.get('date', '')}, kernel {info.get('kernel', '?')}\n\n")
            if args.command:
                f.write(f"Command: `{args.command}`\n\n")
            f.write(md)
            if problems:
                f.write("\nProblems:\n\n" + "".join(f"- {p}\n" for p in problems))
        with open(stem + ".svg", "w") as f:
            f.write(svg_chart(order, medians, f"deltavol vs baselines, kernel {info.get('kernel', '?')}"))
        print(md)
        print(f"report: wrote {stem}.json, {stem}.md, {stem}.svg")
    for p in problems:
        print(f"report: PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
