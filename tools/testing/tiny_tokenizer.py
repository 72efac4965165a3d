"""Rebuilds configs/models/tiny.tokenizer.json: a 512-entry byte-level BPE for the tiny preset.

Run `python -m tools.testing.tiny_tokenizer` to regenerate. Byte-level, so any text encodes.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from common.config import PRESET_DIR

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
OUT = PRESET_DIR / "tiny.tokenizer.json"

CORPUS = """
DeepSeek-V4 is a mixture-of-experts language model. Each token is routed to a few experts chosen by a
router; the first layers route by a fixed hash of the token id. Attention mixes a sliding window over the
most recent tokens with compressed entries that summarise groups of four or one hundred and twenty-eight
tokens. A lightning indexer picks the compressed entries that matter for each query. Hyper-connections
keep four residual streams and mix them with a doubly stochastic matrix found by Sinkhorn iterations.
Pipeline parallelism in AI is a technique where a model is split across multiple devices.
The Ascend 910B and 910C accelerators run the model with expert parallelism over HCCL.
Hello world. The quick brown fox jumps over the lazy dog. Once upon a time there was a small model
that ran on a laptop and answered the same way every time it was asked.
"""


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    return tok


if __name__ == "__main__":
    build().save(str(OUT))
    print(f"wrote {OUT}")
