"""eval.py end to end: train a smoke model, evaluate it, rescore what it wrote; the output folder
checked first; resume after an interruption; flags from the config dataclasses; bad flags; tasks
seen in training; --sample; --skip_bad; cached decoding parity; decoding's --dtype."""
import contextlib
import dataclasses
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import eval as eval_cli
from arc import checkpoint, evaluate, kernels, solve
from arc.data import Pair, Task, load_tasks, task_fingerprint
from arc.loss import resolve_dtype
from arc.evaluate import JOURNAL, EvalConfig, IncompatibleCheckpoint, load_model, sample_ids, select_tasks
from arc.model import HybridLM, preset
from arc.score import score_submission
from arc.solve import SolveConfig, decode, decode_uncached
from arc import augment
from arc.tokens import EOO, ROW, encode_prompt
from arc.ttt import TaskFineTuner, TTTConfig

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def tiny():
    """The tiny test model, long enough for any ARC instance."""
    return preset("tiny", max_seq_len=4096)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """train.py --preset smoke --out DIR, exactly as a user runs it."""
    out = tmp_path_factory.mktemp("runs") / "smoke"
    subprocess.run([sys.executable, "train.py", "--preset", "smoke", "--out", str(out), "--progress", "false"],
                   check=True, cwd=ROOT, capture_output=True)
    return out


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def solved_by_hand(submission: dict, tasks) -> dict[str, list[bool]]:
    """The ARC Prize rule written out, apart from arc.score: per task, per test input, whether either
    attempt equals the true output (shape and every cell)."""
    return {t.id: [any(np.array_equal(np.array(entry[k]), pair.output) for k in ("attempt_1", "attempt_2"))
                   for entry, pair in zip(submission[t.id], t.test)] for t in tasks}


def check_score_is_the_submissions(out: Path, tasks) -> dict:
    """results.json's score and per-test correctness equal those of submission.json scored apart:
    by arc.score.score_submission against the tasks' outputs, and by hand. Returns results.json."""
    results, sub = read(out / "results.json"), read(out / "submission.json")
    by_hand = solved_by_hand(sub, tasks)
    expected = sum(sum(s) / len(s) for s in by_hand.values()) / len(by_hand)
    assert results["score"] == score_submission(sub, tasks).score == pytest.approx(expected, abs=1e-12)
    assert {tid: [t["solved"] for t in e["tests"]] for tid, e in results["tasks"].items()} == by_hand
    assert results["tasks_solved"] == sum(all(s) for s in by_hand.values())
    return results


def test_smoke_checkpoint_then_eval_writes_all_three_outputs_and_its_score_is_the_submissions(smoke_run, tmp_path):
    out = tmp_path / "eval"
    rc = eval_cli.main(["--ckpt", str(smoke_run), "--data", "arc1", "--split", "eval", "--limit", "2",
                        "--views", "2", "--out", str(out), "--progress", "false"])
    assert rc == 0
    sub = read(out / "submission.json")
    tasks = load_tasks("arc1", "eval")[:2]
    assert list(sub) == [t.id for t in tasks]
    for t in tasks:
        assert len(sub[t.id]) == len(t.test)
        assert all(set(e) == {"attempt_1", "attempt_2"} for e in sub[t.id])
    results = check_score_is_the_submissions(out, tasks)
    assert results["tasks_scored"] == 2 and results["test_inputs"] == sum(len(t.test) for t in tasks)
    run = results["run"]
    assert run["settings"]["solve"]["views"] == 2 and run["model_config"]["d_model"] == tiny().d_model
    assert run["checkpoint"] == str(smoke_run / checkpoint.LATEST) and run["sample"] is None
    for t in tasks:
        entry = results["tasks"][t.id]
        assert entry["info"]["seconds"] > 0 and entry["info"]["seen_in_training"] is False
        for test, attempts in zip(entry["tests"], sub[t.id]):
            assert (test["attempt_1"], test["attempt_2"]) == (attempts["attempt_1"], attempts["attempt_2"])
            assert test["info"]["candidates"] == 2 and sum(test["info"]["votes"]) + len(test["info"]["malformed"]) == 2
    html = (out / "report.html").read_text()
    assert all(t.id in html for t in tasks)
    # rescoring the submission it wrote gives the same score, task by task
    assert eval_cli.main(["--submission", str(out / "submission.json"), "--limit", "2", "--out", str(tmp_path / "re")]) == 0
    again = read(tmp_path / "re" / "results.json")
    for key in ("score", "pass_at_1", "tasks_solved", "tasks_scored", "test_inputs_solved", "test_inputs"):
        assert again[key] == results[key], key
    assert {k: v["score"] for k, v in again["tasks"].items()} == {k: v["score"] for k, v in results["tasks"].items()}
    assert again["warnings"] == [] and again["run"]["submission"] == str(out / "submission.json")


