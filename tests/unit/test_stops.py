import random

import pytest

from inferplane.router.stops import StopMatcher


def run(stops: list[str], deltas: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = "".join(m.feed(d) for d in deltas)
    return out + m.flush(), m.matched


def test_no_stops_passes_text_through():
    assert run([], ["ab", "cd"]) == ("abcd", False)


def test_stop_inside_one_delta_cuts_it():
    assert run(["\n\n"], ["hello\n\nworld"]) == ("hello", True)


def test_stop_split_across_deltas_is_held_back_then_cut():
    m = StopMatcher(["END"])
    assert m.feed("abc E") == "abc "  # "E" might start "END": held
    assert m.feed("N") == ""
    assert m.feed("D tail") == ""
    assert m.matched


def test_false_start_is_released():
    m = StopMatcher(["END"])
    assert m.feed("xE") == "x"
    assert m.feed("Nx") == "ENx"
    assert not m.matched
    assert m.flush() == ""


def test_held_prefix_flushed_at_the_end():
    assert run(["END"], ["abc EN"]) == ("abc EN", False)


def test_earliest_of_several_stops_wins():
    assert run(["b", "cd"], ["xcdb"]) == ("x", True)


@pytest.mark.parametrize("seed", range(30))
def test_any_split_gives_the_same_answer_as_whole_text(seed):
    rng = random.Random(seed)
    alphabet = "ab\n"
    text = "".join(rng.choice(alphabet) for _ in range(40))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 3))]
    cuts = sorted(rng.sample(range(1, len(text)), 6))
    deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    idx = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = (text[: min(idx)], True) if idx else (text, False)
    assert run(stops, deltas) == expected


def test_which_stop_matched_is_the_earliest_in_the_text():
    m = StopMatcher(["world", "lo"])
    assert m.feed("hello world") == "hel"
    assert m.which == "lo"
    assert StopMatcher(["x"]).which is None
