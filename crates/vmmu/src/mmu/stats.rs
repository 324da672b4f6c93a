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
    /// Shadow pages freed after a flush.
    pub pages_freed: u64,
}
