"""The token layout: encoding, targets, demonstration dropping and strict decoding."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
