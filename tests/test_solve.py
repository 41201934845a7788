"""The solver without a trained model: constrained decoding, views and their inversion, voting.

Stand-in models implement the solver's model interface (cfg.max_seq_len, prefill / step /
cache.select), so these tests check the solver's own logic: what a model says is fed through exactly
as a real one's is.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from arc import augment
from arc.data import Pair, Task
from arc.solve import SolveConfig, decode, solve_task, solve_tasks, submission_of
from arc.tokens import EOO, IN, OUT, PAD, ROW, VOCAB_SIZE, decode_grid, encode_prompt, grid_tokens

CPU = torch.device("cpu")


class _Cache:
    def __init__(self, keys):
        self.keys = list(keys)
        self.pos = [0] * len(keys)

    def select(self, index):
        idx = index.tolist()
        self.keys = [self.keys[i] for i in idx]
        self.pos = [self.pos[i] for i in idx]


class ScriptedModel(torch.nn.Module):
    """Emits, after each prompt, the token list ``script(prompt_ids)``; random logits elsewhere."""

    def __init__(self, script, noise: float = 0.0, seed: int = 0, max_seq_len: int = 4096):
        super().__init__()
        self.cfg = SimpleNamespace(max_seq_len=max_seq_len)
        self.seen_prompts: list[np.ndarray] = []
        self.script = script
        self.noise = noise
        self.gen = torch.Generator().manual_seed(seed)

    def _logits(self, cache):
        out = torch.randn(len(cache.keys), VOCAB_SIZE, generator=self.gen) * self.noise
        for r, (key, pos) in enumerate(zip(cache.keys, cache.pos)):
            wanted = key[pos] if pos < len(key) else PAD
            out[r, wanted] += 10.0
        return out

    def prefill(self, prompts, max_new_tokens, positions=None):
        assert max(len(p) for p in prompts) + max_new_tokens <= self.cfg.max_seq_len
        self.seen_prompts += [p.numpy() for p in prompts]
        cache = _Cache([self.script(p.numpy()) for p in prompts])
        return cache, self._logits(cache)

    def step(self, tokens, cache, pos=None):
        cache.pos = [p + 1 for p in cache.pos]
        return self._logits(cache)


def make_task(seed: int = 0) -> Task:
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(4):
        g = rng.integers(0, 10, size=(int(rng.integers(2, 6)), int(rng.integers(2, 6))))
        pairs.append(Pair(g, np.fliplr(g) % 7))
    return Task("tflip", tuple(pairs[:3]), (pairs[3],))


def test_decoder_never_emits_an_ill_formed_grid_even_when_the_model_wants_to():
    """A model that prefers structural garbage (PAD, IN, OUT, early EOO, ragged rows) still yields grids."""
    rng = np.random.default_rng(0)

    def garbage(prompt):
        return list(rng.choice([PAD, IN, OUT, EOO, ROW, 1, 2], size=1000))

    model = ScriptedModel(garbage, noise=3.0)
    prompts = [encode_prompt(make_task(s).demos, make_task(s).test[0].input) for s in range(6)]
    for temperature in (0.0, 1.0):
        for ids, mean_lp in decode(model, prompts, CPU, temperature=temperature, generator=torch.Generator().manual_seed(1)):
            out = decode_grid(ids)
            assert out.ok, out.reason
            assert ids[-1] == EOO and np.isfinite(mean_lp)


def test_decoder_caps_grids_at_30_by_30():
    model = ScriptedModel(lambda p: [1] * 5000)  # never ends a row on its own
    (ids, _), = decode(model, [encode_prompt(make_task(0).demos, make_task(0).test[0].input)], CPU)
    grid = decode_grid(ids).grid
    assert grid.shape == (30, 30)


def test_a_small_model_gets_prompts_that_fit_and_answers_that_end_within_its_length():
    """max_seq_len 120: demonstrations are dropped until the prompt leaves room, and a model that never
    stops writing still ends its grid within what is left."""
    task = make_task(5)
    model = ScriptedModel(lambda p: [3] * 5000, max_seq_len=120)
    pred = solve_task(model, task, SolveConfig(views=1), CPU)
    (prompt,) = model.seen_prompts
    full = encode_prompt(task.demos, task.test[0].input)
    assert len(prompt) < len(full.ids) and prompt[-1] == OUT  # demonstrations were dropped
    (test,) = pred.tests
    generated = pred.generated_tokens
    assert len(prompt) + generated <= 120 and test.attempt_1.size > 1 and (test.attempt_1 == 3).all()


def test_a_test_that_cannot_fit_the_model_is_reported_and_the_run_goes_on():
    big = Task("big", (Pair(np.ones((30, 30), int), np.ones((30, 30), int)),), (Pair(np.ones((30, 30), int), np.ones((2, 2), int)),))
    small = make_task(6)
    model = ScriptedModel(lambda p: [7, ROW, EOO], max_seq_len=400)
    preds = solve_tasks(model, [big, small], SolveConfig(views=2), device=CPU, progress=False)
    (test,) = preds[0].tests
    assert test.info["placeholder"] and test.correct == [False, False]
    reasons = {m["reason"] for m in test.info["malformed"]}
    assert reasons == {"prompt does not fit the model's max_seq_len 400: needs 2399 more tokens than the block allows "
                       "even with one demonstration and a 1x1 answer"}
    assert preds[1].tests[0].attempt_1.tolist() == [[7]]  # the next task was solved as usual


def test_views_are_inverted_before_voting_so_an_oracle_wins_every_vote():
    task = make_task(3)
    truth = task.test[0].output
    views = augment.views(8)
    answer = {}
    for v in views:  # what the model should write for each view's prompt: the view's own truth
        seen = v.apply_task(task)
        key = encode_prompt(seen.demos, seen.test[0].input).ids.tobytes()  # what the solver will send
        answer[key] = list(np.append(grid_tokens(seen.test[0].output), EOO))

    model = ScriptedModel(lambda p: answer[p.astype(np.int64).tobytes()])
    pred = solve_task(model, task, SolveConfig(views=8, batch=3), CPU)
    (test,) = pred.tests
    np.testing.assert_array_equal(test.attempt_1, truth)
    assert test.info["votes"] == [8] and test.correct == [True, True]
    assert pred.correct == [True]


def test_a_model_that_ignores_the_view_is_outvoted_into_second_place():
    """Predicting one fixed grid in every view's frame gives 8 different grids after inversion."""
    task = make_task(4)
    fixed = np.array([[1, 2, 3], [4, 5, 6]])
    model = ScriptedModel(lambda p: list(np.append(grid_tokens(fixed), EOO)))
    pred = solve_task(model, task, SolveConfig(views=8), CPU)
    (test,) = pred.tests
    assert sum(test.info["votes"]) == 8 and max(test.info["votes"]) == 1
    assert not np.array_equal(test.attempt_1, test.attempt_2)


