"""`dsv4 compare`: run two backends (or saved dumps) on the same prompt and find where they diverge.

`--a` / `--b` name a backend (`cpu`, `torch`, `mindspore`) or a dump saved earlier (`dump:FILE.npz`),
so a run recorded on an NPU machine can be compared with the CPU reference on a laptop.
"""

from __future__ import annotations

import json

from ascend.backends import get_backend
from common.generate import SamplingParams, generate
from common.loading import load_model
from common.model import Model
from ops import BackendUnavailable
from ops.recording import RecordingBackend, compare_records, load_recording

from .errors import EXIT_USAGE, CliError, log
from .generate_cmd import parse_prompt_ids


def _record_multi(spec: str, args, prompt: list[int]) -> tuple[dict, dict]:
    """Run backend `spec` on --nproc expert-parallel ranks; rank 0 (which owns the prompt) records its ops."""
    import tempfile
    from pathlib import Path

    from ascend.distributed import RankFailed

    from .generate_dist import generate_multi

    with tempfile.TemporaryDirectory(prefix="dsv4-compare-") as tmp:
        dump = args.save_b or str(Path(tmp) / "rank0.npz")
        try:
            generate_multi(args.model, [prompt], SamplingParams(max_new_tokens=args.steps + 1, stop_on_eos=False),
                           args.nproc, backend=spec, moe_comm=(args.moe_comm,), record_ops=dump)
        except (RankFailed, ValueError) as e:
            raise CliError(f"--nproc {args.nproc} run of {spec}: {e}") from None
        recs, header = load_recording(dump)
    header["label"] = f"{spec} x{args.nproc} ranks ({args.moe_comm})"
    return recs, header


def _load_dump(spec: str) -> tuple[dict, dict]:
    path = spec[len("dump:"):]
    try:
        recs, header = load_recording(path)
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CliError(f"{path}: not a dsv4 compare dump ({e})") from None
    ids, out = header.get("prompt_ids"), header.get("output_ids")
    if not (isinstance(ids, list) and ids and all(isinstance(t, int) for t in ids) and isinstance(out, list)):
        raise CliError(f"{path}: not a dsv4 compare dump (no prompt_ids / output_ids in its header)")
    return recs, header


def _record(spec: str, lm, prompt: list[int], steps: int) -> tuple[dict, dict]:
    if spec.startswith("dump:"):
        path = spec[len("dump:"):]
        recs, header = _load_dump(spec)
        if header.get("prompt_ids") != prompt:
            raise CliError(f"{path}: recorded for prompt {header.get('prompt_ids')}, not {prompt}")
        return recs, header
    try:
        backend = get_backend(spec)
    except BackendUnavailable as e:
        raise CliError(str(e)) from None
    rec = RecordingBackend(backend, spec)
    model = Model(lm.cfg, lm.weights, rec)
    res = generate(model, [prompt], SamplingParams(max_new_tokens=steps + 1, stop_on_eos=False))
    return rec.records, {"label": spec, "backend": backend.name, "prompt_ids": prompt,
                         "output_ids": res.output_ids[0], "recorder": rec}


def _prompt_and_steps(args, cfg) -> tuple[list[int], int]:
    """--prompt-ids / --steps, else what a dump on either side recorded, else 2*window tokens and 2 steps."""
    dump = next((s for s in (args.a, args.b) if s.startswith("dump:")), None)
    header = _load_dump(dump)[1] if dump else {}
    if args.prompt_ids:
        prompt = parse_prompt_ids(args.prompt_ids, cfg.vocab_size)[0]
    elif header:
        prompt = list(header["prompt_ids"])
    else:
        prompt = list(range(2, min(cfg.vocab_size, 2 + 2 * cfg.window)))
    if args.steps is not None:
        steps = args.steps
    elif header:
        steps = max(len(header["output_ids"]) - 1, 0)  # the dump's generation: prefill token + decode steps
    else:
        steps = 2
    if steps < 0:
        raise CliError("--steps must be >= 0", EXIT_USAGE)
    return prompt, steps


