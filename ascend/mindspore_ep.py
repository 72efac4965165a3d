"""msrun entry point of the MindSpore backend with expert parallelism: one process per NPU.

Every rank loads its own slice of the routed experts and generates the same prompts; the exchanges live in
`ascend/mindspore_comm.py`. Nothing here was run on an NPU. Launch (see README, "MindSpore backend"):

    msrun --worker_num=8 --local_worker_num=8 --master_port=8118 --log_dir=msrun_log --join=True \\
        python -m ascend.mindspore_ep --model /models/v4-flash-w8a8 --prompt-ids 0,5,6,7 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    """Per-rank entry point under msrun: every rank generates the same prompts; rank 0 prints the JSON."""
    ap = argparse.ArgumentParser(prog="python -m ascend.mindspore_ep")
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args(argv)

    # absolute imports: msrun runs this file as a script (see `dsv4 deploy --launcher msrun`)
    from ascend.mindspore_backend import MindSporeBackend
    from common.config import model_config
    from common.generate import SamplingParams, generate
    from common.loading import load_model
    from common.model import Model

    B = MindSporeBackend(device="ascend", expert_parallel=True)
    cfg = model_config(args.model, need_weights=True)[0]
    first, count = B.ep.expert_range(cfg.n_routed_experts)
    lm = load_model(args.model, experts=range(first, first + count))
    model = Model(lm.cfg, lm.weights, B, expert_range=(first, count))
    ids = [int(t) for t in args.prompt_ids.split(",")]
    res = generate(model, [ids], SamplingParams(max_new_tokens=args.max_new_tokens, stop_on_eos=False))
    if B.ep.rank == 0:
        print(json.dumps({"output_ids": res.output_ids[0], "ranks": B.ep.size, "experts_per_rank": count,
                          "variants": B.variants(), "moe_comm": B.ep.strategies,
                          "decode_tokens_per_s": round(res.decode_tokens_per_s, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
