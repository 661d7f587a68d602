"""FSDP2 (torch's `fully_shard`) through Lightning's ModelParallelStrategy: `trainer=fsdp2`.

The units are those of `trainer=fsdp` (FSDP1, whose wrap policy names the model's Block): one
per block, gathered only while that block runs forward or backward, and the rest of the model
(embeddings, final norm, head) as the root unit. The training step calls the LanguageModel
itself in both its forms (a whole sequence, or a stream with its carried state), so the
gathering hooks run for every backend.
"""

from __future__ import annotations

from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from longctx.model import Block


def fully_shard_model(model: nn.Module, mesh: DeviceMesh) -> None:
    """Shard `model` over `mesh` (in place): each Block is a unit, the root holds the rest."""
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


class FullyShardedStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy with every rank in the data-parallel dimension.

    ModelParallelStrategy lays the ranks out as a (data parallel, tensor parallel) mesh whose
    tensor-parallel dimension defaults to a node's devices. longctx uses no tensor parallelism,
    so the mesh is (world size, 1): every rank reads its own batches (Lightning's distributed
    samplers follow the data-parallel dimension) and fully_shard shards over all ranks.
    """

    def __init__(self, **kwargs):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def _setup_distributed(self) -> None:
        super()._setup_distributed()
        # Known only once the ranks are; ModelParallelStrategy builds its mesh right after this.
        self._data_parallel_size = self.world_size