def test_scoring_a_submission_of_the_true_outputs_gives_one_and_an_empty_one_zero(tmp_path):
    tasks = load_tasks("arc1", "eval")
    truth = {t.id: [{"attempt_1": p.output.tolist(), "attempt_2": [[0]]} for p in t.test] for t in tasks}
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    (tmp_path / "empty.json").write_text("{}")
    assert eval_cli.main(["--submission", str(tmp_path / "truth.json"), "--out", str(tmp_path / "a")]) == 0
    assert eval_cli.main(["--submission", str(tmp_path / "empty.json"), "--out", str(tmp_path / "b")]) == 0
    a = read(tmp_path / "a" / "results.json")
    b = read(tmp_path / "b" / "results.json")
    assert (a["score"], a["pass_at_1"], a["tasks_solved"], a["test_inputs"]) == (1.0, 1.0, 400, 419)
    assert (b["score"], b["tasks_solved"], len(b["warnings"])) == (0.0, 0, 400)


def test_checkpoint_of_another_vocabulary_fails_clearly(tmp_path):
    cfg = tiny().to_dict()
    cfg["vocab_size"] = 100277
    model = HybridLM(tiny())
    checkpoint.save_atomic({"model": model.state_dict(), "model_config": cfg}, tmp_path / "text.pt")
    with pytest.raises(IncompatibleCheckpoint, match="vocabulary of 100277"):
        load_model(tmp_path / "text.pt", CPU)
    assert eval_cli.main(["--ckpt", str(tmp_path / "text.pt"), "--out", str(tmp_path / "o")]) == 2


def test_a_missing_checkpoint_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no latest.pt"):
        load_model(tmp_path, CPU)


def test_cached_decoding_matches_recomputing_the_whole_sequence():
    torch.manual_seed(0)
    model = HybridLM(tiny()).eval()
    tasks = load_tasks("arc1", "eval")[:3]
    prompts = [encode_prompt(t.demos, t.test[0].input, block_size=2048) for t in tasks]
    fast = decode(model, prompts, CPU, max_new_tokens=40)
    slow = decode_uncached(model, prompts, CPU, max_new_tokens=40)
    for (ids_f, lp_f), (ids_s, lp_s) in zip(fast, slow):
        assert ids_f == ids_s
        assert lp_f == pytest.approx(lp_s, abs=1e-4)


# ---- a fast real model on small tasks ---------------------------------------------------------


def short_answer_model(seed: int = 0) -> HybridLM:
    """A tiny HybridLM with random layers whose output head strongly prefers EOO, then ROW, over
    the colours: constrained decoding then answers every test with a 1x1 grid in three tokens,
    which colour depending on the prompt. A real model through the real solver, but fast."""
    torch.manual_seed(seed)
    model = HybridLM(preset("tiny", max_seq_len=4096, tie_embeddings=False))
    with torch.no_grad():
        d = model.cfg.d_model
        model.embedding.weight.copy_(1.0 + 0.3 * torch.randn_like(model.embedding.weight))  # rows near all-ones
        model.lm_head.weight.normal_(0.0, 0.3)
        model.lm_head.weight[EOO] = 30.0 / d
        model.lm_head.weight[ROW] = 20.0 / d
    return model


def save_model(model: HybridLM, path: Path, **extra) -> Path:
    checkpoint.save_atomic({"model": model.state_dict(), "model_config": model.cfg.to_dict(), "step": 7, **extra}, path)
    return path


def write_tasks(folder: Path, n: int = 5, seed: int = 0) -> list[str]:
    """n small tasks (3x3 grids, the rule: flip left-right) as <id>.json files in ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for k in range(n):
        pairs = []
        for _ in range(4):
            g = rng.integers(0, 10, size=(3, 3))
            pairs.append({"input": g.tolist(), "output": np.fliplr(g).tolist()})
        task_id = f"task{k:02d}"
        (folder / f"{task_id}.json").write_text(json.dumps({"train": pairs[:3], "test": pairs[3:]}))
        ids.append(task_id)
    return ids


@pytest.fixture
def small(tmp_path) -> tuple[Path, Path]:
    """(checkpoint file, task folder of 5 small tasks)"""
    write_tasks(tmp_path / "tasks")
    return save_model(short_answer_model(), tmp_path / "m.pt"), tmp_path / "tasks"


def eval_args(ckpt: Path, tasks: Path, out: Path, *more: str) -> list[str]:
    return ["--ckpt", str(ckpt), "--data", str(tasks), "--views", "2", "--out", str(out), "--progress", "false", *more]


def test_the_short_answer_model_answers_in_one_cell(small, tmp_path):
    ckpt, tasks = small
    assert eval_cli.main(eval_args(ckpt, tasks, tmp_path / "o")) == 0
    sub = read(tmp_path / "o" / "submission.json")
    assert len(sub) == 5
    assert all(np.shape(e["attempt_1"]) == (1, 1) for entries in sub.values() for e in entries)


def test_results_score_is_the_submissions_score_and_not_zero(tmp_path):
    """Ten test inputs, all the same 3x3 grid, whose outputs are the ten 1x1 grids [[0]]..[[9]]: the
    short-answer model answers each with a 1x1 grid, the same for all ten, so one or two of them
    are right and the score is 0.1 or 0.2, checked against submission.json scored apart."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    grid = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    demos = [{"input": grid, "output": [[c]]} for c in (3, 5)]
    (folder / "tenfold.json").write_text(json.dumps({"train": demos, "test": [{"input": grid, "output": [[c]]} for c in range(10)]}))
    write_tasks(folder, n=1)  # and a task it cannot solve: the score is a mean over two tasks
    ckpt = save_model(short_answer_model(), tmp_path / "m.pt")
    assert eval_cli.main(eval_args(ckpt, folder, tmp_path / "o")) == 0
    results = check_score_is_the_submissions(tmp_path / "o", load_tasks(str(folder), "eval"))
    solved = results["tasks"]["tenfold"]["tests"]
    assert sum(t["solved"] for t in solved) in (1, 2) and results["score"] == results["tasks"]["tenfold"]["score"] / 2
    assert results["tasks"]["tenfold"]["score"] == sum(t["solved"] for t in solved) / 10


