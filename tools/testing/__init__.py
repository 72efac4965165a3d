"""Test oracles and fixture builders, installed with the package because tests and benchmarks import them:
`hf_bridge` (transformers' DeepseekV4 model <-> our tensors, checkpoints in both namings), `release_format`
(DeepSeek's FP8 / FP4 release layout), `tiny_tokenizer` (regenerates the tiny preset's tokenizer). None of them
is used by a `dsv4` command."""
