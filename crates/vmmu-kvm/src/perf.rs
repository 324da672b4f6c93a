//! The KVM side of `vmmu perf`: a VM on `/dev/kvm` with several vCPUs of the CPL-3 guest,
//! one per host thread, laid out as the KVM selftests' `memstress` lays its VMs out.
//!
//! - The system memslot (id 0, guest-physical 0, 2 MiB) holds the code and the guest's
//!   page tables: an identity map of the first `4 + data GiBs` GiB with 2 MiB pages (no
//!   1 GiB guest pages: PVM's shadow MMU does not offer them), every entry P, R/W, U/S, A
//!   (and D on the leaves), so the CPU never writes a guest table.
//! - Each vCPU has its own list memslot (ids after the data slots, from [`LIST_GPA`]), 2
//!   MiB-aligned: the accesses of its next run, one u64 each, `gpa | 1` for a write and
//!   `gpa` for a read. The host writes a vCPU's list only while no vCPU runs.
//! - The test memory is one region of `vcpus * bytes_per_vcpu` at [`DATA_GPA`], split into
//!   `slots` equal memslots (ids 1..=slots, as memstress numbers them); vCPU `i` accesses
//!   its own part (or, with the selftests' `-o`, the whole region) through its list.
//!
//! The guest loop ([`CODE`]) reads each list entry and stores one byte to it or loads one
//! byte from it, then writes [`DONE_PORT`]. No code runs at CPL 0 (under PVM, CPL-0 code
//! is emulated and never reaches the MMU).
//!
//! Host memory is anonymous and populated (written) before the VM exists, as in
//! [`crate::kvm`]: a guest fault measures KVM's MMU, not the host's page allocator (the
//! selftests leave it to the guest's first touch, which adds the host's own fault).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1, kvm_enable_cap, kvm_pre_fault_memory, kvm_regs,
    kvm_userspace_memory_region, KVM_CAP_BINARY_STATS_FD, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_CAP_PRE_FAULT_MEMORY, KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Cap, VcpuExit, VcpuFd, VmFd};

use crate::kvm::{kvm_err, open, set_user_long_mode, HostMapping};
use crate::stats::{Stats, StatsFd};
use crate::{Error, HostBacking};

/// Guest-physical address of the test memory (above 4 GiB, as a VMM places high memory).
pub const DATA_GPA: u64 = 4 << 30;
/// Guest-physical address of the first vCPU's list; the lists end below [`DATA_GPA`].
pub const LIST_GPA: u64 = 1 << 30;
/// Most test memory the page tables map.
pub const MAX_DATA_BYTES: u64 = 64 << 30;
/// The port the loop writes when its list is done.
pub const DONE_PORT: u16 = 0x10;
/// A list entry's flag: store to the address (clear: load from it).
pub const WRITE: u64 = 1;

const PAGE: u64 = 4096;
const MIB2: u64 = 2 << 20;
const GIB: u64 = 1 << 30;
const SYSTEM_BYTES: u64 = MIB2;
const CODE_GPA: u64 = 0x1000;
const PML4: u64 = 0x2000;
const PDPT: u64 = 0x3000;
const PDS: u64 = 0x4000;
const TABLE: u64 = 0x27; // P | RW | US | A
const LEAF_2M: u64 = 0xe7; // P | RW | US | A | D | PS

/// The guest's code (hand-assembled; `rdi` = list, `rsi` = its end, set by the host):
///
/// ```text
/// list: cmp rdi, rsi ; jae done ; mov rcx, [rdi] ; test cl, 1 ; jz read
///       mov [rcx], al ; jmp next
/// read: mov dl, [rcx]
/// next: add rdi, 8 ; jmp list
/// done: out 0x10, al ; jmp done
/// ```
///
/// A write entry has bit 0 set, so the store lands one byte into the page.
pub const CODE: [u8; 29] = [
    0x48, 0x39, 0xf7, // cmp rdi, rsi
    0x73, 0x14, // jae done
    0x48, 0x8b, 0x0f, // mov rcx, [rdi]
    0xf6, 0xc1, 0x01, // test cl, 1
    0x74, 0x04, // jz read
    0x88, 0x01, // mov [rcx], al
    0xeb, 0x02, // jmp next
    0x8a, 0x11, // read: mov dl, [rcx]
    0x48, 0x83, 0xc7, 0x08, // next: add rdi, 8
    0xeb, 0xe7, // jmp list
    0xe6, 0x10, // done: out 0x10, al
    0xeb, 0xfc, // jmp done
];

