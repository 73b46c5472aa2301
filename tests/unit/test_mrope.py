"""worker/addons/qwen2_vl.py: the prompt's 3-D M-RoPE positions, then text continuing after a delta."""

import mlx.core as mx
import pytest

from worker.addons.qwen2_vl import MRopeState, _Active


# ---- M-RoPE positions (Qwen2-VL): the prompt's 3-D positions, then text continuing after a delta

def test_mrope_positions_inside_across_and_after_the_prompt():
    prompt = mx.array([[[0, 1, 2, 2, 3]], [[0, 1, 2, 3, 3]], [[0, 1, 1, 2, 3]]])  # [3, 1, 5]
    st = MRopeState(_Active(), prompt, delta=-1)
    assert st.positions(1, 2).tolist() == prompt[:, :, 1:3].tolist()
    across = st.positions(3, 4)  # 2 prompt positions, then text positions 5 and 6 shifted by delta
    assert across[:, 0, :2].tolist() == prompt[:, 0, 3:5].tolist()
    assert across[:, 0, 2:].tolist() == [[4, 5]] * 3
    assert st.positions(7, 1).tolist() == [[[6]], [[6]], [[6]]]


def test_mrope_state_is_scoped_to_one_request():
    box = _Active()
    a, b = MRopeState(box, mx.zeros((3, 1, 2)), 0), MRopeState(box, mx.zeros((3, 1, 2)), 0)
    with a:
        assert box.state is a
        with pytest.raises(RuntimeError):
            b.__enter__()
    assert box.state is None
