"""`dsv4 generate`."""

from __future__ import annotations

import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ascend.distributed import EXIT_FAILED, FAULT_ENV, RankFailed, _parse_fault, in_torchrun, launch, run_guarded
from common.generate import SamplingParams, generate
from common.loading import load_model
from common.model import Model
from common.parallel import expert_split_error
from ops import BackendUnavailable

from .errors import EXIT_USAGE, CliError, log


def parse_prompt_ids(text: str, vocab: int) -> list[list[int]]:
    prompts = []
    for part in text.split(";"):
        try:
            ids = [int(t) for t in part.replace(" ", "").split(",") if t != ""]
        except ValueError:
            raise CliError(f"--prompt-ids: {part!r} is not a comma-separated list of integers", EXIT_USAGE) from None
        if not ids:
            raise CliError("--prompt-ids: empty prompt", EXIT_USAGE)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise CliError(f"--prompt-ids: token id {bad[0]} is out of the vocabulary [0, {vocab})")
        prompts.append(ids)
    return prompts


def save_npy(path: str, array) -> None:
    """Write to a temp name and rename: a failed write (a full disk) leaves neither a partial file nor the temp."""
    import numpy as np

    tmp = path + ".tmp.npy"
    try:
        np.save(tmp, array)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise CliError(f"{path}: cannot write ({e.strerror or e})") from None


def check_writable(path: str, flag: str) -> None:
    """Refuse an output file that cannot be written, before any work: its directory must exist and take a file."""
    p = Path(path)
    if p.is_dir():
        raise CliError(f"{flag} {path}: is a directory", EXIT_USAGE)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise CliError(f"{flag} {path}: directory {parent} does not exist", EXIT_USAGE)
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{p.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise CliError(f"{flag} {path}: cannot write in {parent} ({e.strerror or e})", EXIT_USAGE) from None


def check_outputs(args) -> None:
    """--logits-out / --record-ops are checked writable before the model is loaded."""
    for flag, path in (("--logits-out", args.logits_out), ("--record-ops", args.record_ops)):
        if path:
            check_writable(path, flag)


def sampling_params(args) -> SamplingParams:
    if args.max_new_tokens < 0:
        raise CliError("--max-new-tokens must be >= 0", EXIT_USAGE)
    try:
        return SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                              stop_on_eos=not args.ignore_eos)
    except ValueError as e:
        field, _, rest = str(e).partition(" ")  # "temperature must be ..." -> "--temperature must be ..."
        raise CliError(f"--{field.replace('_', '-')} {rest}", EXIT_USAGE) from None


def make_prompts(args, cfg, tokenizer) -> list[list[int]]:
    """The batch of prompt token ids from --prompt / --prompt-ids (BOS alone when neither is given)."""
    if args.prompt is not None:
        if tokenizer is None:
            raise CliError(f"{args.model}: no tokenizer.json; pass --prompt-ids instead of --prompt")
        if getattr(args, "chat", False):  # the V4 chat format (common/chat.py; BOS is part of the rendering)
            from common.chat import encode_messages, encode_text

            return [encode_text(tokenizer, encode_messages([{"role": "user", "content": args.prompt}],
                                                           thinking=args.thinking))]
        ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids
        if not args.no_bos and cfg.bos_token_id is not None:
            ids = [cfg.bos_token_id] + ids
        if not ids:
            raise CliError("--prompt: no tokens to start from (empty text with --no-bos)", EXIT_USAGE)
        prompts = [ids]
    elif args.prompt_ids is not None:
        prompts = parse_prompt_ids(args.prompt_ids, cfg.vocab_size)
    else:
        prompts = [[cfg.bos_token_id if cfg.bos_token_id is not None else 0]]
    if args.logits_out and len(prompts) != 1:
        raise CliError("--logits-out takes a single prompt", EXIT_USAGE)
    longest = max(len(p) for p in prompts)
    if longest + args.max_new_tokens > cfg.max_position_embeddings:
        raise CliError(f"a prompt of {longest} tokens + --max-new-tokens {args.max_new_tokens} exceeds the model's "
                       f"max_position_embeddings ({cfg.max_position_embeddings})", EXIT_USAGE)
    return prompts