def test_submission_has_both_attempts_for_every_test_input():
    task = Task("two", make_task(1).train, make_task(1).test + make_task(2).test)
    model = ScriptedModel(lambda p: [7, ROW, EOO])
    preds = [solve_task(model, task, SolveConfig(views=2), CPU)]
    sub = submission_of(preds)
    assert list(sub) == ["two"] and len(sub["two"]) == 2
    assert all(set(e) == {"attempt_1", "attempt_2"} and e["attempt_1"] == [[7]] for e in sub["two"])


@pytest.mark.parametrize("options", [{}, dict(grid_pos=True, align_input=True, rope="grid"),
                                     dict(grid_pos=True, align_input=True, align_maps=True, map_agree=True, rope="dihedral"),
                                     dict(grid_pos=True, align_input=True, align_maps=True, map_agree=True, map_gate=4.0,
                                          rope="dihedral"),
                                     dict(grid_pos=True, align_input=True, rope="mirror", mamba_scan="rc")])
def test_teacher_forced_exact_is_greedy_decoding_in_one_pass(options):
    """What greedy decoding writes reads as exact under teacher forcing; any other grid does not."""
    from arc.model import HybridLM, preset
    from arc.solve import teacher_forced

    torch.manual_seed(0)
    model = HybridLM(preset("tiny", **options)).eval()
    tasks = [make_task(s) for s in range(5)]
    prompts = [encode_prompt(t.demos, t.test[0].input, block_size=model.cfg.max_seq_len) for t in tasks]
    greedy = [decode_grid(ids).grid for ids, _ in decode(model, prompts, CPU)]
    forced = teacher_forced(model, prompts, greedy, CPU, batch=2)
    assert all(f.exact and f.correct_tokens == f.tokens == g.size + g.shape[0] + 1 for f, g in zip(forced, greedy))
    assert all(np.isfinite(f.logprob) and f.logprob <= 0 for f in forced)
    other = [np.where(g == 0, 1, 0) for g in greedy]  # every cell changed
    assert not any(f.exact for f in teacher_forced(model, prompts, other, CPU))


