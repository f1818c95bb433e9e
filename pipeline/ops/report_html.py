"""The HTML pages: ``report.html`` per request and ``WORK/index.html`` across every run.

Charts are drawn with matplotlib (Agg backend) to SVG and embedded inline, so each page is one file
that asks nothing of the network (a Content-Security-Policy of ``default-src 'none'`` says so to the
browser too). The figures come from ``report.json`` and ``runs.jsonl``: counts and times only, never an
NHS number. A viewport meta tag, a single column and charts drawn at about a phone's width (text at 9 pt
or more, so at least 9 CSS px on a 390 px screen; no wider than 40rem on a laptop) keep them readable anywhere;
tests/test_ops.py measures both in Chromium.
"""
from __future__ import annotations

import html
import io
import re
from typing import Any, Iterable, Sequence

from pipeline.core.files import write_bytes
from pipeline.ops.report import CHANGE_LABELS, outcome_counts
from pipeline.ops.runlog import read_runs
from pipeline.lifecycle.state import WorkDir

REPORT_HTML = "report.html"
INDEX_HTML = "index.html"
# Red is for failures only: opting out is a patient's choice, not an error (GOV.UK palette).
COLOURS = {"opted_out": "#28a197", "not_opted_out": "#00703c", "written": "#1d70b8", "unchanged": "#b1b4b6",
           "failed": "#d4351c", "newly": "#28a197", "withdrawn": "#4c2c92", "rate": "#0b0c0c"}