def result_dict(source: str, backend_name: str, res, tokenizer) -> dict:
    """The `--json` object (also the fields of the plain-text summary)."""
    single = len(res.prompt_ids) == 1
    out = {
        "model": source,
        "backend": backend_name,
        "prompt_ids": res.prompt_ids[0] if single else res.prompt_ids,
        "output_ids": res.output_ids[0] if single else res.output_ids,
        "finish_reason": res.finish_reasons[0] if single else res.finish_reasons,
        "prefill_tokens_per_s": round(res.prefill_tokens_per_s, 2),
        "decode_tokens_per_s": round(res.decode_tokens_per_s, 2),
        "prefill_seconds": round(res.prefill_seconds, 4),
        "decode_seconds": round(res.decode_seconds, 4),
        "seed": res.stats["seed"],
    }
    if tokenizer is not None:
        out["text"] = tokenizer.decode(res.output_ids[0]) if single else [tokenizer.decode(o) for o in res.output_ids]
    return out


def emit_result(args, out: dict, res, tokenizer) -> None:
    """Save --logits-out and print the result (one JSON object with --json)."""
    if args.logits_out:
        save_npy(args.logits_out, res.prompt_logits[0].astype("float32"))
        log(f"wrote prompt logits {tuple(res.prompt_logits[0].shape)} to {args.logits_out}")
    single = len(res.prompt_ids) == 1
    if args.json:
        print(json.dumps(out), flush=True)
    else:
        for i, o in enumerate(res.output_ids):
            shown = tokenizer.decode(o) if tokenizer is not None else ",".join(map(str, o))
            print(shown if single else f"[{i}] {shown}", flush=True)
        log(f"prefill {out['prefill_tokens_per_s']} tok/s, decode {out['decode_tokens_per_s']} tok/s, "
            f"finish: {out['finish_reason']}")


def wants_distributed(args) -> bool:
    """`dsv4 generate` takes the multi-rank path for --nproc other than 1 (0 or less is refused there)."""
    return getattr(args, "nproc", 1) != 1 or in_torchrun()


# ---- `dsv4 generate --nproc N` / under torchrun -------------------------------------------------------

def launch_world(args) -> tuple[bool, int]:
    """(under torchrun?, world size) of a multi-rank `generate` or `serve`, with --nproc and the fault hook checked."""
    if args.dist_timeout <= 0:
        raise CliError("--dist-timeout must be > 0 seconds", EXIT_USAGE)
    torchrun = in_torchrun()
    world = int(os.environ["WORLD_SIZE"]) if torchrun else args.nproc
    if torchrun and args.nproc not in (1, world):
        raise CliError(f"--nproc {args.nproc} disagrees with torchrun's WORLD_SIZE={world}", EXIT_USAGE)
    if world < 1:
        raise CliError("--nproc must be >= 1", EXIT_USAGE)
    try:
        _parse_fault(os.environ.get(FAULT_ENV))
    except ValueError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    return torchrun, world


def run_generate_distributed(args) -> int:
    import importlib.util

    from ascend.backends import device_error

    from .generate_dist import Job, probe_model, run_rank

    params = sampling_params(args)
    torchrun, world = launch_world(args)
    if getattr(args, "kernels", None) == "triton":
        raise CliError("--kernels triton runs on one rank only (drop --nproc / torchrun)", EXIT_USAGE)
    err = device_error(args.backend, args.device)
    if err:
        raise CliError(err)
    if args.device == "npu" and importlib.util.find_spec("torch_npu") is None:
        raise CliError("--device npu needs torch_npu (and CANN); it is not installed here")
    check_outputs(args)
    cfg, tokenizer, _ = probe_model(args.model)
    err = expert_split_error(cfg.n_routed_experts, world)
    if err:
        raise CliError(f"--nproc {world}: {err}", EXIT_USAGE)
    if Path(args.model).is_dir():  # a `dsv4 convert --ep N` output must be run on N ranks: check before spawning
        from common.loading import split_indexes

        split_indexes(Path(args.model), 0, world)
    prompts = make_prompts(args, cfg, tokenizer)
    job = Job(args.model, prompts, params, args.backend, args.device, [args.moe_comm], args.soc,
              bool(args.logits_out), args.dist_timeout, record_ops=args.record_ops, dtype=resolve_dtype(args))

    if torchrun:
        holder: dict[str, Any] = {}
        code = run_guarded(int(os.environ["RANK"]), lambda: holder.update(results=run_rank(job, log)))
        if code:
            return code
        results = holder.get("results")
    else:
        with tempfile.TemporaryDirectory(prefix="dsv4-ranks-") as tmp:
            job.result_path = str(Path(tmp) / "rank0.pkl")
            try:
                launch(world, run_rank, (job,))
            except RankFailed as e:
                raise CliError(str(e), EXIT_FAILED) from None
            with open(job.result_path, "rb") as f:
                results = pickle.load(f)
    if not results:  # ranks other than 0 under torchrun print nothing
        return 0
    r = results[0]
    out = result_dict(r.source, r.backend, r.result, tokenizer)
    out.update(nproc=r.nproc, moe_comm_calls=r.moe_calls)
    emit_result(args, out, r.result, tokenizer)
    log(f"{r.nproc} ranks, MoE layer calls by strategy on rank 0: {r.moe_calls}")
    return 0


