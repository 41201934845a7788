"""The HTML report: well formed, complete, ordered for a reader, and safe with odd input."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from arc.data import Pair, Task
from arc.report import CATEGORIES, PALETTE, SEEN_MARK, grid_svg, task_category, write_report
from arc.score import build_results, grid_to_list, score_submission
from arc.vote import Candidate, two_attempts

A = np.array([[1, 2, 3], [4, 5, 6]])
B = np.array([[7, 8], [9, 0]])
C = np.array([[3, 3, 3], [0, 0, 0], [2, 2, 2]])
EVIL = 'x<script>alert("1")</script>&y'


class Page(HTMLParser):
    """Collects task sections and attempt figures, and checks that every tag is closed in order."""

    VOID = {"meta", "br", "img", "hr", "input", "link", "col", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.sections: list[dict] = []
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append({"task": attrs.get("data-task"), "category": attrs.get("data-category"), "attempts": []})
        if tag == "figure" and "attempt" in (attrs.get("class") or "").split() and self.sections:
            self.sections[-1]["attempts"].append(attrs["class"].split()[1])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(path) -> tuple[str, Page]:
    text = path.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    page.close()
    assert page.errors == [] and page.stack == [], (page.errors, page.stack)
    return text, page


def make_tasks() -> dict[str, Task]:
    demos = (Pair(A, A.T), Pair(B, B.T))
    tasks = [
        Task("zz-solved", demos, (Pair(A, A.T),)),
        Task("p-partial", demos, (Pair(A, A.T), Pair(B, B.T))),
        Task("m-right-shape", demos, (Pair(B, B.T),)),
        Task("a-wrong-shape", demos, (Pair(A, A.T),)),
        Task(EVIL, demos, (Pair(C, C.T),)),  # wrong shape too, and an id to escape
        Task("h-hidden", demos, (Pair(A, None),)),
    ]
    return {t.id: t for t in tasks}


def make_results(tasks: dict[str, Task]) -> dict:
    """Votes -> submission -> score -> results, the way eval.py goes."""
    infos: dict[str, list[dict]] = {}
    sub: dict[str, list[dict]] = {}

    def put(task_id: str, cands: list[Candidate]) -> None:
        a1, a2, info = two_attempts(cands)
        infos.setdefault(task_id, []).append(info)
        sub.setdefault(task_id, []).append({"attempt_1": grid_to_list(a1), "attempt_2": grid_to_list(a2)})

    put("zz-solved", [Candidate(A.T, -0.1, "identity"), Candidate(A.T, -0.2, "rot90"), Candidate(A, -0.05, "flip")])
    put("p-partial", [Candidate(A.T, -0.1, "identity")])
    put("p-partial", [Candidate(None, -1.0, "identity", "ragged: row 2 has 1 cells")] * 3)  # placeholder
    put("m-right-shape", [Candidate(B, -0.1, "identity"), Candidate((B + 1) % 10, -0.3, "rot90")])
    put("a-wrong-shape", [Candidate(A, -0.1, "identity"), Candidate(None, -2.0, "rot90", "no EOO")])
    put(EVIL, [Candidate(B, -0.1, "identity")])
    put("h-hidden", [Candidate(B, -0.1, "identity")])
    sub["a-wrong-shape"][0]["attempt_2"] = [[1, 2], [3]]  # a ragged attempt in the submission itself
    infos["zz-solved"][0]["adapt"] = {"steps": 32, "first_loss": 1.25, "last_loss": 0.5, "seconds": 3.0}
    score = score_submission(sub, tasks.values())
    run = {"checkpoint": "runs/x/ckpt_001000.pt", "settings": {"solve": {"views": 8}, "ttt": None},
           "seen_in_training": ["m-right-shape"], "sample": {"n": 6, "seed": 3, "ids": sorted(tasks)},
           "skipped": [{"task_id": "bad1", "file": "tasks/bad1.json", "reason": "grid is ragged"}]}
    results = build_results(score, test_info=infos, task_info={"m-right-shape": {"seen_in_training": True}}, run=run)
    return json.loads(json.dumps(results, allow_nan=False))  # strict JSON, as results.json


@pytest.fixture
def written(tmp_path):
    tasks = make_tasks()
    results = make_results(tasks)
    path = tmp_path / "report.html"
    write_report(path, results, tasks)
    return path, results, tasks


def test_results_schema_from_score_and_votes():
    results = make_results(make_tasks())
    assert results["score"] == (1 + 0.5 + 0 + 0 + 0) / 5
    assert results["unscored"] == ["h-hidden"]
    partial = results["tasks"]["p-partial"]["tests"]
    assert partial[0]["correct"] == [True, True] and partial[0]["info"]["votes"] == [1]
    assert partial[1]["info"]["placeholder"] and partial[1]["attempt_1"] == [[0]]
    assert partial[1]["info"]["malformed"][0]["reason"].startswith("ragged")
    wrong = results["tasks"]["a-wrong-shape"]["tests"][0]
    assert wrong["attempt_2"] is None and wrong["reasons"][1] == "grid is ragged: row 1 has 1 cells, row 0 has 2"
    assert results["tasks"]["m-right-shape"]["tests"][0]["shape_ok"] == [True, True]
    assert results["tasks"]["zz-solved"]["tests"][0]["info"]["adapt"]["steps"] == 32


def test_report_is_well_formed_and_lists_every_task(written):
    path, results, _ = written
    text, page = parse(path)
    assert text.startswith("<!DOCTYPE html>")
    assert {s["task"] for s in page.sections} == set(results["tasks"])
    assert "runs/x/ckpt_001000.pt" in text and "0.3000 (30.0%)" in text  # checkpoint and score in the header
    assert "6 tasks drawn at random with seed 3" in text
    assert "1 tasks skipped as bad (--skip_bad)" in text and "bad1 (tasks/bad1.json): grid is ragged" in text
    assert "script" not in page.tags, "task ids are escaped, never markup"
    assert EVIL in "".join(page.text)
    for tag in ("link", "img", "iframe"):
        assert tag not in page.tags  # self-contained: no external assets, no scripts
    assert not re.search(r"""(src|href)=["'](?!#)""", text), "only in-page links"


