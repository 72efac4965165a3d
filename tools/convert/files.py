"""Names and sizes of what `dsv4 convert` writes."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from common.converted import CONVERT_INFO, JOURNAL, MANIFEST  # noqa: F401  (re-exported)

from ..errors import CliError

RESOLVED = CONVERT_INFO  # dsv4_convert.json: model summary, recipe, parallel layout
# small files next to the weights that a converted directory keeps (tokenizer, generation defaults)
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
             "chat_template.jinja")
DEFAULT_SHARD = 2 << 30
# float32 elements converted at once per job (row chunks). Small enough that the codecs' temporaries stay
# in cache: 256K elements run ~3x faster than 4M (measured on FP4 -> bf16 / W8A8), and bound each worker's
# memory to a few MiB besides the tensor's own input and output.
CHUNK_ELEMS = 256 << 10
# elements per job: bigger tensors are converted as several row ranges, so memory does not grow with them
JOB_ELEMS = 8 << 20
# converted bytes waiting for the writer thread (bounds memory while the disk is slower than the workers)
WRITE_QUEUE_BYTES = 256 << 20
# test hook: raise KeyboardInterrupt after this many shards completed (exercises the real Ctrl-C path)
INTERRUPT_ENV = "DSV4_CONVERT_INTERRUPT_AFTER_SHARDS"

F32 = np.dtype(np.float32)
BF16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_TAGS = ("F64", "F32", "F16", "BF16")
INT_TAGS = ("I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8")


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise CliError(f"{path}: cannot write ({e.strerror})") from None


def sha256_file(path: Path, stop: threading.Event | None = None, chunk: int = 16 << 20) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    buf = bytearray(chunk)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            if stop is not None and stop.is_set():
                raise KeyboardInterrupt
            n = f.readinto(buf)
            if not n:
                break
            h.update(mv[:n])
            size += n
    return size, h.hexdigest()
