"""Kernels: the mechanisms' tensor computations, tensors in and tensors out.

Per mechanism, a plain reference next to each fast form (the torch kernels that run everywhere,
FlexAttention, flash-linear-attention's Triton kernels), and `seam`, which picks one per call.
Nothing here knows about configs, layers or models.
"""