def resolve_dtype(args) -> str:
    """--dtype, defaulted: bfloat16 for the torch backend on an NPU, float32 (the golden) otherwise. Only the
    torch backend runs a device dtype; the NumPy reference and MindSpore compute in float32."""
    dtype = getattr(args, "dtype", None)
    if dtype is None:
        return "bfloat16" if args.backend == "torch" and args.device == "npu" else "float32"
    if dtype != "float32" and args.backend != "torch":
        raise CliError(f"--dtype {dtype} needs --backend torch (the {args.backend} backend computes in float32)",
                       EXIT_USAGE)
    return dtype


def parse_providers(text: str | None) -> list[str] | None:
    """--providers a,b,c -> a checked list (None: the backend's default)."""
    if text is None:
        return None
    from ascend.soc import COMPOSED, CUSTOM, TORCH_NPU

    known = (TORCH_NPU, CUSTOM, COMPOSED)
    got = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in got if p not in known]
    if bad or not got:
        raise CliError(f"--providers {text!r}: choose from {', '.join(known)}", EXIT_USAGE)
    return got


def _providers(args) -> list[str] | None:
    from ascend.torch_backend import simulated_providers

    return simulated_providers(args.device, args.soc, parse_providers(getattr(args, "providers", None)))


def run_generate(args) -> int:
    if wants_distributed(args):  # --nproc N > 1, or launched as one rank by torchrun
        return run_generate_distributed(args)
    params = sampling_params(args)
    check_outputs(args)
    chunk = getattr(args, "prefill_chunk", None)
    if chunk is not None and chunk < 1:
        raise CliError(f"--prefill-chunk must be >= 1, got {chunk}", EXIT_USAGE)
    kernels = getattr(args, "kernels", None)
    if kernels == "triton" and args.backend != "torch":
        raise CliError("--kernels triton: our kernels run on the torch backend (--backend torch)", EXIT_USAGE)
    dtype = resolve_dtype(args)
    from ascend.backends import get_backend

    try:
        # the torch backend runs the Ascend lowering: on the NPU, or on the CPU through the stand-in
        opts = ({"dtype": dtype, "providers": _providers(args), "kernels": kernels}
                if args.backend == "torch" else {})
        backend = get_backend(args.backend, device=args.device, soc=args.soc, **opts)
    except BackendUnavailable as e:
        raise CliError(str(e)) from None

    t0 = time.perf_counter()
    lm = load_model(args.model, log, float_dtype=dtype)  # weights handed over in the device form
    cfg = lm.cfg
    prompts = make_prompts(args, cfg, lm.tokenizer)
    recorder = None
    if args.record_ops:
        from ops.recording import RecordingBackend

        recorder = RecordingBackend(backend, args.backend)
    model = Model(cfg, lm.weights, recorder or backend)
    load_s = time.perf_counter() - t0
    log(f"loaded {lm.source} in {load_s:.2f}s: {cfg.n_layers} layers, backend {backend.name}, {dtype}")

    bar = tqdm(total=max(args.max_new_tokens - 1, 0), desc="decode", unit="tok", file=sys.stderr,
               disable=args.max_new_tokens <= 1 or not sys.stderr.isatty(), leave=False)
    res = generate(model, prompts, params, keep_prompt_logits=bool(args.logits_out),
                   on_step=lambda n: bar.update(1), prefill_chunk=chunk)
    bar.close()
    used = getattr(backend, "variants", None)
    if used is not None:
        v = used()
        attn = ("compressor", "compressor_metadata", "lightning_indexer", "sparse_attn_sharedkv", "kv_scatter")
        log("attention-side kernels: " + ", ".join(f"{op}={v[op]}" for op in attn if op in v))
    if recorder is not None:
        recorder.save(args.record_ops, {"prompt_ids": prompts[0], "output_ids": res.output_ids[0],
                                        "model": str(args.model)})
        log(f"recorded {len(recorder.records)} op outputs to {args.record_ops}")
    emit_result(args, result_dict(lm.source, backend.name, res, lm.tokenizer), res, lm.tokenizer)
    return 0
