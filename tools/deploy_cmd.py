"""`dsv4 deploy`: render a cluster file into the files an operator runs.

Written to --out (each to NAME.tmp, then renamed; `--dry-run` writes nothing and prints what it would write):

* `rank_table.json` -- the HCCL rank table (RANK_TABLE_FILE), see `tools.cluster.rank_table`;
* `launch_node<i>.sh` -- one per node: the HCCL / gloo / torch.distributed environment, then torchrun
  (`python -m torch.distributed.run ... -m tools.cli generate ...`) or msrun, one rank per device;
* `preflight_node<i>.sh` -- one per node: host NIC and address, master port, NPU driver and CANN versions,
  `npu-smi info`, `hccn_tool -i N -link -g` / `-ip -g` per device, free device memory against the plan,
  python imports (torch, torch_npu / gloo, dsv4), model files and `dsv4_manifest.json` sha256 sums;
* `README.md` -- what to run where, the overrides the scripts take, the rank-table fields;
* `deploy.json` -- what was rendered (the cluster, the model, the layout and the memory plan).

The same rendering serves NPU clusters and the CPU loopback profile (gloo, `--device cpu --backend cpu`),
which is how the deployment path is tested end to end on a machine without NPUs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import ConfigError, ModelConfig, load_config, model_config
from common.converted import CONVERT_INFO
from common.loading import is_preset, split_indexes

from .cluster import Cluster, Node, load_cluster, rank_table_json
from .errors import EXIT_USAGE, CliError, log
from .plan_cmd import GiB, Options, load_recipe, plan, resolve_model

DEPLOY_JSON = "deploy.json"
RANK_TABLE = "rank_table.json"


@dataclass(frozen=True)
class Rendered:
    name: str  # file name inside --out
    text: str
    executable: bool
    summary: str


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# characters a model path may hold: it is rendered into every script (quoted), and a path with shell
# metacharacters or control characters is far more likely an attack or a mistake than a real directory
_PATH = re.compile(r"[A-Za-z0-9_./+,:@=%~ -]+")


def _q(v: Any) -> str:
    return shlex.quote(str(v))


def _comment(text: str) -> str:
    """A `#` comment line: a newline in `text` would end the comment and start a command."""
    return "# " + _CONTROL.sub("?", text)


def _default(var: str, value: Any, export: bool = False) -> list[str]:
    """`VAR` from the caller's environment, else `value`; the value is never re-parsed by the shell (a
    `${VAR:-value}` word inside double quotes would still run `$(...)` in it)."""
    v = str(value)
    pre = "export " if export else ""
    if _q(v) == v:  # only characters shlex leaves unquoted: literal inside "${VAR:-...}"
        return [f"{pre}{var}=\"${{{var}:-{v}}}\""]
    return [f"_DSV4_DEFAULT_{var}={_q(v)}", f"{pre}{var}=\"${{{var}:-$_DSV4_DEFAULT_{var}}}\""]


def check_model_path(path: str, where: str = "--model") -> str:
    """A model path rendered into the scripts: printable, no shell metacharacters."""
    if not path or not _PATH.fullmatch(path):
        bad = sorted({c for c in path if not _PATH.fullmatch(c)}) if path else []
        raise CliError(f"{where}: {path!r}: " + (f"character(s) {''.join(bad)!r} are not allowed in a path "
                                                  f"rendered into shell scripts (letters, digits, space and "
                                                  f"_./+,:@=%~- only); rename or symlink the directory"
                                                  if bad else "empty path"), EXIT_USAGE)
    return path


# ---- model -------------------------------------------------------------------------------------------------

def resolve_deploy_model(spec: str) -> tuple[ModelConfig | None, str, str | None]:
    """(config, the --model value the scripts pass, format recorded by dsv4 convert). Presets must carry
    weights. A directory is read here when this machine sees it; the path is as seen on the nodes, so an
    absolute path that does not exist here is accepted with a warning (config None: nothing model-specific
    is checked or planned; the preflight scripts check it on each node)."""
    if is_preset(spec):
        return model_config(spec, need_weights=True)[0], spec, None
    check_model_path(spec)
    p = Path(spec)
    if not p.exists():
        if not p.is_absolute():
            raise ConfigError(f"{spec}: not a preset and no such directory here; give the model directory as an "
                              f"absolute path as seen on the nodes")
        log(f"dsv4 deploy: warning: model directory {spec} does not exist on this machine; taking it as the path "
            f"on the nodes (config, expert split and memory plan not checked here: run preflight_node<i>.sh)")
        return None, spec, None
    if not p.is_dir():
        raise ConfigError(f"{spec}: not a directory (a model directory holds config.json and *.safetensors)")
    cfg = load_config(p)
    _, _, fmt = resolve_model(str(p))
    return cfg, check_model_path(str(p.resolve()), f"--model {spec} (resolved)"), fmt


def check_layout(model_dir: Path, world: int) -> None:
    """A `dsv4 convert --ep N` output runs on exactly N ranks (the runtime refuses any other world size, after
    the operator has started every node): refuse the mismatch here, reading the conversion record the way
    the runtime does (common.loading.split_indexes)."""
    try:
        split_indexes(model_dir, 0, world)
    except ConfigError as e:
        raise ConfigError(f"{e} (the cluster has {world} ranks: convert again with --ep {world})") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise ConfigError(f"{model_dir / CONVERT_INFO}: malformed 'parallel' section ({e})") from None


# ---- rendering ---------------------------------------------------------------------------------------------

def _first_rank(cluster: Cluster, node: Node) -> int:
    return sum(n.ranks for n in cluster.nodes[: node.index])


def _env_block(cluster: Cluster, node: Node) -> list[str]:
    """`export` lines for one node; MASTER_* and the timeouts stay overridable from the caller's environment."""
    hw = cluster.hardware
    lines = [
        "# torch.distributed rendezvous (node 0's host); override MASTER_PORT if the port is taken",
        *_default("MASTER_ADDR", cluster.master_addr, export=True),
        *_default("MASTER_PORT", cluster.master_port, export=True),
        "# the host NIC HCCL and gloo bootstrap over",
        f"export HCCL_IF_IP={_q(node.host_ip)}",
    ]
    if node.if_name:
        lines += [f"export HCCL_SOCKET_IFNAME={_q(node.if_name)}", f"export GLOO_SOCKET_IFNAME={_q(node.if_name)}"]
    lines += [
        "# HCCL: buffer per communicator (MB; 2x this is allocated per communicator), collectives on AI-Vector",
        "# cores, and how long to wait for the other ranks to connect",
        *_default("HCCL_BUFFSIZE", cluster.hccl_buffsize_mb, export=True),
        "export HCCL_OP_EXPANSION_MODE=AIV",
        *_default("HCCL_CONNECT_TIMEOUT", cluster.hccl_connect_timeout_s, export=True),
        "export RANK_TABLE_FILE=\"$HERE/" + RANK_TABLE + "\"",
        "# ranks on this node (torch_npu's static kernels silently switch off without it)",
        f"export LOCAL_WORLD_SIZE={int(node.ranks)}",
    ]
    if hw.is_npu:
        lines += ["# the devices this node's ranks use, local rank i -> the i-th listed device",
                  f"export ASCEND_RT_VISIBLE_DEVICES={_q(','.join(str(int(d)) for d in node.device_ids))}"]
    for k, v in sorted(cluster.env.items()):
        lines.append(f"export {k}={_q(v)}")
    return lines


