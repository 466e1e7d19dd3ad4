"""Root pytest configuration: modules of optional adapters are not doctest-collected without their extra."""

import importlib.util

collect_ignore = []
if importlib.util.find_spec("torch") is None:  # sparseattn.torch imports torch at module level
    collect_ignore.append("sparseattn/torch.py")
