"""Fault injection against store mode (issue 17): each test damages a store, a rank or a job the
way a campaign did, and checks that nothing is lost, nothing outside the store is touched, and
the error names the real cause and its fix."""

from __future__ import annotations

import pytest

from reshuffle.store import StoreError
from reshuffle.store.format import pack_name
from test_store import run_partial_epochs, staged


def _outside_copy(tmp_path, pack):
    """A file outside the store with the pack's bytes, and the pack replaced by a symlink to it."""
    outside = tmp_path / "outside" / "victim.bin"
    outside.parent.mkdir()
    outside.write_bytes(pack.read_bytes())
    pack.unlink()
    pack.symlink_to(outside)
    return outside


def test_hole_punching_never_writes_through_a_symlink_out_of_the_store(tmp_path):
    """A pack replaced by a symlink to a file outside the store: punching the dead ranges of that
    pack is refused by name, and the outside file keeps every byte."""
    sample, pack_bytes = 16 * 4096, 8 * 16 * 4096
    _, commits = run_partial_epochs(tmp_path / "store", 6, sample, pack_bytes)
    stores = next(commits)
    store = stores[0]  # just committed: its dead ranges not yet punched
    dirty = sorted(store.dirty_packs) if store.dirty_packs else sorted(set(store.records["pack"].tolist()))
    outside = _outside_copy(tmp_path, store.pack_dir / pack_name(dirty[0]))
    before = outside.read_bytes()
    with pytest.raises(StoreError, match=r"resolves outside .* \(a symlink\?\)"):
        store.release_dead_space()
    assert outside.read_bytes() == before


def test_reserved_space_is_never_written_through_a_symlink(tmp_path):
    """The reserve file (next exchange's space) planted as a symlink out of the store: reserving
    is refused by name, and a pack writer that would take it over refuses too."""
    _, _, stores = staged(tmp_path / "store", world=2)
    store = stores[0]
    target = tmp_path / "target.bin"
    target.write_bytes(b"keep me")
    (store.pack_dir / "reserve.bin").symlink_to(target)
    with pytest.raises(StoreError, match=r"resolves outside .* \(a symlink\?\)"):
        store.reserve(1 << 20)
    writer = store.pack_writer(reserved=True)
    with pytest.raises(StoreError, match="resolves outside|is a symlink"):
        writer.append(0, 0, b"x" * 100)
    writer.abort()
    assert target.read_bytes() == b"keep me"