FIGURE_WIDTH = 4.8  # inches (346 pt): about a phone's width, so 9 pt text is 9 CSS px or more at 390 px
FONT, SMALL = 10, 9  # pt: labels and titles; ticks and legends (nothing smaller)
MAX_TICKS = 6  # run labels on the x axis: as many as fit a phone's width
CHART_RUNS = 90  # charts show the latest runs; the table below them lists every run
STAGE_COLOURS = ("#1d70b8", "#5694ca", "#f47738", "#00703c", "#4c2c92", "#b1b4b6")

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;padding:1rem;color:#0b0c0c;
max-width:60rem;margin:auto;line-height:1.4}
h1{font-size:1.4rem}h2{font-size:1.15rem;margin-top:1.6rem}
.chart{max-width:40rem}.chart svg{width:100%;height:auto;display:block}
table{border-collapse:collapse;font-size:.85rem;display:block;overflow-x:auto;max-width:100%}
th,td{border-bottom:1px solid #b1b4b6;padding:.3rem .4rem;text-align:right;white-space:nowrap}
th{white-space:normal;vertical-align:bottom}
th:first-child,td:first-child{text-align:left}
.failed{color:#d4351c;font-weight:bold}.waiting{color:#f47738}.done{color:#00703c}
.muted{color:#505a5f;font-size:.85rem}
"""
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"


# -- charts -------------------------------------------------------------------------------------------

def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "ndop", "font.size": FONT,
                         "axes.titlesize": FONT + 1, "axes.labelsize": FONT, "xtick.labelsize": SMALL,
                         "ytick.labelsize": SMALL, "legend.fontsize": SMALL, "legend.frameon": False,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def svg(fig: Any) -> str:
    """The figure as an inline ``<svg>`` element (no XML prologue, no fixed size: it scales to the page)."""
    plt = _pyplot()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    return re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r'<svg\1 role="img"', text, count=1)


def _figure(title: str, height: float = 3.0) -> tuple[Any, Any]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(FIGURE_WIDTH, height), layout="constrained")
    ax.set_title(title, loc="left")
    return fig, ax


def _labels(runs: Sequence[dict[str, Any]]) -> list[str]:
    """One x label per run, from its end time: day and minute (``4 Dec 05:12``); with the seconds where two runs
    ended in the same minute, a counter where even those match, and the year where the runs span more than one."""
    ended = [r.get("ended_at") or "" for r in runs]
    years = {e[:4] for e in ended if e}

    def label(stamp: str, seconds: bool) -> str:
        if len(stamp) < 16 or not stamp[5:7].isdigit() or not 1 <= int(stamp[5:7]) <= 12:
            return stamp or "?"
        month = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()[int(stamp[5:7]) - 1]
        text = f"{int(stamp[8:10])} {month} {stamp[11:19] if seconds and len(stamp) >= 19 else stamp[11:16]}"
        return f"{stamp[:4]} {text}" if len(years) > 1 else text

    minutes = [label(e, False) for e in ended]
    labels = [label(e, True) if minutes.count(m) > 1 else m for e, m in zip(ended, minutes)]
    seen: dict[str, int] = {}
    for i, text in enumerate(labels):
        seen[text] = seen.get(text, 0) + 1
        if seen[text] > 1:
            labels[i] = f"{text} ({seen[text]})"
    return labels


def _ticks(ax: Any, labels: list[str]) -> None:
    """Run labels on the x axis, thinned to what a phone's width holds (always the newest run's)."""
    step = max(1, -(-len(labels) // MAX_TICKS))
    positions = list(range(len(labels) - 1, -1, -step))[::-1]
    ax.set_xticks(positions, [labels[i] for i in positions], rotation=30, ha="right")


def _legend_below(fig: Any, ax: Any, *more: Any) -> None:
    """The legend under the chart (never over the bars), in as many columns as fit."""
    handles: list[Any] = []
    for axis in (ax, *more):
        handles += axis.get_legend_handles_labels()[0]
    if handles:
        fig.legend(handles, [h.get_label() for h in handles], loc="outside lower left", ncols=min(len(handles), 3))


def _thousands() -> Any:
    from matplotlib.ticker import FuncFormatter  # deferred, as in _pyplot: matplotlib loads slowly

    return FuncFormatter(lambda value, _pos: f"{value:,.0f}")


def _counts_axis(ax: Any, label: str, top: float = 0) -> None:
    """A y axis of counts: whole numbers, from 0 (a count is never negative), thousands separated."""
    from matplotlib.ticker import MaxNLocator  # deferred, as in _pyplot

    ax.set_ylabel(label)
    ax.set_ylim(bottom=0, top=max(top, ax.get_ylim()[1], 1))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    ax.yaxis.set_major_formatter(_thousands())


def _stacked(fig: Any, ax: Any, labels: list[str], series: dict[str, tuple[list[float], str]]) -> None:
    bottom = [0.0] * len(labels)
    x = list(range(len(labels)))
    for name, (values, colour) in series.items():
        ax.bar(x, values, bottom=bottom, label=name, color=colour)
        bottom = [b + v for b, v in zip(bottom, values)]
    _ticks(ax, labels)
    _legend_below(fig, ax)


def chart_cohort(runs: Sequence[dict[str, Any]]) -> str:
    fig, ax = _figure("Cohort size and opt-out rate")
    labels = _labels(runs)
    sizes = [r["results"].get("requested", r.get("cohort", {}).get("sent", 0)) for r in runs]
    rates = [100 * r["results"].get("opted_out", 0) / s if s else 0 for r, s in zip(runs, sizes)]
    x = list(range(len(runs)))
    ax.bar(x, sizes, color=COLOURS["written"], label="cohort (patients sent)")
    _counts_axis(ax, "patients")
    _ticks(ax, labels)
    rate_ax = ax.twinx()
    rate_ax.plot(x, rates, color=COLOURS["rate"], marker="o", label="opted out (%)")
    rate_ax.set_ylabel("opted out (%)")
    rate_ax.set_ylim(0, max(rates + [1]) * 1.25)
    _legend_below(fig, ax, rate_ax)
    return svg(fig)


def chart_changes(runs: Sequence[dict[str, Any]]) -> str:
    fig, ax = _figure("Newly opted out and opt-outs withdrawn")
    labels = _labels(runs)
    x = list(range(len(runs)))
    width = 0.4
    ax.bar([i - width / 2 for i in x], [r.get("changes", {}).get("newly_opted_out", 0) for r in runs], width,
           color=COLOURS["newly"], label="newly opted out")
    ax.bar([i + width / 2 for i in x], [r.get("changes", {}).get("opt_out_withdrawn", 0) for r in runs], width,
           color=COLOURS["withdrawn"], label="opt-out withdrawn")
    _ticks(ax, labels)
    _counts_axis(ax, "patients")
    _legend_below(fig, ax)
    return svg(fig)


def chart_writes(runs: Sequence[dict[str, Any]]) -> str:
    fig, ax = _figure("Consents written vs unchanged")
    _stacked(fig, ax, _labels(runs), {
        "written": ([r["results"].get("written", 0) for r in runs], COLOURS["written"]),
        "unchanged": ([r["results"].get("unchanged", 0) for r in runs], COLOURS["unchanged"]),
        "failed or refused": ([r["results"].get("failed", 0) + r["results"].get("refused", 0) for r in runs],
                              COLOURS["failed"]),
    })
    _counts_axis(ax, "Consents")
    return svg(fig)


def chart_stages(runs: Sequence[dict[str, Any]], title: str = "Time per stage") -> str:
    fig, ax = _figure(title)
    stages: list[str] = []
    for r in runs:
        stages += [s for s in (r.get("stage_seconds") or {}) if s not in stages]
    _stacked(fig, ax, _labels(runs), {
        stage: ([float((r.get("stage_seconds") or {}).get(stage, 0)) for r in runs],
                STAGE_COLOURS[i % len(STAGE_COLOURS)])
        for i, stage in enumerate(stages)
    })
    ax.set_ylabel("seconds")
    return svg(fig)


def chart_failures(runs: Sequence[dict[str, Any]]) -> str:
    fig, ax = _figure("Failures: failed runs and dead letters")
    labels = _labels(runs)
    x = list(range(len(runs)))
    ax.bar(x, [r.get("dead_letters", 0) for r in runs], color=COLOURS["failed"], label="dead letters")
    failed = [i for i, r in enumerate(runs) if r.get("exit_status") not in (0, 3)]
    ax.scatter(failed, [0] * len(failed), marker="x", s=60, color=COLOURS["rate"], label="run failed", zorder=3,
               clip_on=False)
    _ticks(ax, labels)
    _counts_axis(ax, "patients", top=max([r.get("dead_letters", 0) for r in runs] + [1]) * 1.2)
    _legend_below(fig, ax)
    return svg(fig)


def chart_stage_bars(stages: dict[str, float]) -> str:
    """One request: seconds per stage, one bar each."""
    fig, ax = _figure("Seconds per stage", height=0.5 + 0.35 * len(stages))
    names = list(stages)[::-1]
    ax.barh(names, [float(stages[n]) for n in names], color=STAGE_COLOURS[0])
    for i, name in enumerate(names):
        ax.annotate(f"{float(stages[name]):g}", (float(stages[name]), i), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=SMALL)
    ax.set_xlabel("seconds")
    return svg(fig)


def chart_outcome(report: dict[str, Any]) -> str:
    """One request: opted out / not, and what happened to the Consents."""
    results = outcome_counts(report)
    fig, ax = _figure("This request", height=2.4)
    rows = [("opted out", results.get("opted_out", 0), COLOURS["opted_out"]),
            ("not opted out", results.get("not_opted_out", 0), COLOURS["not_opted_out"]),
            ("written", results.get("written", 0), COLOURS["written"]),
            ("unchanged", results.get("unchanged", 0), COLOURS["unchanged"]),
            ("failed or refused", results.get("failed", 0) + results.get("refused", 0), COLOURS["failed"])]
    ax.barh([r[0] for r in rows][::-1], [r[1] for r in rows][::-1], color=[r[2] for r in rows][::-1])
    for i, row in enumerate(rows[::-1]):
        ax.annotate(f"{row[1]:,}", (row[1], i), xytext=(3, 0), textcoords="offset points", va="center",
                    fontsize=SMALL)
    ax.set_xlabel("patients")
    ax.xaxis.set_major_formatter(_thousands())
    return svg(fig)


# -- pages ----------------------------------------------------------------------------------------------

def _e(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"  # 10,000: counts read at a glance
    return html.escape("-" if value is None else str(value))


def _table(headers: Iterable[str], rows: Iterable[Iterable[Any]], classes: Iterable[str] | None = None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = list(classes)[i] if classes is not None else ""
        body.append(f'<tr class="{_e(cls)}">' + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>{body}</body></html>\n"
    )


def _runs_table(runs: Sequence[dict[str, Any]], link: bool = False) -> str:
    rows, classes = [], []
    for r in runs:
        res = r.get("results") or {}
        rid = r.get("request_id")
        ended = (r.get("ended_at") or "").replace("T", " ").removesuffix("Z")
        rows.append([ended, rid, r.get("outcome"), r.get("exit_status"), r.get("state"),
                     (r.get("cohort") or {}).get("sent"), res.get("opted_out"), res.get("written"),
                     r.get("dead_letters"), r.get("seconds")])
        classes.append(r.get("outcome", "").replace(" ", "-"))
    table = _table(["ended", "request", "outcome", "exit", "state", "cohort", "opted out", "written", "dead letters",
                    "seconds"], rows, classes)
    if link:  # request ids are ours (date + counter), safe to link to their folder's page
        for r in runs:
            rid = r.get("request_id")
            if rid:
                cell = f"<td>{_e(rid)}</td>"
                table = table.replace(cell, f'<td><a href="requests/{_e(rid)}/{REPORT_HTML}">{_e(rid)}</a></td>')
    return table


def render_index(runs: Sequence[dict[str, Any]]) -> str:
    processed = [r for r in runs if r.get("results")][-CHART_RUNS:]
    charted = list(runs[-CHART_RUNS:])
    newest = list(reversed(runs))
    body = [f"<h1>NDOP runs</h1><p class=\"muted\">{len(runs)} run(s); newest first. Counts only: no NHS number.</p>"]
    if newest:
        last = newest[0]
        body.append(f"<p>Latest run: <span class=\"{_e(last.get('outcome', '').replace(' ', '-'))}\">"
                    f"{_e(last.get('outcome'))}</span> at {_e(last.get('ended_at'))}: {_e(last.get('message'))}</p>")
    if processed:
        body += ['<h2>Cohort</h2><div class="chart">', chart_cohort(processed), "</div>",
                 '<h2>Changes</h2><div class="chart">', chart_changes(processed), "</div>",
                 '<h2>Consents</h2><div class="chart">', chart_writes(processed), "</div>"]
    if runs:
        body += ['<h2>Stage times</h2><div class="chart">', chart_stages(processed or charted), "</div>",
                 '<h2>Failures</h2><div class="chart">', chart_failures(charted), "</div>"]
    body += ["<h2>Every run</h2>", _runs_table(newest, link=True)]
    return page("NDOP runs", "".join(body))


def render_request(report: dict[str, Any], runs: Sequence[dict[str, Any]]) -> str:
    rid = report["request_id"]
    cohort, results, change = report.get("cohort") or {}, outcome_counts(report), report.get("changes") or {}
    body = [f"<h1>NDOP request {_e(rid)}</h1>",
            (f"<p>State: <strong>{_e(report.get('state'))}</strong>. Created {_e(report.get('created_at'))}; "
             f"sent {_e(report.get('sent_at'))}; NDOP answered {_e(report.get('checked_at'))}.</p>"),
            '<p class="muted"><a href="../../index.html">every run</a></p>',
            "<h2>Cohort</h2>",
            _table(["read", "invalid", "duplicates", "sent"],
                   [[cohort.get("read"), cohort.get("invalid"), cohort.get("duplicates"), cohort.get("sent")]])]
    if results:
        body += ['<h2>Results</h2><div class="chart">', chart_outcome(report), "</div>",
                 _table(["figure", "patients"], [[k.replace("_", " "), v] for k, v in results.items()])]
    keys = [k for k in CHANGE_LABELS if k in change] + [k for k in change
                                                         if k not in CHANGE_LABELS and k != "previous_request_id"]
    if keys:
        body += ["<h2>Changes (counted by the Consent ledger)</h2>",
                 _table(["change", "patients"], [[CHANGE_LABELS.get(k, k.replace("_", " ")), change[k]] for k in keys])]
    if report.get("problems"):
        body += ["<h2>Problems</h2><ul>", *(f'<li class="failed">{_e(p)}</li>' for p in report["problems"]), "</ul>"]
    if report.get("stage_seconds"):
        body += ['<h2>Time per stage</h2><div class="chart">',
                 chart_stage_bars(report["stage_seconds"]),
                 "</div>"]
    mine = [r for r in runs if r.get("request_id") == rid]
    if mine:
        body += ["<h2>Runs of this request</h2>", _runs_table(list(reversed(mine)))]
    return page(f"NDOP request {rid}", "".join(body))


def write_request_page(work_dir: WorkDir, request_id: str, report: dict[str, Any],
                       runs: Sequence[dict[str, Any]] | None = None) -> str:
    path = work_dir.request_dir(request_id) / REPORT_HTML
    write_bytes(path, render_request(report, read_runs(work_dir) if runs is None else runs).encode())
    return str(path)


def write_index(work_dir: WorkDir, runs: Sequence[dict[str, Any]] | None = None) -> str:
    work_dir.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = work_dir.root / INDEX_HTML
    write_bytes(path, render_index(read_runs(work_dir) if runs is None else runs).encode())
    return str(path)
