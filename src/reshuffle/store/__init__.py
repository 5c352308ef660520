"""Store mode: node-local rank stores and the real sample exchange between them."""

from __future__ import annotations

from reshuffle.store.dataset import StoreDataset
from reshuffle.store.exchange import Exchanger, ExchangeStats, check_holdings, new_exchange_group
from reshuffle.store.format import StoreError
from reshuffle.store.meta import StoreMeta
from reshuffle.store.rank_store import RankStore
from reshuffle.store.reads import CorruptSampleError
from reshuffle.store.stage import open_or_stage, stage, store_meta
from reshuffle.store.verify import verify_store
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
    "check_holdings",
    "new_exchange_group",
    "open_or_stage",
    "stage",
    "store_meta",
    "verify_store",
]
