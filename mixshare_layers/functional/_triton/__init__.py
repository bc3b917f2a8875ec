"""Fused Triton kernels of the masked ops (optional: needs ``triton``; imported only when first used).

``kernels`` holds the ``@triton.jit`` kernels, ``ops`` registers them as ``torch.library`` custom ops with autograd
and fake implementations. Nothing is imported here, so that listing the package never imports triton.
"""
