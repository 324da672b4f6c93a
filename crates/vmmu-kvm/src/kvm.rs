//! The KVM peer: a one-vCPU VM on `/dev/kvm` running the [`image`](crate::image) guest.
//!
//! Host memory for both memslots is anonymous memory that is populated (written, so backed
//! by host frames) before the VM is created, so a guest fault measures the MMU, not the
//! host's page allocator. The data slot's memory is `MADV_NOHUGEPAGE` for
//! [`HostBacking::Page4K`] and 2 MiB-aligned `MADV_HUGEPAGE` for [`HostBacking::Thp`];
//! [`Peer::host_huge_bytes`] says how much of it the host
//! really backed with THP.
//!
//! `KVM_GET_DIRTY_LOG` and `KVM_CLEAR_DIRTY_LOG` are issued directly (kvm-ioctls' own
//! `get_dirty_log` allocates a fresh bitmap on each call, which would be timed with the
//! ioctl; it has no `clear_dirty_log`), and so is the dirty ring, which kvm-ioctls does
//! not wrap: `KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING_ACQ_REL)` before the vCPU exists, the
//! vCPU's ring mapped from its fd at `KVM_DIRTY_LOG_PAGE_OFFSET`, entries read with the
//! acquire/release protocol of `Documentation/virt/kvm/api.rst`, and
//! `KVM_RESET_DIRTY_RINGS`.

use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_gfn, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1, kvm_enable_cap, kvm_regs, kvm_segment,
    kvm_userspace_memory_region, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_DIRTY_LOG_PAGE_OFFSET, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};

use crate::image::{Layout, DATA_GPA, DATA_SLOT, DONE_PORT, LIST_ENTRY, STRIDE_ENTRY, SYSTEM_SLOT};
use crate::{DirtyLog, Error, HostBacking, Peer, Schedule, SlotConfig, RING_ENTRIES};

/// `_IOC(dir, 0xAE, nr, size)` as Linux's `asm-generic/ioctl.h` encodes it.
const fn kvm_ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xAE << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
/// `KVM_GET_DIRTY_LOG`: `_IOW(KVMIO, 0x42, struct kvm_dirty_log)`.
const KVM_GET_DIRTY_LOG: u64 = kvm_ioc(IOC_WRITE, 0x42, size_of::<kvm_dirty_log>());
/// `KVM_CLEAR_DIRTY_LOG`: `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
const KVM_CLEAR_DIRTY_LOG: u64 =
    kvm_ioc(IOC_READ | IOC_WRITE, 0xc0, size_of::<kvm_clear_dirty_log>());
/// `KVM_RESET_DIRTY_RINGS`: `_IO(KVMIO, 0xc7)`.
const KVM_RESET_DIRTY_RINGS: u64 = kvm_ioc(0, 0xc7, 0);
/// `KVM_DIRTY_GFN_F_DIRTY`: the entry holds a page the vCPU dirtied.
const GFN_DIRTY: u32 = 1 << 0;
/// `KVM_DIRTY_GFN_F_RESET`: the VMM has collected the entry.
const GFN_RESET: u32 = 1 << 1;

const MIB2: usize = 2 << 20;
/// `MADV_POPULATE_WRITE` (Linux 5.14), spelled out for older libc crates.
const MADV_POPULATE_WRITE: libc::c_int = 23;

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm {
        what,
        err: io::Error::from_raw_os_error(e.errno()),
    }
}

/// The KVM device: `/dev/kvm`, or the path in `VMMU_KVM_DEVICE` (so a test can show what
/// happens where there is no KVM).
pub fn device_path() -> String {
    std::env::var("VMMU_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".into())
}

/// Open the KVM device.
pub(crate) fn open() -> Result<Kvm, Error> {
    let path = device_path();
    let cpath = std::ffi::CString::new(path.as_str())
        .map_err(|_| Error::KvmUnavailable(format!("{path:?}: not a path")))?;
    Kvm::new_with_path(cpath.as_c_str()).map_err(|e| {
        let err = io::Error::from_raw_os_error(e.errno());
        Error::KvmUnavailable(format!("{path}: {err}"))
    })
}

/// Whether the KVM device opens.
pub fn probe() -> Result<(), Error> {
    open().map(drop)
}

/// Anonymous host memory, populated before use and unmapped on drop.
pub struct HostMapping {
    map: NonNull<libc::c_void>,
    map_len: usize,
    /// Start of the usable range (2 MiB-aligned for THP).
    base: *mut u8,
    len: usize,
}