def without_timings(results: dict) -> dict:
    """results.json less what differs between two runs of the same evaluation (wall clock)."""
    r = json.loads(json.dumps(results))
    r["run"].pop("seconds")
    r["run"].pop("resumed_tasks")
    r["run"]["settings"]["eval"].pop("out")
    for t in r["tasks"].values():
        t["info"].pop("seconds")
        t["info"].pop("timings")
        for test in t["tests"]:
            (test["info"].get("adapt") or {}).pop("seconds", None)
    return r


def test_an_interrupted_evaluation_keeps_its_tasks_and_the_same_command_continues_it(small, tmp_path, monkeypatch):
    ckpt, tasks = small
    more = ("--ttt_steps", "1", "--ttt_batch", "2")
    assert eval_cli.main(eval_args(ckpt, tasks, tmp_path / "whole", *more)) == 0

    real = evaluate.solve_tasks
    solved: list[str] = []

    def interrupted(model, batch, *args, **kwargs):
        if len(solved) == 3:
            raise KeyboardInterrupt  # Ctrl-C during the fourth task
        solved.append(batch[0].id)
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(evaluate, "solve_tasks", interrupted)
    out = tmp_path / "broken"
    assert eval_cli.main(eval_args(ckpt, tasks, out, *more)) == 130
    journal = (out / JOURNAL).read_text().splitlines()
    assert [json.loads(line)["task_id"] for line in journal[1:]] == ["task00", "task01", "task02"]
    assert not (out / "results.json").exists()
    with open(out / JOURNAL, "a") as f:
        f.write('{"task_id": "task03", "entr')  # and a kill in the middle of a line

    solved.clear()
    monkeypatch.setattr(evaluate, "solve_tasks", lambda model, batch, *a, **k: solved.append(batch[0].id) or real(model, batch, *a, **k))
    assert eval_cli.main(eval_args(ckpt, tasks, out, *more)) == 0
    assert solved == ["task03", "task04"]  # the finished tasks were not solved again
    assert (out / "submission.json").read_bytes() == (tmp_path / "whole" / "submission.json").read_bytes()
    resumed, whole = read(out / "results.json"), read(tmp_path / "whole" / "results.json")
    assert resumed["run"]["resumed_tasks"] == 3 and whole["run"]["resumed_tasks"] == 0
    assert without_timings(resumed) == without_timings(whole)
    assert resumed["tasks"]["task04"]["tests"][0]["info"]["adapt"]["steps"] == 1  # test-time training's record

    solved.clear()  # a finished evaluation run again is rebuilt from its journal, solving nothing
    assert eval_cli.main(eval_args(ckpt, tasks, out, *more)) == 0
    assert solved == [] and read(out / "results.json")["run"]["resumed_tasks"] == 5


def test_tasks_decoded_in_groups_give_the_same_results_and_each_is_journaled(tmp_path, monkeypatch):
    """--group 3 over 5 tasks: two solve calls (3 + 2 tasks), every task in the journal, and the
    same submission and results (floats to 6 digits) as one task at a time (a random-weight 2D
    model, float32)."""
    from arc.model import GRID_2D

    write_tasks(tmp_path / "tasks", n=5)
    torch.manual_seed(0)
    ckpt = save_model(HybridLM(preset("tiny", max_seq_len=4096, **GRID_2D)), tmp_path / "m.pt")
    assert eval_cli.main(eval_args(ckpt, tmp_path / "tasks", tmp_path / "one", "--dtype", "float32", "--group", "1")) == 0
    real, calls = evaluate.solve_tasks, []
    monkeypatch.setattr(evaluate, "solve_tasks", lambda model, batch, *a, **k: calls.append(len(batch)) or real(model, batch, *a, **k))
    assert eval_cli.main(eval_args(ckpt, tmp_path / "tasks", tmp_path / "three", "--dtype", "float32", "--group", "3")) == 0
    assert calls == [3, 2]
    journal = (tmp_path / "three" / JOURNAL).read_text().splitlines()
    assert sorted(json.loads(line)["task_id"] for line in journal[1:]) == [f"task{k:02d}" for k in range(5)]
    assert read(tmp_path / "three" / "submission.json") == read(tmp_path / "one" / "submission.json")
    one, three = without_timings(read(tmp_path / "one" / "results.json")), without_timings(read(tmp_path / "three" / "results.json"))
    assert three["run"]["settings"]["solve"].pop("group") == 3 and one["run"]["settings"]["solve"].pop("group") == 1
    assert rounded(one) == rounded(three)  # mean log-probabilities move in the 9th digit with the batch's rows


