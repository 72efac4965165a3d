"""Hardware profiles, cluster files and the HCCL rank table: load, validate, render.

A hardware profile (`configs/hardware/NAME.yaml`) describes ONE device (= one rank): memory, bandwidth, peak
throughput, links. A cluster file (`configs/clusters/*.yaml`, or any path) lists the nodes of one job:

    name: atlas800-a2-1node        # free text, used in generated file headers
    hardware: 910b                 # a profile name from configs/hardware/
    world_size: 8                  # optional; refused if it differs from the sum of the nodes' ranks
    parallel: {ep_size: 8, attn_tp: 1}   # optional pins for the planner (default: the planner chooses)
    launcher:                      # optional launcher defaults
      default: torchrun            # torchrun | msrun
      master_port: 29500
      master_addr: 10.10.0.11      # default: node 0's host_ip
      hccl_buffsize_mb: 1024       # HCCL_BUFFSIZE
      hccl_connect_timeout_s: 1200 # HCCL_CONNECT_TIMEOUT
      env: {TASK_QUEUE_ENABLE: "1"}   # extra environment for every rank
    nodes:
      - name: a2-node0             # unique; also the rank table's server_id when host_ip is missing
        host_ip: 10.10.0.11        # host NIC: HCCL_IF_IP, MASTER_ADDR, rank table server_id / host_ip
        if_name: enp189s0f0        # its interface: HCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME
        cards: 8                   # NPU cards used on this node (NPU profiles)
        device_ids: [0, ..., 7]    # optional, default 0 .. cards*devices_per_card-1 (ASCEND_RT_VISIBLE_DEVICES)
        device_ip: [192.168.100.101, ...]   # one per device (die), in device_ids order
        super_device_id: [...]     # optional (A3 SuperPoD): renders a version 1.2 rank table
        processes: 2               # CPU profiles: ranks on this node

Every refusal is one `ClusterError` line naming the file, the node (index and name) and the field.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.config import ConfigError, ModelConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
HARDWARE_DIR = CONFIG_DIR / "hardware"
CLUSTER_DIR = CONFIG_DIR / "clusters"
LAUNCHERS = ("torchrun", "msrun")


class ClusterError(ConfigError):
    """A hardware profile, cluster file or rank table is missing, malformed or inconsistent."""


# ---- hardware profiles ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Link:
    name: str
    bw_gbs: float  # GB/s (1e9 bytes), one direction, per device
    latency_us: float = 0.0


@dataclass(frozen=True)
class Hardware:
    name: str
    kind: str  # "npu" or "cpu"
    soc: str
    product: str
    devices_per_card: int
    max_devices_per_node: int
    memory_gib: float
    memory_bw_gbs: float
    bf16_tflops: float
    int8_tops: float
    intra_node: Link
    inter_node: Link
    host_link: Link
    moe_op_latency_us: float
    runtime_reserve_gib: float
    path: str = ""

    @property
    def is_npu(self) -> bool:
        return self.kind == "npu"


_HW_NUMBERS = ("memory_gib", "memory_bw_gbs", "bf16_tflops", "int8_tops", "moe_op_latency_us", "runtime_reserve_gib")
_HW_KEYS = {"name", "kind", "soc", "product", "devices_per_card", "max_devices_per_node", "intra_node", "inter_node",
            "host_link", *_HW_NUMBERS}


def hardware_names() -> list[str]:
    return sorted(p.stem for p in HARDWARE_DIR.glob("*.yaml"))


MAX_YAML_BYTES = 1 << 20  # a cluster file is a few KiB; refuse anything that is not plausibly one
MAX_YAML_ALIASES = 16  # a handful of `*anchor` uses is convenience; more is how an alias bomb is built


class StrictYAMLError(yaml.YAMLError):
    """A construct the strict loader refuses (too many aliases, a duplicate key)."""


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last one silently) and more than
    MAX_YAML_ALIASES alias uses (nested anchors expand exponentially: 900 bytes became gigabytes)."""

    def __init__(self, stream: Any):
        super().__init__(stream)
        self._aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                mark = self.peek_event().start_mark
                raise StrictYAMLError(f"more than {MAX_YAML_ALIASES} alias (*anchor) uses, line {mark.line + 1} "
                                      f"(refused: nested aliases expand exponentially)")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # the base class reports unhashable keys
                if key in seen:
                    raise StrictYAMLError(f"duplicate key {key!r} on lines {seen[key]} and "
                                          f"{key_node.start_mark.line + 1}")
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def safe_yaml_load(text: str) -> Any:
    """Parse one YAML document with StrictLoader."""
    loader = StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_yaml(path: Path, what: str) -> Any:
    try:
        if not path.is_file():
            raise ClusterError(f"{path}: {what} is not a regular file")
        if path.stat().st_size > MAX_YAML_BYTES:
            raise ClusterError(f"{path}: {what} of {path.stat().st_size} bytes is larger than {MAX_YAML_BYTES}")
        return safe_yaml_load(path.read_text())
    except OSError as e:
        raise ClusterError(f"{path}: cannot read {what} ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ClusterError(f"{path}: {what} is not UTF-8 text") from None
    except StrictYAMLError as e:
        raise ClusterError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ClusterError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def _positive(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v > 0


def _reject_unknown(doc: dict, known, where: str) -> None:
    """A field the format does not define is an error naming it (a typo must not be silently ignored)."""
    for k in doc:
        if k not in known:
            raise ClusterError(f"{where}: unknown field {k!r} (known: {', '.join(sorted(known))})")


def load_hardware(name: str) -> Hardware:
    """The profile `configs/hardware/NAME.yaml`; ClusterError naming the field for a malformed one."""
    path = HARDWARE_DIR / f"{name}.yaml"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)) or not path.is_file():
        raise ClusterError(f"unknown hardware profile {name!r} (known: {', '.join(hardware_names())})")
    doc = _read_yaml(path, "hardware profile")
    if not isinstance(doc, dict):
        raise ClusterError(f"{path}: expected a mapping")
    _reject_unknown(doc, _HW_KEYS, str(path))
    for k in _HW_KEYS:
        if k not in doc:
            raise ClusterError(f"{path}: missing field {k!r}")
    if doc["kind"] not in ("npu", "cpu"):
        raise ClusterError(f"{path}: kind: {doc['kind']!r} is not 'npu' or 'cpu'")
    for k in ("devices_per_card", "max_devices_per_node"):
        if not isinstance(doc[k], int) or isinstance(doc[k], bool) or doc[k] <= 0:
            raise ClusterError(f"{path}: {k}: must be a positive integer, got {doc[k]!r}")
    for k in _HW_NUMBERS:
        if not _positive(doc[k]):
            raise ClusterError(f"{path}: {k}: must be a positive number, got {doc[k]!r}")
    links = {}
    for k in ("intra_node", "inter_node", "host_link"):
        v = doc[k]
        if not isinstance(v, dict) or not _positive(v.get("bw_gbs")) or set(v) - {"name", "bw_gbs", "latency_us"}:
            raise ClusterError(f"{path}: {k}: needs name, a positive bw_gbs and optionally latency_us")
        links[k] = Link(str(v.get("name", k)), float(v["bw_gbs"]), float(v.get("latency_us", 0.0)))
    return Hardware(
        name=str(doc["name"]), kind=doc["kind"], soc=str(doc["soc"]), product=str(doc["product"]),
        devices_per_card=doc["devices_per_card"], max_devices_per_node=doc["max_devices_per_node"],
        memory_gib=float(doc["memory_gib"]), memory_bw_gbs=float(doc["memory_bw_gbs"]),
        bf16_tflops=float(doc["bf16_tflops"]), int8_tops=float(doc["int8_tops"]), **links,
        moe_op_latency_us=float(doc["moe_op_latency_us"]), runtime_reserve_gib=float(doc["runtime_reserve_gib"]),
        path=str(path),
    )


