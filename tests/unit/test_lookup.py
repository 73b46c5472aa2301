"""Prompt lookup's proposals (worker/generation/lookup.py): the continuation of the latest earlier occurrence of
the history's last n-gram, longest n-gram first, and auto mode's pause where proposals do not pay."""

from worker.generation.lookup import AUTO_MIN_RATE, AUTO_PAUSE, AUTO_TRIAL, Lookup  # noqa: F401


def test_proposes_what_followed_the_latest_earlier_occurrence():
    h = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert Lookup(h, 4, auto=False).propose() == [7, 8, 5, 1]  # the latest of two earlier [1, 2, 3]
    assert Lookup(h, 2, auto=False).propose() == [7, 8]


def test_the_longest_ngram_wins_and_single_tokens_do_not_match():
    h = [5, 2, 3, 4, 4, 9, 3, 6, 6, 9, 2, 3]
    assert Lookup(h, 2, auto=False).propose() == [4, 4]  # [2, 3] -> 4 4, not [3] -> 6 (latest single)
    assert Lookup([4, 1, 2, 5, 2], 3, auto=False).propose() == []  # only [2] recurs


def test_extra_tokens_and_extend():
    lk = Lookup([1, 2, 3, 4, 1, 2], 3, auto=False)
    assert lk.propose() == [3, 4, 1]
    assert lk.propose([7]) == []
    lk.extend([3, 4])
    assert lk.propose() == [1, 2, 3]
    assert lk.propose([1, 2]) == [3, 4, 1]


def test_auto_mode_pauses_where_it_does_not_pay_then_tries_again():
    h = [5, 1, 2, 3, 7, 1, 2, 3]
    auto, always = Lookup(h, 2, auto=True), Lookup(h, 2, auto=False)
    for lk in (auto, always):
        lk.record(AUTO_TRIAL - 4, 0)
        assert lk.propose() == [7, 1]  # not judged yet
        lk.record(4, int(AUTO_TRIAL * AUTO_MIN_RATE) - 1)
    assert auto.propose() == [] and always.propose() == [7, 1]
    auto.extend([9] * (AUTO_PAUSE - 3))
    assert auto.propose() == []
    auto.extend([1, 2, 3])  # the pause is over: it proposes again (the latest [1, 2, 3] went on 9 9)
    assert auto.propose() == [9, 9]
    auto.record(AUTO_TRIAL, 0)  # a second poor run in a row: twice as long
    auto.extend([4] * (2 * AUTO_PAUSE - 4) + [1, 2, 3])
    assert auto.propose() == []
    auto.extend([6, 1, 2, 3])
    assert auto.propose() == [6, 1]
    auto.record(AUTO_TRIAL, AUTO_TRIAL)  # a run that pays: no pause
    assert auto.propose() == [6, 1]


def test_auto_mode_matches_three_tokens_only():
    h = [4, 1, 2, 5, 2, 1, 2]
    assert Lookup(h, 2, auto=False).propose() == [5, 2] and Lookup(h, 2, auto=True).propose() == []


def test_auto_mode_widens_while_everything_is_accepted():
    h = list(range(20, 40)) + [20, 21, 22]
    lk = Lookup(h, 9, auto=True)
    assert lk.propose() == [23, 24, 25]  # AUTO_WIDTH at first
    lk.record(2, 2)
    assert len(lk.propose()) == 6
    lk.record(5, 5)
    assert len(lk.propose()) == 9  # at most k
    lk.record(8, 1)
    assert len(lk.propose()) == 3
    assert len(Lookup(h, 9, auto=False).propose()) == 9
