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
    # (row, col, kind, aligned offset, mirrored row, mirrored col)
    expected = [
        (N, N, tk.KIND_NONE, 0, N, N),  # BOS
        (N, N, I, 0, N, N), (0, 0, I, 0, 1, 1), (0, 1, I, 0, 1, 0), (0, 2, I, 0, 1, N),  # IN 1 2 ROW
        (1, 0, I, 0, 0, 1), (1, 1, I, 0, 0, 0), (1, 2, I, 0, 0, N),  # 3 4 ROW
        (N, N, O, 6, N, N),  # OUT: its successor fills (0, 0), the input's cell at index 2
        (0, 0, O, 6, 0, 0),  # 5: successor fills (0, 1) -> index 3; output tokens mirror nothing
        (0, 1, O, 5, 0, 1),  # ROW ending row 0: successor fills (1, 0) -> index 5
        (N, N, O, 0, N, N),  # EOO
        (N, N, I, 0, N, N), (0, 0, I, 0, 0, 0), (0, 1, I, 0, 0, N),  # IN 7 ROW
        (N, N, O, 2, N, N),  # OUT -> the 7 at index 13
        (0, 0, O, 0, 0, 0), (0, 1, O, 0, 0, 1), (0, 2, O, 0, 0, 2), (N, N, O, 0, N, N),  # 8 9 ROW EOO
    ]
    assert [tuple(p) for p in enc.pos[:, :tk.POS_MAPS].tolist()] == expected
    assert enc.x_pos().shape == (len(enc.ids) - 1, tk.N_POS)
    # the map channels: only output tokens point back; the first OUT's cursor (0, 0) reads under
    # flip_h the input's (0, 1) (the 2 at index 3, 5 back), flip_v (1, 0), rot180 (1, 1), transpose
    # (0, 0), antitranspose (1, 1), rot90 (0, 1), rot270 (1, 0)
    assert enc.pos[8, tk.POS_MAPS:].tolist() == [5, 3, 2, 6, 2, 5, 3]
    not_output = enc.pos[:, tk.POS_KIND] != O
    assert (enc.pos[not_output, tk.POS_MAPS:] == 0).all()


MAP_FUNCTIONS = {"flip_h": np.fliplr, "flip_v": np.flipud, "rot180": lambda g: np.rot90(g, 2),
                 "transpose": lambda g: g.T, "antitranspose": lambda g: np.rot90(g, 2).T,
                 "rot90": lambda g: np.rot90(g, 1), "rot270": lambda g: np.rot90(g, -1)}


@settings(max_examples=40, deadline=None)
@given(st.lists(grids(8), min_size=1, max_size=3), grids(8), st.sampled_from(tk.MAPS))
def test_each_map_channel_points_at_the_input_cell_the_next_output_cell_copies(inputs, test_in, name):
    """When every output is map k of its input, map k's channel at each output token points back at
    the very input cell whose colour comes next (for every cell, not just some), and the other maps'
    channels stay inside that pair's input grid."""
    f, k = MAP_FUNCTIONS[name], tk.MAPS.index(name)
    assert tuple(sorted(MAP_FUNCTIONS)) == tuple(sorted(tk.MAPS))
    enc = tk.encode_instance([(g, f(g)) for g in inputs], test_in, f(test_in))
    ids, pos = np.asarray(enc.ids), enc.pos
    checked = 0
    for t in range(len(ids) - 1):
        if pos[t, tk.POS_KIND] != tk.KIND_OUTPUT:
            continue
        backs = pos[t, tk.POS_MAPS:]
        assert (backs >= 0).all() and (ids[t - backs[backs > 0]] < tk.N_COLOURS).all()  # cells, never markers
        if ids[t + 1] < tk.N_COLOURS:
            assert backs[k] > 0 and ids[t - backs[k]] == ids[t + 1]
            checked += 1
    assert checked == sum(g.size for g in inputs) + test_in.size


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