def _generate_args(cluster: Cluster, launcher: str) -> list[str]:
    hw = cluster.hardware
    if not hw.is_npu:
        return ["--backend", "cpu", "--device", "cpu"]
    backend = "mindspore" if launcher == "msrun" else "torch"
    return ["--backend", backend, "--device", "npu", "--soc", hw.soc]


def _example_args(index: int, launcher: str) -> str:
    """An example launch command line; msrun runs ascend/mindspore_ep.py, which takes only --prompt-ids and
    --max-new-tokens (not `dsv4 generate`'s options)."""
    if launcher == "msrun":
        return f"launch_node{index}.sh --prompt-ids 0,5,6 --max-new-tokens 16"
    return f"launch_node{index}.sh --prompt-ids 0,5,6 --max-new-tokens 16 --json"


@dataclass(frozen=True)
class ServeTarget:
    """Where the rendered `dsv4 serve` listens (validated before rendering)."""

    host: str
    port: int
    health_timeout: int


_HOST_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:")


def serve_target(host: str, port: int, cluster: Cluster) -> ServeTarget:
    if not host or not set(host) <= _HOST_CHARS or host.startswith("-"):
        raise CliError(f"--serve-host {host!r}: expected an IP address or host name", EXIT_USAGE)
    if not 1 <= port <= 65535:
        raise CliError(f"--serve-port {port}: must be in [1, 65535]", EXIT_USAGE)
    return ServeTarget(host, port, 1800 if cluster.is_npu else 300)


def _serve_torchrun(cluster: Cluster, node: Node, gen: str, serve: ServeTarget) -> list[str]:
    """torchrun running `dsv4 serve` on every rank; on node 0 (rank 0 serves HTTP) a health check after start,
    and SIGINT/SIGTERM stop the ranks (rank 0 shuts the server down and releases the others) before exiting."""
    n = len(cluster.nodes)
    run = [
        "\"$PYTHON\" -m torch.distributed.run \\",
        f"    --nnodes {n} --node_rank {node.index} --nproc_per_node {node.ranks} \\",
        "    --master_addr \"$MASTER_ADDR\" --master_port \"$MASTER_PORT\" \\",
        f"    -m tools.cli serve --model \"$MODEL\" --host \"$SERVE_HOST\" --port \"$SERVE_PORT\" {gen} \"$@\"",
    ]
    L = ["", f"SERVE_HOST=\"${{SERVE_HOST:-{_q(serve.host)}}}\"", f"SERVE_PORT=\"${{SERVE_PORT:-{_q(serve.port)}}}\"",
         f"HEALTH_TIMEOUT=\"${{HEALTH_TIMEOUT:-{_q(serve.health_timeout)}}}\"", ""]
    if node.index != 0:
        return L + ["# one process per rank; rank 0 (node 0) serves HTTP, these ranks step the same batches",
                    "exec " + run[0]] + run[1:]
    return L + [
        "# one process per rank; rank 0 serves HTTP, every rank steps the same batches (expert parallel)",
        run[0][:-2] + " \\", *run[1:-1], run[-1] + " &",
        "PID=$!",
        "# SIGINT/SIGTERM: stop the ranks (rank 0 shuts the server down and tells the others), then torchrun exits",
        "trap 'pkill -TERM -P \"$PID\" 2>/dev/null || true' INT TERM",
        "case \"$SERVE_HOST\" in 0.0.0.0|::) CHECK_HOST=127.0.0.1 ;; *) CHECK_HOST=\"$SERVE_HOST\" ;; esac",
        "URL=\"http://$CHECK_HOST:$SERVE_PORT\"",
        "# health check after start: /health answers 200 once every rank has loaded and the engine runs",
        "healthy=0",
        "for _ in $(seq \"$HEALTH_TIMEOUT\"); do",
        "    kill -0 \"$PID\" 2>/dev/null || break",
        "    if \"$PYTHON\" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \\",
        "        \"$URL/health\" 2>/dev/null; then healthy=1; break; fi",
        "    sleep 1",
        "done",
        "if [ \"$healthy\" = 1 ]; then",
        f"    echo \"dsv4 serve: healthy at $URL ({cluster.world_size} ranks); OpenAI API at $URL/v1\"",
        "else",
        "    echo \"dsv4 serve: $URL/health did not answer within ${HEALTH_TIMEOUT}s; stopping\" >&2",
        "    pkill -TERM -P \"$PID\" 2>/dev/null || true",
        "fi",
        "set +e",
        "while :; do wait \"$PID\"; code=$?; kill -0 \"$PID\" 2>/dev/null || break; done",
        "[ \"$healthy\" = 1 ] || exit 1",
        "exit \"$code\"",
    ]