def test_teacher_forced_gives_the_same_scores_in_pieces_of_any_size(monkeypatch):
    """The forward runs consecutive sequences together up to arc.model.PREFILL_TOKENS tokens: one
    sequence a piece, a few, or the whole batch read the same scores."""
    import arc.model as model_module
    from arc.model import HybridLM, preset
    from arc.solve import teacher_forced

    torch.manual_seed(0)
    model = HybridLM(preset("tiny", grid_pos=True, align_input=True, rope="mirror")).eval()
    tasks = [make_task(s) for s in range(6)]
    prompts = [encode_prompt(t.demos, t.test[0].input, block_size=model.cfg.max_seq_len) for t in tasks]
    answers = [t.test[0].output for t in tasks]
    runs = []
    for piece in (1, 2 * max(len(p.ids) for p in prompts), 10**9):
        monkeypatch.setattr(model_module, "PREFILL_TOKENS", piece)
        runs.append(teacher_forced(model, prompts, answers, CPU, batch=4))
    for run in runs[1:]:
        assert [(f.exact, f.correct_tokens, f.tokens) for f in run] == [(f.exact, f.correct_tokens, f.tokens) for f in runs[0]]
        np.testing.assert_allclose([f.logprob for f in run], [f.logprob for f in runs[0]], rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype, autocast", [("float32", None), ("bfloat16", torch.bfloat16)])
def test_the_solver_runs_prefill_and_every_step_under_its_dtype(dtype, autocast):
    """SolveConfig.dtype reaches the model: bf16 autocast around the prefill and each step, none for float32."""
    seen = []

    class Recording(ScriptedModel):
        def _logits(self, cache):
            on = torch.is_autocast_enabled("cpu")
            seen.append(torch.get_autocast_dtype("cpu") if on else None)
            return super()._logits(cache)

    model = Recording(lambda p: [3, 4, ROW, 5, 6, ROW, EOO])
    pred = solve_task(model, make_task(0), SolveConfig(views=2, dtype=dtype), CPU)
    assert pred.tests[0].attempt_1.tolist() == [[3, 4], [5, 6]]
    assert len(seen) > 2 and set(seen) == {autocast}


def test_answer_layouts_of_a_batch_are_each_answers_alone():
    """One tracker walking answers of different lengths together gives each one's tokens, positions
    and grammar masks as a tracker of its own does (finished rows must not disturb the others)."""
    from arc.solve import answer_layouts

    tasks = [make_task(s) for s in range(3)]
    prompts = [encode_prompt(t.demos, t.test[0].input) for t in tasks]
    answers = [np.ones((1, 1), dtype=np.int64), np.arange(12).reshape(3, 4) % 10, np.zeros((5, 2), dtype=np.int64)]
    budgets = [40, 40, 12]  # the last answer (5 x 3 + 1 = 16 tokens) does not fit its budget: masked out at the end
    together = answer_layouts(prompts, answers, budgets, VOCAB_SIZE)
    for i in range(3):
        (alone,) = answer_layouts(prompts[i:i + 1], answers[i:i + 1], budgets[i:i + 1], VOCAB_SIZE)
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(alone, together[i]))
    tail, pos, mask = together[2]
    assert len(tail) == 16 and pos.shape == (16, pos.shape[1]) and mask.shape == (16, VOCAB_SIZE)
    assert not mask[np.arange(16), torch.as_tensor(tail)].all()  # the grammar refuses what cannot end in 12 tokens


def oracle_for(tasks, views):
    """A scripted model that writes, after each view's prompt of each task, that view's true output."""
    answer = {}
    for task in tasks:
        for v in views:
            seen = v.apply_task(task)
            for test in seen.test:
                answer[encode_prompt(seen.demos, test.input).ids.tobytes()] = list(np.append(grid_tokens(test.output), EOO))
    return ScriptedModel(lambda p: answer[p.astype(np.int64).tobytes()])


def test_tasks_decoded_together_each_get_their_own_answers():
    """--group: the prompts of several tasks share decoding batches (here 5 prompts a batch, so
    batches straddle tasks); every answer goes back to its own task, view and test input."""
    tasks = [Task(f"t{s}", make_task(s).train, make_task(s).test) for s in range(5)]
    tasks[2] = Task("two_tests", tasks[2].train, tasks[2].test + make_task(9).test)
    model = oracle_for(tasks, augment.views(4))
    alone = solve_tasks(model, tasks, SolveConfig(views=4, batch=5, group=1), device=CPU, progress=False)
    together = solve_tasks(model, tasks, SolveConfig(views=4, batch=5, group=3), device=CPU, progress=False)
    assert [p.task_id for p in together] == [t.id for t in tasks]
    for task, a, b in zip(tasks, alone, together):
        assert [t.correct for t in b.tests] == [[True, True]] * len(task.test)
        assert all(t.info["votes"] == [4] for t in b.tests)
        assert b.generated_tokens == a.generated_tokens > 0
        assert b.timings["decode"] >= 0 and b.seconds >= b.timings["decode"] - 1e-3  # timings are rounded to 1 ms


