//! Locks and fences used by the core.
//!
//! Locks: parking-lot locks with `std` (they sleep when contended), spin locks without it
//! (a bare-metal hypervisor has no scheduler to sleep on). Both expose the same
//! guard-returning `lock()`, `read()` and `write()`.
//!
//! Fences: an asymmetric pair for the vCPU mode protocol (see `hw::vcpu`). The vCPU side
//! runs on every guest entry and must be cheap; the flusher side runs once per remote TLB
//! flush and may be expensive. On Linux with `std`, [`heavy_fence`] is
//! `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which makes every running thread of the
//! process execute a full barrier, so [`light_fence`] only has to stop the compiler from
//! reordering (the technique of userspace RCU and folly's asymmetric barriers; a real TLB
//! shootdown pays with IPIs the same way). Elsewhere, or when the kernel refuses
//! membarrier, both sides are `SeqCst` fences.

use core::sync::atomic::{compiler_fence, fence, AtomicU8, Ordering};

#[cfg(feature = "std")]
pub use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

#[cfg(not(feature = "std"))]
pub use spin::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The data of a reader-writer lock, by pointer, for a caller that excludes writers by
/// other means (see `vm::lock`).
#[inline]
pub fn rwlock_data_ptr<T>(l: &RwLock<T>) -> *mut T {
    #[cfg(feature = "std")]
    {
        l.data_ptr()
    }
    #[cfg(not(feature = "std"))]
    {
        l.as_mut_ptr()
    }
}

const UNKNOWN: u8 = 0;
const MEMBARRIER: u8 = 1;
const FENCES: u8 = 2;

/// Which pair of fences is in use; decided once by [`init_asymmetric_fences`], before any
/// vCPU exists, and never changed afterwards.
static MODE: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Decide which fences to use (registering with membarrier where possible). Call before
/// creating a vCPU; idempotent.
pub fn init_asymmetric_fences() {
    if MODE.load(Ordering::Acquire) != UNKNOWN {
        return;
    }
    let mode = if membarrier::register() {
        MEMBARRIER
    } else {
        FENCES
    };
    // Racing initialisers compute the same answer; the first store wins.
    let _ = MODE.compare_exchange(UNKNOWN, mode, Ordering::AcqRel, Ordering::Acquire);
}

/// The cheap side: orders a preceding store before a following load, provided the other
/// side uses [`heavy_fence`].
#[inline]
pub fn light_fence() {
    if MODE.load(Ordering::Relaxed) == MEMBARRIER {
        compiler_fence(Ordering::SeqCst);
    } else {
        fence(Ordering::SeqCst);
    }
}

/// The expensive side: pairs with every thread's [`light_fence`].
pub fn heavy_fence() {
    fence(Ordering::SeqCst);
    if MODE.load(Ordering::Acquire) == MEMBARRIER {
        membarrier::barrier();
    }
}

/// Whether the cheap side is only a compiler fence (membarrier in use).
pub fn asymmetric_fences_active() -> bool {
    MODE.load(Ordering::Acquire) == MEMBARRIER
}

#[cfg(all(feature = "std", target_os = "linux"))]
mod membarrier {
    const CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
    const CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

    pub fn register() -> bool {
        // SAFETY: membarrier takes (cmd, flags, cpu_id) integers and touches no memory.
        unsafe { libc::syscall(libc::SYS_membarrier, CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0 }
    }

    pub fn barrier() {
        // SAFETY: as above.
        let r = unsafe { libc::syscall(libc::SYS_membarrier, CMD_PRIVATE_EXPEDITED, 0, 0) };
        // Registration succeeded, so this cannot fail; if it ever did, ordering would be
        // lost silently, so stop loudly instead.
        assert_eq!(
            r, 0,
            "membarrier(PRIVATE_EXPEDITED) failed after registration"
        );
    }
}

#[cfg(not(all(feature = "std", target_os = "linux")))]
mod membarrier {
    pub fn register() -> bool {
        false
    }
    pub fn barrier() {}
}
