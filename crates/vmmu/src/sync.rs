//! Locks used by the core: parking-lot locks with `std` (they sleep when contended), spin
//! locks without it (a bare-metal hypervisor has no scheduler to sleep on).
//!
//! Both expose the same guard-returning `lock()`, `read()` and `write()`.

#[cfg(feature = "std")]
pub use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

#[cfg(not(feature = "std"))]
pub use spin::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
