"""`dsv4`: one command, one sub-command per job. Results go to stdout, logs and progress to stderr."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from common.config import ConfigError
from common.safetensors_io import CheckpointError

from .errors import EXIT_INPUT, EXIT_INTERRUPT, CliError, log


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
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.add_argument("--logits-out", help="save float32 prefill logits of every prompt position to FILE.npy")
    p.set_defaults(func=cmd_generate)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="describe a checkpoint or preset: architecture, parameters, tensor formats")
    p.add_argument("--model", required=True, help="model directory or preset name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)


def cmd_generate(args) -> int:
    from tools.generate_cmd import run_generate

    return run_generate(args)


def cmd_inspect(args) -> int:
    from tools.inspect_cmd import run_inspect

    return run_inspect(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 on Ascend: CPU reference and tools")
    sub = ap.add_subparsers(dest="command", required=True)
    for add in (_add_generate, _add_inspect):
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
