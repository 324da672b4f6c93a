//! Guest accesses that move real bytes (Linux, `std`): the CPU model translates the gpa
//! ([`Vm::write`] / [`Vm::read`], which return the host-physical address they reached),
//! and the bytes go to or come from the [`RealHostMemory`] frame that address names.
//!
//! # Atomicity of an access
//! A CPU's store goes through its TLB and completes before the TLB shootdown that any
//! host change or dirty-log re-protection waits for. Here the translation and the bytes
//! are two steps, so:
//! - against host changes (a discard, a moved page), the access holds
//!   [`RealHostMemory`]'s access lock shared across both steps, and checks that the frame
//!   it reached is the page's current one: a frame the host replaced means the MMU kept a
//!   mapping the notifier should have removed, reported as [`DataError::StaleFrame`],
//!   never silently read or written;
//! - against dirty-log harvests (which take no host lock), a write translates again
//!   *after* its bytes are stored (the same `Vm::write`). If a harvest reported the page
//!   and re-protected it between the first translation and the store, the second one
//!   faults and logs the page again, so the store is never lost to a migration that
//!   copied the page before it landed; otherwise the page's dirty mark from the first
//!   translation has not been harvested yet. The second translation is usually a TLB hit.
//!
//! # Locking
//! The access lock (shared) before the MMU lock, as every host change takes them.

use super::{Exit, Vcpu, Vm};
use crate::host::{HostMemory, RealHostMemory};
use crate::table::TableAllocator;
use crate::types::{Gpa, Hpa, PAGE_SIZE};

/// Why a data access did not complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataError {
    /// The access exited to the VMM (MMIO, a full dirty ring, an MMU error).
    Exit(Exit),
    /// The access would cross its 4 KiB page (checked before anything is accessed).
    CrossesPage {
        /// First byte.
        gpa: Gpa,
        /// Length in bytes.
        len: usize,
    },
    /// The translation reached a frame the host has replaced (discarded or moved): the
    /// MMU kept a stale mapping. Nothing was read or written.
    StaleFrame {
        /// The guest address.
        gpa: Gpa,
        /// Where the translation went.
        hpa: Hpa,
    },
    /// The bytes are stored, but the write's second translation (see the module docs)
    /// found the vCPU's dirty ring soft-full: harvest and reset the ring, then run
    /// [`Vm::write`] of the same `gpa` on this vCPU before its next access, which retires
    /// the write (the VMM's KVM_EXIT_DIRTY_RING_FULL handling).
    StoredRingFull {
        /// The guest address.
        gpa: Gpa,
    },
    /// The translation reached a frame that is not in the VM's host memory.
    ForeignFrame {
        /// The guest address.
        gpa: Gpa,
        /// Where the translation went.
        hpa: Hpa,
    },
}

impl core::fmt::Display for DataError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DataError::Exit(e) => write!(f, "{e}"),
            DataError::CrossesPage { gpa, len } => {
                write!(f, "an access of {len} bytes at gpa {gpa} crosses its page")
            }
            DataError::StaleFrame { gpa, hpa } => write!(
                f,
                "gpa {gpa} reached hpa {hpa}, a frame the host replaced: stale mapping"
            ),
            DataError::StoredRingFull { gpa } => write!(
                f,
                "write at gpa {gpa} stored; the dirty ring is full: harvest, reset, write again"
            ),
            DataError::ForeignFrame { gpa, hpa } => {
                write!(
                    f,
                    "gpa {gpa} reached hpa {hpa}, not a frame of the host memory"
                )
            }
        }
    }
}

impl std::error::Error for DataError {}

impl From<Exit> for DataError {
    fn from(e: Exit) -> Self {
        DataError::Exit(e)
    }
}

fn check_len(gpa: Gpa, len: usize) -> Result<(), DataError> {
    if gpa.page_offset() + len as u64 > PAGE_SIZE {
        return Err(DataError::CrossesPage { gpa, len });
    }
    Ok(())
}

fn offset(mem: &RealHostMemory, gpa: Gpa, hpa: Hpa, len: usize) -> Result<u64, DataError> {
    mem.offset_of_hpa(hpa.0, len).map_err(|stale| {
        if stale {
            DataError::StaleFrame { gpa, hpa }
        } else {
            DataError::ForeignFrame { gpa, hpa }
        }
    })
}

impl<H: HostMemory + AsRef<RealHostMemory>, A: TableAllocator + 'static> Vm<H, A> {
    /// A guest write of `data` at `gpa` by `vcpu`: translated by the CPU model (faulting,
    /// logging the page dirty) and stored in the real frame it reached. Returns that
    /// host-physical address. `data` must stay in the page ([`DataError::CrossesPage`]).
    pub fn write_bytes(&self, vcpu: &mut Vcpu, gpa: Gpa, data: &[u8]) -> Result<Hpa, DataError> {
        check_len(gpa, data.len())?;
        let mem = self.host().as_ref();
        let _g = mem.access_guard();
        let hpa = self.write(vcpu, gpa)?;
        let off = offset(mem, gpa, hpa, data.len())?;
        mem.store(off, data);
        // See the module docs: a harvest between the translation and the store must see
        // this page written again.
        match self.write(vcpu, gpa) {
            Ok(_) => Ok(hpa),
            Err(Exit::DirtyRingFull) => Err(DataError::StoredRingFull { gpa }),
            Err(e) => Err(e.into()),
        }
    }

    /// A guest read of `buf.len()` bytes at `gpa` by `vcpu`, from the real frame the CPU
    /// model's translation reached. Returns that host-physical address.
    pub fn read_bytes(&self, vcpu: &mut Vcpu, gpa: Gpa, buf: &mut [u8]) -> Result<Hpa, DataError> {
        check_len(gpa, buf.len())?;
        let mem = self.host().as_ref();
        let _g = mem.access_guard();
        let hpa = self.read(vcpu, gpa)?;
        let off = offset(mem, gpa, hpa, buf.len())?;
        mem.load(off, buf);
        Ok(hpa)
    }

    /// [`write_bytes`](Self::write_bytes) of a little-endian `u64` (8-aligned `gpa`).
    pub fn write_u64(&self, vcpu: &mut Vcpu, gpa: Gpa, v: u64) -> Result<Hpa, DataError> {
        self.write_bytes(vcpu, gpa, &v.to_le_bytes())
    }

    /// [`read_bytes`](Self::read_bytes) of a little-endian `u64`.
    pub fn read_u64(&self, vcpu: &mut Vcpu, gpa: Gpa) -> Result<u64, DataError> {
        let mut b = [0u8; 8];
        self.read_bytes(vcpu, gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}