# ---- cluster files -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Node:
    index: int
    name: str
    host_ip: str | None
    if_name: str | None
    cards: int  # 0 for CPU nodes
    device_ids: tuple[int, ...]  # NPU device ids; CPU: 0..processes-1 (process slots)
    device_ips: tuple[str, ...] | None
    super_device_ids: tuple[str, ...] | None = None

    @property
    def ranks(self) -> int:
        return len(self.device_ids)

    @property
    def label(self) -> str:
        return f"nodes[{self.index}] ({self.name})"


@dataclass(frozen=True)
class Cluster:
    path: str
    name: str
    hardware: Hardware
    nodes: tuple[Node, ...]
    launcher: str
    master_port: int
    master_addr: str
    hccl_buffsize_mb: int
    hccl_connect_timeout_s: int
    env: dict[str, str] = field(default_factory=dict)
    ep_size: int | None = None
    attn_tp: int | None = None
    super_pod_id: str | None = None

    @property
    def world_size(self) -> int:
        return sum(n.ranks for n in self.nodes)

    @property
    def ranks_per_node(self) -> int:
        return self.nodes[0].ranks

    @property
    def is_npu(self) -> bool:
        return self.hardware.is_npu

    def describe(self) -> str:
        hw = self.hardware
        if hw.is_npu:
            per = f"{self.nodes[0].cards} x {hw.name.upper()}"
            if hw.devices_per_card > 1:
                per += f" = {self.ranks_per_node} dies"
            return f"{len(self.nodes)} node(s) x {per}, {self.world_size} ranks"
        return f"{len(self.nodes)} host(s) x {self.ranks_per_node} processes, {self.world_size} ranks (CPU, gloo)"


