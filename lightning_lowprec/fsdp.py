"""FSDP2 for the plugin: the ``parallelize_fn`` of Lightning's ``ModelParallelStrategy``.

The supported sharded strategy is FSDP2 (``torch.distributed.fsdp.fully_shard``, per-parameter
``DTensor`` shards on dim 0), through Lightning's ``ModelParallelStrategy`` in Fabric and the
Trainer; Lightning's ``FSDPStrategy`` (FSDP1, flat parameters, its own precision plugin) is
refused with :data:`FSDP1_MESSAGE`.

Why the quantized layers are correct on shards: the plugin converts ``nn.Linear`` layers to
``QuantizedLinear`` before sharding (Fabric calls ``convert_module`` before the strategy's
``parallelize_fn``; in the Trainer ``configure_model`` runs before it too, see
:func:`fully_shard_blocks`). ``fully_shard`` keeps the module classes and all-gathers each
block's full weights before its forward (and again before its backward), so every matmul sees
the whole ``(out_features, in_features)`` weight: its MX blocks of 32 run along the reduction
axis ``in_features`` exactly as on one device. ``Shard(0)`` splits output rows, which never
cuts a block anyway; the optimizers update the row shards elementwise.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

__all__ = [
    "FSDP1_MESSAGE", "data_parallel_mesh", "fully_shard_blocks", "mark_sharded_multipliers",
    "fsdp_modules", "refuse_fsdp1", "reshard", "transformer_blocks",
]

FSDP1_MESSAGE = (
    "lightning_lowprec does not support FSDPStrategy (FSDP1: flat parameters and its own "
    "FSDPPrecision plugin). Use FSDP2, Lightning's ModelParallelStrategy: "
    "strategy=ModelParallelStrategy(lightning_lowprec.fully_shard_blocks, data_parallel_size=N, "
    "tensor_parallel_size=1) (in the Trainer: shard in configure_model with "
    "fully_shard_blocks(self.model, self.device_mesh)), or DDP: strategy='ddp'."
)
"""The one error a user of ``FSDPStrategy`` gets, naming the supported choices."""


def data_parallel_mesh(device_mesh):  # noqa: ANN001, ANN201 - DeviceMesh is imported lazily
    """The data-parallel dimension of ``ModelParallelStrategy``'s 2-D mesh (named
    ``"data_parallel"``), or ``device_mesh`` itself when it has no such dimension.

    Why: ``fully_shard`` on the whole ``(data_parallel, tensor_parallel)`` mesh would be
    HSDP, replicating over the first dimension and sharding over the second (of size 1).
    """
    names = device_mesh.mesh_dim_names or ()
    return device_mesh["data_parallel"] if "data_parallel" in names else device_mesh


def refuse_fsdp1(plugin_types: tuple[type, ...]) -> None:
    """Make Lightning's ``FSDPStrategy`` (Fabric and Trainer) refuse ``plugin_types`` with
    :data:`FSDP1_MESSAGE` instead of its generic "can only work with the FSDPPrecision
    plugin" ``TypeError``; every other precision plugin meets Lightning's own check.

    Why a wrapped setter: the strategy checks the plugin in its ``precision`` setter inside
    ``Fabric(...)``/``Trainer(...)``, before any hook of the plugin runs.
    """
    from lightning.fabric.strategies.fsdp import FSDPStrategy as FabricFSDP
    from lightning.pytorch.strategies.fsdp import FSDPStrategy as TrainerFSDP

    for cls, name in ((FabricFSDP, "precision"), (TrainerFSDP, "precision_plugin")):
        prop = getattr(cls, name)
        if getattr(prop.fset, "_lowprec_refuses", False):
            continue

        def fset(self, value, _original=prop.fset):  # noqa: ANN001, ANN202
            if isinstance(value, plugin_types):
                raise TypeError(FSDP1_MESSAGE)
            _original(self, value)

        fset._lowprec_refuses = True
        setattr(cls, name, property(prop.fget, fset, prop.fdel, prop.__doc__))


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The elements of the outermost ``nn.ModuleList``s in ``module`` (LitGPT:
    ``transformer.h``): the units FSDP2 gathers one at a time."""
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for child in module.modules():
        if id(child) in inside:
            continue
        if isinstance(child, nn.ModuleList):
            blocks.extend(child)
            inside.update(id(m) for block in child for m in block.modules())
    return blocks


def fully_shard_blocks(
    module: nn.Module, device_mesh, blocks: Iterable[nn.Module] | None = None  # noqa: ANN001
) -> nn.Module:
    """``fully_shard`` each transformer block, then the root, over the data-parallel mesh.

    The ``parallelize_fn`` for ``ModelParallelStrategy(fully_shard_blocks, ...)`` in Fabric;
    in a LightningModule's ``configure_model``: ``fully_shard_blocks(self.model,
    self.device_mesh)``. Convert to ``QuantizedLinear`` and add multipliers before (the plugin
    does the former in ``setup``/before ``configure_model``); the blocks default to
    :func:`transformer_blocks`. Returns ``module`` (now an ``FSDPModule``).
    """
    from torch.distributed.fsdp import fully_shard

    mesh = data_parallel_mesh(device_mesh)
    for block in transformer_blocks(module) if blocks is None else blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    mark_sharded_multipliers(module)
    return module


def mark_sharded_multipliers(module: nn.Module) -> None:
    """Mark the ``DTensor`` parameters of every :class:`~lightning_lowprec.multipliers.Multipliers`
    in ``module`` as multipliers again (:func:`fully_shard_blocks` calls it).

    Why: ``fully_shard`` replaces each parameter by a new ``nn.Parameter`` holding its
    ``DTensor`` shard, without the mark :func:`~lightning_lowprec.optim.mark_multiplier` set;
    unmarked, the multipliers would be clipped with the other gradients, get the matrices'
    weight decay from ``param_groups`` and be monitored as weights. Call it after your own
    ``fully_shard`` calls if you do not use :func:`fully_shard_blocks`.
    """
    from lightning_lowprec.multipliers import Multipliers
    from lightning_lowprec.optim.groups import mark_multiplier

    for child in module.modules():
        if isinstance(child, Multipliers):
            for p in child.parameters(recurse=False):
                mark_multiplier(p)


def reshard(module: nn.Module) -> None:
    """Put an FSDP2 module's parameters back into their shards (a no-op otherwise).

    Why: FSDP2 keeps the *root* module's parameters all-gathered after its forward until the
    backward (which then reshards them); after a forward with no backward (``eval()``,
    ``torch.no_grad()``) they stay gathered, and the next forward skips the all-gather. A
    sample or a point estimate written into the shards would then never reach the forward.
    """
    import torch.distributed as dist

    if not dist.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        module.reshard()


def fsdp_modules(module: nn.Module) -> list[nn.Module]:
    """The FSDP2 modules in ``module`` (itself included), outermost first; empty without
    ``torch.distributed``.

    Why: the Trainer's LightningModule is not itself an ``FSDPModule`` (``fully_shard`` runs
    on its submodules in ``configure_model``), so :func:`reshard` needs each of them; the
    Trainer plugin looks them up once per ``fit`` (a walk over a 24-layer model's modules
    costs ~0.4 ms, too much for every step).
    """
    import torch.distributed as dist

    if not dist.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]