def render_launch(cluster: Cluster, node: Node, model: str, launcher: str, dist_timeout: int,
                  serve: ServeTarget | None = None) -> str:
    W, n = cluster.world_size, len(cluster.nodes)
    first = _first_rank(cluster, node)
    gen = " ".join(_q(a) for a in _generate_args(cluster, launcher)) + f" --dist-timeout {int(dist_timeout)}"
    head = [
        "#!/usr/bin/env bash",
        _comment(f"dsv4 deploy: launch script for node {node.index} ({node.name}) of cluster {cluster.name}"),
        _comment(f"{cluster.describe()}; this node runs ranks {first}..{first + node.ranks - 1} "
                 f"({node.ranks} processes, one per {'device' if cluster.is_npu else 'process slot'})."),
        _comment(f"Start it on {node.name} ({node.host_ip}); start every node's script (any order: the rendezvous "
                 f"waits)."),
        _comment(("Arguments are passed to ascend/mindspore_ep.py, e.g.  ./" if launcher == "msrun" else
                  "Arguments are passed to `dsv4 generate`, e.g.  ./") + f"{_example_args(node.index, launcher)}"),
        "# Overrides: MODEL=<dir> PYTHON=<interpreter> MASTER_PORT=<port> HCCL_BUFFSIZE=<MB>",
        "set -euo pipefail",
        "HERE=\"$(cd \"$(dirname \"${BASH_SOURCE[0]}\")\" && pwd)\"",
        *_default("MODEL", model),
        "PYTHON=\"${PYTHON:-python3}\"",
        "",
    ]
    env = _env_block(cluster, node)
    if launcher == "torchrun" and serve is not None:
        head[4] = (f"# Arguments are passed to `dsv4 serve`, e.g.  ./launch_node{node.index}.sh --max-num-seqs 32; "
                   "rank 0 serves the OpenAI API")
        head[5] += " SERVE_HOST=<addr> SERVE_PORT=<port> HEALTH_TIMEOUT=<s>"
        cmd = _serve_torchrun(cluster, node, gen, serve)
    elif launcher == "torchrun":
        cmd = [
            "",
            "# one process per rank; torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and `dsv4 generate` joins the group",
            "exec \"$PYTHON\" -m torch.distributed.run \\",
            f"    --nnodes {int(n)} --node_rank {int(node.index)} --nproc_per_node {int(node.ranks)} \\",
            "    --master_addr \"$MASTER_ADDR\" --master_port \"$MASTER_PORT\" \\",
            f"    -m tools.cli generate --model \"$MODEL\" {gen} \"$@\"",
        ]
    else:
        cmd = [
            "",
            "# msrun (MindSpore) starts the ranks and runs a script file: the MindSpore expert-parallel entry point",
            "DSV4_MS_EP=\"$(\"$PYTHON\" -c 'import ascend.mindspore_ep as m; print(m.__file__)')\"",
            f"LOG_DIR=\"${{LOG_DIR:-$HERE/msrun_log_node{node.index}}}\"",
            f"exec msrun --worker_num={int(W)} --local_worker_num={int(node.ranks)} \\",
            f"    --master_addr=\"$MASTER_ADDR\" --master_port=\"$MASTER_PORT\" --node_rank={int(node.index)} \\",
            f"    --log_dir=\"$LOG_DIR\" --join=True --cluster_time_out={int(cluster.hccl_connect_timeout_s)} \\",
            "    \"$DSV4_MS_EP\" --model \"$MODEL\" \"$@\"",
        ]
    return "\n".join(head + env + cmd) + "\n"


