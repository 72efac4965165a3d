"""`dsv4`: one command, one sub-command per job. Results go to stdout, logs and progress to stderr."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ascend import soc as soc_table
from common.config import ConfigError
from common.safetensors_io import CheckpointError
from tools.serve.budget import SERVE_BLOCK_SIZE

from .errors import EXIT_INPUT, EXIT_INTERRUPT, EXIT_USAGE, CliError, log


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text or token ids from a checkpoint or preset")
    p.add_argument("--model", required=True, help="model directory or preset name (tiny, bench-small)")
    p.add_argument("--backend", default="cpu", help="compute backend (cpu = the NumPy reference)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", help="prompt text (needs tokenizer.json in the model directory)")
    g.add_argument("--prompt-ids", help="comma-separated prompt token ids; ';' separates a batch of prompts")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token to --prompt text")
    p.add_argument("--chat", action="store_true",
                   help="wrap --prompt as one user turn of the DeepSeek-V4 chat format (as `dsv4 serve` does)")
    p.add_argument("--thinking", action="store_true", help="with --chat: thinking mode (reply opens with <think>)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.add_argument("--logits-out", help="save float32 prefill logits of every prompt position to FILE.npy")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="feed the prompts N tokens per sequence per forward call (chunked prefill)")
    p.add_argument("--kernels", choices=("default", "triton"), default="default",
                   help="torch backend: also offer our Triton-Ascend kernels (after vendor kernels, before "
                        "compositions; on a CPU they run under triton's interpreter; needs the kernels extra)")
    p.add_argument("--record-ops", metavar="FILE.npz",
                   help="record every op output of the (first) prompt, for `dsv4 compare --a dump:FILE.npz`")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="activation and weight dtype of --backend torch (default bfloat16 with --device npu, "
                        "float32 on the CPU: the golden)")
    d = p.add_argument_group("multi-rank (attention data parallel + MoE expert parallel, torch.distributed)")
    d.add_argument("--nproc", type=int, default=1,
                   help="ranks to launch on this node (must divide n_routed_experts); under torchrun the "
                        "command runs as one rank instead")
    d.add_argument("--device", choices=("cpu", "npu"), default="cpu",
                   help="cpu = gloo collectives and stand-in MC2 ops; npu = hccl and torch_npu (needs --backend "
                        "torch or mindspore: the cpu backend runs on the host only)")
    d.add_argument("--moe-comm", choices=soc_table.MOE_COMM_CHOICES, default="auto",
                   help="MoE token exchange; auto picks per forward call from the SoC table")
    d.add_argument("--soc", choices=tuple(soc_table.SOCS), default=None,
                   help="SoC whose limits `--moe-comm auto` applies (default: detected on an NPU, A2 on a CPU)")
    d.add_argument("--providers", default=None, metavar="LIST",
                   help="kernel providers of --backend torch, comma-separated from torch_npu,custom,composed "
                        "(default: torch_npu,composed plus custom when a custom-op package is installed; on a CPU "
                        "`custom` runs the vllm-ascend stand-ins)")
    d.add_argument("--dist-timeout", type=float, default=60.0,
                   help="seconds a collective may wait for the other ranks before the run fails (default 60)")
    p.set_defaults(func=cmd_generate)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="describe a checkpoint or preset: architecture, parameters, tensor formats")
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="model directory or preset name (or --model)")
    p.add_argument("--model", help="model directory or preset name")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the text report")
    p.set_defaults(func=cmd_inspect)


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="run two backends (or saved dumps) and show per-layer, per-op differences")
    p.add_argument("--model", required=True, help="model directory or preset name")
    p.add_argument("--a", default="cpu", help="backend name, or dump:FILE.npz (default cpu)")
    p.add_argument("--b", required=True, help="backend name, or dump:FILE.npz")
    p.add_argument("--prompt-ids", help="comma-separated prompt ids (default: the dump's prompt when --a/--b is a "
                                        "dump, else 2*window tokens 2, 3, ...)")
    p.add_argument("--steps", type=int, default=None,
                   help="decode steps after the prefill (default: the dump's when --a/--b is a dump, else 2)")
    p.add_argument("--tol", type=float, default=1e-4, help="relative error that counts as divergence")
    p.add_argument("--save-a", help="save run a's op outputs to FILE.npz")
    p.add_argument("--save-b", help="save run b's op outputs to FILE.npz")
    p.add_argument("--nproc", type=int, default=1,
                   help="run b on N expert-parallel ranks (gloo on CPU); rank 0's ops are compared")
    p.add_argument("--moe-comm", default="auto", help="MoE communication strategy of the --nproc run")
    p.add_argument("--all", action="store_true", help="list every op output, not only per-scope maxima")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (summary, per-scope rows, every op with --all) on stdout")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from tools.compare_cmd import run_compare

    return run_compare(args)


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint to Ascend-ready bf16 / W8A8 / W4A8 weights",
                       description="Convert any checkpoint the loader reads (DeepSeek release FP8/FP4, bf16/f32 in "
                                   "official or transformers naming) into bf16, W8A8 or W4A8 safetensors, optionally "
                                   "split for expert / tensor parallelism. `--dst DIR --verify` alone re-checks an "
                                   "existing conversion against its manifest.")
    p.add_argument("--src", help="source model directory (config.json + safetensors)")
    p.add_argument("--dst", required=True, help="output directory (new or empty; or an unfinished run with --resume)")
    p.add_argument("--format", help="bundled recipe: bf16, w8a8 or w4a8 (configs/quant/FORMAT.yaml)")
    p.add_argument("--recipe", help="a recipe YAML file (per tensor role: bf16, f32, w8a8, w4a8, keep)")
    p.add_argument("--group-size", type=int, help="W4A8 group size along K (default: the recipe's, 128)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks; must divide n_routed_experts")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel slices of the column/row-parallel linears")
    p.add_argument("--workers", type=int, default=None, help="conversion threads (default min(4, CPUs))")
    p.add_argument("--shard-size", default=None, help="target output shard size, e.g. 2GiB (default), 500MB")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run, keeping verified shards")
    p.add_argument("--verify", action="store_true", help="re-hash every output and source file against the manifest")
    p.add_argument("--json", action="store_true", help="print one JSON summary object on stdout")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from tools.convert import run_convert

    return run_convert(args)


def _add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="show the Ascend software found and which lowering each op will use")
    p.add_argument("--soc", choices=tuple(soc_table.SOCS), default=None,
                   help="SoC to plan for (default: detected on an NPU, A2 otherwise)")
    p.add_argument("--ep", type=int, default=8, help="expert-parallel ranks to plan the MoE exchange for (default 8)")
    p.add_argument("--tokens-per-rank", type=int, default=64,
                   help="largest per-rank token count of a MoE call to plan for (default 64)")
    p.add_argument("--model", default="v4-flash", help="preset or model directory whose call shapes to plan for")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="activation dtype handed to the kernels")
    p.add_argument("--providers", default=None, metavar="LIST",
                   help="kernel providers to plan with, comma-separated from torch_npu,custom,composed (default: "
                        "what is installed; `custom` on a CPU plans as if vllm-ascend's _C_ascend were present)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args) -> int:
    from tools.doctor_cmd import run_doctor

    return run_doctor(args)


def cmd_generate(args) -> int:
    from tools.generate_cmd import run_generate

    return run_generate(args)


def cmd_inspect(args) -> int:
    from tools.inspect_cmd import run_inspect

    if (args.model is None) == (args.model_pos is None):
        raise CliError("inspect takes one model: `dsv4 inspect DIR|PRESET` (or --model)", EXIT_USAGE)
    args.model = args.model or args.model_pos

    return run_inspect(args)


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="per-card memory, parallel layout and roofline speed of a model on a cluster",
                       description="Plan a deployment: weights / KV / activations / HCCL buffers per card, the "
                                   "recommended expert-parallel and attention TP/DP layout and why, and a roofline "
                                   "estimate of decode step time and prefill throughput. Exits non-zero when "
                                   "nothing fits.")
    p.add_argument("--model", required=True, help="model directory or preset name (v4-flash, v4-pro, ...)")
    p.add_argument("--cluster", required=True, help="cluster YAML file or bundled name (configs/clusters)")
    p.add_argument("--format", help="weight format: a recipe in configs/quant (bf16, w8a8, w4a8); default: the "
                                    "format `dsv4 convert` recorded in the model directory")
    p.add_argument("--context", type=int, default=131072, help="tokens per sequence the KV cache must hold")
    p.add_argument("--concurrency", type=int, default=1, help="sequences decoded at once (whole cluster)")
    p.add_argument("--kv-dtype", choices=("fp8", "bf16"), default="fp8", help="KV cache storage (default fp8)")
    p.add_argument("--mem-util", type=float, default=0.90, help="fraction of device memory the job may use")
    p.add_argument("--max-batched-tokens", type=int, default=8192, help="prefill chunk size (activation estimate)")
    p.add_argument("--decode-tokens", type=int, default=1,
                   help="tokens per sequence per decode step (speculative verification width)")
    p.add_argument("--tp", type=int, default=None, help="pin attention tensor parallelism (default: choose)")
    p.add_argument("--ep", type=int, default=None, help="pin the expert-parallel size (default: choose)")
    p.add_argument("--no-mtp", action="store_true", help="leave the MTP layer out of the weights")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from tools.plan_cmd import run_plan

    return run_plan(args)


def _add_deploy(sub) -> None:
    p = sub.add_parser("deploy", help="render the rank table, launch and preflight scripts for a cluster",
                       description="Write RANK_TABLE_FILE (rank_table.json), one launch script and one preflight "
                                   "script per node and an operator README into --out. Files are written to "
                                   "temporary names and renamed; --dry-run writes nothing.")
    p.add_argument("--model", required=True, help="model directory (as seen on the nodes) or preset name")
    p.add_argument("--cluster", required=True, help="cluster YAML file or bundled name (configs/clusters)")
    p.add_argument("--out", required=True, help="output directory for the deployment files")
    p.add_argument("--launcher", choices=("torchrun", "msrun"), default=None,
                   help="process launcher (default: the cluster file's launcher.default)")
    p.add_argument("--format", help="weight format to plan memory for (bf16, w8a8, w4a8); default: the format "
                                    "`dsv4 convert` recorded in the model directory, else no plan")
    p.add_argument("--context", type=int, default=131072, help="context used by the memory plan")
    p.add_argument("--concurrency", type=int, default=1, help="concurrency used by the memory plan")
    p.add_argument("--master-port", type=int, default=None, help="override launcher.master_port")
    p.add_argument("--job", choices=("serve", "generate"), default=None,
                   help="what the launch scripts start: `dsv4 serve` with a health check (default with torchrun) "
                        "or one-shot `dsv4 generate` (default with msrun)")
    p.add_argument("--serve-host", default="0.0.0.0", help="address the rendered server listens on")
    p.add_argument("--serve-port", type=int, default=8000, help="port the rendered server listens on")
    p.add_argument("--dry-run", action="store_true", help="print what would be written; write nothing")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty --out, overwriting files with the names deploy writes (nothing "
                        "else is touched); without it only an empty directory or an earlier deploy's is used")
    p.set_defaults(func=cmd_deploy)


def cmd_deploy(args) -> int:
    from tools.deploy_cmd import run_deploy

    return run_deploy(args)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dsv4-ascend")
    except PackageNotFoundError:  # run from a source tree that was not pip-installed
        return "unknown (not installed)"


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                       description="Serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics. "
                                   "Stops cleanly on SIGINT/SIGTERM.")
    p.add_argument("--model", required=True, help="model directory or preset name (tiny-chat has the V4 tokenizer)")
    p.add_argument("--backend", default="cpu", help="compute backend (cpu = the NumPy reference, torch, mindspore)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="activation and weight dtype of --backend torch (default bfloat16 with --device npu, "
                        "float32 on the CPU: the golden), as for generate")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port (printed at start)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="sequences in the running batch")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + reply tokens per sequence (default min(max_position_embeddings, 4096))")
    p.add_argument("--max-batched-tokens", type=int, default=512,
                   help="tokens per engine step: one per decoding sequence, the rest for prompt chunks")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="requests that may wait for admission before new ones get 429 (default 8 x max-num-seqs)")
    p.add_argument("--cache-tokens", type=int, default=None,
                   help="room for this many tokens of context per rank: fixes the paged cache pools "
                        "(default max-num-seqs x max-model-len)")
    p.add_argument("--block-size", type=int, default=SERVE_BLOCK_SIZE,
                   help="rows per paged-cache block: a multiple of 16 in [16, 1024] (the V4 kernels' limits; "
                        "vllm-ascend serves V4 with 128); default %(default)s, the least padding per sequence")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (default: $DSV4_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model's name)")
    d = p.add_argument_group("multi-rank (rank 0 serves HTTP; all ranks step the same batch, MoE expert parallel)")
    d.add_argument("--nproc", type=int, default=1, help="ranks to launch on this node; under torchrun: one rank")
    d.add_argument("--device", choices=("cpu", "npu"), default="cpu")
    d.add_argument("--moe-comm", choices=soc_table.MOE_COMM_CHOICES, default="auto")
    d.add_argument("--soc", choices=tuple(soc_table.SOCS), default=None)
    d.add_argument("--dist-timeout", type=float, default=60.0,
                   help="seconds a collective may wait; a dead or stuck rank stops the server within it")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from tools.serve.cli import run_serve

    return run_serve(args)


def _add_kernels(sub) -> None:
    p = sub.add_parser("kernels", help="our Triton-Ascend kernels: SoCs, compile status, on-chip memory use",
                       description="Compile each kernel to HIVM for A2 / A3 / 950 at the model shape sets (cached) "
                                   "and report unified-buffer / L0C use. Exit 1 on a compile error or overflow.")
    p.add_argument("--soc", choices=tuple(soc_table.SOCS), default=None, help="one SoC (default: all three)")
    p.add_argument("--model", default=None, help="shape set: flash-slice, v4-flash or v4-pro (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_kernels)


def cmd_kernels(args) -> int:
    from tools.kernels_cmd import run_kernels

    return run_kernels(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 on Ascend: CPU reference and tools")
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)
    for add in (_add_generate, _add_serve, _add_inspect, _add_compare, _add_convert, _add_doctor, _add_plan,
                _add_deploy, _add_kernels):
        add(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable = args.func
    try:
        return int(func(args) or 0)
    except CliError as e:
        log(f"dsv4 {args.command}: error: {e}")
        return e.code
    except (ConfigError, CheckpointError) as e:
        log(f"dsv4 {args.command}: error: {e}")
        return EXIT_INPUT
    except BrokenPipeError:  # e.g. `dsv4 inspect | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        log(f"dsv4 {args.command}: interrupted")
        return EXIT_INTERRUPT


if __name__ == "__main__":
    sys.exit(main())