/// `KVM_PRE_FAULT_MEMORY`: `_IOWR(KVMIO, 0xd5, struct kvm_pre_fault_memory)`.
const KVM_PRE_FAULT_MEMORY: u64 =
    (3 << 30) | ((size_of::<kvm_pre_fault_memory>() as u64) << 16) | (0xAE << 8) | 0xd5;
/// `KVM_GET_DIRTY_LOG`: `_IOW(KVMIO, 0x42, struct kvm_dirty_log)`.
const KVM_GET_DIRTY_LOG: u64 =
    (1 << 30) | ((size_of::<kvm_dirty_log>() as u64) << 16) | (0xAE << 8) | 0x42;
/// `KVM_CLEAR_DIRTY_LOG`: `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
const KVM_CLEAR_DIRTY_LOG: u64 =
    (3 << 30) | ((size_of::<kvm_clear_dirty_log>() as u64) << 16) | (0xAE << 8) | 0xc0;

/// How the test memory is backed on the host (the selftests' `-s`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PerfBacking {
    /// `anonymous`: 4 KiB pages (`MADV_NOHUGEPAGE`).
    Anonymous,
    /// `anonymous_thp`: `MADV_HUGEPAGE`, 2 MiB-aligned.
    Thp,
    /// `anonymous_hugetlb`: `MAP_HUGETLB` with the default huge page size.
    HugeTlb,
}

/// What the VM is built with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PerfConfig {
    /// vCPUs, each on its own thread (>= 1).
    pub vcpus: u32,
    /// Test memory per vCPU, a nonzero multiple of 4 KiB.
    pub bytes_per_vcpu: u64,
    /// Memslots the test memory is split into (>= 1; each a multiple of 4 KiB).
    pub slots: u32,
    /// Host backing.
    pub backing: PerfBacking,
    /// Enable `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (GET copies, CLEAR protects).
    pub manual_protect: bool,
    /// With it, `KVM_DIRTY_LOG_INITIALLY_SET` (where the host offers it).
    pub initially_set: bool,
    /// Capacity of each vCPU's list.
    pub list_entries: u64,
}

impl PerfConfig {
    /// Bytes of test memory in all.
    pub fn data_bytes(&self) -> u64 {
        u64::from(self.vcpus) * self.bytes_per_vcpu
    }

    /// Bytes of each memslot.
    pub fn slot_bytes(&self) -> u64 {
        self.data_bytes() / u64::from(self.slots)
    }

    fn list_slot_bytes(&self) -> u64 {
        (self.list_entries.max(1) * 8).next_multiple_of(MIB2)
    }

    /// Why the layout cannot hold this configuration, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.vcpus == 0 || self.slots == 0 {
            return Err("at least one vCPU and one memslot".into());
        }
        if self.bytes_per_vcpu == 0 || !self.bytes_per_vcpu.is_multiple_of(PAGE) {
            return Err("memory per vCPU must be a nonzero multiple of 4 KiB".into());
        }
        if self.data_bytes() > MAX_DATA_BYTES {
            return Err(format!(
                "{} GiB of test memory: the guest maps at most {} GiB",
                self.data_bytes() >> 30,
                MAX_DATA_BYTES >> 30
            ));
        }
        if !self
            .data_bytes()
            .is_multiple_of(u64::from(self.slots) * PAGE)
        {
            return Err(format!(
                "{} bytes do not split into {} memslots of whole 4 KiB pages",
                self.data_bytes(),
                self.slots
            ));
        }
        if LIST_GPA + u64::from(self.vcpus) * self.list_slot_bytes() > DATA_GPA {
            return Err("the vCPUs' access lists do not fit below 4 GiB".into());
        }
        Ok(())
    }
}

/// One vCPU: its fd, its stats fd, the length of its current list.
struct PerfVcpu {
    fd: VcpuFd,
    stats: Option<StatsFd>,
    list_gpa: u64,
    len: u64,
}

/// The VM-wide part: what the host thread calls while the vCPU threads run.
pub struct KvmOps {
    vm: VmFd,
    /// (userspace address, guest-physical address) of each data slot.
    data: Vec<(u64, u64)>,
    slot_bytes: u64,
    stats: Option<StatsFd>,
    pre_fault: bool,
}