@pytest.mark.parametrize("field, old, default", [("group", "1", "4"), ("draft", "0", "16")])
def test_a_journal_from_before_a_setting_continues_with_its_old_behaviour(small, tmp_path, monkeypatch, capsys,
                                                                          field, old, default):
    """Journals written before --group (one task at a time) or --draft (one token a step) lack the
    field in their key: the same settings with its old value continue them; the new default is
    another evaluation."""
    ckpt, tasks = small
    out = tmp_path / "o"
    assert eval_cli.main(eval_args(ckpt, tasks, out, f"--{field}", old)) == 0
    lines = (out / JOURNAL).read_text().splitlines()
    header = json.loads(lines[0])
    del header["key"]["solve"][field]
    (out / JOURNAL).write_text("\n".join([json.dumps(header)] + lines[1:4]) + "\n")  # 3 of 5 tasks done
    assert eval_cli.main(eval_args(ckpt, tasks, out)) == 2
    assert f"solve.{field}: {default} here, {old} in the journal" in capsys.readouterr().err
    real, solved = evaluate.solve_tasks, []
    monkeypatch.setattr(evaluate, "solve_tasks", lambda model, batch, *a, **k: solved.extend(t.id for t in batch) or real(model, batch, *a, **k))
    assert eval_cli.main(eval_args(ckpt, tasks, out, f"--{field}", old)) == 0
    assert solved == ["task03", "task04"]


def test_compile_is_refused_with_the_measurement_and_old_journals_continue(small, tmp_path, monkeypatch, capsys):
    """eval.py --compile true: refused (decoding compiled does not pay), the message says why and
    where the figures are, nothing is written. A journal written before the flag existed (no
    "compile" in its key) continues with the same command."""
    ckpt, tasks = small
    out = tmp_path / "o"
    assert eval_cli.main(eval_args(ckpt, tasks, out, "--compile", "true")) == 2
    err = capsys.readouterr().err
    assert "--compile: decoding is not compiled" in err and "BENCHMARKS.md section 21" in err and "--ttt_compile" in err
    assert not out.exists()
    assert eval_cli.main(eval_args(ckpt, tasks, out)) == 0
    lines = (out / JOURNAL).read_text().splitlines()
    header = json.loads(lines[0])
    assert header["key"]["solve"].pop("compile") is False
    (out / JOURNAL).write_text("\n".join([json.dumps(header)] + lines[1:4]) + "\n")  # 3 of 5 tasks done
    real, solved = evaluate.solve_tasks, []
    monkeypatch.setattr(evaluate, "solve_tasks", lambda model, batch, *a, **k: solved.extend(t.id for t in batch) or real(model, batch, *a, **k))
    assert eval_cli.main(eval_args(ckpt, tasks, out)) == 0
    assert solved == ["task03", "task04"]


def test_a_ttt_journal_from_before_ttt_compile_continues(small, tmp_path, monkeypatch, capsys):
    """A journal written before --ttt_compile (eager fine-tuning) lacks it in its key: the same
    command continues it; --ttt_compile true is another evaluation."""
    ckpt, tasks = small
    out = tmp_path / "o"
    assert eval_cli.main(eval_args(ckpt, tasks, out, "--ttt_steps", "1", "--ttt_batch", "1")) == 0
    lines = (out / JOURNAL).read_text().splitlines()
    header = json.loads(lines[0])
    del header["key"]["ttt"]["ttt_compile"]
    (out / JOURNAL).write_text("\n".join([json.dumps(header)] + lines[1:4]) + "\n")  # 3 of 5 tasks done
    capsys.readouterr()
    assert eval_cli.main(eval_args(ckpt, tasks, out, "--ttt_steps", "1", "--ttt_batch", "1", "--ttt_compile", "true")) == 2
    assert "ttt.ttt_compile: true here, false in the journal" in capsys.readouterr().err.lower()
    real, solved = evaluate.solve_tasks, []
    monkeypatch.setattr(evaluate, "solve_tasks", lambda model, batch, *a, **k: solved.extend(t.id for t in batch) or real(model, batch, *a, **k))
    assert eval_cli.main(eval_args(ckpt, tasks, out, "--ttt_steps", "1", "--ttt_batch", "1")) == 0
    assert solved == ["task03", "task04"]


def rounded(obj, digits: int = 6):
    """A JSON value with every float rounded (sums over other batch compositions differ in the last bits)."""
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v, digits) for v in obj]
    return round(obj, digits) if isinstance(obj, float) else obj


def test_other_settings_in_the_same_out_are_refused_unless_overwrite(small, tmp_path, capsys):
    ckpt, tasks = small
    out = tmp_path / "o"
    assert eval_cli.main(eval_args(ckpt, tasks, out, "--limit", "1")) == 0
    capsys.readouterr()
    assert eval_cli.main(eval_args(ckpt, tasks, out, "--limit", "1", "--views", "1")) == 2
    err = capsys.readouterr().err
    assert "holds the progress of another evaluation (solve.views: 1 here, 2 in the journal)" in err
    assert "--overwrite true" in err
    other = save_model(short_answer_model(seed=1), tmp_path / "other.pt")
    assert eval_cli.main(eval_args(other, tasks, out, "--limit", "1")) == 2
    assert "checkpoint_sha256" in capsys.readouterr().err
    assert eval_cli.main(eval_args(ckpt, tasks, out, "--limit", "1", "--views", "1", "--overwrite", "true")) == 0
    assert read(out / "results.json")["run"]["settings"]["solve"]["views"] == 1


