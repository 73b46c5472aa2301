"""Prompt lookup's proposals (worker/generation/lookup.py): the continuation of the latest earlier occurrence of
the history's last n-gram, longest n-gram first, and auto mode's pause where proposals do not pay."""

from worker.generation.lookup import AUTO_MIN_RATE, AUTO_PAUSE, AUTO_TRIAL, Lookup


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
    h = [1, 2, 3, 1, 2]
    auto, always = Lookup(h, 2, auto=True), Lookup(h, 2, auto=False)
    for lk in (auto, always):
        lk.record(AUTO_TRIAL - 4, 0)
        assert lk.propose() == [3, 1]  # not judged yet
        lk.record(4, int(AUTO_TRIAL * AUTO_MIN_RATE) - 1)
    assert auto.propose() == [] and always.propose() == [3, 1]
    auto.extend([9] * (AUTO_PAUSE - 1))
    assert auto.propose() == []
    auto.extend([1, 2])  # the pause is over: it proposes again (the latest [1, 2] went on 9 9), judged afresh
    assert auto.propose() == [9, 9]
    auto.record(AUTO_TRIAL - 1, 0)
    assert auto.propose() == [9, 9]
    paying = Lookup(h, 2, auto=True)
    paying.record(AUTO_TRIAL, int(AUTO_TRIAL * AUTO_MIN_RATE) + 1)
    assert paying.propose() == [3, 1]
