//! `KVM_SET_USER_MEMORY_REGION` on the VM: checking and applying a memslot change, zapping
//! what a deleted or moved slot mapped, and what turning dirty logging on or off does to
//! the mappings (eager split and write protection; huge-page recovery).
//!
//! # Locking
//! Memslot changes take the MMU lock exclusively (it stands for KVM's `slots_lock` too);
//! the TDP MMU's eager split runs under the shared lock and allocates outside it.

use core::sync::atomic::Ordering;

use crate::error::Error;
use crate::flush::Removed;
use crate::memslot::{MemoryRegion, MemslotFlags, SlotChange};
use crate::types::Gfn;

use super::{MmuKind, Vm};
use crate::host::HostMemory;
use crate::table::TableAllocator;

impl<H: HostMemory, A: TableAllocator + 'static> Vm<H, A> {
    /// `KVM_SET_USER_MEMORY_REGION`: create, delete (size 0), move or change the flags of
    /// a slot. Invalid input returns an error and changes nothing.
    ///
    /// A deleted or moved slot's mappings are zapped. Turning LOG_DIRTY_PAGES on drops
    /// huge mappings and write-protects the slot (unless every bit starts set); turning it
    /// off zaps the 4K mappings that could be huge, so faults map them huge again.
    pub fn set_user_memory_region(&self, region: MemoryRegion) -> Result<(), Error> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let change = st.slots.check(&region)?;
        // Every allocation before any change: when this update wraps the generation MMIO
        // SPTEs carry, everything is zapped fast, and the TDP MMU's new root is taken now
        // (out of table memory, the update is refused with nothing changed).
        let wraps = change != SlotChange::None
            && st.slots.generation().wrapping_add(1) & crate::spte::MMIO_GEN_MASK == 0;
        let reserved = if wraps {
            Some(st.mmu.reserve_fast_zap()?)
        } else {
            None
        };
        let old = st
            .slots
            .by_id(region.slot)
            .map(|s| (s.base_gfn, s.end_gfn(), s.flags));
        let mut removed = Removed::default();
        if let (SlotChange::Delete | SlotChange::Move { .. }, Some((start, end, _))) = (change, old)
        {
            removed = if self.config.mmu == MmuKind::ShadowPaging {
                // Shadow pages of guest tables in the slot hang on its tracking counts:
                // zap everything, as KVM does for shadow paging.
                st.mmu.zap_all(&mut st.slots)
            } else {
                st.mmu.zap_gfn_range(&mut st.slots, start, end)
            };
        }
        self.commit(st, removed);
        st.slots.apply(&region, change);
        // Publish the logging slots before protecting anything: a lockless fast-path fault
        // that makes a page writable after the protection must find its slot to log it.
        self.dirty_index.publish(&st.slots);
        if let Some(reserved) = reserved {
            // The generation MMIO SPTEs carry wrapped: an old one could match again. Zap
            // everything, as KVM's `kvm_mmu_invalidate_mmio_sptes` does.
            debug_assert_eq!(st.slots.generation() & crate::spte::MMIO_GEN_MASK, 0);
            let removed = st.mmu.zap_all_fast_reserved(&mut st.slots, reserved);
            self.commit(st, removed);
        }
        self.mmio_generation
            .store(st.slots.generation(), Ordering::Release);
        let initially_set = st.slots.dirty_initially_set();
        drop(guard);
        if let (SlotChange::FlagsOnly { old: old_flags }, Some((start, end, _))) = (change, old) {
            let log = MemslotFlags::LOG_DIRTY_PAGES;
            match (old_flags.contains(log), region.flags.contains(log)) {
                (false, true) => self.start_logging(region.slot, start, end, initially_set),
                (true, false) => self.stop_logging(start, end),
                _ => {}
            }
        }
        Ok(())
    }

    /// Logging starts on a slot: only 4K mappings may stay (the shadow MMU zaps huge
    /// leaves; the TDP MMU splits them eagerly with `VmConfig::eager_split`, allocating tables outside the lock, and
    /// zaps those it could not get tables for), then every leaf is write-protected unless
    /// every bit starts set. It cannot fail: a lack of table memory costs faults, not
    /// logged writes.
    fn start_logging(&self, slot: u32, start: Gfn, end: Gfn, initially_set: bool) {
        if self.config.eager_split {
            self.split_huge_for_logging(start, end);
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut removed = st.mmu.zap_huge(&mut st.slots, start, end);
        if !initially_set {
            removed.merge(st.mmu.write_protect_slot(&st.slots, slot));
        }
        self.commit(st, removed);
    }

    /// Logging stopped: let huge mappings come back (the shadow MMU zaps the 4K leaves of
    /// huge-eligible ranges; the TDP MMU recovers huge leaves in place).
    fn stop_logging(&self, start: Gfn, end: Gfn) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let removed =
            st.mmu
                .recover_huge(&mut st.slots, &self.host, start, end, self.config.max_level);
        self.commit(st, removed);
    }
}