def test_a_real_model_writes_the_same_grids_whatever_the_grouping():
    """A random-weight 2D model in float32: grouping tasks changes which prompts share a batch, not
    what each one decodes to."""
    from arc.model import GRID_2D, HybridLM, preset

    torch.manual_seed(0)
    model = HybridLM(preset("tiny", max_seq_len=1024, **GRID_2D)).eval()
    tasks = [Task(f"t{s}", make_task(s).train, make_task(s).test) for s in range(6)]
    runs = [solve_tasks(model, tasks, SolveConfig(views=4, group=g, batch=b, dtype="float32"), device=CPU, progress=False)
            for g, b in ((1, 16), (6, 16), (4, 7))]
    first = submission_of(runs[0])
    assert len(first) == 6 and len({str(e) for e in first.values()}) > 1  # six tasks, not all answered alike
    for preds in runs[1:]:
        assert submission_of(preds) == first
        assert [p.generated_tokens for p in preds] == [p.generated_tokens for p in runs[0]]


def test_sampling_and_test_time_training_solve_one_task_at_a_time():
    """A sampled task keeps its own random stream whatever --group says: the same samples alone or
    among others."""
    assert SolveConfig(group=4).tasks_together() == 4
    assert SolveConfig(group=4).tasks_together(adapting=True) == 1
    assert SolveConfig(group=4, temperature=1.0).tasks_together() == 1
    model = ScriptedModel(lambda p: [PAD] * 5000)  # PAD is never allowed: every allowed token equally likely
    tasks = [Task(f"t{s}", make_task(s).train, make_task(s).test) for s in range(3)]
    cfg = SolveConfig(views=2, group=4, temperature=1.0, seed=3)
    together = submission_of(solve_tasks(model, tasks, cfg, device=CPU, progress=False))
    last_alone = submission_of(solve_tasks(model, tasks[2:], cfg, device=CPU, progress=False))
    assert together["t2"] == last_alone["t2"]


def test_layout_guesses_the_input_cell_under_the_cursor_then_the_row_above():
    """The speculative decoder's drafts: an input cell, ROW at the input's (or the output's) width,
    EOO after the input's last row; past the input's rows the token one output row up; none once done."""
    from arc.tokens import LayoutTracker

    demo = (np.array([[1, 2]]), np.array([[3, 4]]))
    inp = np.array([[5, 6, 7], [8, 9, 0]])
    prompt = encode_prompt([demo], inp).ids
    ids = torch.full((1, len(prompt) + 40), PAD)
    ids[0, :len(prompt)] = torch.as_tensor(prompt)
    layout = LayoutTracker([prompt], [40])

    def write(tokens):
        guesses = []
        for t in tokens:
            guesses.append(int(layout.guess(ids)[0]))
            ids[0, layout.at] = t
            layout.advance(torch.tensor([t]))
        return guesses

    # a copy of the input: every guess right, ending with EOO
    assert write([5, 6, 7, ROW, 8, 9, 0, ROW]) == [5, 6, 7, ROW, 8, 9, 0, ROW]
    assert int(layout.guess(ids)[0]) == EOO
    # a taller output: past the input's rows the guess is the row above
    assert write([1]) == [EOO]
    assert write([2, 3, ROW, 4]) == [9, 0, ROW, 1]  # row 2 under row 1 (8 9 0), row 3 under row 2 (1 2 3)
    assert write([2, 3, ROW, EOO]) == [2, 3, ROW, 4]
    assert int(layout.guess(ids)[0]) == -1  # done
    # a narrower output: ROW where the first row ended
    layout = LayoutTracker([prompt], [40])
    assert write([5, ROW, 8]) == [5, 6, 8]
    assert int(layout.guess(ids)[0]) == ROW


def _greedy_truth(model, prompts):
    """Each prompt's greedy answer from one-token steps, keyed by the prompt's ids."""
    return {p.ids.tobytes(): ids for p, (ids, _) in zip(prompts, decode(model, prompts, CPU, dtype="float32"))}


