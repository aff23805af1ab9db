"""StopStringMatcher: what is emitted, what is held back, where text is cut."""

import pytest

from triton_disagg.serving.stop_strings import StopStringMatcher


def feed_all(matcher: StopStringMatcher, pieces: list[str]) -> list[str]:
    return [matcher.feed(piece) for piece in pieces]


def test_without_stop_strings_text_passes_through():
    matcher = StopStringMatcher([])
    assert feed_all(matcher, ["a", "b"]) == ["a", "b"]
    assert matcher.flush() == ""


def test_match_inside_one_piece_truncates_before_it():
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("abcENDxyz") == "abc"
    assert matcher.is_stopped
    assert matcher.feed("more") == ""


def test_match_across_pieces_holds_back_the_partial_match():
    matcher = StopStringMatcher(["END"])
    # "E" and "EN" could begin "END": held until the next piece settles it.
    assert feed_all(matcher, ["abE", "N", "D!"]) == ["ab", "", ""]
    assert matcher.is_stopped


def test_partial_match_released_when_it_breaks():
    matcher = StopStringMatcher(["END"])
    assert feed_all(matcher, ["abE", "Nx"]) == ["ab", "ENx"]
    assert not matcher.is_stopped


def test_flush_releases_a_trailing_partial_match():
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("abEN") == "ab"
    assert matcher.flush() == "EN"


def test_earliest_of_several_stop_strings_wins():
    matcher = StopStringMatcher(["world", "lo w"])
    assert matcher.feed("hello world") == "hel"


@pytest.mark.parametrize("pieces", [["aXYb"], ["aX", "Yb"], ["a", "X", "Y", "b"]])
def test_result_does_not_depend_on_how_text_is_split(pieces):
    matcher = StopStringMatcher(["XY"])
    assert "".join(feed_all(matcher, pieces)) == "a"


def test_empty_stop_string_is_ignored():
    matcher = StopStringMatcher([""])
    assert matcher.feed("abc") == "abc"
    assert not matcher.is_stopped


def test_stop_string_repeating_its_own_prefix():
    # "aab" after "aaa...": the held tail must be the longest suffix that could still match.
    matcher = StopStringMatcher(["aab"])
    assert feed_all(matcher, ["xaa", "a", "b"]) == ["x", "a", ""]
    assert matcher.is_stopped
