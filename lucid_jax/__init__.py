"""lucid_jax: Lucid's ``faster_rcnn_resnet_101_fpn`` as pure flax.linen modules.

The detector (ResNet-101, FPN, RPN, RoI head) is jit-compiled by XLA for CPU, GPU
and TPU, and its variables convert to and from Lucid's state-dict names.
"""

import jax
import numpy as np

from lucid_jax import host_memory, models, ops, state_dict

# Return the compiler's freed memory to the system after each large compile (see host_memory).
host_memory.install()

__version__ = "0.1.0"


def count_params(params) -> int:
    """Number of scalar parameters in a pytree (e.g. ``variables["params"]``).

    Args:
      params: any pytree of arrays.

    Returns:
      The total element count, as a Python int.
    """
    return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params)))


__all__ = ["count_params", "host_memory", "models", "ops", "state_dict", "__version__"]
