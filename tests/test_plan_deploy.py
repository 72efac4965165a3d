"""Cluster files, `dsv4 plan` and `dsv4 deploy`: rank tables against the CANN format, refusals that name the
culprit, planner numbers against hand arithmetic, rendered scripts that parse, and an end-to-end 2-rank run
through the generated CPU deployment."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.presets import random_weights
from tools.cluster import (
    CLUSTER_DIR,
    ClusterError,
    load_cluster,
    load_hardware,
    rank_table,
    validate_rank_table,
)
from tools.testing.hf_bridge import save_official

from .conftest import small_config

ROOT = Path(__file__).resolve().parent.parent
NPU_CLUSTERS = ["atlas800-a2-1node", "atlas800-a2-2node", "atlas800-a3-1node", "atlas800-a3-8die"]
GB = 1e9


def dsv4(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(ROOT))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True, env=e,
                          timeout=timeout, cwd=str(ROOT))


def plan_json(*args: str) -> dict:
    p = dsv4("plan", *args, "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_cluster(tmp_path: Path, doc: dict, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def a2_node(i: int, **over) -> dict:
    n = {"name": f"n{i}", "host_ip": f"10.0.0.{10 + i}", "if_name": "eth0", "cards": 8,
         "device_ip": [f"192.168.{i}.{100 + d}" for d in range(8)]}
    n.update(over)
    return n


# ---- hardware profiles and rank tables -----------------------------------------------------------------

def test_hardware_profiles_load_and_910c_has_two_dies():
    b, c, cpu = load_hardware("910b"), load_hardware("910c"), load_hardware("cpu")
    assert (b.devices_per_card, c.devices_per_card) == (1, 2)
    assert b.max_devices_per_node == 8 and c.max_devices_per_node == 16
    assert cpu.kind == "cpu" and b.is_npu and c.is_npu
    # every figure in the NPU profiles carries a comment naming its source or saying it is an estimate
    for name in ("910b", "910c"):
        text = (ROOT / "configs" / "hardware" / f"{name}.yaml").read_text()
        for key in ("memory_gib", "memory_bw_gbs", "bf16_tflops", "int8_tops", "bw_gbs", "moe_op_latency_us"):
            for line in (ln for ln in text.splitlines() if ln.strip().startswith(key + ":")):
                assert "#" in line, f"{name}.yaml: {line!r} has no source comment"


@pytest.mark.parametrize("name", NPU_CLUSTERS)
def test_rank_tables_follow_the_cann_format(name):
    cl = load_cluster(name)
    doc = rank_table(cl)
    assert validate_rank_table(doc) == cl.world_size
    # independent of the validator: the shape of the CANN 1.0 table
    assert doc["version"] == "1.0" and doc["status"] == "completed"
    assert doc["server_count"] == str(len(cl.nodes)) == str(len(doc["server_list"]))
    ranks = []
    for node, server in zip(cl.nodes, doc["server_list"], strict=True):
        assert server["server_id"] == node.host_ip
        ids = [d["device_id"] for d in server["device"]]
        assert ids == [str(i) for i in node.device_ids] and len(set(ids)) == len(ids)
        assert [d["device_ip"] for d in server["device"]] == list(node.device_ips)
        ranks += [int(d["rank_id"]) for d in server["device"]]
        assert all(isinstance(v, str) for d in server["device"] for v in d.values())
    assert ranks == list(range(cl.world_size))
    ips = [d["device_ip"] for s in doc["server_list"] for d in s["device"]]
    assert len(set(ips)) == len(ips)


def test_a3_node_has_16_ranks_and_the_8_die_cluster_uses_devices_8_to_15():
    assert load_cluster("atlas800-a3-1node").world_size == 16
    half = load_cluster("atlas800-a3-8die")
    assert half.world_size == 8 and half.nodes[0].device_ids == tuple(range(8, 16))


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["server_list"][0]["device"][1].update(rank_id="0"), "rank_id"),
    (lambda d: d["server_list"][0]["device"][7].update(rank_id="9"), "rank_id"),
    (lambda d: d.update(server_count="3"), "server_count"),
    (lambda d: d.update(status="initializing"), "status"),
    (lambda d: d["server_list"][0]["device"][2].update(device_id="1"), "device_id"),
    (lambda d: d["server_list"][1]["device"][0].update(device_ip="192.168.100.101"), "device_ip"),
    (lambda d: d["server_list"][0]["device"][0].update(rank_id=0), "not a string"),
    # interleaved across servers: server 0 holds 0..6 and 8, server 1 holds 7 and 9..15
    (lambda d: (d["server_list"][0]["device"][7].update(rank_id="8"),
                d["server_list"][1]["device"][0].update(rank_id="7")), "rank_id"),
])
def test_rank_table_validator_rejects(mutate, message):
    doc = rank_table(load_cluster("atlas800-a2-2node"))
    mutate(doc)
    with pytest.raises(ClusterError, match=message):
        validate_rank_table(doc)


def test_superpod_cluster_renders_a_version_1_2_table(tmp_path):
    doc = {"hardware": "910c", "super_pod_id": "0",
           "nodes": [{"name": "a3", "host_ip": "10.1.0.1", "if_name": "eth0", "cards": 1, "device_ids": [0, 1],
                      "device_ip": ["192.168.1.1", "192.168.1.2"], "super_device_id": [37748736, 37748737]}]}
    table = rank_table(load_cluster(write_cluster(tmp_path, doc)))
    assert table["version"] == "1.2"
    assert [d["super_device_id"] for d in table["server_list"][0]["device"]] == ["37748736", "37748737"]
    assert table["super_pod_list"] == [{"super_pod_id": "0", "server_list": [{"server_id": "10.1.0.1"}]}]
    assert validate_rank_table(table) == 2


# ---- bad cluster files ---------------------------------------------------------------------------------------

BAD = {
    "duplicate device id": ({"hardware": "910b", "nodes": [a2_node(0, device_ids=[0, 1, 2, 3, 4, 5, 6, 6])]},
                            "nodes[0] (n0): device_ids: device 6 is listed twice"),
    "duplicate device ip across nodes": (
        {"hardware": "910b", "nodes": [a2_node(0), a2_node(1, device_ip=[f"192.168.1.{100 + d}" for d in range(7)]
                                                        + ["192.168.0.103"])]},
        "nodes[1] (n1): device_ip[7]: 192.168.0.103 is also nodes[0] (n0) device_ip[3]"),
    "missing host ip": ({"hardware": "910b", "nodes": [a2_node(0, host_ip=None)]}, "nodes[0] (n0): host_ip: missing"),
    "missing device ips": ({"hardware": "910b", "nodes": [{k: v for k, v in a2_node(0).items() if k != "device_ip"}]},
                           "nodes[0] (n0): device_ip: missing"),
    "too few device ips": ({"hardware": "910b", "nodes": [a2_node(0, device_ip=["192.168.0.1"])]},
                           "nodes[0] (n0): device_ip: expected 8 addresses (one per device), got 1"),
    "bad ip": ({"hardware": "910b", "nodes": [a2_node(0, host_ip="10.0.0.300")]},
               "nodes[0] (n0): host_ip: '10.0.0.300' is not an IP address"),
    "unknown hardware": ({"hardware": "910x", "nodes": [a2_node(0)]}, "hardware: unknown hardware profile '910x'"),
    "world size mismatch": ({"hardware": "910b", "world_size": 16, "nodes": [a2_node(0)]},
                            "world_size: 16 does not match the nodes, which hold 8 ranks"),
    "too many cards": ({"hardware": "910b", "nodes": [a2_node(0, cards=9, device_ip=None)]},
                       "nodes[0] (n0): cards: 9 cards = 9 devices"),
    "uneven nodes": ({"hardware": "910b", "nodes": [a2_node(0), a2_node(1, cards=4, device_ip=[
        f"192.168.1.{d}" for d in range(4)])]}, "nodes[1] (n1): cards: 4 ranks, but nodes[0] (n0) has 8"),
    "unknown field": ({"hardware": "910b", "nodes": [a2_node(0, devices=8)]}, "nodes[0] (n0): unknown field 'devices'"),
    "duplicate host": ({"hardware": "910b", "nodes": [a2_node(0), a2_node(1, host_ip="10.0.0.10")]},
                       "nodes[1] (n1): host_ip: 10.0.0.10 is also nodes[0] (n0)'s"),
    "cpu with cards": ({"hardware": "cpu", "nodes": [{"name": "h", "cards": 2}]}, "nodes[0] (h): cards: not used"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_cluster_files_are_refused_naming_the_entry(tmp_path, case):
    doc, message = BAD[case]
    for n in doc["nodes"]:
        for k in [k for k, v in n.items() if v is None]:
            del n[k]
    path = write_cluster(tmp_path, doc, f"{case.replace(' ', '_')}.yaml")
    with pytest.raises(ClusterError) as e:
        load_cluster(path)
    assert str(path) in str(e.value) and message in str(e.value), str(e.value)


def test_cli_refuses_a_cluster_whose_ranks_do_not_divide_the_experts(tmp_path):
    # 3 nodes x 8 = 24 ranks; V4-Flash has 256 routed experts, 256 % 24 != 0
    path = write_cluster(tmp_path, {"hardware": "910b", "nodes": [a2_node(i) for i in range(3)]})
    p = dsv4("plan", "--model", "v4-flash", "--cluster", str(path), "--format", "w8a8")
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0]
    assert "n_routed_experts=256 is not divisible by 24" in err[0]
    p = dsv4("deploy", "--model", "bench-small", "--cluster", str(path), "--out", str(tmp_path / "o"))
    assert p.returncode != 0 and "not divisible by 24" in p.stderr and not (tmp_path / "o").exists()


# ---- the planner against hand arithmetic ------------------------------------------------------------------------

# V4-Flash shapes (spec 1.1 / 2.1): d=4096, 43 layers + 1 MTP layer, 256 experts of [2048, 4096] x2 + [4096, 2048].
D, INTER, E, LAYERS = 4096, 2048, 256, 43
EXPERT_PARAMS = 3 * D * INTER  # 25,165,824


def flash_w8a8_weights_per_card_tp1(ranks: int) -> tuple[float, float]:
    """W8A8 Flash on `ranks` devices with EP over all of them and no attention TP, by hand."""
    # routed experts: int8 + one float32 scale per output row (rows 2048 + 2048 + 4096 per expert)
    expert = EXPERT_PARAMS + 4 * (INTER + INTER + D)
    experts = (LAYERS + 1) * E * expert / ranks  # main + MTP layer, split by EP
    # replicated, per main layer: attention linears int8 wq_a [1024,4096], wq_b [32768,1024], wkv [512,4096],
    # wo_b [4096,8192] (+ row scales); wo_a bf16 [8192,4096]; shared expert int8 (+ scales)
    attn = (1024 * 4096 + 32768 * 1024 + 512 * 4096 + 4096 * 8192) + 4 * (1024 + 32768 + 512 + 4096)
    wo_a = 2 * 8192 * 4096
    shared = EXPERT_PARAMS + 4 * (INTER + INTER + D)
    router = 2 * E * D  # bf16 gate
    hc = 4 * 2 * (24 * 4 * D + 24 + 3)  # f32 mHC maps, attention + ffn
    per_layer = attn + wo_a + shared + router + hc
    # compressors (bf16): 21 CSA layers wkv+wgate [1024,4096] x2 + indexer wkv+wgate [256,4096] x2,
    # 20 HCA layers [512,4096] x2; indexer wq_b int8 [8192,1024] + weights_proj bf16 [64,4096] on CSA layers
    comp = 21 * 2 * (2 * 1024 * 4096 + 2 * 256 * 4096) + 20 * 2 * (2 * 512 * 4096)
    indexer = 21 * ((8192 * 1024 + 4 * 8192) + 2 * 64 * 4096)
    embed_head = 2 * 2 * 129280 * D  # bf16
    hash_tables = 3 * 129280 * 6 * 8  # int64
    # MTP layer non-expert part: one SWA block + e_proj/h_proj int8 [4096,4096] (+ scales)
    mtp = per_layer + 2 * (D * D + 4 * D)
    small = 0.05 * GB  # norms, ape, sinks, biases, mtp norms: tens of MB (upper bound)
    return experts + LAYERS * per_layer + comp + indexer + embed_head + hash_tables + mtp, small


def test_plan_flash_w8a8_on_8x910b_matches_hand_arithmetic():
    out = plan_json("--model", "v4-flash", "--cluster", "atlas800-a2-1node", "--format", "w8a8", "--tp", "1")
    rec = out["recommended"]
    assert rec["layout"]["ep"] == 8 and rec["layout"]["attn_tp"] == 1
    got = rec["memory_bytes"]["weights_total"]
    hand, slack = flash_w8a8_weights_per_card_tp1(8)
    # the brief's rule of thumb: ~284B x 1 byte / 8 plus the bf16 parts -> ~46 GB
    assert 44e9 < hand < 47e9
    assert hand <= got <= hand + slack, (got / GB, hand / GB)
    # routed experts alone, per card: (43 + 1) x 256 experts / 8 ranks
    experts = rec["memory_bytes"]["weights"]["routed experts"]  # main layers; the MTP layer has its own line
    assert abs(experts - LAYERS * E * (EXPERT_PARAMS + 4 * 8192) / 8) < 1e3
    assert out["fits"] is True and rec["memory_bytes"]["fits"] is True


def test_plan_kv_bytes_match_the_spec_estimate():
    """Spec 3.8: ~4 GB for one 1M-token V4-Flash sequence with vLLM's 584 B entries."""
    out = plan_json("--model", "v4-flash", "--cluster", "atlas800-a3-1node", "--format", "w4a8",
                    "--context", "1048576", "--no-mtp")
    kv = out["kv"]["per_sequence"]
    csa = 21 * (1048576 // 4) * (584 + 132)  # compressed entries + indexer keys
    hca = 20 * (1048576 // 128) * 584
    window = 43 * 128 * 584  # the next query's 127 window rows: one 128-row block at a 1M boundary
    # float32 compressor state in 16-row pages (common.paged_cache): C4 keeps the previous group's 4 rows (one
    # page of [kv | score] 2 * 2 * 512 floats, the indexer's 4 * 128); C128's open group is empty at 1M
    state = 21 * 16 * (2 * 2 * 512 * 4 + 4 * 128 * 4)
    assert kv["total"] == csa + hca + window + state
    assert kv["block_size"] == 128
    assert 4.0e9 < kv["total"] < 4.1e9
    assert out["kv"]["layout"]["kv_entry"] == 584 and out["kv"]["layout"]["index_entry"] == 132


def test_plan_w4a8_flash_on_910c_is_sane_and_explains_itself():
    p = dsv4("plan", "--model", "v4-flash", "--cluster", "configs/clusters/atlas800-a3-1node.yaml",
             "--format", "w4a8")
    assert p.returncode == 0, p.stderr
    assert "<- recommended" in p.stdout and "why" in p.stdout and "assumptions" in p.stdout
    assert "one KV head" in p.stdout  # the reasoning names the MQA / TP trade-off
    out = plan_json("--model", "v4-flash", "--cluster", "atlas800-a3-1node", "--format", "w4a8")
    rec = out["recommended"]
    # w4a8 experts: 0.5 B per weight + float32 per (row, 128 inputs) = 0.53125 B per weight, over 16 dies
    experts = rec["memory_bytes"]["weights"]["routed experts"]
    assert abs(experts - LAYERS * E * EXPERT_PARAMS * (0.5 + 4 / 128) / 16) < 1e3
    dec = rec["decode"]
    s = dec["seconds"]
    assert s["step"] == pytest.approx(max(s["memory"], s["compute"]) + s["comm"])
    assert s["memory"] == pytest.approx(dec["bytes"]["total"] / (1600 * GB))
    assert 1e-3 < s["step"] < 0.05
    assert rec["prefill"]["tokens_per_s_cluster"] > 1000
    assert len(out["candidates"]) >= 4 and out["reasons"]


def test_plan_more_concurrency_means_more_kv_and_a_longer_step():
    lo = plan_json("--model", "v4-flash", "--cluster", "atlas800-a2-1node", "--format", "w4a8", "--tp", "1")
    hi = plan_json("--model", "v4-flash", "--cluster", "atlas800-a2-1node", "--format", "w4a8", "--tp", "1",
                   "--concurrency", "64")
    a, b = lo["recommended"], hi["recommended"]
    assert b["memory_bytes"]["kv"] == pytest.approx(8 * a["memory_bytes"]["kv"])  # 64 seqs over 8 DP ranks
    assert b["decode"]["seconds"]["step"] > a["decode"]["seconds"]["step"]
    assert b["decode"]["tokens_per_s_cluster"] > 10 * a["decode"]["tokens_per_s_cluster"]


def test_plan_refuses_pro_bf16_on_one_a2_node():
    p = dsv4("plan", "--model", "v4-pro", "--cluster", "atlas800-a2-1node", "--format", "bf16")
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "does not fit" in err[0] and "GiB short" in err[0], p.stderr
    # 1.6T parameters x 2 bytes over 8 cards is ~390 GB per card: the shortfall is in the hundreds of GiB
    short = float(err[0].split(" GiB short")[0].rsplit(" ", 1)[-1])
    assert 250 < short < 400
    assert "DOES NOT FIT" in p.stdout


def test_plan_bad_input():
    p = dsv4("plan", "--model", "v4-flash", "--cluster", "atlas800-a2-1node", "--format", "int3")
    assert p.returncode != 0 and "unknown format 'int3'" in p.stderr
    p = dsv4("plan", "--model", "v4-flash", "--cluster", "nowhere.yaml", "--format", "w8a8")
    assert p.returncode != 0 and "no such cluster file" in p.stderr
    p = dsv4("plan", "--model", "v4-flash", "--cluster", "atlas800-a2-1node", "--format", "w8a8",
             "--context", str(2 ** 21))
    assert p.returncode != 0 and "max_position_embeddings" in p.stderr


def test_tp_split_matches_the_converter():
    from common import names
    from common.config import load_preset
    from tools.convert import plan as convert_cmd
    from tools.plan_cmd import tp_split

    cfg, _ = load_preset("tiny")
    for name, _shape, _kind in names.expected_tensors(cfg):
        assert tp_split(name) == (convert_cmd.tp_rule(name) is not None), name


# ---- deploy ----------------------------------------------------------------------------------------------------

def test_deploy_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "deploy"
    p = dsv4("deploy", "--model", "bench-small", "--cluster", "atlas800-a2-2node", "--out", str(out), "--dry-run",
             "--format", "w8a8")
    assert p.returncode == 0, p.stderr
    assert not out.exists()
    for name in ("rank_table.json", "launch_node0.sh", "launch_node1.sh", "preflight_node1.sh", "README.md"):
        assert str(out / name) in p.stdout
    # an existing directory is left exactly as it was (a non-empty one is refused without --force)
    out.mkdir()
    (out / "keep.txt").write_text("x")
    p = dsv4("deploy", "--model", "bench-small", "--cluster", "atlas800-a2-2node", "--out", str(out), "--dry-run")
    assert p.returncode == 2 and "not empty" in p.stderr and "keep.txt" in p.stderr
    assert dsv4("deploy", "--model", "bench-small", "--cluster", "atlas800-a2-2node", "--out", str(out),
                "--dry-run", "--force").returncode == 0
    assert sorted(q.name for q in out.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("launcher", ["torchrun", "msrun"])
def test_deploy_renders_valid_files_for_a_2_node_a2_cluster(tmp_path, launcher):
    out = tmp_path / "d"
    p = dsv4("deploy", "--model", "bench-small", "--cluster", "atlas800-a2-2node", "--out", str(out),
             "--launcher", launcher, "--format", "w8a8")
    assert p.returncode == 0, p.stderr
    names_ = sorted(q.name for q in out.iterdir())
    assert names_ == sorted(["README.md", "deploy.json", "launch_node0.sh", "launch_node1.sh", "preflight_node0.sh",
                             "preflight_node1.sh", "rank_table.json"])  # no .tmp left behind
    assert validate_rank_table(json.loads((out / "rank_table.json").read_text())) == 16
    for sh in out.glob("*.sh"):
        assert os.access(sh, os.X_OK)
        r = subprocess.run(["bash", "-n", str(sh)], capture_output=True, text=True)
        assert r.returncode == 0, f"{sh.name}: {r.stderr}"
    node1 = (out / "launch_node1.sh").read_text()
    for line in ("export HCCL_IF_IP=10.10.0.12", "export HCCL_SOCKET_IFNAME=enp189s0f0",
                 "export GLOO_SOCKET_IFNAME=enp189s0f0", "export HCCL_OP_EXPANSION_MODE=AIV",
                 "export ASCEND_RT_VISIBLE_DEVICES=0,1,2,3,4,5,6,7", "export LOCAL_WORLD_SIZE=8",
                 'export RANK_TABLE_FILE="$HERE/rank_table.json"', 'MASTER_ADDR="${MASTER_ADDR:-10.10.0.11}"',
                 'HCCL_BUFFSIZE="${HCCL_BUFFSIZE:-1024}"', 'HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-1800}"'):
        assert line in node1, line
    if launcher == "torchrun":
        assert "--nnodes 2 --node_rank 1 --nproc_per_node 8" in node1
        # torchrun scripts start `dsv4 serve` (node 0 adds the health check: tests/test_serve_multirank.py)
        assert "-m tools.cli serve --model" in node1 and "--backend torch --device npu --soc A2" in node1
    else:
        assert "msrun --worker_num=16 --local_worker_num=8" in node1 and "--node_rank=1" in node1
        # msrun runs a script file: the MindSpore EP entry point must work as one (absolute imports)
        assert "import ascend.mindspore_ep as m" in node1 and '"$DSV4_MS_EP" --model "$MODEL"' in node1
        import ascend.mindspore_ep as ms_ep

        r = subprocess.run([sys.executable, ms_ep.__file__, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "--prompt-ids" in r.stdout, r.stderr
    pre = (out / "preflight_node1.sh").read_text()
    for needle in ("npu-smi info", "hccn_tool -i \"$dev\" -link -g", "hccn_tool -i \"$dev\" -ip -g",
                   "1:192.168.101.102", "mem_get_info", "sha256sum -c", "torch_npu", "version.info"):
        assert needle in pre, needle
    meta = json.loads((out / "deploy.json").read_text())
    assert meta["world_size"] == 16 and meta["plan"]["format"] == "w8a8"
    assert meta["plan"]["runtime_layout"].startswith("EP16 x attn TP1/DP16")


def test_deploy_replaces_files_and_drops_nodes_no_longer_there(tmp_path):
    out = tmp_path / "d"
    assert dsv4("deploy", "--model", "bench-small", "--cluster", "atlas800-a2-2node", "--out",
                str(out)).returncode == 0
    assert (out / "launch_node1.sh").is_file()
    p = dsv4("deploy", "--model", "bench-small", "--cluster", "atlas800-a2-1node", "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert not (out / "launch_node1.sh").exists() and not (out / "preflight_node1.sh").exists()
    assert "removed" in p.stdout
    assert validate_rank_table(json.loads((out / "rank_table.json").read_text())) == 8


def test_deploy_refuses_a_model_that_does_not_fit(tmp_path):
    p = dsv4("deploy", "--model", "bench-small", "--cluster", "cpu-loopback-2", "--out", str(tmp_path / "o"),
             "--format", "bf16", "--context", "1048576", "--concurrency", "64")
    assert p.returncode != 0 and "does not fit" in p.stderr
    assert not (tmp_path / "o").exists()


def _fake_tool(bin_dir: Path, name: str, body: str) -> None:
    f = bin_dir / name
    f.write_text("#!/usr/bin/env bash\n" + body)
    f.chmod(0o755)


def test_npu_preflight_checks_each_device_nic(tmp_path):
    """Run the A2 preflight with stand-ins for npu-smi and hccn_tool: device 3 reports the wrong address."""
    out = tmp_path / "d"
    assert dsv4("deploy", "--model", "bench-small", "--cluster", "atlas800-a2-1node", "--out",
                str(out)).returncode == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_tool(bin_dir, "npu-smi", "echo 'npu-smi 24.1.0'\n")
    _fake_tool(bin_dir, "hccn_tool", 'dev=$2; case "$3" in -link) echo "link status: UP";; '
                                     '-ip) if [ "$dev" = 3 ]; then echo "ipaddr:192.168.100.199"; '
                                     'else echo "ipaddr:192.168.100.$((101 + dev))"; fi; '
                                     'echo "netmask:255.255.255.0";; esac\n')
    drv = tmp_path / "version.info"
    drv.write_text("Version=24.1.rc3\n")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", ASCEND_DRIVER_INFO=str(drv),
               PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    r = subprocess.run(["bash", str(out / "preflight_node0.sh")], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert "ok    npu-smi info" in lines
    assert "info  driver Version=24.1.rc3" in lines
    for d in range(8):
        assert f"ok    device {d} RoCE link up" in lines
    assert "ok    device 2 ip 192.168.100.103" in lines
    assert any(ln.startswith("FAIL  device 3 ip is not 192.168.100.104") for ln in lines), r.stdout
    assert any(ln.startswith("FAIL  host_ip 10.10.0.11 is not an address of this host") for ln in lines)
    assert "ok    model bench-small is a bundled preset" in lines


# ---- end to end: the generated CPU deployment runs 2 ranks -------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    cfg = small_config()
    d = tmp_path_factory.mktemp("ckpt")
    save_official(cfg, dict(random_weights(cfg, seed=5)), d)
    return d


def test_cpu_deployment_runs_two_ranks_and_matches_single_process(tmp_path, tiny_ckpt):
    if not (ROOT / "ascend" / "distributed.py").is_file():
        pytest.skip("multi-rank generate (ascend/distributed.py) is not in the tree yet")
    if "--device" not in dsv4("generate", "--help").stdout:
        pytest.skip("dsv4 generate has no --device option yet (multi-rank generate not wired into the CLI)")
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    out = tmp_path / "deploy"
    port = free_port()
    p = dsv4("deploy", "--model", str(tiny_ckpt), "--cluster", str(CLUSTER_DIR / "cpu-loopback-2.yaml"),
             "--out", str(out), "--master-port", str(port), "--format", "bf16", "--context", "4096",
             "--job", "generate")
    assert p.returncode == 0, p.stderr
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    pre = subprocess.run(["bash", str(out / "preflight_node0.sh")], capture_output=True, text=True, env=env,
                         timeout=120)
    assert pre.returncode == 0, pre.stdout + pre.stderr
    assert "all checks passed" in pre.stdout
    gen = ["--prompt-ids", "5,6,7,8,9,10,11,12,13,14,15,16;3,4,5", "--max-new-tokens", "6", "--ignore-eos", "--json"]
    run = subprocess.run(["bash", str(out / "launch_node0.sh"), *gen], capture_output=True, text=True, env=env,
                         timeout=300, cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, run.stdout  # rank 0 prints, rank 1 does not
    multi = json.loads(lines[0])
    assert multi["nproc"] == 2
    single = dsv4("generate", "--model", str(tiny_ckpt), "--backend", "cpu", *gen)
    assert single.returncode == 0, single.stderr
    ref = json.loads(single.stdout)
    assert multi["output_ids"] == ref["output_ids"]
    assert all(len(o) == 6 for o in multi["output_ids"])
