"""The visual report of an evaluation: one self-contained HTML file (inline SVG grids, CSS, no
JavaScript, no external assets) that a person opens in a browser to see what was solved and how
the rest went wrong.

It only renders: the ``results`` dict it reads is results.json as :func:`arc.score.build_results`
makes it (the schema is documented once, in arc/score.py's docstring).

Only ``score``/``tasks`` and, per test, ``attempt_1``/``attempt_2``/``correct`` are needed by
:func:`write_report`; every other key is optional (without ``shape_ok`` a task scoring 0 is shown
as "wrong shape": the report renders what scoring found, it does not score again). Tasks the checkpoint was trained on
(``info.seen_in_training``) are marked in the table and in their section. Tasks are shown solved
first, then partially solved, then wrong with the right output shape, then wrong shape, then
unscored; by id within each group.
"""
from __future__ import annotations

import html
import json
import os
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from arc.data import Task
from arc.files import atomic_write_text
from arc.score import read_grid

# The standard ARC palette, colour 0..9.
PALETTE = (
    "#000000",  # 0 black
    "#0074D9",  # 1 blue
    "#FF4136",  # 2 red
    "#2ECC40",  # 3 green
    "#FFDC00",  # 4 yellow
    "#AAAAAA",  # 5 grey
    "#F012BE",  # 6 magenta
    "#FF851B",  # 7 orange
    "#7FDBFF",  # 8 light blue
    "#870C25",  # 9 maroon
)
CATEGORIES = ("solved", "partial", "right shape", "wrong shape", "unscored")
MAX_DISPLAY_PX = 300  # a grid is drawn at most this wide/high: 30x30 grids get smaller cells
MAX_LISTED = 200  # warnings / malformed reasons listed before "... and N more"
SEEN_MARK = "seen in training"  # the label of a task whose content the checkpoint was trained on


def task_category(entry: Mapping[str, Any]) -> str:
    """One of CATEGORIES for a task's results entry, read from what scoring recorded: its ``score``
    and, for a task scoring 0, each test's ``shape_ok`` ("right shape": some attempt of some test
    input has the true output's shape). Nothing is compared against the truth here."""
    score = entry.get("score")
    if score is None:
        return "unscored"
    if score >= 1.0:
        return "solved"
    if score > 0.0:
        return "partial"
    if any(any(test.get("shape_ok") or ()) for test in entry.get("tests", [])):
        return "right shape"
    return "wrong shape"


# ----------------------------------------------------------------------------------------------
# grids


