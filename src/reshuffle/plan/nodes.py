"""Node-aware plans: the strategy runs over nodes, and each node deals its samples to its ranks.

On a cluster a node's GPUs share its local SSD and page cache, so what matters for storage and
the network is what a *node* holds. With ``ranks_per_node = R > 1`` the planner runs the chosen
strategy with one "rank" per node (``M / R`` nodes): the initial partition is a node-level
partition (``label-sorted`` gives each node a few classes), ``local`` keeps each node's samples on
the node forever, ``partial`` moves round(Q * floor(N / nodes)) samples between nodes per epoch,
``global`` reshuffles everything. Then, every epoch, each node deals what it holds afresh among
its R ranks: a keyed random permutation of the node's slots, drawn from (seed, epoch, node), cut
into R balanced parts. Rank ``n * R + j`` is local rank ``j`` of node ``n``.

So a rank's holdings change every epoch even under ``local`` (about (R - 1) / R of them, all from
its own node), while nothing crosses a node boundary except what the node-level strategy moves.
Every plan guarantee still holds at the rank level (balanced holdings, sends mirror receives,
holdings minus sends plus receives are the next epoch's): rank sizes are ``floor(N/M)`` or
``ceil(N/M)``, though which ranks hold the extra sample follows the nodes, not rank order.

Costs per rank: the node's slots (O(R * N / M)) and a pointwise inverse of the node-level
strategy (:meth:`Strategy.locate`) for the ids it sends and receives.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import numpy as np
from numpy.typing import NDArray

from reshuffle.plan import streams
from reshuffle.plan.layout import Layout, group_by_rank
from reshuffle.plan.permutation import KeyedPermutation
from reshuffle.plan.strategies.base import Strategy

T = TypeVar("T")
KEPT_EPOCHS = 3  # node slots and deals cached per epoch; a rank asks for e and e + 1


class EpochCache(Generic[T]):
    """Values per (epoch, node), kept for the ``KEPT_EPOCHS`` most recently used epochs."""

    def __init__(self) -> None:
        self._values: dict[int, dict[int, T]] = {}

    def get(self, epoch: int, node: int, make: Callable[[], T]) -> T:
        values = self._values.pop(epoch, {})
        self._values[epoch] = values  # most recently used last
        for old in list(self._values)[:-KEPT_EPOCHS]:
            del self._values[old]
        if node not in values:
            values[node] = make()
        return values[node]

    def clear(self) -> None:
        self._values.clear()


class NodeLevel(Strategy):
    """``inner`` (planned over nodes) with a per-epoch deal of each node's slots to its ranks.

    Args:
        inner: the strategy, built on a layout of ``world_size / ranks_per_node`` nodes.
        ranks: the rank layout (``Layout(N, M)``).
        ranks_per_node: R; the ranks of node ``n`` are ``n * R .. n * R + R - 1``.
    """

    def __init__(self, inner: Strategy, ranks: Layout, ranks_per_node: int) -> None:
        super().__init__(inner.context)
        self.inner = inner
        self.layout = ranks
        self.nodes = inner.layout
        self.per_node = ranks_per_node
        self.name = inner.name  # type: ignore[misc]
        self.uses_fraction = inner.uses_fraction  # type: ignore[misc]
        self.uses_losses = inner.uses_losses  # type: ignore[misc]
        self._node_slots: EpochCache[NDArray[np.int64]] = EpochCache()
        self._deals: EpochCache[KeyedPermutation] = EpochCache()

    # ---- the deal of a node's slots among its ranks

    def _deal(self, epoch: int, node: int) -> KeyedPermutation:
        """Deal position -> node slot; local rank j holds the deal positions of part j."""
        return self._deals.get(
            epoch,
            node,
            lambda: KeyedPermutation(
                self.nodes.size(node), streams.key(self.context.seed, streams.Stream.DEAL, epoch, node)
            ),
        )

    def _parts(self, node: int) -> Layout:
        return Layout(self.nodes.size(node), self.per_node)

    def node_slots(self, epoch: int, node: int) -> NDArray[np.int64]:
        """Ids node ``node`` holds in ``epoch``, in the node-level strategy's slot order."""
        return self._node_slots.get(epoch, node, lambda: self.inner.held(epoch, node))

    def _place(
        self, epoch: int, nodes: NDArray[np.int64], slots: NDArray[np.int64]
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """(rank, rank slot) holding slot ``slots[i]`` of node ``nodes[i]`` in ``epoch``."""
        ranks, positions = np.empty_like(nodes), np.empty_like(slots)
        for node in np.unique(nodes).tolist():
            mask = nodes == node
            parts, dealt = self._parts(node), self._deal(epoch, node).inverse(slots[mask])
            local = parts.rank_of(dealt)
            ranks[mask], positions[mask] = node * self.per_node + local, dealt - parts.offsets[local]
        return ranks, positions

    # ---- the Strategy contract at the rank level

    def slots(self, epoch: int, rank: int) -> NDArray[np.int64]:
        node, local = divmod(rank, self.per_node)
        parts = self._parts(node)
        positions = np.arange(parts.offsets[local], parts.offsets[local + 1], dtype=np.int64)
        return self.node_slots(epoch, node)[self._deal(epoch, node).forward(positions)]

    def locate(self, epoch: int, ids: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        return self._place(epoch, *self.inner.locate(epoch, ids))

    def sends(self, epoch: int, rank: int) -> dict[int, NDArray[np.int64]]:
        ids = self.held(epoch, rank)
        return group_by_rank(ids, self.locate(epoch + 1, ids)[0], exclude=rank)

    def receives(self, epoch: int, rank: int) -> dict[int, NDArray[np.int64]]:
        ids = self.held(epoch + 1, rank)
        return group_by_rank(ids, self.locate(epoch, ids)[0], exclude=rank)

    def expected_churn(self, layout: Layout, fraction: float) -> float | None:  # type: ignore[override]
        """A held id is new if it arrived from another node (the node-level churn c) or, having
        stayed, was dealt to this rank from another of the node's R ranks: 1 - (1 - c) / R."""
        churn = self.inner.expected_churn(self.nodes, fraction)
        return None if churn is None else 1.0 - (1.0 - churn) / self.per_node

    def needs_losses_of(self, epoch: int) -> bool:
        return self.inner.needs_losses_of(epoch)

    def observe(self, epoch: int, ids: NDArray[np.int64], losses: NDArray[np.floating]) -> None:
        self.inner.observe(epoch, ids, losses)
        self.inner.forget_located()
        self._node_slots.clear()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)
        self.inner.forget_located()
        self._node_slots.clear()


def node_level(inner: Strategy, ranks: Layout, ranks_per_node: int) -> NodeLevel:
    """``inner`` wrapped as a node-aware strategy, after checking it can be one."""
    if type(inner).order is not Strategy.order:
        raise ValueError(
            f"strategy {inner.name!r} keeps its own training order (blocks read in sequence), which a "
            "per-epoch deal within the node would break; use ranks_per_node=1 with it"
        )
    return NodeLevel(inner, ranks, ranks_per_node)