_TOP_KEYS = {"name", "description", "hardware", "world_size", "parallel", "launcher", "nodes", "super_pod_id"}
_LAUNCHER_KEYS = {"default", "master_port", "master_addr", "hccl_buffsize_mb", "hccl_connect_timeout_s", "env"}
_NODE_KEYS = {"name", "host_ip", "if_name", "cards", "device_ids", "device_ip", "processes", "super_device_id"}
# Every value that reaches a rendered shell script is checked against one of these grammars (fullmatch: `$`
# would also match before a trailing newline) and is shlex-quoted when rendered as well.
_IFNAME = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")  # Linux IFNAMSIZ - 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # cluster and node names
_SCOPE = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # an IPv6 zone: an interface name or index
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f]*")  # free text (env values): no control characters


def check_name(value: Any, where: str) -> str:
    """A cluster or node name: letters, digits, '_', '.', '-' (it appears in file headers and messages)."""
    if not isinstance(value, str | int) or isinstance(value, bool) or not _NAME.fullmatch(str(value)):
        raise ClusterError(f"{where}: {value!r} is not a valid name (letters, digits, '_', '.', '-'; at most 64, "
                           f"starting with a letter or digit)")
    return str(value)


def resolve_cluster_path(spec: str) -> Path:
    """A path, or a bundled cluster name (`atlas800-a2-1node` -> configs/clusters/atlas800-a2-1node.yaml)."""
    p = Path(spec)
    if p.is_file():
        return p
    if p.exists():
        raise ClusterError(f"{spec}: not a regular file (a cluster file is a YAML file)")
    bundled = CLUSTER_DIR / f"{spec}.yaml"
    if re.fullmatch(r"[A-Za-z0-9_.-]+", spec) and bundled.is_file():
        return bundled
    known = ", ".join(sorted(q.stem for q in CLUSTER_DIR.glob("*.yaml")))
    raise ClusterError(f"{spec}: no such cluster file (bundled clusters: {known})")


def _ip(value: Any, where: str, scope: bool = False) -> str:
    """An IPv4/IPv6 address in canonical form. Python's ipaddress accepts any text after an IPv6 '%' (spaces,
    '$(...)', newlines), so a zone id is checked here: allowed only where `scope`, and then an interface name."""
    if not isinstance(value, str) or isinstance(value, bool):
        raise ClusterError(f"{where}: {value!r} is not an IP address (give it as a string)")
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise ClusterError(f"{where}: {value!r} is not an IP address") from None
    zone = getattr(addr, "scope_id", None)
    if zone is not None:
        if not scope:
            raise ClusterError(f"{where}: {value!r}: an IPv6 zone id ('%...') is not allowed here")
        if not _SCOPE.fullmatch(zone):
            raise ClusterError(f"{where}: {value!r}: the zone id after '%' must be an interface name or index")
    return str(addr)