def test_sections_are_ordered_for_a_reader(written):
    path, _, _ = written
    _, page = parse(path)
    order = [(s["category"], s["task"]) for s in page.sections]
    assert order == [
        ("solved", "zz-solved"),
        ("partial", "p-partial"),
        ("right shape", "m-right-shape"),
        ("wrong shape", "a-wrong-shape"),
        ("wrong shape", EVIL),
        ("unscored", "h-hidden"),
    ]
    marks = {s["task"]: s["attempts"] for s in page.sections}
    assert marks["zz-solved"] == ["correct", "wrong"]  # the majority first
    assert marks["p-partial"] == ["correct", "correct", "wrong", "wrong"]  # one grid: repeated
    assert marks["m-right-shape"] == ["wrong", "wrong"]
    assert marks["a-wrong-shape"] == ["wrong", "wrong"]
    assert marks["h-hidden"] == ["unknown", "unknown"]


def test_report_shows_grids_sizes_votes_and_malformed_reasons(written):
    path, _, _ = written
    text, _ = parse(path)
    for colour in PALETTE:
        assert colour in text
    assert "2x3" in text and "3x2" in text  # grid sizes under the grids
    assert "votes: 2 · 1" in text
    assert "ragged: row 2 has 1 cells" in text  # a malformed prediction's reason
    assert "no EOO" in text
    assert "placeholder" in text
    assert "test-time training: 32 steps, loss 1.250 → 0.500, 3.0 s" in text
    assert "ragged: row 1 has 1 cells, row 0 has 2" in text  # a malformed attempt in the submission
    assert text.count("<svg") >= 6 * 2 * 2  # at least the demonstrations


def test_tasks_seen_in_training_are_marked_in_the_table_and_their_section(written):
    path, _, _ = written
    text, page = parse(path)
    summary_rows = re.findall(r"<tr class=[^>]*>.*?</tr>", text)
    marked = [row for row in summary_rows if SEEN_MARK in row]
    assert len(marked) == 1 and "m-right-shape" in marked[0]
    sections = re.findall(r'<section class="task".*?</section>', text, flags=re.S)
    assert [("m-right-shape" in sec) for sec in sections if SEEN_MARK in sec] == [True]
    assert "1 evaluated task(s) have the content of a task the checkpoint was trained on: m-right-shape" in text


def test_a_report_of_nothing_scored_says_so(tmp_path):
    tasks = make_tasks()
    hidden = {"h-hidden": tasks["h-hidden"]}
    results = build_results(score_submission({}, hidden.values()))
    path = tmp_path / "r.html"
    write_report(path, results, hidden)
    text, _ = parse(path)
    assert "not scored (no task with known test outputs)" in text
    assert "0.0000" not in text


def test_limit_caps_sections_but_not_the_summary(tmp_path):
    tasks = make_tasks()
    path = tmp_path / "r.html"
    write_report(path, make_results(tasks), tasks, limit=2)
    text, page = parse(path)
    assert [s["task"] for s in page.sections] == ["zz-solved", "p-partial"]
    assert "m-right-shape" in text and "showing 2 of 6 tasks" in text
    with pytest.raises(ValueError, match="limit"):
        write_report(path, {}, tasks, limit=-1)


def test_hand_written_results_with_missing_pieces(tmp_path):
    """None attempts, no truth, a task the report was not given, and no optional keys."""
    tasks = make_tasks()
    results = {
        "score": 0.0,
        "tasks": {
            "zz-solved": {"score": 0.0, "tests": [{"attempt_1": None, "attempt_2": [[1, 2], [3]], "correct": [False, False]}]},
            "not-given": {"score": None, "tests": [{"attempt_1": [[1]], "attempt_2": [[1]], "correct": None}]},
            "h-hidden": {"score": None, "tests": []},
        },
    }
    path = tmp_path / "r.html"
    write_report(path, results, list(tasks.values()))
    text, page = parse(path)
    assert [s["task"] for s in page.sections] == ["zz-solved", "h-hidden", "not-given"]
    assert page.sections[0]["category"] == "wrong shape"
    assert "task not given to the report" in text
    assert text.count("no grid") >= 2