/// Snapshot of KVM's binary stats: the VM's and each vCPU's.
#[derive(Clone, Debug, Default)]
pub struct KvmStats {
    /// The VM's statistics.
    pub vm: Stats,
    /// Each vCPU's statistics.
    pub vcpus: Vec<Stats>,
}

impl KvmStats {
    /// A VM statistic, if the host has it.
    pub fn vm(&self, name: &str) -> Option<u64> {
        self.vm.get(name)
    }
    /// A vCPU statistic summed over the vCPUs, if the host has it.
    pub fn vcpus(&self, name: &str) -> Option<u64> {
        Stats::sum(&self.vcpus, name)
    }
}

/// The VM. Field order is drop order: vCPUs close before the VM, the VM before the
/// memory its slots map.
pub struct KvmPerfVm {
    vcpus: Vec<PerfVcpu>,
    ops: KvmOps,
    _kvm: kvm_ioctls::Kvm,
    lists: Vec<HostMapping>,
    data: Vec<DataMapping>,
    _system: HostMapping,
    config: PerfConfig,
}

/// A data slot's host memory.
enum DataMapping {
    Mapped(HostMapping),
    HugeTlb(HugeTlbMapping),
}

impl DataMapping {
    fn addr(&self) -> u64 {
        match self {
            DataMapping::Mapped(m) => m.addr(),
            DataMapping::HugeTlb(m) => m.base as u64,
        }
    }
}

/// `MAP_HUGETLB` anonymous memory, populated; unmapped on drop.
struct HugeTlbMapping {
    base: *mut libc::c_void,
    len: usize,
}

impl HugeTlbMapping {
    fn new(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(HugeTlbMapping { base, len })
    }
}

impl Drop for HugeTlbMapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping; the VM that used it is closed first (field order).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

