//! Counters of MMU work both MMUs report through the VM (`VmStats`).

/// Counters of MMU work, for benchmarks and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmuStats {
    /// Faults handled under the lock.
    pub faults: u64,
    /// Faults that found the mapping already there (another vCPU, or a stale TLB).
    pub spurious_faults: u64,
    /// Faults on gpas outside every memslot (an MMIO SPTE was installed).
    pub mmio_faults: u64,
    /// Leaf SPTEs installed.
    pub leaves_installed: u64,
    /// Leaf SPTEs zapped.
    pub leaves_zapped: u64,
    /// Of [`leaves_zapped`](Self::leaves_zapped), the 4 KiB leaves the shadow MMU zapped
    /// by visiting last-level pages instead of reverse maps (direct mode, a range mapping
    /// many more leaves than there are pages: see `shadow/zap.rs`).
    pub leaves_zapped_by_pages: u64,
    /// Shadow pages freed after a flush.
    pub pages_freed: u64,
}