def _scopes(rows: list[dict]) -> dict[str, dict]:
    """Per model scope: op count, worst max-abs / relative error / cosine and the op with the worst relative."""
    scopes: dict[str, dict] = {}
    for r in rows:
        s = scopes.setdefault(r["scope"], {"scope": r["scope"], "ops": 0, "max_abs": 0.0, "rel": 0.0, "cosine": 1.0,
                                           "worst_op": ""})
        s["ops"] += 1
        if r["rel"] >= s["rel"]:
            s["worst_op"] = r["op"]
        s["max_abs"] = max(s["max_abs"], r["max_abs"])
        s["rel"] = max(s["rel"], r["rel"])
        s["cosine"] = min(s["cosine"], r["cosine"])
    return scopes


def run_compare(args) -> int:
    if args.steps is not None and args.steps < 0:
        raise CliError("--steps must be >= 0", EXIT_USAGE)
    lm = load_model(args.model, log)
    prompt, args.steps = _prompt_and_steps(args, lm.cfg)
    ra, ha = _record(args.a, lm, prompt, args.steps)
    if args.nproc > 1:
        if args.b.startswith("dump:"):
            raise CliError("--nproc runs backend b live; it cannot be a dump", EXIT_USAGE)
        rb, hb = _record_multi(args.b, args, prompt)
    else:
        rb, hb = _record(args.b, lm, prompt, args.steps)
    for spec, header, path in ((args.a, ha, args.save_a), (args.b, hb, args.save_b)):
        if path and not (spec == args.b and args.nproc > 1):  # a multi-rank run saved its dump directly
            if "recorder" not in header:
                raise CliError(f"--save for {spec}: it is already a dump")
            header["recorder"].save(path, {"prompt_ids": prompt, "output_ids": header["output_ids"],
                                           "model": str(args.model)})
            log(f"saved {len(header['recorder'].records)} op outputs of {spec} to {path}")
    rows = compare_records(ra, rb)
    if not rows:
        raise CliError("the two runs share no recorded ops (different models or prompts?)")
    first_bad = next((r for r in rows if r["rel"] > args.tol), None)
    scopes = _scopes(rows)
    tokens_a, tokens_b = ha.get("output_ids"), hb.get("output_ids")
    summary = {
        "a": ha.get("label", args.a), "b": hb.get("label", args.b), "prompt_len": len(prompt),
        "ops_compared": len(rows),
        "tolerance": args.tol, "first_divergence": first_bad, "greedy_a": tokens_a, "greedy_b": tokens_b,
        "greedy_agree": tokens_a == tokens_b, "max_rel": max(r["rel"] for r in rows),
    }
    if args.json:
        print(json.dumps({"summary": summary, "scopes": list(scopes.values()),
                          "ops": rows if args.all else None}, default=float))
        return 0
    print(f"compare {summary['a']} vs {summary['b']}: {len(rows)} op outputs, prompt {len(prompt)} tokens, "
          f"{args.steps} decode step(s); tolerance {args.tol:g} relative")
    print(f"{'scope':34s} {'ops':>4s} {'max-abs':>10s} {'relative':>10s} {'cosine':>10s}  worst op")
    for s in scopes.values():
        flag = "  <-- first divergence" if first_bad and s["scope"] == first_bad["scope"] else ""
        print(f"{s['scope']:34s} {s['ops']:4d} {s['max_abs']:10.3g} {s['rel']:10.3g} {s['cosine']:10.6f}  "
              f"{s['worst_op']}{flag}")
    if args.all:
        for r in rows:
            print(f"  {r['key']:60s} {r['max_abs']:10.3g} {r['rel']:10.3g} {r['cosine']:10.6f} {r['note']}")
    agree = "identical" if summary["greedy_agree"] else f"differ: {tokens_a} vs {tokens_b}"
    print(f"greedy tokens: {agree}")
    if first_bad:
        print(f"first op over tolerance: {first_bad['key']} (relative {first_bad['rel']:.3g})")
    else:
        print(f"no op over tolerance (max relative {summary['max_rel']:.3g})")
    return 0

