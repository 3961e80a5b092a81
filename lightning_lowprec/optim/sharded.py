"""The optimizers on FSDP2 ``DTensor`` parameters: local elementwise work, global decisions.

FSDP2 (``torch.distributed.fsdp.fully_shard``, Lightning's ``ModelParallelStrategy``) turns
every parameter into a ``DTensor`` sharded on dim 0 over the data-parallel ranks (``torch.chunk``
semantics: the last ranks may hold fewer rows, or none). The optimizers of this package keep
their math as it is and run it on the *local* shard (:func:`local_view`); what this module adds
is what must not depend on the world size:

* **per-tensor decisions** (Madam's ``p_scale * RMS``, LMD's ``m0`` from the RMS, the AdamW
  rule's all-zero routing, the whole-tensor skip on a non-finite gradient) reduce over the
  shards (:func:`global_sums`, :func:`mean_square`, :func:`any_nonzero`), so every rank takes
  the decision the unsharded tensor would;
* **counter-based noise** (LMD's samples, M+Adam's stochastic rounding) is indexed by the
  *global* element index: :func:`flat_offset` is where the shard starts in the flattened global
  tensor (dim-0 shards of a row-major tensor are contiguous there), so the sample of a step is
  bitwise the one a single process draws.

State tensors stay ``DTensor`` with the parameter's placements, as ``torch.optim`` keeps them
under FSDP2, so ``torch.distributed.checkpoint`` saves them sharded and Lightning gathers them
into full checkpoints. Only dim-0 sharding (and replication) is supported: other placements
(tensor parallelism's ``Shard(1)``) have no contiguous global index range and raise.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from math import prod
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

__all__ = [
    "any_nonzero", "flat_offset", "global_sums", "is_sharded", "local", "local_view",
    "mean_square", "offset_tensor", "state_offset", "wrap_like",
]


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2 parameter, its gradient or its state)."""
    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (sharing its storage: in-place writes go through),
    or ``t`` itself."""
    return t._local_tensor if isinstance(t, DTensor) else t


def _shard_dims(p: DTensor) -> tuple[int, ...]:
    """The mesh dimensions ``p`` is sharded over (on its dim 0); raise for other placements."""
    dims = []
    for mesh_dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard) and placement.dim == 0:
            dims.append(mesh_dim)
        elif not isinstance(placement, Replicate):
            raise NotImplementedError(
                f"lightning_lowprec optimizers support DTensor parameters sharded on dim 0 "
                f"(FSDP2) or replicated, got placements {p.placements}."
            )
    return tuple(dims)


def flat_offset(p: Tensor) -> int:
    """Where ``p``'s local shard starts in the flattened global tensor (0 when unsharded)."""
    if not isinstance(p, DTensor) or not _shard_dims(p):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return offset[0] * prod(p.shape[1:]) if p.ndim else 0


def offset_tensor(p: Tensor) -> Tensor:
    """:func:`flat_offset` as an int64 scalar tensor on ``p``'s device: a tensor, so that a
    compiled kernel does not recompile per shard, and a tensor (0) for an unsharded ``p`` too,
    so that plain tensors and shards run one compiled graph. Two graphs (one without the
    offset input) are different C++ sources, which the compiler contracts into fused
    multiply-adds differently: a sharded LMD run differed from the unsharded one in a
    few ulps of one log-median element (measured)."""
    return torch.tensor(flat_offset(p), dtype=torch.int64, device=local(p).device)


def state_offset(state: dict[str, Any], p: Tensor) -> Tensor:
    """The :func:`offset_tensor` of the tensor whose ``state`` this is: the one
    :func:`local_view` put there for a shard, else that of ``p`` (0 when unsharded)."""
    offset = state.get("offset")
    return offset if offset is not None else offset_tensor(p)


