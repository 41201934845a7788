"""The token layout: encoding, targets, demonstration dropping and strict decoding."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import torch

from arc import tokens as tk


def grids(max_side: int = 30):
    return st.tuples(st.integers(1, max_side), st.integers(1, max_side), st.integers(0, 2**31 - 1)).map(
        lambda hws: np.random.default_rng(hws[2]).integers(0, 10, size=(hws[0], hws[1]))
    )


def test_vocabulary_is_small_and_pad_is_not_a_colour():
    structural = [tk.PAD, tk.ROW, tk.IN, tk.OUT, tk.EOO, tk.BOS]
    assert len(set(structural)) == 6
    assert all(t >= tk.N_COLOURS for t in structural)
    assert max(structural) < tk.VOCAB_SIZE <= 16


def test_layout_of_a_small_instance():
    demo = (np.array([[1, 2], [3, 4]]), np.array([[5]]))
    enc = tk.encode_instance([demo], np.array([[7]]), np.array([[8, 9]]))
    assert tk.render(enc.ids) == "BOS IN 1 2 ROW 3 4 ROW OUT 5 ROW EOO IN 7 ROW OUT 8 9 ROW EOO"


def test_targets_test_only_vs_all_outputs():
    demo = (np.array([[1]]), np.array([[2]]))
    test_in, test_out = np.array([[3]]), np.array([[4]])
    only_test = tk.encode_instance([demo, demo, demo], test_in, test_out, targets="test")
    outputs = tk.encode_instance([demo, demo, demo], test_in, test_out, targets="outputs")
    _, y_test = only_test.xy()
    _, y_out = outputs.xy()
    # 'test': the test output's rows and EOO: 4 ROW EOO
    assert [tk.token_name(t) for t in y_test[y_test != tk.IGNORE_INDEX]] == ["4", "ROW", "EOO"]
    # 'outputs': demonstrations 2 and 3 (not the first) plus the test output
    assert [tk.token_name(t) for t in y_out[y_out != tk.IGNORE_INDEX]] == ["2", "ROW", "EOO"] * 2 + ["4", "ROW", "EOO"]
    # y is x shifted by one wherever it is a target
    x, y = outputs.xy()
    assert np.all(y[y != tk.IGNORE_INDEX] == outputs.ids[1:][y != tk.IGNORE_INDEX])
    assert len(x) == len(y) == len(outputs.ids) - 1


def test_prompt_stops_after_the_test_output_marker():
    demo = (np.array([[1]]), np.array([[2]]))
    prompt = tk.encode_prompt([demo], np.array([[3, 3]]))
    assert tk.render(prompt.ids).endswith("IN 3 3 ROW OUT")


def test_longest_demonstrations_are_dropped_until_it_fits():
    small = (np.zeros((2, 2), int), np.zeros((2, 2), int))
    big = (np.zeros((30, 30), int), np.zeros((30, 30), int))
    test = (np.zeros((30, 30), int), np.zeros((30, 30), int))
    enc = tk.encode_instance([small, big, big, small], *test, block_size=4096)
    assert len(enc.ids) <= 4096
    # one big demo fits beside the big test pair, the second does not: the last-listed big one goes
    assert enc.demos_used == (0, 1, 3) and enc.demos_dropped == 1
    with pytest.raises(tk.DoesNotFit):
        tk.encode_instance([big], *test, block_size=2048)


def test_every_largest_case_fits_the_default_block():
    big = (np.zeros((30, 30), int), np.zeros((30, 30), int))
    assert len(tk.encode_instance([big] * 5, *big).ids) <= tk.BLOCK_SIZE
    # a prompt keeps room for the largest output grid
    assert len(tk.encode_prompt([big] * 5, big[0]).ids) + tk.MAX_GRID_TOKENS <= tk.BLOCK_SIZE


@settings(max_examples=60, deadline=None)
@given(grids())
def test_decode_inverts_grid_tokens(grid):
    ids = np.append(tk.grid_tokens(grid), tk.EOO)
    out = tk.decode_grid(ids)
    assert out.ok and out.reason is None
    np.testing.assert_array_equal(out.grid, grid)
    assert tk.grid_length(grid.shape) + 1 == len(ids)


@pytest.mark.parametrize(
    "ids, reason",
    [
        ([1, 2, tk.ROW, 3, tk.ROW, tk.EOO], "ragged"),
        ([1, 2, tk.ROW, 3, 4], "no EOO"),
        ([1, 2, tk.EOO], "unterminated"),
        ([tk.EOO], "before any row"),
        ([tk.ROW, tk.EOO], "empty row"),
        ([1, tk.PAD, tk.ROW, tk.EOO], "unexpected PAD"),
        ([1, tk.OUT, tk.ROW, tk.EOO], "unexpected OUT"),
        ([1] * 31 + [tk.ROW, tk.EOO], "longer than 30"),
        ([1, tk.ROW] * 31 + [tk.EOO], "more than 30 rows"),
    ],
)
def test_decode_reports_malformed_grids(ids, reason):
    out = tk.decode_grid(ids)
    assert not out.ok and out.grid is None
    assert reason in out.reason


def test_decode_ignores_tokens_after_eoo():
    out = tk.decode_grid([5, tk.ROW, tk.EOO, tk.PAD, 99])
    assert out.ok and out.grid.tolist() == [[5]]


def test_bad_targets_option_is_named():
    with pytest.raises(ValueError, match="targets"):
        tk.encode_instance([(np.zeros((1, 1)), np.zeros((1, 1)))], np.zeros((1, 1)), targets="all")


# ---- 2D positions and the grammar of a generated grid --------------------------------------------
def test_positions_of_every_token_kind_in_a_small_instance():
    demo = (np.array([[1, 2], [3, 4]]), np.array([[5]]))
    enc = tk.encode_instance([demo], np.array([[7]]), np.array([[8, 9]]))
    N, I, O = tk.NO_POS, tk.KIND_INPUT, tk.KIND_OUTPUT
    expected = [
        (N, N, tk.KIND_NONE, 0),  # BOS
        (N, N, I, 0), (0, 0, I, 0), (0, 1, I, 0), (0, 2, I, 0),  # IN 1 2 ROW
        (1, 0, I, 0), (1, 1, I, 0), (1, 2, I, 0),  # 3 4 ROW
        (N, N, O, 6),  # OUT: its successor fills (0, 0), the input's cell at index 2
        (0, 0, O, 6),  # 5: successor fills (0, 1) -> index 3
        (0, 1, O, 5),  # ROW ending row 0: successor fills (1, 0) -> index 5
        (N, N, O, 0),  # EOO
        (N, N, I, 0), (0, 0, I, 0), (0, 1, I, 0),  # IN 7 ROW
        (N, N, O, 2),  # OUT -> the 7 at index 13
        (0, 0, O, 0), (0, 1, O, 0), (0, 2, O, 0), (N, N, O, 0),  # 8 9 ROW EOO: outside the 1x1 input
    ]
    assert [tuple(p) for p in enc.pos.tolist()] == expected
    assert enc.x_pos().shape == (len(enc.ids) - 1, tk.N_POS)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(grids(8), grids(8)), min_size=1, max_size=4), grids(8), grids(8))
def test_encoder_parser_and_tracker_give_the_same_positions(demos, test_in, test_out):
    enc = tk.encode_instance(demos, test_in, test_out)
    parsed, _ = tk.layout_positions(enc.ids)  # from the ids alone
    assert np.array_equal(parsed, enc.pos)
    prompt = tk.encode_prompt(demos, test_in)
    assert np.array_equal(prompt.pos, enc.pos[: len(prompt.ids)])
    tracker = tk.LayoutTracker([prompt.ids], [10_000])
    for j in range(len(prompt.ids), len(enc.ids)):  # writing the test output token by token
        tok = torch.tensor([enc.ids[j]])
        assert tracker.allowed(tk.VOCAB_SIZE)[0, enc.ids[j]]
        assert tracker.advance(tok)[0].tolist() == enc.pos[j].tolist()
    assert bool(tracker.done[0])


def _prompt() -> tk.Encoded:
    return tk.encode_prompt([(np.ones((3, 3), int), np.ones((2, 2), int))], np.zeros((4, 5), int))


def test_tracker_mask_enforces_rectangular_grids():
    t = tk.LayoutTracker([_prompt().ids], [10_000])
    allowed = t.allowed(tk.VOCAB_SIZE)[0]
    assert allowed[:10].all() and not allowed[tk.ROW] and not allowed[tk.EOO] and not allowed[tk.PAD]
    for tok in [3, 4, tk.ROW, 5]:  # the first row sets the width to 2
        t.advance(torch.tensor([tok]))
    allowed = t.allowed(tk.VOCAB_SIZE)[0]
    assert allowed[:10].all() and not allowed[tk.ROW] and not allowed[tk.EOO]  # one cell: must continue
    t.advance(torch.tensor([6]))
    allowed = t.allowed(tk.VOCAB_SIZE)[0]
    assert not allowed[:10].any() and allowed[tk.ROW] and not allowed[tk.EOO]  # full width: must end the row
    t.advance(torch.tensor([tk.ROW]))
    allowed = t.allowed(tk.VOCAB_SIZE)[0]
    assert allowed[:10].all() and allowed[tk.EOO] and not allowed[tk.ROW]
    t.advance(torch.tensor([tk.EOO]))
    assert t.allowed(tk.VOCAB_SIZE)[0].nonzero().flatten().tolist() == [tk.EOO]  # finished: idles on EOO


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 5, 9, tk.ROW, tk.ROW, tk.EOO, tk.PAD, tk.IN]), min_size=1, max_size=60))
def test_tracker_allows_exactly_the_streams_decode_grid_accepts(stream):
    """Every token the tracker allows keeps the grid completable; the first one it refuses makes
    decode_grid fail however the stream is finished."""
    t = tk.LayoutTracker([_prompt().ids], [10_000])
    written: list[int] = []
    for tok in stream:
        if not t.allowed(tk.VOCAB_SIZE)[0, tok]:
            for tail in ([tk.EOO], [tk.ROW, tk.EOO], [0] * 30 + [tk.ROW, tk.EOO]):
                assert not tk.decode_grid(written + [tok] + tail).ok
            return
        written.append(tok)
        t.advance(torch.tensor([tok]))
        if tok == tk.EOO:
            assert tk.decode_grid(written).ok
            return


@pytest.mark.parametrize("budget", [3, 4, 5, 7, 12, 33, 100])
def test_tracker_ends_every_grid_within_its_budget(budget):
    """A writer that always picks the longest continuation (a colour, else ROW, else EOO) still ends
    with a well-formed grid in at most ``budget`` tokens."""
    t = tk.LayoutTracker([_prompt().ids, _prompt().ids], [budget, budget + 1])
    written: list[list[int]] = [[], []]
    while not bool(t.done.all()):
        allowed = t.allowed(tk.VOCAB_SIZE)
        tok = torch.tensor([4 if a[4] else (tk.ROW if a[tk.ROW] else tk.EOO) for a in allowed])
        for i in range(2):
            if not bool(t.done[i]):
                written[i].append(int(tok[i]))
        t.advance(tok)
    for i, b in enumerate([budget, budget + 1]):
        assert len(written[i]) <= b and tk.decode_grid(written[i]).ok


def test_a_prompt_keeps_room_for_its_answer_and_drops_demonstrations_first():
    demo = (np.zeros((10, 10), int), np.zeros((10, 10), int))
    test_in = np.zeros((10, 10), int)
    roomy = tk.encode_prompt([demo, demo], test_in, block_size=4096)
    assert roomy.demos_used == (0, 1)  # all fit with room for a 30x30 answer
    tight = tk.encode_prompt([demo, demo], test_in, block_size=500)
    # 1 + 223 (one demo) + 112 (test in + OUT) = 336 tokens, leaving 164 >= the 111 a 10x10 answer takes
    assert tight.demos_used == (0,) and len(tight.ids) == 336
    with pytest.raises(tk.DoesNotFit, match="and a 1x1 answer"):
        tk.encode_prompt([demo], test_in, block_size=300)