impl HostMapping {
    /// Map `len` bytes backed as `backing`, and populate them.
    pub fn new(len: usize, backing: HostBacking) -> io::Result<Self> {
        let map_len = len + if backing == HostBacking::Thp { MIB2 } else { 0 };
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let map = NonNull::new(map).ok_or_else(io::Error::last_os_error)?;
        let offset = match backing {
            HostBacking::Page4K => 0,
            HostBacking::Thp => {
                (map.as_ptr() as usize).next_multiple_of(MIB2) - map.as_ptr() as usize
            }
        };
        let m = HostMapping {
            map,
            map_len,
            // SAFETY: `offset + len <= map_len`.
            base: unsafe { map.as_ptr().cast::<u8>().add(offset) },
            len,
        };
        let advice = match backing {
            HostBacking::Page4K => libc::MADV_NOHUGEPAGE,
            HostBacking::Thp => libc::MADV_HUGEPAGE,
        };
        // SAFETY: advice on our own mapping.
        if unsafe { libc::madvise(m.base.cast(), len, advice) } != 0 {
            return Err(io::Error::last_os_error());
        }
        m.populate()?;
        Ok(m)
    }

    fn populate(&self) -> io::Result<()> {
        // SAFETY: our own mapping, readable and writable.
        if unsafe { libc::madvise(self.base.cast(), self.len, MADV_POPULATE_WRITE) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(err);
        }
        // A kernel before 5.14: touch every page instead.
        for off in (0..self.len).step_by(4096) {
            // SAFETY: inside our mapping.
            unsafe { self.base.add(off).write_volatile(0) };
        }
        Ok(())
    }

    /// The host-virtual address of the range.
    pub fn addr(&self) -> u64 {
        self.base as u64
    }

    /// The range as bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping lives as long as `self`, and `&mut self` is unique. The
        // guest may write it concurrently only while KVM_RUN runs, which needs `&mut` too.
        unsafe { std::slice::from_raw_parts_mut(self.base, self.len) }
    }

    /// Bytes of the range the host backs with transparent huge pages (`AnonHugePages` in
    /// `/proc/self/smaps`), if smaps can be read.
    pub fn huge_bytes(&self) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let (lo, hi) = (self.base as u64, self.base as u64 + self.len as u64);
        let mut inside = false;
        let mut total = 0;
        for line in smaps.lines() {
            let head = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = head.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    inside = a < hi && b > lo;
                    continue;
                }
            }
            if inside {
                if let Some(kb) = line.strip_prefix("AnonHugePages:") {
                    let kb: u64 = kb.trim().trim_end_matches("kB").trim().parse().ok()?;
                    total += kb * 1024;
                }
            }
        }
        Some(total)
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; nothing refers to it any more (the VM that
        // used it is dropped first, see `KvmGuest`'s field order).
        unsafe { libc::munmap(self.map.as_ptr(), self.map_len) };
    }
}

/// A vCPU's dirty ring, mapped from its fd; unmapped on drop (before the vCPU closes:
/// [`KvmGuest`]'s field order).
struct RingMapping {
    entries: NonNull<kvm_dirty_gfn>,
    /// A power of two.
    len: u32,
    /// The next entry to collect (KVM's `fetch_index` on the VMM side).
    next: u32,
}

impl RingMapping {
    /// Map the ring of `len` entries of the vCPU `fd`.
    fn new(fd: libc::c_int, len: u32) -> io::Result<Self> {
        // SAFETY: `sysconf` has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as libc::off_t;
        let bytes = len as usize * size_of::<kvm_dirty_gfn>();
        // SAFETY: a fresh shared mapping of the vCPU's ring; no existing memory affected.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                libc::off_t::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let entries = NonNull::new(map.cast()).ok_or_else(io::Error::last_os_error)?;
        Ok(RingMapping {
            entries,
            len,
            next: 0,
        })
    }

    /// Collect every entry KVM published since the last call, in ring order: call `f`
    /// with each (slot, offset) and hand the entry back (`KVM_DIRTY_GFN_F_RESET`).
    /// Stops at the first entry not yet published (flags without `DIRTY`).
    fn collect(&mut self, mut f: impl FnMut(u32, u64)) -> u32 {
        let mut n = 0;
        loop {
            let i = (self.next & (self.len - 1)) as usize;
            // SAFETY: `i < len`, inside the mapping, which lives as long as `self`;
            // entries are 16-byte aligned (the mapping is page-aligned).
            let e = unsafe { self.entries.as_ptr().add(i) };
            // SAFETY: `flags` is a naturally aligned u32 in shared memory that KVM only
            // accesses atomically (`smp_store_release` / `smp_load_acquire`).
            let flags = unsafe { AtomicU32::from_ptr(&raw mut (*e).flags) };
            // Acquire pairs with KVM's release when it published the entry: slot and
            // offset are complete once DIRTY is seen.
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                break;
            }
            // SAFETY: a published entry; KVM does not write it again before it is reset.
            let (slot, offset) = unsafe { ((*e).slot, (*e).offset) };
            f(slot, offset);
            // Release: our reads of the entry happen before KVM may reuse it.
            flags.store(GFN_RESET, Ordering::Release);
            self.next = self.next.wrapping_add(1);
            n += 1;
        }
        n
    }
}