fn hugetlb_pages() -> String {
    std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

impl KvmOps {
    fn set_region(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        addr: u64,
        flags: u32,
    ) -> Result<(), Error> {
        let region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: addr,
        };
        // SAFETY: every address given is one of this VM's own mappings, which outlive it
        // (`KvmPerfVm`'s field order).
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))
    }

    /// Number of data memslots.
    pub fn slots(&self) -> u32 {
        self.data.len() as u32
    }

    /// 4 KiB pages per data memslot.
    pub fn slot_pages(&self) -> u64 {
        self.slot_bytes / PAGE
    }

    /// LOG_DIRTY_PAGES on or off for every data slot, in slot order (the selftests'
    /// `memstress_{enable,disable}_dirty_logging`).
    pub fn set_logging(&self, on: bool) -> Result<(), Error> {
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        for (i, &(addr, gpa)) in self.data.iter().enumerate() {
            self.set_region(1 + i as u32, gpa, self.slot_bytes, addr, flags)?;
        }
        Ok(())
    }

    /// Delete data slot `i` (0-based) and create it again at `gpa` (a move when `gpa`
    /// differs): two `KVM_SET_USER_MEMORY_REGION` calls, as a VMM moves a slot.
    pub fn move_slot(&mut self, i: usize, gpa: u64) -> Result<(), Error> {
        let (addr, old) = self.data[i];
        self.set_region(1 + i as u32, old, 0, addr, 0)?;
        self.set_region(1 + i as u32, gpa, self.slot_bytes, addr, 0)?;
        self.data[i].1 = gpa;
        Ok(())
    }

    /// `KVM_GET_DIRTY_LOG` of data slot `i` (0-based) into `out`.
    pub fn get_dirty_log(&self, i: usize, out: &mut [u64]) -> Result<(), Error> {
        assert!(
            out.len() as u64 >= self.slot_pages().div_ceil(64),
            "bitmap too small"
        );
        let log = kvm_dirty_log {
            slot: 1 + i as u32,
            padding1: 0,
            __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
                dirty_bitmap: out.as_mut_ptr().cast(),
            },
        };
        // SAFETY: a VM fd and a bitmap of at least one bit per page of the slot.
        let ret = unsafe { libc::ioctl(self.vm.as_raw_fd(), KVM_GET_DIRTY_LOG as _, &log) };
        if ret != 0 {
            return Err(Error::Kvm {
                what: "KVM_GET_DIRTY_LOG",
                err: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// `KVM_CLEAR_DIRTY_LOG` of the whole of data slot `i` with `bitmap`.
    pub fn clear_dirty_log(&self, i: usize, bitmap: &[u64]) -> Result<(), Error> {
        let pages = self.slot_pages();
        assert!(
            bitmap.len() as u64 >= pages.div_ceil(64),
            "bitmap too small"
        );
        let log = kvm_clear_dirty_log {
            slot: 1 + i as u32,
            num_pages: u32::try_from(pages).map_err(|_| Error::Kvm {
                what: "KVM_CLEAR_DIRTY_LOG",
                err: io::Error::from_raw_os_error(libc::EINVAL),
            })?,
            first_page: 0,
            __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: bitmap.as_ptr().cast_mut().cast(),
            },
        };
        // SAFETY: a VM fd; KVM only reads `num_pages` bits of the bitmap.
        let ret = unsafe { libc::ioctl(self.vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG as _, &log) };
        if ret != 0 {
            return Err(Error::Kvm {
                what: "KVM_CLEAR_DIRTY_LOG",
                err: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Guest-physical address of data slot `i` now.
    pub fn slot_gpa(&self, i: usize) -> u64 {
        self.data[i].1
    }

    /// Drop the host memory behind `[gpa, gpa + size)` of the data slots, `chunk` bytes a
    /// call, with `madvise(MADV_DONTNEED)`: the host's MMU notifier makes KVM zap the
    /// SPTEs, and the next guest access faults a fresh zeroed page in (host and KVM).
    pub fn discard(&self, gpa: u64, size: u64, chunk: u64) -> Result<(), Error> {
        let chunk = chunk.max(PAGE);
        for &(addr, base) in &self.data {
            let lo = gpa.max(base);
            let hi = (gpa + size).min(base + self.slot_bytes);
            let mut at = lo;
            while at < hi {
                let len = chunk.min(hi - at);
                // SAFETY: inside one of this VM's own anonymous mappings (the slot at
                // `base`, `slot_bytes` long, mapped at `addr`); no Rust reference into the
                // test memory exists, and discarding anonymous memory only zeroes it.
                let ret = unsafe {
                    libc::madvise(
                        (addr + (at - base)) as *mut libc::c_void,
                        len as usize,
                        libc::MADV_DONTNEED,
                    )
                };
                if ret != 0 {
                    return Err(Error::Kvm {
                        what: "madvise(MADV_DONTNEED)",
                        err: io::Error::last_os_error(),
                    });
                }
                at += len;
            }
        }
        Ok(())
    }

    /// Whether the host offers `KVM_PRE_FAULT_MEMORY` on this VM.
    pub fn has_pre_fault(&self) -> bool {
        self.pre_fault
    }
}

impl KvmPerfVm {
    /// Open `/dev/kvm`; create the VM, its memslots and `config.vcpus` vCPUs in 64-bit
    /// user mode.
    pub fn new(config: &PerfConfig) -> Result<Self, Error> {
        config.check().map_err(Error::KvmUnsupported)?;
        let kvm = open()?;
        for (cap, name) in [
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::KvmUnsupported(format!("no {name}")));
            }
        }
        let max_vcpus = kvm.get_max_vcpus();
        if config.vcpus as usize > max_vcpus {
            return Err(Error::KvmUnsupported(format!(
                "{} vCPUs asked, the host's KVM allows {max_vcpus}",
                config.vcpus
            )));
        }
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        if config.manual_protect {
            let offered = vm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into()) as u32;
            if offered & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE == 0 {
                return Err(Error::KvmUnsupported(
                    "no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (KVM_CLEAR_DIRTY_LOG)".into(),
                ));
            }
            let mut flags = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
            if config.initially_set {
                flags |= offered & KVM_DIRTY_LOG_INITIALLY_SET;
            }
            let cap = kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                args: [flags.into(), 0, 0, 0],
                ..Default::default()
            };
            vm.enable_cap(&cap)
                .map_err(kvm_err("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)"))?;
        }

        // The system slot: code and page tables.
        let mut system =
            HostMapping::new(SYSTEM_BYTES as usize, HostBacking::Page4K).map_err(|err| {
                Error::Kvm {
                    what: "mmap the system slot",
                    err,
                }
            })?;
        build_tables(system.as_mut_slice(), config.data_bytes());
        // The data slots.
        let slot_bytes = config.slot_bytes();
        let mut data = Vec::new();
        for _ in 0..config.slots {
            let m = match config.backing {
                PerfBacking::Anonymous | PerfBacking::Thp => {
                    let backing = if config.backing == PerfBacking::Thp {
                        HostBacking::Thp
                    } else {
                        HostBacking::Page4K
                    };
                    DataMapping::Mapped(HostMapping::new(slot_bytes as usize, backing).map_err(
                        |err| Error::Kvm {
                            what: "mmap and populate the test memory",
                            err,
                        },
                    )?)
                }
                PerfBacking::HugeTlb => DataMapping::HugeTlb(
                    HugeTlbMapping::new(slot_bytes as usize).map_err(|err| {
                        Error::KvmUnsupported(format!(
                            "anonymous_hugetlb: mmap(MAP_HUGETLB) of {slot_bytes} bytes \
                                 failed ({err}); the host has vm.nr_hugepages = {}",
                            hugetlb_pages()
                        ))
                    })?,
                ),
            };
            data.push(m);
        }
        let mut lists = Vec::new();
        for _ in 0..config.vcpus {
            lists.push(
                HostMapping::new(config.list_slot_bytes() as usize, HostBacking::Page4K).map_err(
                    |err| Error::Kvm {
                        what: "mmap a vCPU's list",
                        err,
                    },
                )?,
            );
        }
        let stats = if vm.check_extension_raw(KVM_CAP_BINARY_STATS_FD.into()) > 0 {
            StatsFd::open(&vm).ok()
        } else {
            None
        };
        let pre_fault = vm.check_extension_raw(KVM_CAP_PRE_FAULT_MEMORY.into()) > 0;
        let mut ops = KvmOps {
            vm,
            data: Vec::new(),
            slot_bytes,
            stats,
            pre_fault,
        };
        ops.set_region(0, 0, SYSTEM_BYTES, system.addr(), 0)?;
        for (i, m) in data.iter().enumerate() {
            let gpa = DATA_GPA + i as u64 * slot_bytes;
            ops.set_region(1 + i as u32, gpa, slot_bytes, m.addr(), 0)?;
            ops.data.push((m.addr(), gpa));
        }
        let list_slot = config.list_slot_bytes();
        let mut vcpus = Vec::new();
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        for (i, list) in lists.iter().enumerate() {
            let list_gpa = LIST_GPA + i as u64 * list_slot;
            let id = 1 + config.slots + i as u32;
            ops.set_region(id, list_gpa, list_slot, list.addr(), 0)?;
            let fd = ops
                .vm
                .create_vcpu(i as u64)
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            set_user_long_mode(&mut sregs);
            fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
            let stats = ops.stats.as_ref().and_then(|_| StatsFd::open(&fd).ok());
            vcpus.push(PerfVcpu {
                fd,
                stats,
                list_gpa,
                len: 0,
            });
        }
        Ok(KvmPerfVm {
            vcpus,
            ops,
            _kvm: kvm,
            lists,
            data,
            _system: system,
            config: *config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PerfConfig {
        &self.config
    }

    /// The VM-wide operations.
    pub fn ops(&mut self) -> &mut KvmOps {
        &mut self.ops
    }

    /// Bytes of test memory the host really backs with THP (`AnonHugePages`), if known.
    pub fn host_huge_bytes(&self) -> Option<u64> {
        self.data
            .iter()
            .map(|m| match m {
                DataMapping::Mapped(m) => m.huge_bytes(),
                DataMapping::HugeTlb(m) => Some(m.len as u64),
            })
            .sum()
    }

    /// Set vCPU `vcpu`'s next run to `entries` (`gpa | WRITE` or `gpa`, each inside the
    /// test memory).
    ///
    /// # Panics
    /// If the list is longer than [`PerfConfig::list_entries`].
    pub fn set_list(&mut self, vcpu: usize, entries: &[u64]) {
        let mem = self.lists[vcpu].as_mut_slice();
        assert!(entries.len() * 8 <= mem.len(), "list too long");
        for (i, e) in entries.iter().enumerate() {
            mem[8 * i..8 * i + 8].copy_from_slice(&e.to_le_bytes());
        }
        self.vcpus[vcpu].len = entries.len() as u64;
    }

    /// The binary stats of the VM and its vCPUs; `Err` says why there are none.
    pub fn stats(&self) -> Result<KvmStats, String> {
        let Some(vm) = &self.ops.stats else {
            return Err("the host's KVM has no KVM_CAP_BINARY_STATS_FD".into());
        };
        let vm = vm
            .read()
            .map_err(|e| format!("reading the VM stats fd: {e}"))?;
        let mut vcpus = Vec::new();
        for v in &self.vcpus {
            if let Some(s) = &v.stats {
                vcpus.push(
                    s.read()
                        .map_err(|e| format!("reading a vCPU stats fd: {e}"))?,
                );
            }
        }
        Ok(KvmStats { vm, vcpus })
    }

    /// Every vCPU runs its list once, each on its own thread, started together. Returns
    /// the wall-clock time from the start until the last vCPU finished.
    pub fn run_all(&mut self) -> Result<Duration, Error> {
        self.run_all_during(|_| ()).map(|(d, ())| d)
    }

    /// Every vCPU runs its list once, and then again and again, on its own thread, while
    /// the host thread calls `f`; when `f` returns each vCPU finishes its current run.
    /// Returns the time from the start until the last vCPU finished its first run, and
    /// `f`'s value. (With `f` doing nothing, [`run_all`](Self::run_all).)
    pub fn run_all_during<R>(
        &mut self,
        f: impl FnOnce(&mut KvmOps) -> R,
    ) -> Result<(Duration, R), Error> {
        let n = self.vcpus.len();
        let start_line = Barrier::new(n + 1);
        let first_done = Barrier::new(n + 1);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let ops = &mut self.ops;
        std::thread::scope(|s| {
            let workers: Vec<_> = self
                .vcpus
                .iter_mut()
                .map(|v| {
                    let (start_line, first_done, stop) = (&start_line, &first_done, &stop);
                    s.spawn(move || -> Result<(), Error> {
                        start_line.wait();
                        start_line.wait();
                        let first = run_list(v);
                        first_done.wait();
                        first?;
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            run_list(v)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            // Every vCPU thread is up; the clock starts as they are released.
            start_line.wait();
            let start = Instant::now();
            start_line.wait();
            first_done.wait();
            let elapsed = start.elapsed();
            let r = f(ops);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let mut result = Ok(());
            for w in workers {
                let r = w.join().unwrap_or_else(|_| {
                    Err(Error::UnexpectedExit("a vCPU thread panicked".into()))
                });
                if result.is_ok() {
                    result = r;
                }
            }
            result.map(|()| (elapsed, r))
        })
    }

    /// `KVM_PRE_FAULT_MEMORY` on each vCPU of its range `(gpa, size)` (`None`: nothing),
    /// all vCPUs in parallel, each on its own thread; repeated until the whole range is
    /// done (KVM may return early, with the rest of the range in the struct). Returns the
    /// wall-clock time of them all.
    pub fn pre_fault_all(&mut self, ranges: &[Option<(u64, u64)>]) -> Result<Duration, Error> {
        if !self.ops.pre_fault {
            return Err(Error::KvmUnsupported(
                "no KVM_CAP_PRE_FAULT_MEMORY (the host's KVM offers it only on its TDP MMU)".into(),
            ));
        }
        let barrier = Barrier::new(self.vcpus.len() + 1);
        std::thread::scope(|s| {
            let workers: Vec<_> = self
                .vcpus
                .iter_mut()
                .zip(ranges.iter().chain(std::iter::repeat(&None)))
                .map(|(v, range)| {
                    let barrier = &barrier;
                    let range = *range;
                    s.spawn(move || -> Result<(), Error> {
                        barrier.wait();
                        barrier.wait();
                        let Some((gpa, size)) = range else {
                            return Ok(());
                        };
                        pre_fault(&v.fd, gpa, size)
                    })
                })
                .collect();
            // Every vCPU thread is up; the clock starts as they are released.
            barrier.wait();
            let start = Instant::now();
            barrier.wait();
            let mut result = Ok(());
            for w in workers {
                let r = w.join().unwrap_or_else(|_| {
                    Err(Error::UnexpectedExit("a vCPU thread panicked".into()))
                });
                if result.is_ok() {
                    result = r;
                }
            }
            result.map(|()| start.elapsed())
        })
    }
}

fn pre_fault(fd: &VcpuFd, gpa: u64, size: u64) -> Result<(), Error> {
    let mut range = kvm_pre_fault_memory {
        gpa,
        size,
        ..Default::default()
    };
    while range.size > 0 {
        // SAFETY: a vCPU fd and a `kvm_pre_fault_memory` KVM reads and updates.
        let ret = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_PRE_FAULT_MEMORY as _, &mut range) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
                _ => {
                    return Err(Error::Kvm {
                        what: "KVM_PRE_FAULT_MEMORY",
                        err,
                    })
                }
            }
        }
    }
    Ok(())
}

/// Run `v`'s list once: enter at the loop and run to the done port.
fn run_list(v: &mut PerfVcpu) -> Result<(), Error> {
    let regs = kvm_regs {
        rip: CODE_GPA,
        rdi: v.list_gpa,
        rsi: v.list_gpa + 8 * v.len,
        rax: 0x5a,
        // Bit 1 is always set; IOPL = 3 so `out` is allowed at CPL 3; IF = 0.
        rflags: 0x2 | 3 << 12,
        ..Default::default()
    };
    v.fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    loop {
        let exit = match v.fd.run() {
            Ok(VcpuExit::IoOut(DONE_PORT, _)) => return Ok(()),
            Ok(VcpuExit::Intr) => continue,
            Ok(other) => format!("{other:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(kvm_err("KVM_RUN")(e)),
        };
        let at = match v.fd.get_regs() {
            Ok(r) => format!("rip {:#x} rdi {:#x} rcx {:#x}", r.rip, r.rdi, r.rcx),
            Err(_) => "unknown registers".into(),
        };
        return Err(Error::UnexpectedExit(format!("{exit} at {at}")));
    }
}

/// Code and page tables into the system slot's memory (zeroed, [`SYSTEM_BYTES`] long):
/// GiBs `0 .. 4 + data GiBs` identity-mapped with 2 MiB pages.
fn build_tables(system: &mut [u8], data_bytes: u64) {
    let mut put = |at: u64, v: u64| {
        let at = at as usize;
        system[at..at + 8].copy_from_slice(&v.to_le_bytes());
    };
    put(PML4, PDPT | TABLE);
    let gibs = DATA_GPA / GIB + data_bytes.div_ceil(GIB);
    for g in 0..gibs {
        let pd = PDS + g * PAGE;
        put(PDPT + 8 * g, pd | TABLE);
        for i in 0..512 {
            put(pd + 8 * i, (g * GIB + i * MIB2) | LEAF_2M);
        }
    }
    let code = CODE_GPA as usize;
    system[code..code + CODE.len()].copy_from_slice(&CODE);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux() {
        assert_eq!(KVM_PRE_FAULT_MEMORY, 0xc040_aed5);
        assert_eq!(KVM_GET_DIRTY_LOG, 0x4010_ae42);
        assert_eq!(KVM_CLEAR_DIRTY_LOG, 0xc018_aec0);
    }

    #[test]
    fn tables_map_code_lists_and_data() {
        let mut mem = vec![0u8; SYSTEM_BYTES as usize];
        build_tables(&mut mem, 3 << 30);
        for va in [CODE_GPA, LIST_GPA, DATA_GPA, DATA_GPA + (3 << 30) - 1] {
            assert_eq!(
                crate::image::Layout::translate(&mem, va),
                Some(va),
                "{va:#x}"
            );
        }
        assert_eq!(
            crate::image::Layout::translate(&mem, DATA_GPA + (3 << 30)),
            None
        );
    }

    #[test]
    fn bad_layouts_are_refused() {
        let ok = PerfConfig {
            vcpus: 2,
            bytes_per_vcpu: 1 << 30,
            slots: 1,
            backing: PerfBacking::Anonymous,
            manual_protect: true,
            initially_set: true,
            list_entries: 1 << 18,
        };
        assert!(ok.check().is_ok());
        for bad in [
            PerfConfig { vcpus: 0, ..ok },
            PerfConfig { slots: 0, ..ok },
            PerfConfig {
                bytes_per_vcpu: 100,
                ..ok
            },
            PerfConfig { vcpus: 65, ..ok },
            PerfConfig {
                slots: 3,
                bytes_per_vcpu: 4096,
                ..ok
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }
}
