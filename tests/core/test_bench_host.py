"""The benchmarks flag a run whose host was overcommitted (hypervisor steal time), so its ratios are not trusted."""

from bench.host import NOISY_STEAL_SHARE, cpu_counters, describe_host, steal_share


def _stat(tmp_path, user, idle, steal):
    path = tmp_path / "stat"
    path.write_text(f"cpu  {user} 0 10 {idle} 0 0 0 {steal} 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 0\n")
    return str(path)


def test_steal_share_is_the_stolen_part_of_all_cpu_time_between_snapshots(tmp_path):
    before = cpu_counters(_stat(tmp_path, user=100, idle=800, steal=0))
    after = cpu_counters(_stat(tmp_path, user=150, idle=830, steal=20))  # 50 + 30 + 20 ticks went by
    assert before["steal"] == 0 and after["user"] == 150
    assert abs(steal_share(before, after) - 0.2) < 1e-12


def test_no_share_without_counters_or_elapsed_time(tmp_path):
    assert cpu_counters(str(tmp_path / "missing")) is None
    same = cpu_counters(_stat(tmp_path, user=1, idle=1, steal=1))
    assert steal_share(None, same) is None and steal_share(same, same) is None


def test_a_noisy_run_is_reported_with_a_warning(tmp_path, capsys, monkeypatch):
    import bench.host

    before = cpu_counters(_stat(tmp_path, user=0, idle=0, steal=0))
    monkeypatch.setattr(bench.host, "cpu_counters", lambda: {**before, "user": 90, "steal": 10})
    assert describe_host(before) == {"cpu_steal_share": 0.1} and 0.1 > NOISY_STEAL_SHARE
    assert "unreliable" in capsys.readouterr().out
    monkeypatch.setattr(bench.host, "cpu_counters", lambda: {**before, "user": 100})
    assert describe_host(before) == {"cpu_steal_share": 0.0}
    assert capsys.readouterr().out == ""


def test_this_machines_counters_parse_when_it_has_them():
    counters = cpu_counters()
    if counters is not None:  # Linux
        assert set(counters) >= {"user", "idle", "steal"} and all(v >= 0 for v in counters.values())
