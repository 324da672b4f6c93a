//! Write tracking (KVM's `page_track.c`): while a gfn is tracked, its SPTEs are never
//! writable and guest writes to it exit to the tracker.
//!
//! # Locking
//! Exclusive MMU lock (the tracking counts live in the memslot).

use crate::error::Error;
use crate::types::Gfn;

use super::Vm;
use crate::host::HostMemory;
use crate::table::TableAllocator;

impl<H: HostMemory, A: TableAllocator + 'static> Vm<H, A> {
    /// Track writes to `gfn` (KVM's `kvm_write_track_add_gfn`, used by shadow paging for
    /// guest page tables and by VMMs for device tables): its SPTEs lose W and
    /// MMU-writable (so not even the fast path can restore W), huge mappings over it are
    /// dropped and disallowed, and guest writes to it exit with [`Exit::WriteTracked`](super::Exit::WriteTracked).
    pub fn track_write(&self, gfn: Gfn) -> Result<(), Error> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let slot = st.slots.lookup_mut(gfn).ok_or(Error::InvalidRange {
            start: gfn.0,
            end: gfn.0.saturating_add(1),
        })?;
        if !slot.track_write(gfn, true) {
            return Err(Error::WriteTrackCount { gfn: gfn.0 });
        }
        let removed = st.mmu.track_write(&mut st.slots, gfn);
        self.commit(st, removed);
        Ok(())
    }

    /// Drop one tracker of writes to `gfn`; when none is left, the next write fault maps
    /// it writable again.
    pub fn untrack_write(&self, gfn: Gfn) -> Result<(), Error> {
        let mut guard = self.lock();
        let slot = guard.slots.lookup_mut(gfn).ok_or(Error::InvalidRange {
            start: gfn.0,
            end: gfn.0.saturating_add(1),
        })?;
        if slot.track_write(gfn, false) {
            Ok(())
        } else {
            Err(Error::WriteTrackCount { gfn: gfn.0 })
        }
    }
}
