"""`dsv4 convert`: a checkpoint the loader reads in, Ascend-ready weights (bf16 / W8A8 / W4A8) out.

Pipeline (peak memory bounded by a few tensors, never by the model):

1. Validate everything from headers before writing a byte: the recipe, the config, every expected tensor
   (presence, shape, dtype, quantized-format/scale shapes via `ops.quant.detect_format`), the parallel
   layout (`--ep` divides the experts, `--tp` splits whole heads / groups) and the W4A8 group size.
2. Plan: the output tensors of every source tensor (dtype and shape are known from the recipe alone),
   their part (top level, or `shared/`, `tp-NNNNN/`, `ep-NNNNN/`) and shard; so each shard's safetensors
   header is written first and the tensor bytes are streamed after it.
3. Convert with a thread pool, one source tensor per job, consumed in plan order with a small look-ahead
   window; the main thread appends each result to its part's open shard (one writer per shard) and hashes
   the bytes as they are written. Threads, not processes: numpy releases the GIL in the heavy loops
   (casts, abs/max reductions, rint, clip) and hashlib does for large buffers, and threads share the
   source reader without pickling multi-MB arrays between processes (which would copy every tensor twice).
4. Every file is written to `NAME.tmp` and renamed; after each finished shard its size and sha256 go to
   the journal `dsv4_progress.json` (that is what `--resume` trusts, after re-hashing the file). Indices,
   configs and `dsv4_convert.json` follow, and `dsv4_manifest.json` is written LAST: a directory without
   it is never a complete conversion.

Source tensors are read with `os.preadv` at the offsets the (mmap-based) `Checkpoint` headers give, not
through the map: pages of a map that has been read count in the process's resident set until unmapped,
so a multi-GB source would make the converter's RSS as large as the checkpoint.
"""

from __future__ import annotations

from common.recipes import SCHEMES, Recipe, load_recipe, recipe_path

from .command import run_convert
from .files import JOURNAL, MANIFEST, RESOLVED
from .manifest import verify_dir
from .plan import Layout, OutTensor, Shard, plan_conversion
from .validate import scan_source
from .write import ShardFile

__all__ = ["MANIFEST", "RESOLVED", "JOURNAL", "SCHEMES", "Layout", "Recipe", "load_recipe", "recipe_path",
           "run_convert", "scan_source", "plan_conversion", "verify_dir", "OutTensor", "Shard", "ShardFile"]