def _int(value: Any, where: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ClusterError(f"{where}: must be an integer >= {minimum}, got {value!r}")
    return value


def load_cluster(spec: str | Path, cfg: ModelConfig | None = None) -> Cluster:
    """Read and validate a cluster file; with `cfg`, also check the model fits the expert-parallel size."""
    path = resolve_cluster_path(str(spec))
    where = str(path)
    doc = _read_yaml(path, "cluster file")
    if not isinstance(doc, dict):
        raise ClusterError(f"{where}: expected a mapping with 'hardware' and 'nodes'")
    _reject_unknown(doc, _TOP_KEYS, where)
    if "hardware" not in doc:
        raise ClusterError(f"{where}: missing field 'hardware' (a profile: {', '.join(hardware_names())})")
    try:
        hw = load_hardware(str(doc["hardware"]))
    except ClusterError as e:
        raise ClusterError(f"{where}: hardware: {e}") from None

    launcher = doc.get("launcher") or {}
    if not isinstance(launcher, dict):
        raise ClusterError(f"{where}: launcher: expected a mapping")
    _reject_unknown(launcher, _LAUNCHER_KEYS, f"{where}: launcher")
    default = launcher.get("default", "torchrun")
    if default not in LAUNCHERS:
        raise ClusterError(f"{where}: launcher.default: {default!r} is not one of {', '.join(LAUNCHERS)}")
    env = launcher.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and _ENV_NAME.fullmatch(k) for k in env):
        raise ClusterError(f"{where}: launcher.env: expected a mapping of environment variable names to values")
    for k, v in env.items():
        if not isinstance(v, str | int | float) or isinstance(v, bool) or not _PRINTABLE.fullmatch(str(v)):
            raise ClusterError(f"{where}: launcher.env.{k}: {v!r} must be a string or number without control "
                               f"characters")

    raw_nodes = doc.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise ClusterError(f"{where}: nodes: expected a non-empty list of nodes")
    nodes = [_node(raw, i, hw, where) for i, raw in enumerate(raw_nodes)]
    _check_nodes(nodes, hw, where)

    world = sum(n.ranks for n in nodes)
    if "world_size" in doc and doc["world_size"] != world:
        raise ClusterError(f"{where}: world_size: {doc['world_size']!r} does not match the nodes, which hold "
                           f"{world} ranks ({' + '.join(str(n.ranks) for n in nodes)})")
    parallel = doc.get("parallel") or {}
    if not isinstance(parallel, dict) or set(parallel) - {"ep_size", "attn_tp"}:
        raise ClusterError(f"{where}: parallel: expected a mapping with ep_size and/or attn_tp")
    ep = parallel.get("ep_size")
    if ep is not None and (_int(ep, f"{where}: parallel.ep_size") > world or world % ep):
        raise ClusterError(f"{where}: parallel.ep_size: {ep} does not divide the world size {world}")
    tp = parallel.get("attn_tp")
    if tp is not None and (_int(tp, f"{where}: parallel.attn_tp") > nodes[0].ranks or nodes[0].ranks % tp):
        raise ClusterError(f"{where}: parallel.attn_tp: {tp} must divide the {nodes[0].ranks} ranks of a node "
                           f"(attention tensor parallelism stays inside one node)")
    master_addr = launcher.get("master_addr")
    master_addr = _ip(master_addr, f"{where}: launcher.master_addr", scope=True) if master_addr is not None \
        else (nodes[0].host_ip or "127.0.0.1")
    spod = doc.get("super_pod_id")
    if spod is not None:
        check_name(spod, f"{where}: super_pod_id")
    if doc.get("name") is not None:
        name = check_name(doc["name"], f"{where}: name")
    else:
        name = check_name(path.stem, f"{where}: name (missing; the file name stands in for it)")
    if (spod is not None) != any(n.super_device_ids for n in nodes):
        raise ClusterError(f"{where}: super_pod_id: give both super_pod_id and every node's super_device_id "
                           f"(A3 SuperPoD rank table), or neither")
    cluster = Cluster(
        path=where, name=name, hardware=hw, nodes=tuple(nodes), launcher=default,
        master_port=_int(launcher.get("master_port", 29500), f"{where}: launcher.master_port", 1024),
        master_addr=master_addr,
        hccl_buffsize_mb=_int(launcher.get("hccl_buffsize_mb", 200 if not hw.is_npu else 1024),
                              f"{where}: launcher.hccl_buffsize_mb"),
        hccl_connect_timeout_s=_int(launcher.get("hccl_connect_timeout_s", 1200),
                                    f"{where}: launcher.hccl_connect_timeout_s"),
        env={str(k): str(v) for k, v in env.items()}, ep_size=ep, attn_tp=tp,
        super_pod_id=None if spod is None else str(spod),
    )
    if cluster.master_port > 65535:
        raise ClusterError(f"{where}: launcher.master_port: {cluster.master_port} is not a TCP port")
    if cfg is not None:
        check_model(cluster, cfg)
    return cluster


