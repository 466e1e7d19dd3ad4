"""Numba kernels: raw arrays in, raw arrays out, no validation and no allocation policy.

``staged``: SDDMM -> row softmax -> SpMM (materialises one score per nonzero).
``fused``: the tile-planned online-softmax forward (see ``sparseattn.plan``).
"""
