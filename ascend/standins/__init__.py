"""CPU stand-ins of the Ascend libraries the torch backend calls, one module per library.

Each stand-in is a torch.library op defined from the real library's schema string (ascend/schemas/, bound by
ascend/standins/schema.py), with the binding's host-side checks mirrored and cited, so a call the real library
rejects is rejected here too:

- torch_npu.py: the torch_npu (op-plugin) kernels, torch-npu 2.14.0 schemas
- mc2.py: the MC2 expert-parallel dispatch/combine pair of torch_npu (over torch.distributed)
- vllm_ascend.py: vllm-ascend's `_C_ascend` custom ops
- cann_recipes.py: cann-recipes-infer's `custom` ops

Used only when the real package is absent (CPU machines).
"""