def test_task_category_is_read_from_what_scoring_recorded():
    """Every category, from the results eval.py's path builds; the report never scores again, so a
    results entry without ``shape_ok`` for a task scoring 0 is "wrong shape", whatever the truth."""
    results = make_results(make_tasks())
    categories = {tid: task_category(entry) for tid, entry in results["tasks"].items()}
    assert categories == {"zz-solved": "solved", "p-partial": "partial", "m-right-shape": "right shape",
                          "a-wrong-shape": "wrong shape", EVIL: "wrong shape", "h-hidden": "unscored"}
    right = results["tasks"]["m-right-shape"]
    assert right["tests"][0]["shape_ok"] == [True, True]
    unrecorded = {**right, "tests": [{k: v for k, v in t.items() if k != "shape_ok"} for t in right["tests"]]}
    assert task_category(unrecorded) == "wrong shape"
    assert [task_category({"score": s}) for s in (None, 1.0, 0.5, 0.0)] == ["unscored", "solved", "partial", "wrong shape"]
    assert set(categories.values()) == set(CATEGORIES)


def _paint(svg: str, cell: int) -> np.ndarray:
    """Rebuild cell colours from grid_svg's output: the background rectangle, then each colour's runs."""
    width, height = (int(v) for v in re.search(r'<svg[^>]* width="(\d+)" height="(\d+)"', svg).groups())
    colour = {c: i for i, c in enumerate(PALETTE)}
    background = re.search(r'<rect width="\d+" height="\d+" fill="([^"]+)"/>', svg).group(1)
    canvas = np.full((height // cell, width // cell), colour[background])
    for fill, d in re.findall(r'<path fill="([^"]+)" d="([^"]*)"/>', svg):
        for x, y, w, h in re.findall(r"M(\d+) (\d+)h(\d+)v(\d+)h-\d+z", d):
            x, y, w, h = (int(v) // cell for v in (x, y, w, h))
            canvas[y : y + h, x : x + w] = colour[fill]
    return canvas


@given(
    hnp.arrays(np.int64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=30), elements=st.integers(0, 9)),
    st.sampled_from([3, 12]),
)
@settings(max_examples=60, deadline=None)
def test_grid_svg_draws_every_cell_in_its_palette_colour(grid, cell):
    svg = grid_svg(grid, cell)
    assert np.array_equal(_paint(svg, cell), grid)
    page = Page()
    page.feed(svg)
    assert page.errors == [] and page.stack == []


def test_grid_svg_draws_grid_lines_and_rejects_non_colours():
    svg = grid_svg([[0, 1], [2, 3]])
    assert '<path d="M12 0V24M0 12H24"' in svg
    assert "<path" not in grid_svg([[5]])
    with pytest.raises(ValueError):
        grid_svg([[10]])
    with pytest.raises(ValueError):
        grid_svg(np.zeros((0, 3), dtype=int))


def test_candidates_are_shown_best_first_with_the_truth_marked(tmp_path):
    """A test whose right grid was a runner-up: the report lists the kept candidates in the order of
    the selection rule, with votes and scores, and marks the one equal to the truth."""
    task = Task("runner-up", (Pair(A, A),), (Pair(A, B),))
    wrong = np.array([[1, 1], [1, 1]])
    info = {"select": "product", "score_views": ["identity", "rot90"], "order": [1, 0, 2], "votes": [3, 2, 1],
            "ballots": [{"votes": 3, "score": -7.5, "grid": wrong.tolist()},
                        {"votes": 2, "score": -1.25, "grid": C.tolist()},
                        {"votes": 1, "score": -9.0, "grid": B.tolist()}]}
    results = build_results(score_submission({"runner-up": [{"attempt_1": C, "attempt_2": wrong}]}, [task]),
                            test_info={"runner-up": [info]})
    path = tmp_path / "r.html"
    write_report(path, results, [task])
    text, page = parse(path)
    assert not page.errors
    section = re.search(r'<section class="task".*?</section>', text, flags=re.S).group(0)
    labels = re.findall(r'<figure class="candidate[^"]*"><div class="label">([^<]*)', section)
    assert [x.strip() for x in labels] == ["#1: 2 votes, log p -1.2", "#2: 3 votes, log p -7.5", "#3: 1 vote, log p -9.0"]
    assert section.count('class="candidate truth"') == 1 and "= truth" in section
    assert "identity · rot90" in section
    # the attempts are still the two scored figures
    assert page.sections[0]["attempts"] == ["wrong", "wrong"]
