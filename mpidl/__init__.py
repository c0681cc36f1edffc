"""mpidl: data-parallel PyTorch training on HPC clusters.

    world = mpidl.init()        # rank, size, local_rank, device, launcher; fail-fast armed
"""
from mpidl.errors import BadInput
from mpidl.world import World, current, init

__version__ = "0.1.0"
__all__ = ["BadInput", "World", "current", "init", "__version__"]
