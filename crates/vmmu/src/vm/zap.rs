//! Zapping from the VMM: a gfn range, a memslot, everything (in place or fast, by
//! invalidating the roots), each ending with the remote flush before tables are freed.
//!
//! # Locking
//! Exclusive MMU lock; the TDP MMU's range zap gives the lock up every
//! [`crate::tdp::YIELD_BUDGET`] positions (flushing first) and resumes where it stopped.

use crate::error::Error;
use crate::types::{Gfn, PAGE_SHIFT};

use super::Vm;
use crate::host::HostMemory;
use crate::table::TableAllocator;

impl<H: HostMemory, A: TableAllocator + 'static> Vm<H, A> {
    fn check_range(&self, start: Gfn, end: Gfn) -> Result<(), Error> {
        let max = 1u64 << (self.config.limits.gpa_bits - PAGE_SHIFT as u8);
        if start >= end || end.0 > max {
            return Err(Error::InvalidRange {
                start: start.0,
                end: end.0,
            });
        }
        Ok(())
    }

    /// Zap every mapping of gfns in `[start, end)`, flush, free emptied tables.
    pub fn zap_gfn_range(&self, start: Gfn, end: Gfn) -> Result<(), Error> {
        self.check_range(start, end)?;
        self.zap_range_yielding(start, end);
        Ok(())
    }

    /// Zap every mapping of memslot `slot` (the slot stays).
    pub fn zap_memslot(&self, slot: u32) -> Result<(), Error> {
        let (start, end) = {
            let st = self.lock_shared();
            let s = st.slots.by_id(slot).ok_or(Error::NoSuchSlot(slot))?;
            (s.base_gfn, s.end_gfn())
        };
        self.zap_range_yielding(start, end);
        Ok(())
    }

    /// Zap `[start, end)`. The TDP MMU's walk stops every [`tdp::YIELD_BUDGET`] positions
    /// to flush, free and let the lock go (so faults and other operations get a turn, as
    /// KVM's `tdp_mmu_iter_cond_resched`), then resumes past everything already walked.
    fn zap_range_yielding(&self, mut start: Gfn, end: Gfn) {
        loop {
            let mut guard = self.lock();
            let st = &mut *guard;
            let (removed, resume) = st.mmu.zap_range_step(&mut st.slots, start, end);
            self.commit(st, removed);
            match resume {
                Some(r) if r < end => start = r,
                _ => return,
            }
        }
    }

    /// Zap everything (KVM's `kvm_mmu_zap_all`); the roots stay (the TDP MMU zaps each
    /// in passes of increasing level).
    pub fn zap_all(&self) -> Result<(), Error> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let removed = st.mmu.zap_all(&mut st.slots);
        self.commit(st, removed);
        Ok(())
    }

    /// Zap everything fast (KVM's `kvm_mmu_zap_all_fast`): the TDP MMU invalidates its
    /// roots and hands vCPUs a new one; the old roots are zapped as soon as no vCPU runs
    /// on them. The shadow MMU zaps in place.
    pub fn zap_all_fast(&self) -> Result<(), Error> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let removed = st.mmu.zap_all_fast(&mut st.slots)?;
        self.commit(st, removed);
        Ok(())
    }
}
