"""worker/generation/channels.py without markers: text is released as it comes, a stop string across tokens is held back and cut."""

from worker.generation.channels import Channels


# ---- the answer stream (Channels without markers), with a detokenizer that maps ids to fixed strings

class FakeDetok:
    """mlx-lm's streaming detokenizer interface: add_token, finalize, last_segment, reset."""

    def __init__(self, pieces):
        self.pieces, self.last_segment = pieces, ""

    def reset(self):
        self.last_segment = ""

    def add_token(self, t):
        self.last_segment = self.pieces[t]

    def finalize(self):
        self.last_segment = ""


def _run(pieces, ids, stop=()):
    ts = Channels(FakeDetok(pieces), stop)
    out = []
    for t in ids:
        out += [(p.text, p.ids) for p in ts.add(t)]
        if ts.stop_string is not None:
            break
    else:
        out += [(p.text, p.ids) for p in ts.finish()]
    return ts, out


def test_text_is_released_and_equals_the_concatenation():
    ts, out = _run({1: "Hel", 2: "lo", 3: " world"}, [1, 2, 3])
    assert "".join(t for t, _ in out) == ts.text == "Hello world"
    assert [i for _, ids in out for i in ids] == [1, 2, 3]


def test_a_stop_string_across_tokens_is_held_back_and_cut():
    ts, out = _run({1: "ab", 2: "c<", 3: "/s", 4: ">tail"}, [1, 2, 3, 4], stop=["</s>"])
    assert ts.stop_string == "</s>"
    assert ts.text == "abc" and "".join(t for t, _ in out) == "abc"


def test_a_partial_stop_that_does_not_match_is_released_at_the_end():
    ts, out = _run({1: "x<", 2: "/t"}, [1, 2], stop=["</s>"])
    assert ts.stop_string is None and ts.text == "x</t"