def _node(raw: Any, i: int, hw: Hardware, where: str) -> Node:
    if not isinstance(raw, dict):
        raise ClusterError(f"{where}: nodes[{i}]: expected a mapping")
    name = check_name(raw["name"], f"{where}: nodes[{i}]: name") if raw.get("name") is not None else f"node{i}"
    label = f"{where}: nodes[{i}] ({name})"
    _reject_unknown(raw, _NODE_KEYS, label)
    host_ip = _ip(raw["host_ip"], f"{label}: host_ip", scope=True) if raw.get("host_ip") is not None else None
    if_name = raw.get("if_name")
    if if_name is not None and (not isinstance(if_name, str) or not _IFNAME.fullmatch(if_name)):
        raise ClusterError(f"{label}: if_name: {if_name!r} is not a network interface name (letters, digits, "
                           f"'_', '.', ':', '@', '-'; at most 15)")
    if hw.is_npu:
        if "processes" in raw:
            raise ClusterError(f"{label}: processes: NPU nodes run one rank per device; give 'cards' instead")
        if "cards" not in raw:
            raise ClusterError(f"{label}: cards: missing (number of {hw.name} cards used on this node)")
        cards = _int(raw["cards"], f"{label}: cards")
        n_dev = cards * hw.devices_per_card
        if n_dev > hw.max_devices_per_node:
            raise ClusterError(f"{label}: cards: {cards} cards = {n_dev} devices, more than a {hw.product} server "
                               f"holds ({hw.max_devices_per_node})")
        ids = raw.get("device_ids", list(range(n_dev)))
        if not isinstance(ids, list) or len(ids) != n_dev:
            raise ClusterError(f"{label}: device_ids: expected {n_dev} device ids ({cards} cards x "
                               f"{hw.devices_per_card} devices per card), got {ids!r}")
        for d in ids:
            if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d < hw.max_devices_per_node:
                raise ClusterError(f"{label}: device_ids: {d!r} is not a device id in [0, {hw.max_devices_per_node})")
        dup = _first_duplicate(ids)
        if dup is not None:
            raise ClusterError(f"{label}: device_ids: device {dup} is listed twice")
        if host_ip is None:
            raise ClusterError(f"{label}: host_ip: missing (NPU clusters need the host IP for HCCL_IF_IP, "
                               f"MASTER_ADDR and the rank table)")
        if if_name is None:
            raise ClusterError(f"{label}: if_name: missing (the host interface for HCCL_SOCKET_IFNAME / "
                               f"GLOO_SOCKET_IFNAME)")
        ips = raw.get("device_ip")
        if ips is None:
            raise ClusterError(f"{label}: device_ip: missing (one RoCE NIC address per device, see "
                               f"/etc/hccn.conf or `hccn_tool -i N -ip -g`)")
        if not isinstance(ips, list) or len(ips) != n_dev:
            got = len(ips) if isinstance(ips, list) else repr(ips)
            raise ClusterError(f"{label}: device_ip: expected {n_dev} addresses (one per device), got {got}")
        device_ips = tuple(_ip(v, f"{label}: device_ip[{k}]") for k, v in enumerate(ips))
        sdids = raw.get("super_device_id")
        if sdids is not None:
            if not isinstance(sdids, list) or len(sdids) != n_dev:
                raise ClusterError(f"{label}: super_device_id: expected {n_dev} ids (one per device)")
            for k, sd in enumerate(sdids):
                if not (isinstance(sd, int) and not isinstance(sd, bool) and sd >= 0
                        or isinstance(sd, str) and sd.isascii() and sd.isdigit()):
                    raise ClusterError(f"{label}: super_device_id[{k}]: {sd!r} is not a device number")
            sdids = tuple(str(s) for s in sdids)
        return Node(i, name, host_ip, if_name, cards, tuple(ids), device_ips, sdids)
    for k in ("cards", "device_ip", "device_ids", "super_device_id"):
        if k in raw:
            raise ClusterError(f"{label}: {k}: not used on a CPU profile (give 'processes')")
    procs = _int(raw.get("processes", 1), f"{label}: processes")
    if procs > hw.max_devices_per_node:
        raise ClusterError(f"{label}: processes: {procs} > {hw.max_devices_per_node}")
    return Node(i, name, host_ip or "127.0.0.1", if_name, 0, tuple(range(procs)), None)


def _first_duplicate(values) -> Any:
    seen = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return None


