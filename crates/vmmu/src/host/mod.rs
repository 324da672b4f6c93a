//! What the MMU learns from the host: for a host-virtual address, the frame that backs it,
//! the level at which the host maps it, and whether the host mapping is writable.
//!
//! KVM gets this from `gfn_to_pfn` (through `get_user_pages`) and from a walk of the host
//! page tables (`host_pfn_mapping_level`); vmmu asks a [`HostMemory`]. A hypervisor that
//! owns the hardware implements the trait over its own memory map; tests and benchmarks
//! use [`SimHostMemory`] (in `sim/`, re-exported here), which simulates 4 KiB pages,
//! transparent huge pages (THP) and 1 GiB hugetlb pages, and the host events the MMU must
//! follow: munmap, page migration (a fresh pfn), THP splits and mprotect.
//!
//! With `std` on Linux, [`RealHostMemory`] (in `real.rs`) backs guest RAM with real
//! anonymous memory of this process, whose bytes guest accesses move
//! (`Vm::write_bytes`, in `vm/data.rs`).
//!
//! This file holds what every backend shares: the trait and its answer, [`HostPage`].
//!
//! # Invariants
//! Every [`HostMemory`] keeps the [`HostPage`] contract: a huge mapping is reported only
//! where the whole aligned huge page is mapped at that level with contiguous pfns, and the
//! pfn is congruent to the address's page number modulo the huge page's size. A host
//! change to a page is announced through the MMU notifier, covering at least that page
//! (see [`HostMemory`]: the whole huge page around it is not required).
//!
//! # Locking
//! The trait takes `&self` and is `Send + Sync`: faults on many vCPUs translate
//! concurrently. A translation holds no reference and can be stale as soon as it returns;
//! the MMU notifier (not this module) is what tells the MMU to drop mappings of changed
//! pages. [`SimHostMemory`]'s own locking is described in its module.

use crate::types::{Hva, Level, Pfn};

#[cfg(all(feature = "std", target_os = "linux"))]
mod real;
mod sim;
#[cfg(all(feature = "std", target_os = "linux"))]
pub use real::{RealBacking, RealHostError, RealHostMemory};
pub use sim::{
    Backing, HostError, SimHostMemory, SIM_HVA_BASE, SIM_HVA_LIMIT, SIM_PFN_BASE, SIM_PFN_LIMIT,
};

/// The host's answer for one host-virtual address.
///
/// Invariant (the contract every [`HostMemory`] keeps): when `level` is above
/// [`Level::L4K`], the whole `level`-aligned huge page around the address is mapped at
/// that level with contiguous pfns, and `pfn` is congruent to the address's page number
/// modulo `level.pages()`. So the huge page's first frame is
/// `pfn & !(level.pages() - 1)`, and the MMU may map the guest page huge by aligning both
/// gfn and pfn down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostPage {
    /// The exact 4 KiB frame backing the address (not the huge page's first frame).
    pub pfn: Pfn,
    /// The host mapping level at the address: [`Level::L4K`], [`Level::L2M`] (THP) or
    /// [`Level::L1G`] (hugetlb). Never [`Level::L512G`].
    pub level: Level,
    /// The host mapping allows writes (KVM's `writable` out-parameter of `gfn_to_pfn`;
    /// it becomes the SPTE's host-writable bit).
    pub writable: bool,
}

/// Host memory as the MMU sees it: host-virtual address to frame, mapping level and
/// writability.
///
/// Contract:
/// - each answer keeps the [`HostPage`] invariant (contiguous, congruent pfns for huge
///   mappings);
/// - a translation holds no reference: the host may change the mapping right after, and
///   then tells the MMU through the notifier. Before it changes the frame, the
///   writability or the presence of any page, it calls `Vm::invalidate_range_start` on a
///   range containing at least that page, and `Vm::invalidate_range_end` once the change
///   is done (or `Vm::unmap_hva_range` after it; or, with the compatibility option
///   `VmConfig::change_pte` that models Linux before 6.10, `Vm::change_pte` after it moved
///   a page).
///
/// The host need not invalidate the whole huge page around a page it changes (Linux does
/// when it splits a THP, but vmmu does not rely on it): no fault installs a leaf whose
/// level-aligned host range intersects an invalidation in progress, so a huge leaf built
/// from the answer before the change never covers the changed page. The audit
/// (`Vm::audit`) checks every leaf against the host's current answer, page by page.
pub trait HostMemory: Send + Sync {
    /// Translate `hva`. `None` if nothing is mapped there (KVM would get -EFAULT /
    /// `KVM_PFN_ERR_FAULT`).
    fn translate(&self, hva: Hva) -> Option<HostPage>;
}

impl<T: HostMemory + ?Sized> HostMemory for alloc::sync::Arc<T> {
    #[inline]
    fn translate(&self, hva: Hva) -> Option<HostPage> {
        (**self).translate(hva)
    }
}

impl<T: HostMemory + ?Sized> HostMemory for alloc::boxed::Box<T> {
    #[inline]
    fn translate(&self, hva: Hva) -> Option<HostPage> {
        (**self).translate(hva)
    }
}

impl<T: HostMemory + ?Sized> HostMemory for &T {
    #[inline]
    fn translate(&self, hva: Hva) -> Option<HostPage> {
        (**self).translate(hva)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::sync::Arc;

    const M2: u64 = 2 << 20;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn is_send_sync_and_usable_through_pointers() {
        assert_send_sync::<SimHostMemory>();
        let m = Arc::new(SimHostMemory::new());
        let hva = m.mmap(M2, Backing::Page4K, true).unwrap();
        let d: &dyn HostMemory = &m;
        assert_eq!(d.translate(hva), m.translate(hva));
        fn by_value<H: HostMemory>(h: H, hva: Hva) -> Option<HostPage> {
            h.translate(hva)
        }
        assert_eq!(by_value(&*m, hva), m.translate(hva));
        assert_eq!(by_value(m.clone(), hva), m.translate(hva));
        let b: alloc::boxed::Box<dyn HostMemory> = alloc::boxed::Box::new(m.clone());
        assert_eq!(b.translate(hva), m.translate(hva));
    }
}