@pytest.mark.parametrize("guesser", ["layout", "oracle", "every_third_wrong"])
def test_speculative_decoding_writes_the_greedy_grids(guesser, monkeypatch):
    """--draft: guesses checked in one extend give exactly the tokens (and log-probabilities, to
    rounding) of one step at a time, whether the guesses are the layout's own, always right (every
    draft kept: far fewer model calls than tokens) or wrong every third token (partial keeps)."""
    from arc.model import GRID_2D, HybridLM, preset
    from arc.tokens import LayoutTracker

    torch.manual_seed(0)
    model = HybridLM(preset("tiny", max_seq_len=1024, **GRID_2D)).eval()
    tasks = [make_task(s) for s in range(6)]
    prompts = [encode_prompt(t.demos, t.test[0].input, block_size=1024) for t in tasks]
    prompts += [encode_prompt(v.apply_task(tasks[0]).demos, v.apply_task(tasks[0]).test[0].input, block_size=1024)
                for v in augment.views(8)[1:4]]
    reference = decode(model, prompts, CPU, dtype="float32")
    truth = _greedy_truth(model, prompts)
    if guesser != "layout":
        def guess(self, ids):
            out = []
            for i in range(ids.shape[0]):
                length = int(self.in_start[i] + self.in_h[i] * (self.in_w[i] + 1) + 2)  # the prompt ends at OUT
                answer = truth[ids[i, :length].numpy().tobytes()]
                k = int(self.at[i]) - length
                right = answer[k] if k < len(answer) and not bool(self.done[i]) else -1
                wrong = guesser == "every_third_wrong" and k % 3 == 2 and right >= 0
                out.append((right + 1) % 10 if wrong and right < 10 else right)
            return torch.tensor(out)
        monkeypatch.setattr(LayoutTracker, "guess", guess)
    calls = {"step": 0, "extend": 0}
    for name in calls:
        real = getattr(model, name)
        monkeypatch.setattr(model, name, lambda *a, _real=real, _name=name, **k: calls.__setitem__(_name, calls[_name] + 1) or _real(*a, **k))
    for draft in (1, 4, 16):
        got = decode(model, prompts, CPU, dtype="float32", draft=draft)
        assert [ids for ids, _ in got] == [ids for ids, _ in reference]
        np.testing.assert_allclose([lp for _, lp in got], [lp for _, lp in reference], rtol=0, atol=1e-5)
    tokens = sum(len(ids) for ids, _ in reference)
    if guesser == "oracle":
        assert calls["extend"] > 0 and calls["step"] + calls["extend"] < 3 * max(len(ids) for ids, _ in reference)
    assert calls["extend"] > 0 or guesser == "layout"
    assert tokens > 50


def test_drafts_are_checked_only_where_the_guesses_have_been_right():
    """The verification length: a plain step (1) while no sequence's guesses are on a run of right
    ones; up to draft + 1 when all are on long runs; never more tokens than the cache has room for."""
    from arc.solve import _verify_length

    assert _verify_length(torch.zeros(8, dtype=torch.long), 16, 100) == 1
    assert _verify_length(torch.full((8,), 40), 16, 100) == 17
    assert _verify_length(torch.full((8,), 40), 16, 5) <= 6
    assert _verify_length(torch.full((8,), 40), 0, 100) == 1
    mixed = torch.tensor([0, 0, 0, 0, 0, 0, 0, 40])  # one sequence in 8 on a run does not pay for the rest
    assert _verify_length(mixed, 16, 100) == 1


def test_speculative_decoding_is_greedy_only_and_the_solver_passes_draft():
    """Sampling ignores --draft (a guess is checked against the argmax); the solver's grids do not
    depend on it; a negative draft is refused."""
    from arc.model import GRID_2D, HybridLM, preset

    torch.manual_seed(0)
    model = HybridLM(preset("tiny", max_seq_len=1024, **GRID_2D)).eval()
    tasks = [Task(f"t{s}", make_task(s).train, make_task(s).test) for s in range(3)]
    prompts = [encode_prompt(t.demos, t.test[0].input, block_size=1024) for t in tasks]
    sampled = [decode(model, prompts, CPU, temperature=1.0, generator=torch.Generator().manual_seed(2), draft=d)
               for d in (0, 8)]
    assert sampled[0] == sampled[1]
    runs = [submission_of(solve_tasks(model, tasks, SolveConfig(views=4, draft=d, dtype="float32"), device=CPU,
                                      progress=False)) for d in (0, 16)]
    assert runs[0] == runs[1]
    with pytest.raises(ValueError, match="--draft must be >= 0"):
        SolveConfig(draft=-1)


def test_a_group_needs_at_least_one_task():
    with pytest.raises(ValueError, match="--group must be >= 1"):
        SolveConfig(group=0)
