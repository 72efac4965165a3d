"""The hardware-agnostic DeepSeek-V4 model graph: config, checkpoints, the V4 block, caches, generation."""