def render_preflight(cluster: Cluster, node: Node, model: str, need_gib: float | None) -> str:
    hw = cluster.hardware
    L = [
        "#!/usr/bin/env bash",
        _comment(f"dsv4 deploy: preflight checks for node {node.index} ({node.name}) of cluster {cluster.name}."),
        _comment(f"Run on {node.name} before launch_node{node.index}.sh; exits 1 if any check fails."),
        "# Overrides: MODEL=<dir> PYTHON=<interpreter> MASTER_PORT=<port> SKIP_SHA=1 (skip checksum verification)",
        "set -uo pipefail",
        "HERE=\"$(cd \"$(dirname \"${BASH_SOURCE[0]}\")\" && pwd)\"",
        *_default("MODEL", model),
        "PYTHON=\"${PYTHON:-python3}\"",
        *_default("MASTER_ADDR", cluster.master_addr),
        *_default("MASTER_PORT", cluster.master_port),
        "FAILS=0",
        "pass() { printf 'ok    %s\\n' \"$*\"; }",
        "fail() { printf 'FAIL  %s\\n' \"$*\"; FAILS=$((FAILS + 1)); }",
        "info() { printf 'info  %s\\n' \"$*\"; }",
        "",
        "# -- host network: the interface and address the cluster file names",
    ]
    if node.if_name:
        L.append(f"if [ -e {_q('/sys/class/net/' + node.if_name)} ]; then "
                 f"pass {_q(f'interface {node.if_name} present')}; "
                 f"else fail {_q(f'interface {node.if_name} not found (if_name in {Path(cluster.path).name})')}; fi")
    L += [
        f"if \"$PYTHON\" -c 'import socket,sys; s=socket.socket(socket.AF_INET6 if \":\" in sys.argv[1] else "
        f"socket.AF_INET); s.bind((sys.argv[1], 0))' {_q(node.host_ip)} "
        f"2>/dev/null; then pass {_q(f'host_ip {node.host_ip} is an address of this host')}; "
        f"else fail {_q(f'host_ip {node.host_ip} is not an address of this host (wrong node?)')}; fi",
    ]
    if node.index == 0:
        L.append("if \"$PYTHON\" -c 'import socket,sys; s=socket.socket(); "
                 "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], int(sys.argv[2])))' "
                 "\"$MASTER_ADDR\" \"$MASTER_PORT\" 2>/dev/null; then pass \"master port $MASTER_ADDR:$MASTER_PORT "
                 "is free\"; else fail \"master port $MASTER_ADDR:$MASTER_PORT is in use (set MASTER_PORT on every "
                 "node)\"; fi")
    else:
        L.append("if ! command -v ip >/dev/null 2>&1; then info \"no 'ip' tool: route to $MASTER_ADDR not checked\"; "
                 "elif ip route get \"$MASTER_ADDR\" >/dev/null 2>&1; then pass \"route to master $MASTER_ADDR\"; "
                 "else fail \"no route to master $MASTER_ADDR (node 0's host_ip)\"; fi")
    L.append("")
    if hw.is_npu:
        devs = " ".join(_q(f"{int(d)}:{ip}") for d, ip in zip(node.device_ids, node.device_ips or (), strict=True))
        L += [
            "# -- NPU driver, CANN and devices",
            "if command -v npu-smi >/dev/null 2>&1; then",
            "  if npu-smi info >/dev/null 2>&1; then pass \"npu-smi info\"; else fail \"npu-smi info failed\"; fi",
            "else fail \"npu-smi not found (Ascend driver not installed or not on PATH)\"; fi",
            "DRV=\"${ASCEND_DRIVER_INFO:-/usr/local/Ascend/driver/version.info}\"",
            "if [ -r \"$DRV\" ]; then info \"driver $(grep -m1 -i 'version' \"$DRV\")\"; "
            "else fail \"$DRV not found (Ascend driver)\"; fi",
            "CANN_HOME=\"${ASCEND_HOME_PATH:-/usr/local/Ascend/ascend-toolkit/latest}\"",
            "CANN_INFO=$(ls \"$CANN_HOME\"/*/ascend_toolkit_install.info 2>/dev/null | head -n1)",
            "if [ -n \"$CANN_INFO\" ]; then info \"CANN $(grep -m1 '^version=' \"$CANN_INFO\")\"; "
            "else fail \"CANN toolkit not found under $CANN_HOME (source set_env.sh?)\"; fi",
            "if command -v hccn_tool >/dev/null 2>&1; then",
            f"  for pair in {devs}; do",
            "    dev=${pair%%:*}; want=${pair#*:}",
            "    link=$(hccn_tool -i \"$dev\" -link -g 2>&1)",
            "    if echo \"$link\" | grep -qi 'link status: *up'; then pass \"device $dev RoCE link up\"; "
            "else fail \"device $dev RoCE link: $(echo $link)\"; fi",
            "    ip=$(hccn_tool -i \"$dev\" -ip -g 2>&1)",
            "    if echo \"$ip\" | grep -Eq \"ipaddr: *${want//./\\\\.}([^0-9]|\\$)\"; then "
            "pass \"device $dev ip $want\"; "
            "else fail \"device $dev ip is not $want (device_ip in the cluster file): $(echo $ip)\"; fi",
            "  done",
            "else fail \"hccn_tool not found (Ascend driver tools)\"; fi",
            "",
            "# -- python stack and free device memory",
            f"export ASCEND_RT_VISIBLE_DEVICES={_q(','.join(str(int(d)) for d in node.device_ids))}",
            "if \"$PYTHON\" -c 'import torch, torch_npu' 2>/dev/null; then "
            "pass \"import torch, torch_npu ($(\"$PYTHON\" -c 'import torch, torch_npu; "
            "print(torch.__version__, torch_npu.__version__)' 2>/dev/null))\"; "
            "else fail \"cannot import torch and torch_npu with $PYTHON\"; fi",
        ]
        need = f"{need_gib:.2f}" if need_gib is not None else "0"
        L += [
            f"NEED_GIB={need}   # the memory plan's per-device total (dsv4 plan; 0 = no plan)",
            "\"$PYTHON\" - \"$NEED_GIB\" <<'PY' || FAILS=$((FAILS + 1))",
            "import sys",
            "need = float(sys.argv[1])",
            "try:",
            "    import torch, torch_npu  # noqa: F401",
            "except ImportError:",
            "    sys.exit(0)  # reported above",
            "bad = 0",
            "for i in range(torch.npu.device_count()):",
            "    free, total = torch.npu.mem_get_info(i)",
            "    ok = free / 2**30 >= need",
            "    bad += not ok",
            "    state = 'ok   ' if ok else 'FAIL '",
            "    print(f\"{state} device {i}: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free\"",
            "          + (f\" (plan needs {need:.1f} GiB)\" if need else \"\"))",
            "sys.exit(1 if bad else 0)",
            "PY",
        ]
    else:
        total_need = (need_gib or 0.0) * node.ranks
        L += [
            "# -- python stack and free host memory (CPU ranks share this host)",
            "if \"$PYTHON\" -c 'import torch, torch.distributed as d, sys; sys.exit(0 if d.is_gloo_available() "
            "else 1)' 2>/dev/null; then pass \"torch with gloo ($(\"$PYTHON\" -c 'import torch; "
            "print(torch.__version__)'))\"; else fail \"torch with gloo not importable by $PYTHON\"; fi",
            f"NEED_GIB={total_need:.2f}   # the memory plan's per-process total x {node.ranks} processes (0 = no plan)",
            "AVAIL_KB=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo 2>/dev/null || echo 0)",
            "if awk -v a=\"$AVAIL_KB\" -v n=\"$NEED_GIB\" 'BEGIN { exit !(a / 1048576 >= n) }'; then "
            "pass \"host memory available: $((AVAIL_KB / 1048576)) GiB (plan needs $NEED_GIB GiB)\"; "
            "else fail \"host memory available $((AVAIL_KB / 1048576)) GiB < plan $NEED_GIB GiB\"; fi",
        ]
    L += [
        "if \"$PYTHON\" -c 'import tools.cli' 2>/dev/null; then pass \"dsv4 importable (tools.cli)\"; "
        "else fail \"dsv4 not importable by $PYTHON (pip install -e . in the repository)\"; fi",
        "",
        "# -- model files",
        "if [ -d \"$MODEL\" ]; then",
        "  if [ -f \"$MODEL/config.json\" ]; then pass \"model config $MODEL/config.json\"; "
        "else fail \"no config.json in $MODEL\"; fi",
        # a `dsv4 convert --ep N` output keeps its shards under shared/ and ep-*/
        "  ST=0; for f in \"$MODEL\"/*.safetensors \"$MODEL\"/*/*.safetensors; do "
        "[ -f \"$f\" ] && ST=$((ST + 1)); done",
        "  if [ \"$ST\" -gt 0 ]; then pass \"$ST safetensors files in $MODEL\"; "
        "else fail \"no *.safetensors in $MODEL (nor in its subdirectories)\"; fi",
        "  if [ -f \"$MODEL/dsv4_manifest.json\" ]; then",
        "    if [ \"${SKIP_SHA:-0}\" = 1 ]; then info \"SKIP_SHA=1: checksums of dsv4_manifest.json not verified\"; ",
        "    else",
        # mktemp: a predictable name in a shared /tmp could be pre-created or linked by another user
        "      if ! SHA_LIST=$(mktemp \"${TMPDIR:-/tmp}/dsv4_sha.XXXXXXXX\"); then fail \"mktemp failed\"; "
        "elif \"$PYTHON\" -c 'import json,sys; m=json.load(open(sys.argv[1])); "
        "[print(r[\"sha256\"] + \"  \" + p) for p, r in sorted(m.get(\"files\", {}).items())]' "
        "\"$MODEL/dsv4_manifest.json\" > \"$SHA_LIST\" && "
        "(cd \"$MODEL\" && sha256sum -c --quiet \"$SHA_LIST\"); then "
        "pass \"model files match dsv4_manifest.json (sha256)\"; "
        "else fail \"model files do not match dsv4_manifest.json (sha256sum -c)\"; fi",
        "      [ -n \"${SHA_LIST:-}\" ] && rm -f \"$SHA_LIST\"",
        "    fi",
        "  else info \"no dsv4_manifest.json in $MODEL: checksums not verified\"; fi",
        "elif \"$PYTHON\" -c 'import sys; from common.loading import is_preset; sys.exit(0 if is_preset(sys.argv[1]) "
        "else 1)' \"$MODEL\" 2>/dev/null; then pass \"model $MODEL is a bundled preset\"",
        "else fail \"model directory $MODEL not found\"; fi",
        "",
        f"if [ \"$FAILS\" -eq 0 ]; then echo \"preflight node {int(node.index)}: all checks passed\"; exit 0; fi",
        "echo \"preflight node " + str(int(node.index)) + ": $FAILS check(s) failed\"; exit 1",
    ]
    return "\n".join(L) + "\n"


