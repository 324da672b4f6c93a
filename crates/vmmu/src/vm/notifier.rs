//! MMU-notifier operations: what the host kernel calls when it unmaps, ages or moves the
//! host memory behind a guest (KVM's `kvm_mmu_notifier_*`).
//!
//! Each takes a host-virtual range, finds the gfns every memslot maps there and runs the
//! MMU operation on them under the MMU lock.
//!
//! # Protocol
//! `invalidate_range_start` zaps the range and, until the matching
//! `invalidate_range_end`, stops faults on it from installing a mapping (they report
//! [`FaultOutcome::Retry`](crate::mmu::FaultOutcome::Retry) and the vCPU retries), so
//! a fault can never install a pfn the host is taking away. When `start` returns, no SPTE
//! maps the range and the flush has completed. [`Vm::unmap_hva_range`] is the pair for a
//! host change that already happened.
//!
//! # The notifier set
//! By default the set a current Linux calls: `invalidate_range_start` / `end` (every
//! change of a page's frame, writability or presence, KSM merges and page migration
//! included), `clear_young` / `test_young` ([`Vm::age_hva_range`],
//! [`Vm::test_age_hva_range`]). `.change_pte` was removed from Linux in 2024 (6.10): since
//! 2012 the host called it only inside an invalidation, after `invalidate_range_start`
//! had zapped the SPTEs it would have changed, so it never did anything. vmmu keeps it as
//! a compatibility option ([`VmConfig::change_pte`](crate::VmConfig::change_pte)), with
//! its original meaning (a host change announced on its own, after the fact).

use alloc::vec::Vec;

use super::Vm;
use crate::error::Error;
use crate::flush::Removed;
use crate::host::HostMemory;
use crate::memslot::Memslots;
use crate::table::TableAllocator;
use crate::types::{Gfn, Hva, Pfn, PAGE_SIZE};

/// The gfn ranges (one per memslot) backed by host-virtual `[start, end)`.
fn gfn_ranges(slots: &Memslots, start: u64, end: u64) -> Vec<(Gfn, Gfn)> {
    slots
        .iter()
        .filter_map(|s| {
            let (ua, ue) = (
                s.userspace_addr.0,
                s.userspace_addr.0 + s.npages * PAGE_SIZE,
            );
            let (lo, hi) = (start.max(ua), end.min(ue));
            (lo < hi).then(|| {
                (
                    Gfn(s.base_gfn.0 + (lo - ua) / PAGE_SIZE),
                    Gfn(s.base_gfn.0 + (hi - ua).div_ceil(PAGE_SIZE)),
                )
            })
        })
        .collect()
}

fn check(start: Hva, end: Hva) -> Result<(u64, u64), Error> {
    if start.0 >= end.0 {
        return Err(Error::InvalidHvaRange {
            start: start.0,
            end: end.0,
        });
    }
    Ok((start.0 & !(PAGE_SIZE - 1), end.0))
}

impl<H: HostMemory, A: TableAllocator> Vm<H, A> {
    /// The host is about to change `[start, end)`: zap every SPTE of the gfns mapped
    /// there (each reverse map dropped as configured, seed 003), flush, and hold off
    /// faults on the range until [`invalidate_range_end`](Self::invalidate_range_end).
    pub fn invalidate_range_start(&self, start: Hva, end: Hva) -> Result<(), Error> {
        let (start, end) = check(start, end)?;
        let mut guard = self.lock();
        let st = &mut *guard;
        st.mmu.invalidation_mut().begin(start, end);
        let mut removed = Removed::default();
        for (lo, hi) in gfn_ranges(&st.slots, start, end) {
            removed.merge(st.mmu.zap_gfn_range(&mut st.slots, lo, hi));
        }
        self.commit(st, removed);
        Ok(())
    }

    /// The host change announced by the last unmatched `invalidate_range_start` is done.
    pub fn invalidate_range_end(&self) -> Result<(), Error> {
        if self.lock().mmu.invalidation_mut().end() {
            Ok(())
        } else {
            Err(Error::NoInvalidationInProgress)
        }
    }

    /// Unmap `[start, end)` (start and end together): when this returns, no SPTE maps a
    /// page of the range and every vCPU's TLB has been flushed.
    pub fn unmap_hva_range(&self, start: Hva, end: Hva) -> Result<(), Error> {
        self.invalidate_range_start(start, end)?;
        self.invalidate_range_end()
    }

    /// Clear the accessed bits of the SPTEs mapping `[start, end)`; whether any was young
    /// (`clear_young` without flush, as KVM does on x86).
    ///
    /// On the TDP MMU this takes no MMU lock, as KVM's TDP aging (see
    /// `Vm::with_aging_lock`).
    pub fn age_hva_range(&self, start: Hva, end: Hva) -> Result<bool, Error> {
        let (start, end) = check(start, end)?;
        Ok(self.with_aging_lock(|slots, mmu| {
            gfn_ranges(slots, start, end)
                .into_iter()
                .fold(false, |young, (lo, hi)| mmu.age(slots, lo, hi) | young)
        }))
    }

    /// Whether any SPTE mapping `[start, end)` is young; stops at the first.
    /// Lockless on the TDP MMU, as [`age_hva_range`](Self::age_hva_range).
    pub fn test_age_hva_range(&self, start: Hva, end: Hva) -> Result<bool, Error> {
        let (start, end) = check(start, end)?;
        Ok(self.with_aging_lock(|slots, mmu| {
            gfn_ranges(slots, start, end)
                .into_iter()
                .any(|(lo, hi)| mmu.test_age(slots, lo, hi))
        }))
    }

    /// Compatibility only ([`VmConfig::change_pte`](crate::VmConfig::change_pte); without
    /// it, [`Error::ChangePteRemoved`] and nothing changes): Linux's `.change_pte`
    /// notifier, removed in 2024 (Linux 6.10). A current host announces the same change
    /// with [`invalidate_range_start`](Self::invalidate_range_start) and
    /// [`invalidate_range_end`](Self::invalidate_range_end), and the page faults back in.
    ///
    /// The host now maps the page at `hva` to `new_pfn` (KSM merge, migration):
    /// point the guest's SPTEs there read-only, or drop them if the new host mapping is
    /// writable. Flushes before returning. A frame too wide for an SPTE (40 bits) is
    /// refused ([`Error::HostPfnTooLarge`]) before anything changes.
    pub fn change_pte(&self, hva: Hva, new_pfn: Pfn, writable: bool) -> Result<(), Error> {
        if !self.config().change_pte {
            return Err(Error::ChangePteRemoved);
        }
        let (start, end) = check(hva, Hva(hva.0.saturating_add(1)))?;
        if new_pfn.0 > crate::spte::bits::MAX_PFN {
            return Err(Error::HostPfnTooLarge { hva, pfn: new_pfn });
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut removed = Removed::default();
        for (lo, _) in gfn_ranges(&st.slots, start, end) {
            removed.merge(st.mmu.change_pte(&mut st.slots, lo, new_pfn, writable));
        }
        self.commit(st, removed);
        Ok(())
    }
}