def _column_order_from_ids(ids, length: int | None = None) -> list[int]:
    """column_order's brute-force twin, from the ids alone: each IN's tokens up to the next OUT (or
    the end), read column by column (the ROWs as the last column) over its rows that are whole; with
    ``length``, the order of ids[:length], where a grid that does not end before it keeps its place."""
    ids, i = [int(t) for t in ids], 0
    order = list(range(len(ids) if length is None else length))
    while i < len(ids):
        if ids[i] != tk.IN:
            i += 1
            continue
        j = i + 1
        while j < len(ids) and ids[j] != tk.OUT:
            j += 1
        if tk.ROW in ids[i + 1:j] and (length is None or j <= length):
            w, h = ids[i + 1:j].index(tk.ROW), ids[i + 1:j].count(tk.ROW)
            order[i + 1:i + 1 + h * (w + 1)] = [i + 1 + r * (w + 1) + c for c in range(w + 1) for r in range(h)]
        i = j
    return order


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(grids(8), grids(8)), min_size=1, max_size=4), grids(8), grids(8), st.data())
def test_column_order_reads_every_input_grid_column_by_column(demos, test_in, test_out, data):
    enc = tk.encode_instance(demos, test_in, test_out)
    prompt = tk.encode_prompt(demos, test_in)
    cut = data.draw(st.integers(1, len(enc.ids)))
    cut_pos, _ = tk.layout_positions(enc.ids[:cut])  # the channels of ids that may end inside an input grid
    for ids, pos in [(enc.ids, enc.pos), (prompt.ids, prompt.pos), (enc.ids[:cut], cut_pos)]:
        order, place = tk.column_order(torch.as_tensor(pos)[None])
        assert order[0].tolist() == _column_order_from_ids(ids)
        assert torch.equal(place[0][order[0]], torch.arange(len(ids)))  # place inverts order
    # the whole instance's channels cut at the same place: a grid they say runs past the end stays
    order, _ = tk.column_order(torch.as_tensor(enc.pos[:cut])[None])
    assert order[0].tolist() == _column_order_from_ids(enc.ids, length=cut)
    # a batch: the prompt right-padded to the instance's length is read as when alone
    padded = np.concatenate([prompt.pos, np.tile(tk.NO_GRID_POS, (len(enc.ids) - len(prompt.ids), 1))])
    order, _ = tk.column_order(torch.as_tensor(np.stack([enc.pos, padded])))
    assert order[0].tolist() == _column_order_from_ids(enc.ids)
    assert order[1].tolist() == _column_order_from_ids(prompt.ids) + list(range(len(prompt.ids), len(enc.ids)))


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


def test_a_prompt_keeps_room_for_the_answer_its_task_suggests_and_drops_demonstrations_first():
    demo = (np.zeros((10, 10), int), np.zeros((10, 10), int))
    test_in = np.zeros((10, 10), int)
    assert tk.expected_answer_tokens([demo], test_in) == 111  # a 10x10 grid: 10 rows of 10 cells + ROW, then EOO
    doubling = (np.zeros((3, 4), int), np.zeros((6, 8), int))
    assert tk.expected_answer_tokens([doubling], np.zeros((5, 5), int)) == 10 * 11 + 1  # 5x5 scaled by 2
    assert tk.expected_answer_tokens([doubling], np.zeros((20, 20), int)) == 30 * 31 + 1  # capped at 30x30
    assert tk.encode_prompt([demo, demo], test_in, block_size=4096).demos_used == (0, 1)
    # 1 + 2 * 223 (demos) + 112 (test in + OUT) = 559 tokens + 111 for the answer fit 700: both demos stay
    both = tk.encode_prompt([demo, demo], test_in, block_size=700)
    assert both.demos_used == (0, 1) and len(both.ids) == 559
    tight = tk.encode_prompt([demo, demo], test_in, block_size=500)  # one demo goes; 164 tokens left for the answer
    assert tight.demos_used == (0,) and len(tight.ids) == 336
    with pytest.raises(tk.DoesNotFit, match="and a 1x1 answer"):
        tk.encode_prompt([demo], test_in, block_size=300)