impl Drop for RingMapping {
    fn drop(&mut self) {
        let bytes = self.len as usize * size_of::<kvm_dirty_gfn>();
        // SAFETY: our own mapping; nothing refers to it any more.
        unsafe { libc::munmap(self.entries.as_ptr().cast(), bytes) };
    }
}

/// Enable a dirty ring of [`RING_ENTRIES`] entries on `vm` (before any vCPU exists):
/// with acquire/release ordering where the host offers it, as KVM recommends.
fn enable_dirty_ring(vm: &VmFd) -> Result<(), Error> {
    let bytes = RING_ENTRIES as usize * size_of::<kvm_dirty_gfn>();
    let cap = [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING]
        .into_iter()
        .find(|&c| vm.check_extension_raw(c.into()) > 0)
        .ok_or_else(|| {
            Error::KvmUnsupported("no KVM_CAP_DIRTY_LOG_RING (the dirty ring)".into())
        })?;
    let max = vm.check_extension_raw(cap.into()) as usize;
    if max < bytes {
        return Err(Error::KvmUnsupported(format!(
            "the host's dirty ring holds at most {} entries, {} needed",
            max / size_of::<kvm_dirty_gfn>(),
            RING_ENTRIES
        )));
    }
    let enable = kvm_enable_cap {
        cap,
        args: [bytes as u64, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&enable)
        .map_err(kvm_err("KVM_ENABLE_CAP(DIRTY_LOG_RING)"))
}

/// A KVM VM running the image guest on one vCPU.
///
/// Field order is drop order: the ring is unmapped before the vCPU closes, and the vCPU
/// and the VM close before their memory is unmapped.
pub struct KvmGuest {
    ring: Option<RingMapping>,
    vcpu: VcpuFd,
    vm: VmFd,
    _kvm: Kvm,
    system: HostMapping,
    data: Option<HostMapping>,
    layout: Layout,
    config: SlotConfig,
    /// The byte the guest's loops store (`al`).
    store_value: u8,
}

impl KvmGuest {
    /// Open `/dev/kvm`, create the VM, both memslots and the vCPU in 64-bit user mode.
    pub fn new(config: &SlotConfig) -> Result<Self, Error> {
        let kvm = open()?;
        for (cap, name) in [
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::KvmUnsupported(format!("no {name}")));
            }
        }
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        if config.log == DirtyLog::GetClear {
            let flags = vm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
            if flags & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as i32 == 0 {
                return Err(Error::KvmUnsupported(
                    "no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (KVM_CLEAR_DIRTY_LOG)".into(),
                ));
            }
            let cap = kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                args: [KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE.into(), 0, 0, 0],
                ..Default::default()
            };
            vm.enable_cap(&cap)
                .map_err(kvm_err("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)"))?;
        }
        if config.log == DirtyLog::Ring {
            enable_dirty_ring(&vm)?;
        }

        let layout = Layout::new(config.bytes, config.paging, config.list_entries);
        let mut system = HostMapping::new(layout.system_bytes as usize, HostBacking::Page4K)
            .map_err(|err| Error::Kvm {
                what: "mmap the system slot",
                err,
            })?;
        layout.build(system.as_mut_slice());
        let data =
            HostMapping::new(config.bytes as usize, config.backing).map_err(|err| Error::Kvm {
                what: "mmap and populate the data slot",
                err,
            })?;
        let log = if config.log == DirtyLog::Off {
            0
        } else {
            KVM_MEM_LOG_DIRTY_PAGES
        };
        for (slot, gpa, size, addr, flags) in [
            (SYSTEM_SLOT, 0, layout.system_bytes, system.addr(), 0),
            (DATA_SLOT, DATA_GPA, config.bytes, data.addr(), log),
        ] {
            let region = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: addr,
            };
            // SAFETY: the memory is mapped for as long as the VM exists (field order).
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        set_user_long_mode(&mut sregs);
        vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        let ring = match config.log {
            DirtyLog::Ring => Some(RingMapping::new(vcpu.as_raw_fd(), RING_ENTRIES).map_err(
                |err| Error::Kvm {
                    what: "mmap the vCPU's dirty ring",
                    err,
                },
            )?),
            _ => None,
        };

        Ok(KvmGuest {
            ring,
            vcpu,
            vm,
            _kvm: kvm,
            system,
            data: Some(data),
            layout,
            config: *config,
            store_value: 0x5a,
        })
    }

    /// Enter the guest at `rip` with the loop's arguments and run it to the done port.
    fn enter(&mut self, rip: u64, rdi: u64, rsi: u64, rdx: u64) -> Result<(), Error> {
        let regs = kvm_regs {
            rip,
            rdi,
            rsi,
            rdx,
            rax: self.store_value as u64,
            // Bit 1 is always set; IOPL = 3 so `out` is allowed at CPL 3; IF = 0.
            rflags: 0x2 | 3 << 12,
            ..Default::default()
        };
        self.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        loop {
            let exit = match self.vcpu.run() {
                Ok(VcpuExit::IoOut(DONE_PORT, _)) => return Ok(()),
                Ok(VcpuExit::Intr) => continue,
                Ok(other) => format!("{other:?}"),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => return Err(kvm_err("KVM_RUN")(e)),
            };
            let at = match self.vcpu.get_regs() {
                Ok(r) => format!(
                    "rip {:#x} rdi {:#x} rsi {:#x} rcx {:#x}",
                    r.rip, r.rdi, r.rsi, r.rcx
                ),
                Err(_) => "unknown registers".into(),
            };
            return Err(Error::UnexpectedExit(format!("{exit} at {at}")));
        }
    }
}

