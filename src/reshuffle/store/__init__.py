"""Store mode: node-local rank stores and the real sample exchange between them."""

from __future__ import annotations

from reshuffle.store.dataset import StoreDataset
from reshuffle.store.exchange import Exchanger, ExchangeStats, new_exchange_group
from reshuffle.store.format import StoreError
from reshuffle.store.meta import StoreMeta
from reshuffle.store.rank_store import RankStore
from reshuffle.store.reads import CorruptSampleError
from reshuffle.store.recovery import synchronize
from reshuffle.store.session import StoreSession, open_or_stage
from reshuffle.store.stage import stage, store_meta
from reshuffle.store.verify import check_holdings, open_verified, verify_store
from reshuffle.store.wire import ExchangeError

__all__ = [
    "CorruptSampleError",
    "ExchangeError",
    "ExchangeStats",
    "Exchanger",
    "RankStore",
    "StoreDataset",
    "StoreError",
    "StoreMeta",
    "StoreSession",
    "check_holdings",
    "new_exchange_group",
    "open_or_stage",
    "open_verified",
    "stage",
    "store_meta",
    "synchronize",
    "verify_store",
]
