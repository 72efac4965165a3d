"""`dsv4 generate`."""

from __future__ import annotations

import json
import os
import sys
import time

from tqdm import tqdm

from common.generate import SamplingParams, generate
from common.loading import load_model
from common.model import Model
from ops import BackendUnavailable, get_backend

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
    import numpy as np

    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def sampling_params(args) -> SamplingParams:
    if args.max_new_tokens < 0:
        raise CliError("--max-new-tokens must be >= 0", EXIT_USAGE)
    try:
        return SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                              stop_on_eos=not args.ignore_eos)
    except ValueError as e:
        raise CliError(str(e), EXIT_USAGE) from None


def make_prompts(args, cfg, tokenizer) -> list[list[int]]:
    """The batch of prompt token ids from --prompt / --prompt-ids (BOS alone when neither is given)."""
    if args.prompt is not None:
        if tokenizer is None:
            raise CliError(f"{args.model}: no tokenizer.json; pass --prompt-ids instead of --prompt")
        ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids
        if not args.no_bos and cfg.bos_token_id is not None:
            ids = [cfg.bos_token_id] + ids
        prompts = [ids]
    elif args.prompt_ids is not None:
        prompts = parse_prompt_ids(args.prompt_ids, cfg.vocab_size)
    else:
        prompts = [[cfg.bos_token_id if cfg.bos_token_id is not None else 0]]
    if args.logits_out and len(prompts) != 1:
        raise CliError("--logits-out takes a single prompt", EXIT_USAGE)
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


def run_generate(args) -> int:
    from ascend.distributed import wants_distributed

    if wants_distributed(args):  # --nproc N > 1, or launched as one rank by torchrun
        from ascend.distributed import run_generate_distributed

        return run_generate_distributed(args)
    params = sampling_params(args)
    if getattr(args, "kernels", None) == "triton" and args.backend != "torch":
        raise CliError("--kernels triton: our kernels run on the torch backend (--backend torch)", EXIT_USAGE)
    try:
        # the torch backend runs the Ascend lowering: on the NPU, or on the CPU through the stand-in
        opts = ({"device": args.device, "soc": args.soc, "kernels": getattr(args, "kernels", None)}
                if args.backend == "torch"
                else {"device": "ascend" if args.device == "npu" else "cpu"} if args.backend == "mindspore" else {})
        backend = get_backend(args.backend, **opts)
    except BackendUnavailable as e:
        raise CliError(str(e)) from None

    t0 = time.perf_counter()
    lm = load_model(args.model, log)
    cfg = lm.cfg
    prompts = make_prompts(args, cfg, lm.tokenizer)
    recorder = None
    if args.record_ops:
        from ops.recording import RecordingBackend

        recorder = RecordingBackend(backend, args.backend)
    model = Model(cfg, lm.weights, recorder or backend)
    load_s = time.perf_counter() - t0
    log(f"loaded {lm.source} in {load_s:.2f}s: {cfg.n_layers} layers, backend {backend.name}")

    bar = tqdm(total=max(args.max_new_tokens - 1, 0), desc="decode", unit="tok", file=sys.stderr,
               disable=args.max_new_tokens <= 1 or not sys.stderr.isatty(), leave=False)
    res = generate(model, prompts, params, keep_prompt_logits=bool(args.logits_out),
                   on_step=lambda n: bar.update(1))
    bar.close()
    if recorder is not None:
        recorder.save(args.record_ops, {"prompt_ids": prompts[0], "output_ids": res.output_ids[0],
                                        "model": str(args.model)})
        log(f"recorded {len(recorder.records)} op outputs to {args.record_ops}")
    emit_result(args, result_dict(lm.source, backend.name, res, lm.tokenizer), res, lm.tokenizer)
    return 0