/// 64-bit mode at CPL 3: CS and SS with DPL 3 and RPL 3, paging on with the image's PML4,
/// EFER.LME/LMA. The descriptor tables are never read (no segment load, no interrupt), so
/// GDTR and IDTR stay empty.
pub(crate) fn set_user_long_mode(sregs: &mut kvm_bindings::kvm_sregs) {
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: (6 << 3) | 3,
        type_: 0xb, // execute/read, accessed
        present: 1,
        dpl: 3,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: (5 << 3) | 3,
        type_: 0x3, // read/write, accessed
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ss = data;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: 8 << 3,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.ldt = kvm_segment {
        type_: 0x2,
        present: 0,
        unusable: 1,
        ..sregs.tr
    };
    sregs.cr3 = crate::image::PML4_GPA;
    // PG | AM | WP | NE | ET | MP | PE.
    sregs.cr0 = 0x8005_0033;
    // PAE | OSFXSR | OSXMMEXCPT.
    sregs.cr4 = 0x620;
    // LMA | LME.
    sregs.efer = 0x500;
}

impl Peer for KvmGuest {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn config(&self) -> &SlotConfig {
        &self.config
    }

    fn run(&mut self, schedule: &Schedule) -> Result<Duration, Error> {
        if let Some(max) = schedule.max_page() {
            assert!(max < self.config.pages(), "page {max} outside the slot");
        }
        let start = Instant::now();
        match schedule {
            Schedule::Stride { first, end, step } => {
                self.enter(
                    STRIDE_ENTRY,
                    DATA_GPA + first * 4096,
                    DATA_GPA + end.min(&self.config.pages()) * 4096,
                    step * 4096,
                )?;
            }
            Schedule::Pages(pages) => {
                let cap = self.layout.list_entries as usize;
                let mut elapsed = Duration::ZERO;
                for chunk in pages.chunks(cap) {
                    let list = self.layout.list as usize;
                    let mem = self.system.as_mut_slice();
                    for (i, p) in chunk.iter().enumerate() {
                        let at = list + 8 * i;
                        mem[at..at + 8].copy_from_slice(&(DATA_GPA + p * 4096).to_le_bytes());
                    }
                    let t = Instant::now();
                    let end = self.layout.list + 8 * chunk.len() as u64;
                    self.enter(LIST_ENTRY, self.layout.list, end, 0)?;
                    elapsed += t.elapsed();
                }
                return Ok(elapsed);
            }
        }
        Ok(start.elapsed())
    }