def render_readme(cluster: Cluster, model: str, launcher: str, plan_info: dict[str, Any] | None,
                  experts_per_rank: int | None) -> str:
    hw = cluster.hardware
    L = [
        f"# Deployment: {cluster.name}",
        "",
        f"Generated by `dsv4 deploy` from `{cluster.path}` for model `{model}`.",
        f"Cluster: {cluster.describe()}; hardware profile `{hw.name}` ({hw.product}); launcher `{launcher}`.",
        "",
        "| node | host | interface | ranks | devices | launch | preflight |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in cluster.nodes:
        first = _first_rank(cluster, n)
        devs = ",".join(map(str, n.device_ids)) if hw.is_npu else f"{n.ranks} processes"
        L.append(f"| {n.index} {n.name} | {n.host_ip} | {n.if_name or '-'} | {first}-{first + n.ranks - 1} | {devs} "
                 f"| `launch_node{n.index}.sh` | `preflight_node{n.index}.sh` |")
    L += ["", "## Layout and memory", ""]
    L.append("The multi-rank runtime (`dsv4 generate` under torchrun, `ascend/distributed.py`) runs expert "
             f"parallelism over all {cluster.world_size} ranks ("
             + (f"{experts_per_rank} routed experts per layer each" if experts_per_rank is not None else
                "n_routed_experts / world size routed experts per layer each") + ") "
             "and attention data parallelism (each rank decodes its own prompts); attention tensor parallelism is "
             "not implemented by the runtime yet.")
    if plan_info:
        L += ["", f"Memory plan (`dsv4 plan`, format `{plan_info['format']}`, context {plan_info['context']}, "
                  f"concurrency {plan_info['concurrency']}) for this layout, per device:", "",
              "| item | GiB |", "|---|---|"]
        for k, v in plan_info["memory_gib"].items():
            L.append(f"| {k} | {v:.2f} |")
        L.append("")
        L.append(f"Usable {plan_info['usable_gib']:.2f} GiB ({hw.memory_gib:g} GiB x {plan_info['mem_util']:.2f}); "
                 f"headroom {plan_info['headroom_gib']:.2f} GiB. The preflight scripts require "
                 f"{plan_info['memory_gib']['total']:.2f} GiB free per device.")
        if plan_info.get("recommended") and plan_info["recommended"] != plan_info["runtime_layout"]:
            L.append(f"`dsv4 plan` would recommend {plan_info['recommended']} on this cluster (this deployment runs "
                     f"{plan_info['runtime_layout']}); see `dsv4 plan --model ... --cluster {cluster.path}`.")
    else:
        L.append("")
        L.append("No memory plan: pass `--format` (or deploy a `dsv4 convert` output, which records its format) to "
                 "have the preflight check free device memory against the plan.")
    L += [
        "", "## Steps", "",
        "1. Copy this directory to every node at the same path (the scripts find the rank table next to "
        "themselves). The model directory must exist on every node at the same path, or pass `MODEL=<dir>`.",
        "2. On each node *i*: `./preflight_node<i>.sh` -- every line must read `ok` (or `info`).",
        "3. On each node *i*: `./launch_node<i>.sh ["
        + ("ascend/mindspore_ep.py arguments" if launcher == "msrun" else "dsv4 generate arguments") + "]`, e.g. "
        + ("`./launch_node0.sh --prompt-ids 0,5,6 --max-new-tokens 64` (msrun runs ascend/mindspore_ep.py, which "
           "takes token ids and --max-new-tokens only)" if launcher == "msrun" else
           "`./launch_node0.sh --prompt \"Hello\" --max-new-tokens 64 --json`") + ". Start all nodes within "
        f"HCCL_CONNECT_TIMEOUT ({cluster.hccl_connect_timeout_s} s); rank 0 prints the result.",
        "",
        "Overrides (environment): `MODEL`, `PYTHON` (interpreter with dsv4 installed), `MASTER_PORT` (same on every "
        "node), `HCCL_BUFFSIZE`, `HCCL_CONNECT_TIMEOUT`, `SKIP_SHA=1` (preflight: skip checksum verification).",
        "",
        "## Environment set by the launch scripts", "",
        "| variable | value | why |", "|---|---|---|",
        f"| MASTER_ADDR / MASTER_PORT | {cluster.master_addr} / {cluster.master_port} | torch.distributed "
        "rendezvous on node 0 |",
        "| HCCL_IF_IP | the node's host_ip | host NIC for HCCL's socket bootstrap |",
        "| HCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME | the node's if_name | interface for HCCL / gloo sockets |",
        f"| HCCL_BUFFSIZE | {cluster.hccl_buffsize_mb} | MB per communicator; HCCL allocates 2x per communicator "
        "(MC2 dispatch/combine buffers live there) |",
        "| HCCL_OP_EXPANSION_MODE | AIV | collectives expanded on AI-Vector cores (all V4 recipes) |",
        f"| HCCL_CONNECT_TIMEOUT | {cluster.hccl_connect_timeout_s} | seconds to wait for peers |",
        "| ASCEND_RT_VISIBLE_DEVICES | the node's device ids | local rank i uses the i-th listed device |",
        "| LOCAL_WORLD_SIZE | ranks on the node | torch_npu static kernels need it |",
        "| RANK_TABLE_FILE | ./rank_table.json | HCCL rank table (below) |",
    ]
    for k, v in sorted(cluster.env.items()):
        L.append(f"| {k} | {v} | from the cluster file's launcher.env |")
    L += [
        "", "## rank_table.json", "",
        "HCCL rank table, CANN format (\"Rank Table Configuration Resource Information\"):",
        "",
        "- `version`: \"1.0\" for AI-server networking; \"1.2\" for A3 SuperPoD networking (adds `super_device_id` "
        "per device and `super_pod_list`).",
        "- `server_count`: number of servers, as a string; `status`: \"completed\" (the table is ready).",
        "- `server_list[].server_id`: unique server identifier (the host IP here); `host_ip`: the server's host IP.",
        "- `server_list[].device[]`: `device_id` = physical NPU id on the server (`/dev/davinciN`), `device_ip` = that "
        "NPU's RoCE NIC address (`/etc/hccn.conf` address_N; required across servers), `rank_id` = global rank.",
        "- Ranks are numbered 0..N-1, one ascending block per server in server order (no interleaving); every value "
        "is a string.",
        "",
        "## Troubleshooting", "",
        "- A rank waits forever at start: another node is not started, MASTER_PORT differs between nodes, or a "
        "firewall blocks MASTER_PORT / the HCCL ports; `preflight_node*.sh` checks addresses and ports.",
        "- `hccn_tool` reports link down or another IP: fix the NIC or the cluster file's `device_ip`, then re-run "
        "`dsv4 deploy`.",
        "- Out of device memory: see the plan above; lower `HCCL_BUFFSIZE`, the context or the concurrency, or "
        "use a smaller weight format (`dsv4 plan` shows the options).",
    ]
    if launcher == "msrun":
        L += ["- msrun: the launch scripts run `ascend/mindspore_ep.py` on every rank (MindSpore backend on Ascend, "
              "experts split over mindspore.communication); it takes `--prompt-ids` and `--max-new-tokens` and rank 0 "
              "prints one JSON line. This path has not run on NPU hardware yet; `--launcher torchrun` is the tested "
              "one."]
    return "\n".join(L) + "\n"


def plan_for_runtime(cfg: ModelConfig, cluster: Cluster, fmt: str, context: int,
                     concurrency: int) -> dict[str, Any]:
    """The memory plan for the layout the runtime runs (EP over all ranks, attention DP), plus what the
    planner would recommend with a free choice."""
    recipe = load_recipe(fmt)
    if context > cfg.max_position_embeddings or context <= 0 or concurrency <= 0:
        raise CliError("--context must be in [1, max_position_embeddings] and --concurrency positive", EXIT_USAGE)
    opt = Options(fmt=fmt, context=context, concurrency=concurrency)
    res = plan(cfg, cluster, opt, recipe, tp_pin=1, ep_pin=cluster.world_size)
    best = res["best"]
    mem = best["memory"]
    if not res["fits"]:
        raise CliError(f"the model ({fmt}) does not fit {cluster.name} with the runtime's layout "
                       f"{best['layout'].label()}: {mem['total'] / GiB:.2f} GiB per device needed, "
                       f"{mem['usable'] / GiB:.2f} GiB usable ({-mem['headroom'] / GiB:.2f} GiB short); "
                       f"see `dsv4 plan`")
    try:
        free = plan(cfg, cluster, opt, recipe)
        recommended = free["best"]["layout"].label() if free["fits"] else None
    except CliError:
        recommended = None
    items = {f"weights {k}": v / GiB for k, v in mem["weights"].items()}
    items.update({"KV + compressor state": mem["kv"] / GiB, "activations (estimate)": mem["activations"] / GiB,
                  "HCCL buffers": mem["hccl"] / GiB, "runtime reserve": mem["reserve"] / GiB,
                  "total": mem["total"] / GiB})
    return {"format": fmt, "context": context, "concurrency": concurrency, "mem_util": opt.mem_util,
            "memory_gib": items, "usable_gib": mem["usable"] / GiB, "headroom_gib": mem["headroom"] / GiB,
            "runtime_layout": best["layout"].label(), "recommended": recommended,
            "decode_step_ms": best["decode"]["seconds"]["step"] * 1e3}


def render_all(cluster: Cluster, cfg: ModelConfig | None, model: str, launcher: str,
               plan_info: dict[str, Any] | None, serve: ServeTarget | None = None) -> list[Rendered]:
    need = plan_info["memory_gib"]["total"] if plan_info else None
    dist_timeout = max(60, cluster.hccl_connect_timeout_s) if cluster.is_npu else 120
    files = [Rendered(RANK_TABLE, rank_table_json(cluster), False,
                      f"HCCL rank table: {len(cluster.nodes)} server(s), {cluster.world_size} ranks")]
    for n in cluster.nodes:
        first = _first_rank(cluster, n)
        files.append(Rendered(f"launch_node{n.index}.sh",
                              render_launch(cluster, n, model, launcher, dist_timeout, serve),
                              True, f"{launcher}: node {n.index} ({n.name}, {n.host_ip}), ranks {first}.."
                                    f"{first + n.ranks - 1}"))
        files.append(Rendered(f"preflight_node{n.index}.sh", render_preflight(cluster, n, model, need), True,
                              f"checks for node {n.index} ({n.name})"))
    files.append(Rendered("README.md", render_readme(cluster, model, launcher, plan_info,
                                                        cfg.n_routed_experts // cluster.world_size if cfg else None),
                          False,
                          "operator instructions"))
    meta = {
        "generated_by": "dsv4 deploy", "cluster": cluster.path, "cluster_name": cluster.name,
        "hardware": cluster.hardware.name, "model": model, "launcher": launcher, "world_size": cluster.world_size,
        "master": f"{cluster.master_addr}:{cluster.master_port}",
        "nodes": [{"index": n.index, "name": n.name, "host_ip": n.host_ip, "ranks": n.ranks,
                   "first_rank": _first_rank(cluster, n), "device_ids": list(n.device_ids)} for n in cluster.nodes],
        "plan": plan_info,
    }
    names_ = [f.name for f in files] + [DEPLOY_JSON]
    meta["files"] = names_
    files.append(Rendered(DEPLOY_JSON, json.dumps(meta, indent=1) + "\n", False, "what was rendered"))
    return files


_OWN_NAME = re.compile(r"(launch|preflight)_node\d+\.sh|README\.md|rank_table\.json|deploy\.json")


def previous_files(out: Path) -> set[str]:
    """The files an earlier `dsv4 deploy` wrote into `out` (its deploy.json), restricted to names deploy
    produces: a tampered or foreign deploy.json cannot make deploy overwrite or delete anything else."""
    meta = out / DEPLOY_JSON
    try:
        doc = json.loads(meta.read_text()) if meta.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return set()
    if not isinstance(doc, dict) or doc.get("generated_by") != "dsv4 deploy" or not isinstance(doc.get("files"), list):
        return set()
    return {n for n in doc["files"] if isinstance(n, str) and _OWN_NAME.fullmatch(n)}


def check_out(out: Path, files: list[Rendered], force: bool) -> None:
    """--out must be a directory that holds nothing deploy would overwrite except its own earlier output;
    `force` allows overwriting other files of the same names (nothing else is ever touched)."""
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out}: exists and is not a directory", EXIT_USAGE)
    if not out.exists():
        return
    ours = previous_files(out)
    for f in files:
        dst = out / f.name
        if (dst.exists() or dst.is_symlink()) and not (dst.is_file() or dst.is_symlink()):
            raise CliError(f"--out {out}: {f.name} exists and is not a file", EXIT_USAGE)
    try:
        entries = sorted(e.name for e in out.iterdir())
    except OSError as e:
        raise CliError(f"--out {out}: cannot list the directory ({e.strerror})", EXIT_USAGE) from None
    if not entries or force:
        return
    if not ours:
        raise CliError(f"--out {out}: the directory is not empty and holds no earlier `dsv4 deploy` output "
                       f"({', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}); choose an empty or new "
                       f"directory, or pass --force to overwrite files of the same names", EXIT_USAGE)
    clash = [f.name for f in files if (out / f.name).exists() and f.name not in ours]
    if clash:
        raise CliError(f"--out {out}: would overwrite {', '.join(clash)}, which an earlier deploy did not write; "
                       f"pass --force to overwrite", EXIT_USAGE)


def write_files(out: Path, files: list[Rendered]) -> list[str]:
    """Write each file to a fresh temporary name then rename it into place; drop files an earlier render
    wrote (its deploy.json) that this one no longer produces (e.g. a node removed from the cluster).
    Returns the removed names. Call check_out first."""
    old = previous_files(out) if out.is_dir() else set()
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        fd, tmp = tempfile.mkstemp(prefix=f".{f.name}.", suffix=".tmp", dir=out)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(f.text)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o755 if f.executable else 0o644)
            os.replace(tmp, out / f.name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    new = {f.name for f in files}
    removed = []
    for name in sorted(old - new):
        p = out / name
        if p.is_file() and not p.is_symlink():
            p.unlink()
            removed.append(name)
    return removed


def run_deploy(args) -> int:
    cfg, model, conv_fmt = resolve_deploy_model(args.model)
    cluster = load_cluster(args.cluster, cfg)
    if cfg is not None and cfg.n_routed_experts % cluster.world_size:  # EP over every rank, whatever is pinned
        raise ConfigError(f"{cluster.path}: the multi-rank runtime splits the routed experts over all "
                          f"{cluster.world_size} ranks, and n_routed_experts={cfg.n_routed_experts} is not divisible "
                          f"by {cluster.world_size}")
    if cfg is not None and Path(model).is_dir():
        check_layout(Path(model), cluster.world_size)
    if args.master_port is not None:
        if not 1024 <= args.master_port <= 65535:
            raise CliError("--master-port must be in [1024, 65535]", EXIT_USAGE)
        from dataclasses import replace

        cluster = replace(cluster, master_port=args.master_port)
    launcher = args.launcher or cluster.launcher
    fmt = args.format or conv_fmt
    if fmt and cfg is None:
        log("dsv4 deploy: warning: no memory plan (the model's config is not readable on this machine)")
    plan_info = plan_for_runtime(cfg, cluster, fmt, args.context, args.concurrency) if fmt and cfg else None
    job = getattr(args, "job", None) or ("serve" if launcher == "torchrun" else "generate")
    if job == "serve" and launcher != "torchrun":
        raise CliError(f"--job serve runs under torchrun; --launcher {launcher} starts one-shot generation only "
                       f"(pass --job generate)", EXIT_USAGE)
    serve = serve_target(args.serve_host, args.serve_port, cluster) if job == "serve" else None
    files = render_all(cluster, cfg, model, launcher, plan_info, serve)
    out = Path(args.out)
    check_out(out, files, bool(getattr(args, "force", False)))
    if args.dry_run:
        print(f"dry run: would write {len(files)} files to {out} (nothing written)")
        for f in files:
            lines = f.text.count("\n")
            mode = ", executable" if f.executable else ""
            print(f"  {out / f.name}  ({len(f.text.encode())} bytes, {lines} lines{mode})  {f.summary}")
        return 0
    removed = write_files(out, files)
    for f in files:
        print(f"wrote {out / f.name}  {f.summary}")
    for name in removed:
        print(f"removed {out / name}  (no longer part of this cluster)")
    log(f"deploy: {cluster.name}, {cluster.world_size} ranks, launcher {launcher}; next: run preflight_node<i>.sh "
        f"then launch_node<i>.sh on each node (see {out / 'README.md'})")
    return 0
