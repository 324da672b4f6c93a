//! vmmu side by side with the host's Linux KVM.
//!
//! The same guest workload runs on two peers, each behind [`Peer`]:
//!
//! - [`kvm::KvmGuest`] (x86-64 Linux only): a real VM on `/dev/kvm` with one vCPU in 64-bit
//!   user mode, identity-mapped guest page tables, a system memslot holding code and tables
//!   and a data memslot at [`image::DATA_GPA`]. A loop stores one byte to each page of a
//!   [`Schedule`] and signals the host with a port write.
//! - [`model::VmmuGuest`]: a vmmu [`vmmu::Vm`] with a data memslot of the same size, id,
//!   address and host backing, whose CPU model stores to the same pages in the same order
//!   (`Vm::write`).
//!
//! [`compare`] drives both through the same steps (runs, `KVM_GET_DIRTY_LOG`,
//! `KVM_CLEAR_DIRTY_LOG`, memslot deletion), times each call and compares the harvested
//! bitmaps word for word; [`conformance`] does so over random schedules.
//!
//! Module map:
//! - [`image`]: the guest's code and page tables, and where everything is
//! - [`schedule`]: which pages a run writes, and the seeded generator
//! - [`kvm`]: the KVM peer (ioctls on `/dev/kvm`, host memory populated up front)
//! - [`model`]: the vmmu peer
//! - [`compare`]: one harvest on both peers, timed and compared
//! - [`conformance`]: random rounds on both peers, every bitmap compared
//! - [`perf`] (x86-64 Linux only): `vmmu perf`'s KVM side, several vCPUs of the CPL-3
//!   guest on their own threads, laid out as the KVM selftests' `memstress`
//! - [`stats`] (x86-64 Linux only): KVM's binary statistics (`KVM_GET_STATS_FD`)
//! - [`migrate`]: pre-copy migration rounds on a peer, the KVM peer's guest memory copied
//!   and compared byte for byte
#![warn(missing_docs)]

pub mod compare;
pub mod conformance;
pub mod image;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod kvm;
pub mod migrate;
pub mod model;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod perf;
pub mod schedule;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod stats;

use std::fmt;
use std::time::Duration;

pub use image::GuestPaging;
pub use schedule::{Rng, Schedule};

/// How the host backs a data slot, on both peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostBacking {
    /// 4 KiB host pages (`MADV_NOHUGEPAGE` for KVM, [`vmmu::host::Backing::Page4K`]):
    /// the MMU can only map 4 KiB.
    Page4K,
    /// Transparent huge pages (`MADV_HUGEPAGE` for KVM, [`vmmu::host::Backing::Thp`]):
    /// the MMU may map 2 MiB.
    Thp,
}

impl HostBacking {
    /// Both backings, as `vmmu bench` compares them.
    pub const ALL: [HostBacking; 2] = [HostBacking::Page4K, HostBacking::Thp];

    /// The name used in output and in the `backing` param (`4k`, `2m`).
    pub fn name(self) -> &'static str {
        match self {
            HostBacking::Page4K => "4k",
            HostBacking::Thp => "2m",
        }
    }
}

/// How the data slot logs dirty pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DirtyLog {
    /// No LOG_DIRTY_PAGES: faults may map huge pages (the fault-in and delete measurements).
    Off,
    /// LOG_DIRTY_PAGES; `KVM_GET_DIRTY_LOG` returns the bitmap, clears it and write-protects
    /// the reported pages.
    Get,
    /// LOG_DIRTY_PAGES with `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (without
    /// `KVM_DIRTY_LOG_INITIALLY_SET`): GET only copies the bitmap; `KVM_CLEAR_DIRTY_LOG`
    /// clears bits and write-protects those pages.
    GetClear,
    /// LOG_DIRTY_PAGES with a per-vCPU dirty ring of [`RING_ENTRIES`] entries
    /// (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`, or `KVM_CAP_DIRTY_LOG_RING` on a host without
    /// it): the VMM reads the entries the vCPU pushed and calls `KVM_RESET_DIRTY_RINGS`,
    /// which write-protects them again. A run may write at most [`RING_BATCH`] pages
    /// before a harvest ([`Schedule::split`]).
    Ring,
}

/// Entries of the ring in [`DirtyLog::Ring`], on both peers: the most KVM allows
/// (`KVM_DIRTY_RING_MAX_ENTRIES`, a 1 MiB ring of 16-byte entries).
pub const RING_ENTRIES: u32 = 1 << 16;

/// Pages a run writes at most before a harvest in [`DirtyLog::Ring`]: half the ring, well
/// below KVM's soft-full mark (the size less its reserved entries, 64 plus the CPU's
/// hardware log), so the guest never exits with `KVM_EXIT_DIRTY_RING_FULL`.
pub const RING_BATCH: u64 = RING_ENTRIES as u64 / 2;

impl DirtyLog {
    /// The name used in output and in the `mode` param (`off`, `get`, `get-clear`,
    /// `ring`).
    pub fn name(self) -> &'static str {
        match self {
            DirtyLog::Off => "off",
            DirtyLog::Get => "get",
            DirtyLog::GetClear => "get-clear",
            DirtyLog::Ring => "ring",
        }
    }
}

/// The data slot both peers build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotConfig {
    /// Size in bytes (a nonzero multiple of 4 KiB, at most [`image::MAX_DATA_BYTES`]).
    pub bytes: u64,
    /// Host backing.
    pub backing: HostBacking,
    /// Dirty logging mode.
    pub log: DirtyLog,
    /// The guest's page size over the slot (KVM only: vmmu's CPU model takes
    /// guest-physical addresses).
    pub paging: GuestPaging,
    /// Capacity of the guest's write list; longer [`Schedule::Pages`] run in several
    /// guest entries (KVM only).
    pub list_entries: u64,
}