def _check_nodes(nodes: list[Node], hw: Hardware, where: str) -> None:
    seen_names: dict[str, Node] = {}
    seen_hosts: dict[str, Node] = {}
    seen_dev_ips: dict[str, tuple[Node, int]] = {}
    for n in nodes:
        if n.name in seen_names:
            raise ClusterError(f"{where}: {n.label}: name: also used by {seen_names[n.name].label}")
        seen_names[n.name] = n
        if len(nodes) > 1 and n.host_ip in seen_hosts:
            raise ClusterError(f"{where}: {n.label}: host_ip: {n.host_ip} is also {seen_hosts[n.host_ip].label}'s "
                               f"(one node entry per host)")
        seen_hosts[n.host_ip or ""] = n
        for k, ip in enumerate(n.device_ips or ()):
            if ip in seen_dev_ips:
                other, j = seen_dev_ips[ip]
                raise ClusterError(f"{where}: {n.label}: device_ip[{k}]: {ip} is also {other.label} device_ip[{j}]")
            seen_dev_ips[ip] = (n, k)
    if len(nodes) > 1 and any(n.host_ip in ("127.0.0.1", "::1") for n in nodes):
        bad = next(n for n in nodes if n.host_ip in ("127.0.0.1", "::1"))
        raise ClusterError(f"{where}: {bad.label}: host_ip: a loopback address cannot reach the other nodes")
    first = nodes[0]
    for n in nodes[1:]:
        if n.ranks != first.ranks:
            what = "cards" if hw.is_npu else "processes"
            raise ClusterError(f"{where}: {n.label}: {what}: {n.ranks} ranks, but {first.label} has {first.ranks}; "
                               f"torchrun/msrun start the same number of processes on every node")


def check_model(cluster: Cluster, cfg: ModelConfig) -> None:
    """The model must split over the expert-parallel group: n_routed_experts divisible by the EP size."""
    ep = cluster.ep_size or cluster.world_size
    what = "parallel.ep_size" if cluster.ep_size else "world size (EP over every rank)"
    if cfg.n_routed_experts % ep:
        fits = [str(d) for d in range(2, min(cfg.n_routed_experts, 512) + 1) if cfg.n_routed_experts % d == 0]
        raise ClusterError(f"{cluster.path}: {what} {ep}: n_routed_experts={cfg.n_routed_experts} is not divisible "
                           f"by {ep}; use an expert-parallel size that divides it ({', '.join(fits)})")


# ---- HCCL rank table ---------------------------------------------------------------------------------------

def rank_table(cluster: Cluster) -> dict[str, Any]:
    """The HCCL rank table file (RANK_TABLE_FILE) for the cluster, ranks numbered node by node.

    Version "1.0" ("AI server mode"): status, version, server_count, server_list[{server_id, host_ip,
    device[{device_id, device_ip, rank_id}]}]. Version "1.2" (A3 SuperPoD) adds super_device_id to each
    device and super_pod_list[{super_pod_id, server_list[{server_id}]}]. All values are strings, as the
    CANN guide writes them. device_ip is left out where the cluster has none (CPU loopback), which HCCL allows
    on a single server.
    """
    superpod = cluster.super_pod_id is not None
    servers, rank = [], 0
    for n in cluster.nodes:
        devices = []
        for k, dev in enumerate(n.device_ids):
            d: dict[str, str] = {"device_id": str(dev)}
            if n.device_ips:
                d["device_ip"] = n.device_ips[k]
            if superpod and n.super_device_ids:
                d["super_device_id"] = n.super_device_ids[k]
            d["rank_id"] = str(rank)
            rank += 1
            devices.append(d)
        server: dict[str, Any] = {"server_id": n.host_ip or n.name}
        if n.host_ip:
            server["host_ip"] = n.host_ip
        server["device"] = devices
        servers.append(server)
    doc: dict[str, Any] = {"version": "1.2" if superpod else "1.0", "server_count": str(len(servers)),
                           "server_list": servers, "status": "completed"}
    if superpod:
        doc["super_pod_list"] = [{"super_pod_id": cluster.super_pod_id,
                                  "server_list": [{"server_id": s["server_id"]} for s in servers]}]
    return doc


