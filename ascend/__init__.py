"""Lowering of the op contract to Ascend NPUs (torch_npu, MindSpore) and expert-parallel communication.

Nothing here imports torch_npu, CANN or MindSpore at module import time.
"""