def wrap_like(p: Tensor, t: Tensor) -> Tensor:
    """``t`` (a tensor of ``p``'s local shape) as a ``DTensor`` laid out like ``p``; ``t`` as
    is when ``p`` is not a ``DTensor`` or ``t`` already is one."""
    if not isinstance(p, DTensor) or isinstance(t, DTensor) or t.shape != local(p).shape:
        return t
    return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def global_sums(values: Sequence[Tensor], params: Sequence[Tensor],
                op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> list[Tensor]:
    """``values[i]`` (a scalar computed on ``params[i]``'s local shard, all of one dtype)
    reduced by ``op``
    over the ranks ``params[i]`` is sharded over; unsharded parameters' values unchanged.

    One collective per mesh dimension in use (all FSDP2 parameters share one), so a step
    costs one small all-reduce, not one per tensor. Every rank must call it with the same
    parameters in the same order, as it does inside ``optimizer.step``.
    """
    out = list(values)
    groups: dict[tuple[int, int], list[int]] = {}
    meshes: dict[int, Any] = {}
    for i, p in enumerate(params):
        if isinstance(p, DTensor):
            for mesh_dim in _shard_dims(p):
                groups.setdefault((id(p.device_mesh), mesh_dim), []).append(i)
                meshes[id(p.device_mesh)] = p.device_mesh
    for (mesh_id, mesh_dim), idx in groups.items():
        box = torch.stack([out[i].reshape(()) for i in idx])
        dist.all_reduce(box, op=op, group=meshes[mesh_id].get_group(mesh_dim))
        for j, i in enumerate(idx):
            out[i] = box[j]
    return out


def mean_square(p: Tensor) -> float:
    """``mean(p**2)`` over the whole (global) tensor (a collective when sharded).

    The fp32 squares are summed in fp64, so that the order of the sum (one tensor, or shard
    sums added across ranks) changes the result by ~1e-16 relative: far below the fp32
    rounding of anything computed from it, so sharded and unsharded runs start bit-identical
    (an fp32 sum differed in the last bits and LMD's sign dynamics amplified that, measured).
    """
    square_sum = local(p).detach().float().square().sum(dtype=torch.float64)
    (square_sum,) = global_sums([square_sum], [p])
    return square_sum.item() / max(p.numel(), 1)


def any_nonzero(p: Tensor) -> bool:
    """Whether any element of the whole (global) tensor is nonzero (a collective when sharded)."""
    (flag,) = global_sums([local(p).detach().any().float()], [p], dist.ReduceOp.MAX)
    return bool(flag.item())


@contextmanager
def local_view(state: dict[Tensor, dict[str, Any]], params: Sequence[Tensor],
               owners: dict[Tensor, Tensor]) -> Iterator[list[Tensor]]:
    """The parameters as the optimizer math sees them: each ``DTensor`` by its local shard.

    For the duration, every shard carries its local gradient as ``.grad`` and has a
    ``state`` entry of local state tensors (sharing storage with the ``DTensor`` state, so
    in-place updates land there) plus ``"offset"``, the :func:`offset_tensor` of the shard;
    non-tensor entries written into it are copied back after. ``owners`` maps each shard to
    its ``DTensor`` parameter meanwhile. Shards with no elements (uneven dim-0 sharding) are
    left out: there is nothing to update.
    """
    views: list[tuple[Tensor, Tensor, dict[str, Any]]] = []
    out = []
    try:
        for p in params:
            if not isinstance(p, DTensor):
                out.append(p)
                continue
            shard = local(p)
            if shard.numel() == 0:
                continue
            shard.grad = local(p.grad)
            view = {k: local(v) if isinstance(v, Tensor) else v for k, v in state[p].items()}
            view["offset"] = offset_tensor(p)
            state[shard] = view
            owners[shard] = p
            views.append((p, shard, view))
            out.append(shard)
        yield out
    finally:
        for p, shard, view in views:
            for key, value in view.items():
                if key != "offset" and not isinstance(value, Tensor):
                    state[p][key] = value
            del state[shard]
            del owners[shard]
            shard.grad = None