    fn get_dirty_log(&mut self, out: &mut [u64]) -> Result<Duration, Error> {
        assert!(out.len() >= self.config.bitmap_words(), "bitmap too small");
        let log = kvm_dirty_log {
            slot: DATA_SLOT,
            padding1: 0,
            __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
                dirty_bitmap: out.as_mut_ptr().cast(),
            },
        };
        let fd = self.vm.as_raw_fd();
        let start = Instant::now();
        // SAFETY: a VM fd, and a bitmap of at least one bit per page of the slot.
        let ret = unsafe { libc::ioctl(fd, KVM_GET_DIRTY_LOG as _, &log) };
        let elapsed = start.elapsed();
        if ret != 0 {
            return Err(Error::Kvm {
                what: "KVM_GET_DIRTY_LOG",
                err: io::Error::last_os_error(),
            });
        }
        Ok(elapsed)
    }

    fn clear_dirty_log(
        &mut self,
        first_page: u64,
        num_pages: u64,
        bitmap: &[u64],
    ) -> Result<Duration, Error> {
        assert!(
            bitmap.len() as u64 >= num_pages.div_ceil(64),
            "bitmap too small"
        );
        let num_pages = u32::try_from(num_pages).map_err(|_| Error::Kvm {
            what: "KVM_CLEAR_DIRTY_LOG",
            err: io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        let log = kvm_clear_dirty_log {
            slot: DATA_SLOT,
            num_pages,
            first_page,
            __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: bitmap.as_ptr().cast_mut().cast(),
            },
        };
        let fd = self.vm.as_raw_fd();
        let start = Instant::now();
        // SAFETY: a VM fd; KVM only reads `num_pages` bits of the bitmap.
        let ret = unsafe { libc::ioctl(fd, KVM_CLEAR_DIRTY_LOG as _, &log) };
        let elapsed = start.elapsed();
        if ret != 0 {
            return Err(Error::Kvm {
                what: "KVM_CLEAR_DIRTY_LOG",
                err: io::Error::last_os_error(),
            });
        }
        Ok(elapsed)
    }

    fn harvest_ring(&mut self, out: &mut [u64]) -> Result<Duration, Error> {
        let ring = self.ring.as_mut().ok_or_else(|| {
            Error::KvmUnsupported("the slot was not built with a dirty ring".into())
        })?;
        let fd = self.vm.as_raw_fd();
        let start = Instant::now();
        ring.collect(|slot, offset| {
            // `slot` is (address space << 16) | id; the data slot is in space 0.
            if slot == DATA_SLOT {
                out[(offset / 64) as usize] |= 1 << (offset % 64);
            }
        });
        // SAFETY: a VM fd; the ioctl takes no argument.
        let ret = unsafe { libc::ioctl(fd, KVM_RESET_DIRTY_RINGS as _) };
        let elapsed = start.elapsed();
        if ret < 0 {
            return Err(Error::Kvm {
                what: "KVM_RESET_DIRTY_RINGS",
                err: io::Error::last_os_error(),
            });
        }
        Ok(elapsed)
    }

    /// Bytes of the data slot's host memory backed by THP (see [`HostMapping::huge_bytes`]).
    fn host_huge_bytes(&self) -> Option<u64> {
        self.data.as_ref().and_then(HostMapping::huge_bytes)
    }

    fn set_store_value(&mut self, value: u8) {
        self.store_value = value;
    }

    fn data_bytes(&mut self) -> Option<&mut [u8]> {
        self.data.as_mut().map(HostMapping::as_mut_slice)
    }

    fn set_dirty_logging(&mut self, on: bool) -> Result<Duration, Error> {
        let data = self.data.as_ref().expect("the data slot was deleted");
        let region = kvm_userspace_memory_region {
            slot: DATA_SLOT,
            flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: DATA_GPA,
            memory_size: self.config.bytes,
            userspace_addr: data.addr(),
        };
        let start = Instant::now();
        // SAFETY: the same memory as before; only the flags change.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION (flags)"))?;
        Ok(start.elapsed())
    }

    fn delete_slot(&mut self) -> Result<Duration, Error> {
        let Some(data) = &self.data else {
            return Ok(Duration::ZERO);
        };
        let region = kvm_userspace_memory_region {
            slot: DATA_SLOT,
            flags: 0,
            guest_phys_addr: DATA_GPA,
            memory_size: 0,
            userspace_addr: data.addr(),
        };
        let start = Instant::now();
        // SAFETY: deleting a slot makes KVM drop every reference to its memory.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION (delete)"))?;
        let elapsed = start.elapsed();
        self.data = None;
        Ok(elapsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux() {
        assert_eq!(KVM_GET_DIRTY_LOG, 0x4010_ae42);
        assert_eq!(KVM_CLEAR_DIRTY_LOG, 0xc018_aec0);
        assert_eq!(KVM_RESET_DIRTY_RINGS, 0xaec7);
        assert_eq!(size_of::<kvm_dirty_gfn>(), 16);
    }
}
