"""The planner reproduces the SN40L paper's system claims from documented preset numbers, and its CLI
gives a table, JSON, a report, and one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from coeserve.planner import PRESETS, ExpertGroup, Workload, compare, parse_experts, plan, zipf_hit

from .conftest import REPO


def test_850_experts_need_19_dgx_nodes_in_hbm_and_one_sn40l_node():
    g = parse_experts("850x7B")
    assert g == [ExpertGroup(850, 7e9)] and g[0].bytes == 14e9
    sn, h100, a100 = compare(g, ["sn40l", "dgx-h100", "dgx-a100"], Workload())
    assert sn["nodes_three_tier"] == 1
    assert h100["nodes_all_in_hbm"] == a100["nodes_all_in_hbm"] == 19  # the paper's 19x


def test_switch_time_ratios_match_the_paper():
    sn, h100, a100 = compare(parse_experts("150x7B"), ["sn40l", "dgx-h100", "dgx-a100"], Workload())
    assert h100["switch_s"]["host"] / sn["switch_s"]["host"] == pytest.approx(15, rel=0.05)
    assert a100["switch_s"]["host"] / sn["switch_s"]["host"] == pytest.approx(31, rel=0.05)
    assert sn["switch_s"]["hbm"] == 0 and sn["switch_s"]["disk"] > sn["switch_s"]["host"]


def test_zipf_hits_and_bounds_move_the_right_way():
    assert zipf_hit(150, 150, 1.0) == 1.0 and zipf_hit(0, 150, 1.0) == 0.0
    assert zipf_hit(10, 150, 1.2) > zipf_hit(10, 150, 0.8)
    g, hw = parse_experts("150x7B"), PRESETS["dgx-h100"]
    small, big = plan(g, hw, Workload(batch=1)), plan(g, hw, Workload(batch=16))
    assert big["throughput_bound_rps"] > small["throughput_bound_rps"]
    assert plan(g, hw, Workload(output=256))["latency_bound_s"] > small["latency_bound_s"]


def test_mixed_specs_manifests_and_installed_experts(tmp_path, store):
    assert [x.count for x in parse_experts("10x8B+2x70B")] == [10, 2]
    m = tmp_path / "m.json"
    m.write_text(json.dumps([{"count": 3, "params": 7e9, "dtype": "fp32"}]))
    assert parse_experts(str(m))[0].bytes == 28e9
    mine = parse_experts("smollm2-135m-instruct", store.home)
    assert mine[0].bytes == store.info("smollm2-135m-instruct").bytes


def coe(*args):
    return subprocess.run([sys.executable, "-m", "coeserve.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_cli_json_measured_and_report(tmp_path):
    r = coe("plan", "--experts", "850x7B", "--measured", "bench/results/switch-cpu.json", "--json")
    assert r.returncode == 0, r.stderr
    plans = json.loads(r.stdout)["plans"]
    assert [p["nodes_all_in_hbm"] for p in plans[1:3]] == [19, 19]
    assert plans[-1]["hardware"].startswith("measured")
    r = coe("plan", "--report", str(tmp_path / "rep"))
    assert r.returncode == 0 and "15.6x" in r.stdout and "31.2x" in r.stdout
    for f in ("plan.md", "switch.png", "footprint.png"):
        data = (tmp_path / "rep" / f).read_bytes()
        assert data and (not f.endswith(".png") or data[:4] == b"\x89PNG")


@pytest.mark.parametrize("args, msg", [(["--experts", "150xfoo"], "invalid experts"),
                                       (["--hardware", "tpu"], "unknown hardware"),
                                       (["--measured", "nope.json"], "no such file")])
def test_cli_errors_are_one_line(args, msg):
    r = coe("plan", *args)
    assert r.returncode == 2 and r.stderr.startswith("coe: error:") and msg in r.stderr
    assert r.stderr.strip().count("\n") == 0