def validate_rank_table(doc: Any, where: str = "rank table") -> int:
    """Check a rank table against the CANN format; returns the number of ranks, ClusterError otherwise.

    Rules (CANN HCCL guide, "Rank Table Configuration Resource Information"): status "completed"; version
    "1.0" or "1.2"; server_count equals the number of servers; server_id unique; device_id unique within a
    server; device_ip (where given) unique across the table; rank_id the integers 0..N-1, each server holding
    one contiguous ascending block (no interleaving across servers); every value a string; version 1.2 needs
    super_device_id on every device and a super_pod_list covering every server once.
    """
    def bad(msg: str) -> ClusterError:
        return ClusterError(f"{where}: {msg}")

    if not isinstance(doc, dict):
        raise bad("expected a JSON object")
    if doc.get("status") != "completed":
        raise bad(f"status: {doc.get('status')!r}, expected 'completed'")
    version = doc.get("version")
    if version not in ("1.0", "1.2"):
        raise bad(f"version: {version!r}, expected '1.0' or '1.2'")
    servers = doc.get("server_list")
    if not isinstance(servers, list) or not servers:
        raise bad("server_list: expected a non-empty list")
    if doc.get("server_count") != str(len(servers)):
        raise bad(f"server_count: {doc.get('server_count')!r}, but server_list has {len(servers)} servers "
                  f"(a string is expected)")
    server_ids, dev_ips, ranks, sdids = set(), set(), [], set()
    for i, s in enumerate(servers):
        sw = f"server_list[{i}]"
        if not isinstance(s, dict) or not isinstance(s.get("server_id"), str) or not s["server_id"]:
            raise bad(f"{sw}.server_id: missing or not a string")
        if s["server_id"] in server_ids:
            raise bad(f"{sw}.server_id: {s['server_id']!r} appears twice")
        server_ids.add(s["server_id"])
        devs = s.get("device")
        if not isinstance(devs, list) or not devs:
            raise bad(f"{sw}.device: expected a non-empty list")
        ids = set()
        block = []
        for j, d in enumerate(devs):
            dw = f"{sw}.device[{j}]"
            if not isinstance(d, dict):
                raise bad(f"{dw}: expected an object")
            for k, v in d.items():
                if not isinstance(v, str):
                    raise bad(f"{dw}.{k}: {v!r} is not a string")
            if not d.get("device_id", "").isdigit():
                raise bad(f"{dw}.device_id: {d.get('device_id')!r} is not a device number")
            if d["device_id"] in ids:
                raise bad(f"{dw}.device_id: {d['device_id']} appears twice on server {s['server_id']}")
            ids.add(d["device_id"])
            if "device_ip" in d:
                try:
                    ipaddress.ip_address(d["device_ip"])
                except ValueError:
                    raise bad(f"{dw}.device_ip: {d['device_ip']!r} is not an IP address") from None
                if d["device_ip"] in dev_ips:
                    raise bad(f"{dw}.device_ip: {d['device_ip']} appears twice")
                dev_ips.add(d["device_ip"])
            if not d.get("rank_id", "").isdigit():
                raise bad(f"{dw}.rank_id: {d.get('rank_id')!r} is not a rank number")
            if version == "1.2":
                if not d.get("super_device_id"):
                    raise bad(f"{dw}.super_device_id: missing (version 1.2)")
                if d["super_device_id"] in sdids:
                    raise bad(f"{dw}.super_device_id: {d['super_device_id']} appears twice")
                sdids.add(d["super_device_id"])
            block.append(int(d["rank_id"]))
        if block != list(range(block[0], block[0] + len(block))):
            raise bad(f"{sw}: rank_id {block} is not one ascending contiguous block")
        ranks.extend(block)
    if sorted(ranks) != list(range(len(ranks))):
        raise bad(f"rank_id: not unique and contiguous 0..{len(ranks) - 1} (got {sorted(ranks)})")
    if ranks != sorted(ranks):
        raise bad("rank_id: servers must hold ascending blocks in server_list order (no interleaving)")
    if version == "1.2":
        pods = doc.get("super_pod_list")
        if not isinstance(pods, list) or not pods:
            raise bad("super_pod_list: required for version 1.2")
        listed = [e.get("server_id") for p in pods for e in (p.get("server_list") or [])]
        if sorted(listed) != sorted(server_ids):
            raise bad(f"super_pod_list: must list every server_id exactly once (got {listed})")
    return len(ranks)


def rank_table_json(cluster: Cluster) -> str:
    doc = rank_table(cluster)
    validate_rank_table(doc, f"rank table for {cluster.path}")
    return json.dumps(doc, indent=4) + "\n"
