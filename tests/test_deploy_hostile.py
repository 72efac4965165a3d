"""`dsv4 deploy` against hostile cluster files and model paths: every value that reaches a rendered script is
refused by a strict grammar, and, with the grammar bypassed, the renderer's quoting alone keeps the scripts
from running anything. The rendered scripts are RUN here with the interpreter, launchers and device tools
replaced by stubs that only log their arguments; a marker file that an injected command would create must
not appear."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tools.cluster import load_cluster
from tools.deploy_cmd import render_launch, render_preflight

from .conftest import small_config

ROOT = Path(__file__).resolve().parent.parent
STUBS = ("python", "python3", "torchrun", "msrun", "ssh", "npu-smi", "hccn_tool", "ip")


def dsv4(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=str(ROOT))


def refused(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode in (2, 3), (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in p.stderr, (n, p.stderr)


def cpu_doc(**over) -> dict:
    doc = {"name": "c", "hardware": "cpu", "nodes": [{"name": "n0", "host_ip": "127.0.0.1", "if_name": "lo",
                                                      "processes": 2}]}
    doc.update(over)
    return doc


def write(tmp: Path, doc: dict | str, name: str = "c.yaml") -> Path:
    p = tmp / name
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return p


def deploy(tmp: Path, cluster: Path | str, model: str = "tiny", *extra: str) -> subprocess.CompletedProcess:
    return dsv4("deploy", "--model", model, "--cluster", str(cluster), "--out", str(tmp / "out"), *extra)


# ---- values refused at load, with a named error, before anything is written ----------------------------

def test_preset_used_here_deploys(tmp_path):
    """The baseline the refusals below differ from: the same cluster with ordinary values renders."""
    p = deploy(tmp_path, write(tmp_path, cpu_doc()))
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out" / "launch_node0.sh").is_file()


def _mark(tmp: Path) -> Path:
    return tmp / "INJECTED"


@pytest.mark.parametrize("case", ["host_ip_backticks", "node_name_newline", "cluster_name_newline",
                                  "master_addr_subshell", "if_name_trailing_newline", "env_value_newline",
                                  "device_ip_zone", "super_device_id"])
def test_hostile_cluster_values_are_refused(tmp_path, case):
    m = _mark(tmp_path)
    node = {"name": "n0", "host_ip": "127.0.0.1", "if_name": "lo", "processes": 2}
    doc = cpu_doc()
    field = case
    if case == "host_ip_backticks":
        node["host_ip"], field = f"fe80::1%`touch {m}`", "host_ip"
    elif case == "node_name_newline":
        node["name"], field = f"n0\ntouch {m}\n#", "name"
    elif case == "cluster_name_newline":
        doc["name"], field = f"c\ntouch {m}\n#", "name"
    elif case == "master_addr_subshell":
        doc["launcher"], field = {"master_addr": f"fe80::1%$(touch {m})"}, "launcher.master_addr"
    elif case == "if_name_trailing_newline":
        node["if_name"], field = "lo\n", "if_name"
    elif case == "env_value_newline":
        doc["launcher"], field = {"env": {"X": f"1\ntouch {m}"}}, "launcher.env.X"
    elif case in ("device_ip_zone", "super_device_id"):
        doc["hardware"] = "910b"
        doc["super_pod_id"] = "1"
        node = {"name": "n0", "host_ip": "10.0.0.1", "if_name": "eth0", "cards": 8,
                "device_ip": [f"192.168.0.{100 + d}" for d in range(8)], "super_device_id": list(range(8))}
        if case == "device_ip_zone":
            node["device_ip"][3], field = "fe80::1%eth0", "device_ip[3]"
        else:
            node["super_device_id"][2], field = "$(x)", "super_device_id[2]"
    doc["nodes"] = [node]
    p = deploy(tmp_path, write(tmp_path, doc), "bench-small" if doc["hardware"] == "910b" else "tiny")
    refused(p, field)
    assert not (tmp_path / "out").exists() and not m.exists()


def test_scoped_ipv6_with_an_interface_zone_is_accepted(tmp_path):
    doc = cpu_doc(launcher={"master_addr": "fe80::1%lo"})
    doc["nodes"][0]["host_ip"] = "fe80::1%lo"
    c = load_cluster(write(tmp_path, doc))
    assert c.master_addr == "fe80::1%lo" and c.nodes[0].host_ip == "fe80::1%lo"


def test_model_path_with_shell_metacharacters_is_refused(tmp_path):
    model = tmp_path / "m$(touch INJECTED)"
    model.mkdir()
    p = deploy(tmp_path, write(tmp_path, cpu_doc()), str(model))
    refused(p, "--model", "$()")
    assert not (tmp_path / "out").exists()


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    bomb = "\n".join(lines) + "\nname: c\nhardware: cpu\nnodes: [{name: n0, processes: 1, extra: *a8}]\n"
    assert len(bomb) < 1000
    p = deploy(tmp_path, write(tmp_path, bomb))
    refused(p, "alias")
    assert not (tmp_path / "out").exists()


def test_duplicate_yaml_keys_are_refused(tmp_path):
    text = "name: c\nhardware: cpu\nnodes:\n  - name: n0\n    processes: 2\n    processes: 4\n"
    refused(deploy(tmp_path, write(tmp_path, text)), "duplicate key 'processes'", "lines 5 and 6")
    text = "name: c\nhardware: cpu\nname: d\nnodes: [{name: n0}]\n"
    refused(deploy(tmp_path, write(tmp_path, text)), "duplicate key 'name'")


def test_a_fifo_as_cluster_file_is_named_as_such(tmp_path):
    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    refused(deploy(tmp_path, fifo), "not a regular file")


# ---- --out --------------------------------------------------------------------------------------------

def test_out_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "out"
    f.write_text("mine")
    refused(deploy(tmp_path, write(tmp_path, cpu_doc())), "--out", "not a directory")
    assert f.read_text() == "mine"


def test_out_non_empty_needs_force_and_foreign_files_are_never_deleted(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("the user's readme")
    (out / "notes.txt").write_text("the user's notes")
    c = write(tmp_path, cpu_doc())
    refused(deploy(tmp_path, c), "not empty", "--force")
    assert (out / "README.md").read_text() == "the user's readme"
    assert deploy(tmp_path, c, "tiny", "--force").returncode == 0
    assert (out / "notes.txt").read_text() == "the user's notes"
    assert "Deployment" in (out / "README.md").read_text()  # overwritten, as --force asked
    # an earlier deploy's own directory is re-rendered without --force; a tampered deploy.json listing the
    # user's file does not make deploy delete it
    meta = json.loads((out / "deploy.json").read_text())
    meta["files"] += ["notes.txt", "../outside.txt"]
    (out / "deploy.json").write_text(json.dumps(meta))
    (tmp_path / "outside.txt").write_text("x")
    p = deploy(tmp_path, c)
    assert p.returncode == 0, p.stderr
    assert (out / "notes.txt").is_file() and (tmp_path / "outside.txt").is_file()
    # a file deploy writes that the earlier deploy did not: refused without --force
    (out / "launch_node1.sh").write_text("user script")
    two = write(tmp_path, cpu_doc(nodes=[{"name": "n0", "host_ip": "10.0.0.1", "processes": 1},
                                         {"name": "n1", "host_ip": "10.0.0.2", "processes": 1}]), "two.yaml")
    refused(deploy(tmp_path, two), "launch_node1.sh", "--force")
    assert (out / "launch_node1.sh").read_text() == "user script"
    assert not [q for q in out.iterdir() if q.name.endswith(".tmp")]


# ---- model paths as seen on the nodes; --ep N conversions -------------------------------------------------

def test_model_path_only_on_the_nodes_is_a_warning(tmp_path):
    p = deploy(tmp_path, write(tmp_path, cpu_doc()), "/models/on-the-nodes/v4")
    assert p.returncode == 0, p.stderr
    assert "does not exist on this machine" in p.stderr
    assert "_DSV4_DEFAULT_MODEL" not in (tmp_path / "out" / "launch_node0.sh").read_text()
    assert 'MODEL="${MODEL:-/models/on-the-nodes/v4}"' in (tmp_path / "out" / "launch_node0.sh").read_text()
    refused(deploy(tmp_path, write(tmp_path, cpu_doc()), "relative/missing"), "absolute path")


@pytest.fixture(scope="module")
def ep2_conversion(tmp_path_factory) -> Path:
    from common.presets import random_weights
    from tools.testing.hf_bridge import save_official

    root = tmp_path_factory.mktemp("ep2")
    cfg = small_config()
    save_official(cfg, dict(random_weights(cfg, seed=5)), root / "src")
    p = dsv4("convert", "--src", str(root / "src"), "--dst", str(root / "ep2"), "--format", "bf16", "--ep", "2")
    assert p.returncode == 0, p.stderr
    return root / "ep2"


def test_ep_conversion_for_another_world_size_is_refused(tmp_path, ep2_conversion):
    four = write(tmp_path, cpu_doc(nodes=[{"name": "n0", "host_ip": "127.0.0.1", "processes": 4}]))
    refused(deploy(tmp_path, four, str(ep2_conversion)), "converted for 2 expert-parallel ranks", "--ep 4")
    assert not (tmp_path / "out").exists()


def test_ep_conversion_preflight_finds_the_shards(tmp_path, ep2_conversion):
    p = deploy(tmp_path, write(tmp_path, cpu_doc()), str(ep2_conversion), "--context", "64")
    assert p.returncode == 0, p.stderr
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    r = subprocess.run(["bash", str(tmp_path / "out" / "preflight_node0.sh")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert "FAIL  no *.safetensors" not in r.stdout, r.stdout
    assert "ok    3 safetensors files in" in r.stdout, r.stdout
    assert "ok    model files match dsv4_manifest.json (sha256)" in r.stdout, r.stdout
    assert not list(tmp_path.glob("dsv4_sha.*"))  # the mktemp list is removed


def test_preflight_checksum_list_uses_mktemp(tmp_path):
    assert deploy(tmp_path, write(tmp_path, cpu_doc())).returncode == 0
    text = (tmp_path / "out" / "preflight_node0.sh").read_text()
    assert 'mktemp "${TMPDIR:-/tmp}/dsv4_sha.XXXXXXXX"' in text and "dsv4_sha.$$" not in text


def test_msrun_readme_passes_only_arguments_mindspore_ep_accepts(tmp_path):
    p = deploy(tmp_path, write(tmp_path, cpu_doc(launcher={"default": "msrun"})))
    assert p.returncode == 0, p.stderr
    readme = (tmp_path / "out" / "README.md").read_text()
    example = readme.split("e.g. `", 1)[1].split("`", 1)[0]
    assert example.startswith("./launch_node0.sh ")
    import ascend.mindspore_ep as ms_ep

    args = example.split()[1:]
    r = subprocess.run([sys.executable, ms_ep.__file__, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for a in args:
        if a.startswith("--"):
            assert a in r.stdout, (a, r.stdout)
    assert "--json" not in example and "--prompt " not in example


# ---- defence in depth: hostile values with the grammar bypassed, scripts run with stub tools --------------

def _stub_bin(tmp: Path) -> tuple[Path, Path]:
    bin_dir, log = tmp / "stubbin", tmp / "calls.log"
    bin_dir.mkdir()
    for name in STUBS:
        f = bin_dir / name
        f.write_text(f'#!/bin/sh\nprintf "%s\\n" "{name} $*" >> "{log}"\nexit 0\n')
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    return bin_dir, log


@pytest.mark.parametrize("profile", ["cpu", "npu"])
@pytest.mark.parametrize("launcher", ["torchrun", "msrun"])
def test_rendered_scripts_quote_every_value(tmp_path, profile, launcher):
    marks = {k: tmp_path / f"RAN_{k}" for k in ("node", "cluster", "host", "master", "ifname", "model", "env",
                                               "env2", "path")}
    base = load_cluster("cpu-loopback-2" if profile == "cpu" else "atlas800-a2-1node")
    node = dataclasses.replace(base.nodes[0], name=f"n0\ntouch {marks['node']}\n#",
                               host_ip=f"fe80::1%`touch {marks['host']}`",
                               if_name=f"lo$(touch {marks['ifname']})")
    cluster = dataclasses.replace(base, nodes=(node,), name=f"c\ntouch {marks['cluster']}\n#",
                                  master_addr=f"fe80::1%$(touch {marks['master']})",
                                  path=str(tmp_path / f"c$(touch {marks['path']}).yaml"),
                                  env={"A": f"1\ntouch {marks['env']}", "B": f"$(touch {marks['env2']})"})
    model = str(tmp_path / f"m$(touch {marks['model']})\"'`touch {marks['model']}`")
    bin_dir, log = _stub_bin(tmp_path)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
           "PYTHON": str(bin_dir / "python3")}
    for name, text in (("launch.sh", render_launch(cluster, node, model, launcher, 60)),
                       ("preflight.sh", render_preflight(cluster, node, model, 1.0))):
        script = tmp_path / name
        script.write_text(text)
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, name
        subprocess.run(["bash", str(script), "--max-new-tokens", "1"], capture_output=True, text=True, env=env,
                       timeout=60, cwd=str(tmp_path))
        ran = [k for k, m in marks.items() if m.exists()]
        assert not ran, f"{name} ran an injected command from: {ran}"
    calls = log.read_text()
    # the scripts did run through: the launcher received the hostile model path as one literal argument
    first = "torch.distributed.run" if launcher == "torchrun" else "msrun "
    assert first in calls, calls
    assert f"--model {model}" in calls, calls