impl SlotConfig {
    /// A slot of `bytes` with 2 MiB guest pages and a 1 MiB write list.
    pub fn new(bytes: u64, backing: HostBacking, log: DirtyLog) -> Self {
        SlotConfig {
            bytes,
            backing,
            log,
            paging: GuestPaging::Huge2M,
            list_entries: 1 << 17,
        }
    }

    /// Number of 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.bytes / 4096
    }

    /// Number of u64 words in the slot's dirty bitmap.
    pub fn bitmap_words(&self) -> usize {
        self.pages().div_ceil(64) as usize
    }
}

/// One side of the comparison: a VM with the data slot of a [`SlotConfig`], driven through
/// KVM's memslot and dirty-log calls. Each timed call reports the wall-clock time of the
/// call itself, nothing around it.
pub trait Peer {
    /// `kvm` or `vmmu`, as the JSON `variant`.
    fn name(&self) -> &'static str;
    /// The slot it was built with.
    fn config(&self) -> &SlotConfig;
    /// Have the guest store to the pages of `schedule` (all of them before returning).
    /// Returns the time the guest took, exits included.
    fn run(&mut self, schedule: &Schedule) -> Result<Duration, Error>;
    /// `KVM_GET_DIRTY_LOG` of the data slot into `out` (at least
    /// [`SlotConfig::bitmap_words`] words).
    fn get_dirty_log(&mut self, out: &mut [u64]) -> Result<Duration, Error>;
    /// `KVM_CLEAR_DIRTY_LOG` of the data slot: clear the bits of `bitmap` (bit `i` is page
    /// `first_page + i`) and write-protect those pages.
    fn clear_dirty_log(
        &mut self,
        first_page: u64,
        num_pages: u64,
        bitmap: &[u64],
    ) -> Result<Duration, Error>;
    /// In [`DirtyLog::Ring`]: read every entry the vCPU pushed to its dirty ring since the
    /// last harvest, set each data-slot page's bit in `out` (the VMM's own bitmap: its
    /// other bits are left as they are), and `KVM_RESET_DIRTY_RINGS`, which write-protects
    /// the pages again and frees the entries. Returns the time of both.
    fn harvest_ring(&mut self, out: &mut [u64]) -> Result<Duration, Error>;
    /// `KVM_SET_USER_MEMORY_REGION` changing only the data slot's flags: LOG_DIRTY_PAGES
    /// on or off. Turning it on starts an empty bitmap and write-protects the slot;
    /// turning it off drops the bitmap (GET then fails) and lets faults map huge again.
    fn set_dirty_logging(&mut self, on: bool) -> Result<Duration, Error>;
    /// `KVM_SET_USER_MEMORY_REGION` with size 0: delete the data slot.
    fn delete_slot(&mut self) -> Result<Duration, Error>;
    /// Bytes of the data slot's host memory really backed by huge pages, where the peer
    /// can tell (a real host may not give THP when asked).
    fn host_huge_bytes(&self) -> Option<u64> {
        None
    }
    /// The byte value the guest's stores write from now on (so a migration's rounds
    /// change contents). A peer without guest bytes ignores it.
    fn set_store_value(&mut self, _value: u8) {}
    /// The data slot's guest memory as bytes, where the peer has real ones (the KVM
    /// peer); `None` for a peer whose host memory is simulated.
    fn data_bytes(&mut self) -> Option<&mut [u8]> {
        None
    }
}

/// Why a comparison could not be made.
#[derive(Debug)]
pub enum Error {
    /// `/dev/kvm` could not be opened (absent, no permission, or not x86-64 Linux): there is
    /// nothing to compare with.
    KvmUnavailable(String),
    /// The host's KVM lacks something the comparison needs.
    KvmUnsupported(String),
    /// A KVM ioctl or host call failed.
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        err: std::io::Error,
    },
    /// The guest left for the VMM in a way the workload never does.
    UnexpectedExit(String),
    /// vmmu refused a call.
    Vmmu {
        /// What was being done.
        what: &'static str,
        /// vmmu's error, as text.
        err: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::KvmUnavailable(why) => write!(
                f,
                "cannot open the KVM device ({why}): there is no host KVM to compare with, \
                 so nothing was compared"
            ),
            Error::KvmUnsupported(why) => {
                write!(f, "the host's KVM cannot run the comparison: {why}")
            }
            Error::Kvm { what, err } => write!(f, "KVM: {what}: {err}"),
            Error::UnexpectedExit(why) => write!(f, "KVM guest: unexpected exit: {why}"),
            Error::Vmmu { what, err } => write!(f, "vmmu: {what}: {err}"),
        }
    }
}

impl std::error::Error for Error {}

/// Open the KVM peer for `config`; on targets other than x86-64 Linux, always
/// [`Error::KvmUnavailable`].
pub fn open_kvm(config: &SlotConfig) -> Result<Box<dyn Peer>, Error> {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    {
        Ok(Box::new(kvm::KvmGuest::new(config)?))
    }
    #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
    {
        let _ = config;
        Err(Error::KvmUnavailable(
            "the KVM peer exists only on x86-64 Linux".into(),
        ))
    }
}

/// Whether `/dev/kvm` can be opened here; `Err` says why not.
pub fn kvm_available() -> Result<(), Error> {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    {
        kvm::probe()
    }
    #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
    {
        Err(Error::KvmUnavailable(
            "the KVM peer exists only on x86-64 Linux".into(),
        ))
    }
}