def grid_svg(grid: np.ndarray | Sequence[Sequence[int]], cell: int = 12) -> str:
    """An inline SVG of a grid in the ARC palette with thin grid lines, ``cell`` pixels a cell.

    The most common colour is one background rectangle; every other colour is one path with a
    rectangle per horizontal run of it, which keeps a report of hundreds of tasks small.
    """
    arr = np.asarray(grid)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"grid_svg needs a non-empty 2-D grid, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() >= len(PALETTE):
        raise ValueError(f"grid_svg needs colours 0..{len(PALETTE) - 1}")
    h, w = arr.shape
    width, height = w * cell, h * cell
    background = int(np.bincount(arr.ravel(), minlength=len(PALETTE)).argmax())
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="grid" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" shape-rendering="crispEdges" role="img" aria-label="{h}x{w} grid">',
        f'<rect width="{width}" height="{height}" fill="{PALETTE[background]}"/>',
    ]
    runs: dict[int, list[str]] = {}  # colour -> one closed sub-path per horizontal run
    for r in range(h):
        row = arr[r]
        c = 0
        while c < w:
            end = c + 1
            while end < w and row[end] == row[c]:
                end += 1
            if row[c] != background:
                run = (end - c) * cell
                runs.setdefault(int(row[c]), []).append(f"M{c * cell} {r * cell}h{run}v{cell}h-{run}z")
            c = end
    parts += [f'<path fill="{PALETTE[colour]}" d="{"".join(d)}"/>' for colour, d in sorted(runs.items())]
    lines = "".join(f"M{c * cell} 0V{height}" for c in range(1, w)) + "".join(f"M0 {r * cell}H{width}" for r in range(1, h))
    if lines:
        parts.append(f'<path d="{lines}" stroke="#555" stroke-width="{1 if cell >= 8 else 0.5}" fill="none"/>')
    parts.append("</svg>")
    return "".join(parts)


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _figure(label: str, grid: Any, cell: int, css: str = "", note: str = "") -> str:
    """A labelled grid with its size underneath, or a placeholder box saying why there is none."""
    arr, reason = (None, "none") if grid is None else read_grid(grid)
    if arr is not None:
        size = max(arr.shape)
        body = grid_svg(arr, max(2, min(cell, MAX_DISPLAY_PX // size)))
        caption = f"{arr.shape[0]}x{arr.shape[1]}"
    else:
        body = f'<div class="nogrid">no grid<br>{_esc(note or reason)}</div>'
        caption = "&nbsp;"
    klass = f' class="{css}"' if css else ""
    return (
        f'<figure{klass}><div class="label">{label}</div>{body}'
        f"<figcaption>{caption}</figcaption></figure>"
    )


# ----------------------------------------------------------------------------------------------
# the page

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{margin:0 0 12px}
table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top;font-size:14px}
th{background:#eee}
table.stats td:first-child{font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.swatch{display:inline-block;width:22px;height:22px;margin-right:3px;border:1px solid #555;
  color:#fff;font-size:11px;text-align:center;line-height:22px;text-shadow:0 0 2px #000}
tr.solved td.cat{background:#d8f5d8}
tr.partial td.cat{background:#fff1c2}
tr.right-shape td.cat,tr.wrong-shape td.cat{background:#fbdcdc}
tr.unscored td.cat{background:#eee}
section.task{background:#fff;border:1px solid #ccc;border-radius:6px;margin:18px 0;padding:8px 14px}
section.task h3{margin:4px 0}
.row{display:flex;flex-wrap:wrap;align-items:flex-start;gap:6px 14px;margin:6px 0}
.pair{display:flex;align-items:center;gap:6px;padding:4px;border:1px solid #eee}
.arrow{font-size:22px;color:#777}
figure{margin:0;text-align:center}
figure .label{font-size:12px;color:#333;margin-bottom:2px}
figcaption{font-size:12px;color:#666;margin-top:2px}
svg.grid{display:block;margin:auto;outline:1px solid #555}
figure.attempt{padding:3px;border:4px solid #bbb;border-radius:4px}
figure.correct{border-color:#1f9d3a}
figure.wrong{border-color:#d8262e}
figure.unknown{border-style:dashed}
figure.candidate{padding:2px;border:2px solid #ddd;border-radius:4px}
figure.candidate.truth{border-color:#1f9d3a}
.nogrid{width:90px;min-height:60px;padding:6px;font-size:11px;color:#900;background:#f4f4f4;
  border:1px dashed #999;overflow-wrap:anywhere}
.ok{color:#1f9d3a;font-weight:600}
.bad{color:#d8262e;font-weight:600}
.meta{font-size:13px;color:#444;margin:2px 0}
.seen{background:#ffe08a;border:1px solid #c90;border-radius:3px;padding:0 4px;font-size:12px}
details{margin:4px 0;font-size:13px}
"""


def _fmt_score(x: Any) -> str:
    return "–" if x is None else f"{float(x):.3f}"


def _mark(correct: Any) -> str:
    if correct is None:
        return '<span title="no truth">?</span>'
    return '<span class="ok">✓</span>' if any(correct) else '<span class="bad">✗</span>'


def _header(results: Mapping[str, Any], n_tasks: int) -> list[str]:
    score = results.get("score")
    run: Mapping[str, Any] = results.get("run") or {}
    out = ["<h1>ARC evaluation report</h1>", '<table class="stats">']
    rows = [
        ("score (official, pass@2)", "not scored (no task with known test outputs)" if score is None
         else f"{score:.4f} ({100 * score:.1f}%)"),
        ("pass@1", _fmt_score(results.get("pass_at_1"))),
        ("tasks fully solved", f"{results.get('tasks_solved', '–')} / {results.get('tasks_scored', n_tasks)}"),
        ("test inputs solved", f"{results.get('test_inputs_solved', '–')} / {results.get('test_inputs', '–')}"),
        ("tasks in report", str(n_tasks) + (f" ({len(results['unscored'])} unscored)" if results.get("unscored") else "")),
        ("checkpoint", run.get("checkpoint") or "–"),
    ]
    if run.get("submission"):
        rows.append(("submission", run["submission"]))
    if run.get("data") is not None:
        source = f" ({run['source']})" if run.get("source") else ""
        rows.append(("tasks from", f"--data {run['data']} --split {run.get('split', '')}{source}"))
    sample = run.get("sample")
    if sample:
        rows.append(("sample", f"{sample.get('n')} tasks drawn at random with seed {sample.get('seed')}"))
    seen = run.get("seen_in_training") or []
    if seen:
        rows.append((SEEN_MARK, f"{len(seen)} evaluated task(s) have the content of a task the checkpoint was "
                                f"trained on: {', '.join(seen[:20])}{' …' if len(seen) > 20 else ''}"))
    out += [f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in rows]
    out.append("</table>")
    settings = run.get("settings") or {}
    if settings:
        out.append("<h2>Settings</h2><table class=\"settings\">")
        for k, v in settings.items():
            out.append(f"<tr><td>{_esc(k)}</td><td><code>{_esc(json.dumps(v, default=str))}</code></td></tr>")
        out.append("</table>")
    swatches = "".join(f'<span class="swatch" style="background:{c}">{i}</span>' for i, c in enumerate(PALETTE))
    out.append(f'<p class="meta">palette: {swatches}</p>')
    for title, items in (("submission warnings", results.get("warnings") or []),
                         ("tasks skipped as bad (--skip_bad)",
                          [f"{b.get('task_id')} ({b.get('file')}): {b.get('reason')}" for b in run.get("skipped") or []]),
                         ("duplicates dropped (same content)", [f"{d[0]} = {d[1]}" for d in run.get("duplicates") or []]),
                         ("ids renamed (same id, other content)", [f"{r[1]} -> {r[0]}" for r in run.get("renamed") or []])):
        if items:
            out.append(f"<details><summary>{len(items)} {_esc(title)}</summary><ul>")
            out += [f"<li>{_esc(w)}</li>" for w in items[:MAX_LISTED]]
            if len(items) > MAX_LISTED:
                out.append(f"<li>… and {len(items) - MAX_LISTED} more</li>")
            out.append("</ul></details>")
    return out


def _info(entry: Mapping[str, Any]) -> Mapping[str, Any]:
    return entry.get("info") or {}


def _votes_text(test: Mapping[str, Any], top: int = 3) -> str:
    votes = list(_info(test).get("votes") or [])
    if not votes:
        return "–"
    shown = "·".join(str(v) for v in votes[:top])
    return shown + ("·…" if len(votes) > top else "")


def _summary(order: list[tuple[str, str]], results_tasks: Mapping[str, Any], anchors: dict[str, str]) -> list[str]:
    out = [
        "<h2>Tasks</h2>",
        '<table class="summary"><tr><th>#</th><th>task</th><th>result</th><th>score</th>'
        "<th>test inputs: ✓/✗ and votes of the top candidates</th></tr>",
    ]
    for n, (task_id, category) in enumerate(order, start=1):
        entry = results_tasks[task_id]
        name = _esc(task_id)
        link = f'<a href="#{anchors[task_id]}">{name}</a>' if task_id in anchors else name
        if _info(entry).get("seen_in_training"):
            link += f' <span class="seen">{SEEN_MARK}</span>'
        tests = " &nbsp;|&nbsp; ".join(
            f"{_mark(t.get('correct'))} {_esc(_votes_text(t))}" for t in entry.get("tests", [])
        )
        out.append(
            f'<tr class="{category.replace(" ", "-")}"><td class="num">{n}</td><td>{link}</td>'
            f'<td class="cat">{_esc(category)}</td><td class="num">{_fmt_score(entry.get("score"))}</td><td>{tests}</td></tr>'
        )
    out.append("</table>")
    return out


def _malformed_html(malformed: Sequence[Any]) -> str:
    reasons: Counter[str] = Counter()
    views: dict[str, list[str]] = {}
    for m in malformed:
        if isinstance(m, Mapping):
            reason, view = str(m.get("reason")), str(m.get("view", ""))
        else:
            reason, view = str(m), ""
        reasons[reason] += 1
        if view:
            views.setdefault(reason, []).append(view)
    items = []
    for reason, count in reasons.most_common(MAX_LISTED):
        vs = views.get(reason, [])
        seen = f" (views: {', '.join(vs[:8])}{', …' if len(vs) > 8 else ''})" if vs else ""
        items.append(f"<li>{count}× {_esc(reason)}{_esc(seen)}</li>")
    return f"<details><summary>{len(malformed)} malformed predictions</summary><ul>{''.join(items)}</ul></details>"


def _adapt_text(adapt: Mapping[str, Any]) -> str:
    """Test-time training's record of a task, in words."""
    steps = adapt.get("steps", 0)
    if not steps:
        return f"no test-time training ({adapt.get('reason') or 'no steps'})"
    first, last = adapt.get("first_loss"), adapt.get("last_loss")
    losses = f", loss {first:.3f} → {last:.3f}" if isinstance(first, (int, float)) and isinstance(last, (int, float)) else ""
    return f"test-time training: {steps} steps{losses}, {adapt.get('seconds', 0):.1f} s"


def _candidates_html(info: Mapping[str, Any], truth: Any, cell: int) -> list[str]:
    """The candidate grids the solver kept (``info.order``/``info.ballots``), best first by its
    selection rule: votes, the product score when scored, and whether each one is the truth. Shows
    when the right grid was found but ranked below the two attempts."""
    ballots, order = list(info.get("ballots") or []), list(info.get("order") or [])
    shown = [(rank, ballots[i]) for rank, i in enumerate(order) if i < len(ballots) and "grid" in ballots[i]]
    if len(shown) < 2:
        return []
    truth_arr = None if truth is None else np.asarray(truth)
    figures = []
    for rank, b in shown:
        arr, _ = read_grid(b["grid"])
        hit = truth_arr is not None and arr is not None and arr.shape == truth_arr.shape and bool((arr == truth_arr).all())
        score = b.get("score")
        label = f"#{rank + 1}: {b.get('votes', 0)} vote{'' if b.get('votes') == 1 else 's'}"
        label += f", log p {score:.1f}" if isinstance(score, (int, float)) else ""
        label += ' <span class="ok">= truth</span>' if hit else ""
        figures.append(_figure(label, b["grid"], cell, "candidate truth" if hit else "candidate"))
    rule = _esc(str(info.get("select", "vote")))
    return [f'<p class="meta">candidates, best first by --select {rule} (log p: sum over the views '
            f"{_esc(' · '.join(info.get('score_views') or []) or '–')})</p>",
            '<div class="row">', *figures, "</div>"]


def _task_section(task_id: str, anchor: str, category: str, entry: Mapping[str, Any], task: Task | None, cell: int) -> list[str]:
    out = [
        f'<section class="task" id="{anchor}" data-task="{_esc(task_id)}" data-category="{_esc(category)}">',
        f"<h3>{_esc(task_id)} — {_esc(category)}, score {_fmt_score(entry.get('score'))}</h3>",
    ]
    if _info(entry).get("seen_in_training"):
        out.append(f'<p class="meta"><span class="seen">{SEEN_MARK}</span> the checkpoint was trained on a task '
                   "with this content: its score says little about generalisation</p>")
    if task is None:
        out.append('<p class="meta">task not given to the report: no demonstrations, inputs or truth</p>')
    else:
        out.append('<p class="meta">demonstrations</p><div class="row">')
        for i, pair in enumerate(task.train):
            out.append(
                f'<div class="pair">{_figure(f"input {i + 1}", pair.input, cell)}<span class="arrow">→</span>'
                f'{_figure(f"output {i + 1}", pair.output, cell)}</div>'
            )
        out.append("</div>")
    tests = list(entry.get("tests", []))
    n_tests = max(len(tests), len(task.test) if task is not None else 0)
    for i in range(n_tests):
        test = tests[i] if i < len(tests) else {}
        pair = task.test[i] if task is not None and i < len(task.test) else None
        correct = test.get("correct")
        reasons = list(test.get("reasons") or [None, None])
        info = _info(test)
        out.append(f'<p class="meta"><b>test {i + 1}</b> {_mark(correct)}</p><div class="row">')
        out.append(_figure("test input", None if pair is None else pair.input, cell, note="input unknown"))
        for k in (0, 1):
            if correct is None:
                css, mark = "attempt unknown", "(no truth)"
            elif correct[k]:
                css, mark = "attempt correct", '<span class="ok">✓ correct</span>'
            else:
                css, mark = "attempt wrong", '<span class="bad">✗ wrong</span>'
            note = reasons[k] if k < len(reasons) and reasons[k] else ""
            out.append(_figure(f"attempt {k + 1} {mark}", test.get(f"attempt_{k + 1}"), cell, css, note))
        truth = None if pair is None else pair.output
        out.append(_figure("truth", truth, cell, note="unknown"))
        out.append("</div>")
        meta = [f"votes: {_esc(' · '.join(str(v) for v in info.get('votes') or []) or '–')}"]
        if info.get("candidates") is not None:
            n = int(info["candidates"])
            meta.append(f"{n} candidate{'' if n == 1 else 's'}")
        if info.get("placeholder"):
            meta.append("no candidate was a grid: both attempts are the [[0]] placeholder")
        adapt = info.get("adapt")
        if isinstance(adapt, Mapping):
            meta.append(_esc(_adapt_text(adapt)))
        out.append(f'<p class="meta">{"; ".join(meta)}</p>')
        if info.get("malformed"):
            out.append(_malformed_html(info["malformed"]))
        out += _candidates_html(info, truth, cell)
    out.append("</section>")
    return out


def write_report(
    path: str | os.PathLike,
    results: Mapping[str, Any],
    tasks: Mapping[str, Task] | Iterable[Task],
    *,
    limit: int | None = None,
    cell: int = 12,
    title: str = "ARC evaluation report",
) -> None:
    """Write the report as one self-contained HTML file (atomically).

    ``tasks`` gives the demonstrations, test inputs and true outputs (a dict by id, or any iterable
    of Task); a task in ``results`` but not in ``tasks`` is shown without them. ``limit`` caps the
    number of task sections (the summary table still lists every task); ``cell`` is the pixel size
    of a grid cell (large grids are drawn smaller, at most 300 px a side).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    by_id = dict(tasks) if isinstance(tasks, Mapping) else {t.id: t for t in tasks}
    results_tasks: Mapping[str, Any] = results.get("tasks") or {}
    categories = {tid: task_category(entry) for tid, entry in results_tasks.items()}
    order = sorted(categories.items(), key=lambda kv: (CATEGORIES.index(kv[1]), kv[0]))
    shown = order if limit is None else order[:limit]
    anchors = {tid: f"t{n}" for n, (tid, _) in enumerate(shown)}
    checkpoint = (results.get("run") or {}).get("checkpoint")

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_esc(title)}{(' – ' + _esc(checkpoint)) if checkpoint else ''}</title>",
        f"<style>{_CSS}</style></head><body>",
    ]
    parts += _header(results, len(order))
    parts += _summary(order, results_tasks, anchors)
    if len(shown) < len(order):
        parts.append(f'<p class="meta">showing {len(shown)} of {len(order)} tasks (limit {limit})</p>')
    for tid, category in shown:
        parts += _task_section(tid, anchors[tid], category, results_tasks[tid], by_id.get(tid), cell)
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts) + "\n")