def test_an_unusable_out_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("the model was loaded before --out was checked"))
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    for out, message in ((a_file, "exists and is not a directory"), (a_file / "sub", "cannot write there")):
        assert eval_cli.main(["--ckpt", str(tmp_path / "m.pt"), "--out", str(out)]) == 2
        assert f"eval.py: error: --out {out}: {message}" in capsys.readouterr().err
        assert eval_cli.main(["--submission", str(tmp_path / "s.json"), "--out", str(out)]) == 2
        assert f"--out {out}: {message}" in capsys.readouterr().err
    assert a_file.read_text() == "keep me"


@pytest.mark.parametrize("flags, message", [
    (["--limit", "-1"], "--limit must be >= 0, got -1"),
    (["--sample", "0"], "--sample must be >= 1, got 0"),
    (["--report_limit", "-2"], "--report_limit must be >= 0, got -2"),
    (["--samples", "0"], "--samples must be >= 1 (decodes per view), got 0"),
    (["--samples", "3"], "--samples > 1 needs --temperature > 0"),
    (["--temperature", "-1"], "--temperature must be >= 0 (0 = greedy), got -1.0"),
    (["--temperature", "nan"], "--temperature must be >= 0"),
    (["--views", "0"], "--views must be >= 1, got 0"),
    (["--ttt_steps", "-3"], "--ttt_steps must be >= 0"),
    (["--tasks", ","], "--tasks: no task ids"),
    ([], "--out is required"),
])
def test_bad_flags_are_refused_with_the_flag_named(flags, message, tmp_path, capsys):
    out = [] if not flags else ["--out", str(tmp_path / "o")]
    assert eval_cli.main(["--ckpt", "missing.pt", *out, *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_exactly_one_of_ckpt_or_submission(tmp_path, capsys):
    assert eval_cli.main(["--out", str(tmp_path)]) == 2
    assert eval_cli.main(["--ckpt", "a", "--submission", "b", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("give exactly one of --ckpt or --submission") == 2


def test_flags_come_from_the_config_dataclasses():
    cfgs = eval_cli.parse_args(["--ckpt", "c", "--out", "o"])
    assert cfgs == (EvalConfig(ckpt="c", out="o"), SolveConfig(), TTTConfig())
    cfgs = eval_cli.parse_args(["--ckpt", "c", "--out", "o", "--seed", "5", "--views", "3", "--ttt_steps", "4",
                                "--colour_views", "false", "--skip_bad", "true", "--split", "train"])
    assert cfgs == (EvalConfig(ckpt="c", out="o", seed=5, skip_bad=True, split="train"),
                    SolveConfig(seed=5, views=3, colour_views=False), TTTConfig(seed=5, ttt_steps=4))
    _, solve_cfg, ttt_cfg = eval_cli.parse_args(["--ckpt", "c", "--out", "o", "--dtype", "bfloat16"])
    assert solve_cfg.dtype == ttt_cfg.dtype == "bfloat16"  # one --dtype for decoding and test-time training
    dests = {a.dest for a in eval_cli.build_parser()._actions}
    for cls in (EvalConfig, SolveConfig, TTTConfig):
        assert {f.name for f in dataclasses.fields(cls)} <= dests, cls
    source = (ROOT / "eval.py").read_text()
    assert "default=" not in source and "add_argument(" not in source  # no flag written by hand


def test_nothing_scored_says_not_scored_and_writes_null(tmp_path, capsys):
    """--limit 0, and a Kaggle challenges file without its solutions."""
    challenges = {t.id: {"train": [{"input": p.input.tolist(), "output": p.output.tolist()} for p in t.train],
                         "test": [{"input": p.input.tolist()} for p in t.test]} for t in load_tasks("arc1", "eval")[:3]}
    kaggle = tmp_path / "x_evaluation_challenges.json"
    kaggle.write_text(json.dumps(challenges))
    sub = tmp_path / "sub.json"
    sub.write_text(json.dumps({tid: [{"attempt_1": [[1]], "attempt_2": [[2]]}] for tid in challenges}))
    for name, more in (("limit0", ["--limit", "0"]), ("kaggle", ["--data", str(kaggle)])):
        assert eval_cli.main(["--submission", str(sub), "--out", str(tmp_path / name), *more]) == 0
        assert capsys.readouterr().out.startswith("not scored (no task with known test outputs)")
        results = read(tmp_path / name / "results.json")
        assert results["score"] is None and results["pass_at_1"] is None and results["tasks_scored"] == 0
    assert read(tmp_path / "kaggle" / "results.json")["unscored"] == sorted(challenges)


def test_a_binary_submission_names_the_file(tmp_path, capsys):
    (tmp_path / "sub.json").write_bytes(b"\xff\xfe{\x00")
    assert eval_cli.main(["--submission", str(tmp_path / "sub.json"), "--out", str(tmp_path / "o")]) == 2
    assert f"eval.py: error: {tmp_path / 'sub.json'}: not a JSON text file" in capsys.readouterr().err


def test_skip_bad_evaluates_the_valid_tasks_and_lists_the_others(small, tmp_path, capsys):
    ckpt, tasks = small
    (tasks / "zbad.json").write_text(json.dumps({"train": [{"input": [[1, 2], [3]], "output": [[1]]}],
                                                 "test": [{"input": [[1]], "output": [[1]]}]}))
    assert eval_cli.main(eval_args(ckpt, tasks, tmp_path / "o")) == 2
    assert "zbad.json" in capsys.readouterr().err
    assert eval_cli.main(eval_args(ckpt, tasks, tmp_path / "o", "--skip_bad", "true")) == 0
    results = read(tmp_path / "o" / "results.json")
    assert sorted(results["tasks"]) == [f"task{k:02d}" for k in range(5)]
    (skipped,) = results["run"]["skipped"]
    assert skipped["task_id"] == "zbad" and skipped["file"].endswith("zbad.json") and "ragged" in skipped["reason"]
    assert "zbad" in (tmp_path / "o" / "report.html").read_text()


def test_tasks_the_checkpoint_was_trained_on_are_warned_about_and_marked(tmp_path, capsys):
    folder = tmp_path / "tasks"
    write_tasks(folder)
    trained = [t for t in load_tasks(str(folder), "eval") if t.id in ("task01", "task03")]
    ckpt = save_model(short_answer_model(), tmp_path / "m.pt",
                      train_fingerprints=sorted(task_fingerprint(t) for t in trained) + ["0" * 64])
    assert eval_cli.main(eval_args(ckpt, folder, tmp_path / "o")) == 0
    assert "2 evaluated task(s) were trained on by this checkpoint (same content): task01, task03" in capsys.readouterr().err
    results = read(tmp_path / "o" / "results.json")
    assert results["run"]["seen_in_training"] == ["task01", "task03"]
    assert [t for t, e in results["tasks"].items() if e["info"]["seen_in_training"]] == ["task01", "task03"]
    html = (tmp_path / "o" / "report.html").read_text()
    assert html.count('<span class="seen">seen in training</span>') == 4  # two table rows, two sections
    # a checkpoint without the record (older ones) marks nothing
    plain = save_model(short_answer_model(), tmp_path / "plain.pt")
    assert eval_cli.main(eval_args(plain, folder, tmp_path / "p")) == 0
    assert read(tmp_path / "p" / "results.json")["run"]["seen_in_training"] == []


def test_sample_is_a_fixed_random_subset_named_in_results(small, tmp_path):
    ids = [t.id for t in load_tasks("arc1", "eval")]
    five = sample_ids(ids, 5, seed=0)
    assert five == ["20818e16", "358ba94e", "575b1a71", "85fa5666", "c1990cce"]  # fixed: figures quoted stay reproducible
    assert sample_ids(list(reversed(ids)), 5, seed=0) == five  # not the order the source lists them in
    assert set(five) <= set(sample_ids(ids, 40, seed=0))  # a larger sample extends a smaller one
    assert sample_ids(ids, 5, seed=1) != five
    with pytest.raises(ValueError, match="--sample 401: only 400 tasks"):
        sample_ids(ids, 401, seed=0)
    tasks = load_tasks("arc1", "eval")
    chosen, record = select_tasks(tasks, sample=5, seed=0, limit=2)
    assert [t.id for t in chosen] == five[:2] and record == {"n": 5, "seed": 0, "ids": five}

    ckpt, folder = small
    assert eval_cli.main(eval_args(ckpt, folder, tmp_path / "o", "--sample", "3", "--seed", "4")) == 0
    results = read(tmp_path / "o" / "results.json")
    expected = sample_ids([f"task{k:02d}" for k in range(5)], 3, seed=4)
    assert results["run"]["sample"] == {"n": 3, "seed": 4, "ids": expected}
    assert list(results["tasks"]) == expected
    assert "3 tasks drawn at random with seed 4" in (tmp_path / "o" / "report.html").read_text()


# ---- --data: every form arc.sources reads ------------------------------------------------------


def test_data_synthetic_is_evaluated_with_a_model(tmp_path):
    ckpt = save_model(short_answer_model(), tmp_path / "m.pt")
    out = tmp_path / "o"
    assert eval_cli.main(["--ckpt", str(ckpt), "--data", "synthetic:6", "--limit", "2", "--views", "1", "--out", str(out),
                          "--progress", "false"]) == 0
    results = read(out / "results.json")
    assert list(results["tasks"]) == ["syn-flip_h-1-0", "syn-flip_v-1-1"]  # the eval split's generator seed: --seed + 1
    assert results["tasks_scored"] == 2 and results["run"]["source"] == "6 synthetic tasks (seed 1)"


def test_data_arc1_arc2_combined_keeps_each_content_once(tmp_path):
    """arc1,arc2 eval: 400 + 120 tasks, 6 of ARC-AGI-2's with the content of an ARC-AGI-1 task."""
    truth = {t.id: [{"attempt_1": p.output.tolist(), "attempt_2": [[0]]} for p in t.test]
             for spec in ("arc1", "arc2") for t in load_tasks(spec, "eval")}
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    out = tmp_path / "o"
    assert eval_cli.main(["--submission", str(tmp_path / "truth.json"), "--data", "arc1,arc2", "--out", str(out)]) == 0
    results = read(out / "results.json")
    assert (len(results["tasks"]), results["tasks_scored"], results["score"]) == (514, 514, 1.0)
    dropped = results["run"]["duplicates"]
    assert len(dropped) == 6 and ["0934a4d8", "0934a4d8"] in dropped
    assert "6 duplicates dropped (same content)" in (out / "report.html").read_text()


def test_outputs_are_created_with_the_users_umask(small, tmp_path):
    ckpt, tasks = small
    old = os.umask(0o022)
    try:
        assert eval_cli.main(eval_args(ckpt, tasks, tmp_path / "o", "--limit", "1")) == 0
    finally:
        os.umask(old)
    names = ["submission.json", "results.json", "report.html", JOURNAL]
    assert {n: stat.S_IMODE((tmp_path / "o" / n).stat().st_mode) for n in names} == {n: 0o644 for n in names}
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == sorted(names)  # no temporary left behind


# ---- decoding's --dtype (issue 12: decoding uses training's bf16 fast path) -----------------------


def arc_prompts(n: int) -> list:
    """The test prompts of the first n ARC-AGI-1 evaluation tasks with short demonstrations."""
    tasks = [t for t in load_tasks("arc1", "eval") if sum(p.input.size + p.output.size for p in t.train) < 600][:n]
    return [encode_prompt(t.demos, t.test[0].input, block_size=2048) for t in tasks]


def test_float32_decoding_is_the_path_without_autocast_bit_for_bit(monkeypatch):
    """--dtype float32 is the decoder as it was before --dtype: no autocast, the head as forward computes it;
    the same ids and the same mean log-probabilities, float for float."""
    torch.manual_seed(0)
    model = HybridLM(tiny()).eval()
    prompts = arc_prompts(4)
    new = decode(model, prompts, CPU, max_new_tokens=40, dtype="float32")
    monkeypatch.setattr(solve, "autocast_for", lambda dtype, device: contextlib.nullcontext())
    monkeypatch.setattr(HybridLM, "_next_logits", lambda self, x: self.lm_head(self.norm_f(x)).float())
    assert decode(model, prompts, CPU, max_new_tokens=40) == new


def test_bf16_decoding_writes_the_same_tokens_as_float32_on_random_weights():
    """12 ARC prompts, 40 tokens each, the tiny model at its random init (near-equal logits: the hard
    case for bf16): the same tokens; mean log-probabilities within 0.01."""
    torch.manual_seed(0)
    model = HybridLM(tiny()).eval()
    prompts = arc_prompts(12)
    f32 = decode(model, prompts, CPU, max_new_tokens=40, dtype="float32")
    bf16 = decode(model, prompts, CPU, max_new_tokens=40, dtype="bfloat16")
    assert [ids for ids, _ in bf16] == [ids for ids, _ in f32]
    assert [lp for _, lp in bf16] == pytest.approx([lp for _, lp in f32], abs=1e-2)


def _same_or_near_tie(model, prompts, got, want, gap=0.05):
    """Each prompt's decoded ids ``got`` equal ``want``, or first part where the float32 model gives
    the two tokens log-probabilities within ``gap`` of each other: a near-tie, which the rounding of
    another dtype or path may tip (how bf16 rounds differs from CPU to CPU: AMX against AVX-512-BF16).
    Returns the gaps found at such partings."""
    from arc.tokens import layout_positions
    gaps = []
    for prompt, a, b in zip(prompts, got, want):
        if a == b:
            continue
        i = next(k for k, (x, y) in enumerate(zip(a, b)) if x != y)  # both end at EOO, so they part somewhere
        ids = np.concatenate([prompt.ids, b[:i]])
        with torch.no_grad():
            logits = model(torch.as_tensor(ids)[None], pos=torch.as_tensor(layout_positions(ids)[0])[None])[0][0, -1]
        lp = torch.log_softmax(logits.float(), dim=-1)
        gaps.append(abs(float(lp[a[i]] - lp[b[i]])))
        assert gaps[-1] < gap, f"token {i} of an answer: {a[i]} against {b[i]}, log-probabilities {gaps[-1]:.3f} apart"
    return gaps


def test_bf16_decoding_writes_the_same_grids_as_float32_after_fine_tuning():
    """The tiny model fine-tuned for 60 steps (test-time training, float32) on a flip task's
    demonstrations (loss 2.77 -> 1.75: it writes grids of the right width, not yet the rule), then its
    test input decoded under all 8 views in both dtypes: the same tokens, view for view (or a
    parting at a near-tie, below). A fully
    trained checkpoint's parity is measured by bench/bench_decode.py solve --dtypes (docs/BENCHMARKS.md 6).

    The fixture is one particular model, so it is fitted on one fixed path (the reference twin): the
    C++ CPU ops round differently in the last bits, and 60 steps at lr 1e-2 turn that into a model
    with a near-tie where bf16 flips a token on either path (measured). Decoding itself is then run
    on both paths, which must agree token for token in both dtypes. Where bf16 parts from float32 it
    must be at a near-tie of the float32 model (log-probabilities within 0.05): on a CPU whose bf16
    units round unlike the one this fixture was measured on (AVX-512-BF16 without AMX), view 3 of 8
    parts from float32 at such a tie (0.0009 apart)."""
    rng = np.random.default_rng(3)
    grids = [rng.integers(0, 10, size=(3, 4)) for _ in range(5)]
    task = Task("flip", tuple(Pair(g, np.fliplr(g)) for g in grids[:4]), (Pair(grids[4], np.fliplr(grids[4])),))
    torch.manual_seed(0)
    model = HybridLM(tiny())
    with kernels.reference_path():
        TaskFineTuner(model, TTTConfig(ttt_steps=60, ttt_batch=4, ttt_lr=1e-2, dtype="float32")).fit(task, CPU)
    model.eval()
    prompts = []
    for view in augment.views(8):
        seen = view.apply_task(task)
        prompts.append(encode_prompt(seen.demos, seen.test[0].input))
    f32 = [ids for ids, _ in decode(model, prompts, CPU, dtype="float32")]
    bf16 = [ids for ids, _ in decode(model, prompts, CPU, dtype="bfloat16")]
    _same_or_near_tie(model, prompts, bf16, f32)
    assert sum(a == b for a, b in zip(bf16, f32)) >= 6  # a tie or two, not a different model
    with kernels.reference_path():
        assert [ids for ids, _ in decode(model, prompts, CPU, dtype="float32")] == f32
        _same_or_near_tie(model, prompts, [ids for ids, _ in decode(model, prompts, CPU, dtype="bfloat16")], bf16)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "auto"])
def test_eval_records_the_resolved_dtype_and_answers_alike_in_each(small, tmp_path, dtype):
    ckpt, tasks = small
    assert eval_cli.main(eval_args(ckpt, tasks, tmp_path / dtype, "--dtype", dtype)) == 0
    results = read(tmp_path / dtype / "results.json")
    assert results["run"]["dtype"] == resolve_dtype(dtype, CPU) and results["run"]["settings"]["solve"]["dtype"] == dtype
    if dtype != "float32":
        assert eval_cli.main(eval_args(ckpt, tasks, tmp_path / "float32", "--dtype", "float32")) == 0
        assert read(tmp_path / dtype / "submission.json") == read(tmp_path / "float32" / "submission.json")


def test_an_unknown_dtype_is_refused_with_the_flag_named():
    with pytest.raises(ValueError, match="--dtype must be one of"):
        SolveConfig(dtype="float16")
    with pytest.raises(ValueError, match="--dtype must be one of"):
        TTTConfig(dtype="half")


def test_product_selection_end_to_end_records_what_every_rule_scores(tmp_path):
    """The ten-fold task (ten 1x1 answers to one input) with the search on: results.json's score is
    the submission's and the chosen rule's, each rule's figure is what its picks score, and a
    --select product run without search scores by its vote rule exactly what --select vote scores."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    grid = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    demos = [{"input": grid, "output": [[c]]} for c in (3, 5)]
    (folder / "tenfold.json").write_text(json.dumps({"train": demos, "test": [{"input": grid, "output": [[c]]} for c in range(10)]}))
    write_tasks(folder, n=2)
    tasks = load_tasks(str(folder), "eval")
    ckpt = save_model(short_answer_model(), tmp_path / "m.pt")

    assert eval_cli.main(eval_args(ckpt, folder, tmp_path / "both", "--views", "4", "--select", "both", "--search", "0.02")) == 0
    results = check_score_is_the_submissions(tmp_path / "both", tasks)
    by = results["run"]["by_select"]
    assert set(by) == {"vote", "product", "both"} and by["both"]["score"] == pytest.approx(results["score"])
    tests = results["tasks"]["tenfold"]["tests"]
    assert all(t["info"]["search"]["tokens"] > 0 and len(t["info"]["score_views"]) == 4 for t in tests)
    assert max(len(t["info"]["ballots"]) for t in tests) > 1  # the search found more than the greedy grid
    for rule in by:
        per_task = [sum(any(t["info"]["correct_by"][rule]) for t in e["tests"]) / len(e["tests"]) for e in results["tasks"].values()]
        assert by[rule]["score"] == pytest.approx(sum(per_task) / len(per_task))
    assert "candidates, best first by --select both" in (tmp_path / "both" / "report.html").read_text()

    assert eval_cli.main(eval_args(ckpt, folder, tmp_path / "vote")) == 0
    assert eval_cli.main(eval_args(ckpt, folder, tmp_path / "product", "--select", "product")) == 0
    vote, product = read(tmp_path / "vote" / "results.json"), read(tmp_path / "product" / "results.json")
    assert product["run"]["by_select"]["vote"]["score"] == pytest.approx(vote["score"])
    assert product["run"]["by_select"]["product"]["score"] == pytest.approx(product["score"])
