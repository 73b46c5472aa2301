"""The pure parts of several ranks: the flags the other ranks get, the ring's addresses from mlx's hostfile,
and which rank counts a tensor split can take."""

import json

from worker.__main__ import _rank_argv
from worker.distributed.launch import hosts_for, ring_hostfile
from worker.loading.sharding import _indivisible, _ranks_that_work


def test_the_other_ranks_get_every_flag_but_those_that_start_ranks():
    argv = ["--ranks", "2", "--max-line-bytes=4096", "--backend", "ring", "--rank-timeout", "5",
            "--hostfile=h.json"]
    assert _rank_argv(argv) == ["--max-line-bytes=4096", "--rank-timeout", "5"]


def test_ranks_on_this_machine_get_free_ports_of_their_own():
    addrs = ring_hostfile(hosts_for(3, None))
    assert len(addrs) == 3 and all(len(a) == 1 and a[0].startswith("127.0.0.1:") for a in addrs)
    assert len({a[0] for a in addrs}) == 3


def test_a_hostfile_of_two_machines_rings_over_their_ips(tmp_path):
    f = tmp_path / "hosts.json"
    f.write_text(json.dumps({"backend": "ring", "envs": ["A=1"], "hosts": [
        {"ssh": "mac-a.local", "ips": ["10.0.0.1"]}, {"ssh": "mac-b.local", "ips": ["10.0.0.2"]}]}))
    hosts = hosts_for(None, str(f))
    assert [h.ssh_hostname for h in hosts.hosts] == ["mac-a.local", "mac-b.local"]
    assert hosts.backend == "ring" and hosts.envs == ["A=1"]
    assert ring_hostfile(hosts) == [["10.0.0.1:32323"], ["10.0.0.2:32324"]]


def test_a_tensor_split_needs_every_head_count_and_the_mlp_divisible():
    smollm2 = {"num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536}
    assert _indivisible(smollm2, 2) == [("num_attention_heads", 9), ("num_key_value_heads", 3)]
    assert _indivisible(smollm2, 3) == []
    assert _ranks_that_work(smollm2) == [3]
    vlm = {"text_config": {"num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 100}}
    assert _indivisible(vlm, 8) == [("num_key_value_heads", 4), ("intermediate_size", 100)]
    assert _ranks_that_work(vlm) == [2, 4]


def test_the_first_rank_s_failure_is_every_rank_s():
    """A request or a load that fails on one rank (a path missing on its host) fails on all, with its error."""
    from worker.distributed.group import first_failure

    assert first_failure([None, None]) is None
    e = first_failure([None, ["invalid_image", "no such file: /x.png"]])
    assert (e.code, e.message) == ("invalid_image", "rank 1: no such file: /x.png")
    e = first_failure([["invalid_params", "a"], ["invalid_image", "b"]])
    assert (e.code, e.message) == ("invalid_params", "a")
