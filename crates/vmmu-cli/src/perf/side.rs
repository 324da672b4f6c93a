//! The two sides a `vmmu perf` test runs on, behind one trait: vmmu ([`VmmuSide`]: a
//! [`Vm`] on simulated host memory, its CPU model driven from one thread per vCPU) and
//! the host's KVM ([`KvmSide`]: `vmmu_kvm::perf::KvmPerfVm`, the CPL-3 guest on one
//! thread per vCPU). Both lay the test memory out as the selftests' `memstress` does:
//! `vcpus * bytes` at 4 GiB, split into `slots` equal memslots (ids 1..=slots), vCPU `i`
//! owning bytes `[i * bytes, (i + 1) * bytes)`.
//!
//! A vCPU's run is a list of accesses, `gpa | WRITE` or `gpa` (see [`super::access`]),
//! the same lists on both sides.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use vmmu::host::{Backing, SimHostMemory};
use vmmu::types::{AccessKind, Gpa, Hva};
use vmmu::{
    Algorithms, DirtyLogConfig, MemoryRegion, MemslotFlags, MmuKind, RmapIteration, TdpIteration,
    Vcpu, Vm, VmConfig,
};

use super::{BackingArg, CommonArgs, MmuArg, PerfError, RmapIterArg};

/// Guest-physical address of the test memory on both sides.
pub const DATA_GPA: u64 = 4 << 30;
/// A list entry's write flag.
pub const WRITE: u64 = 1;

/// What a side is built with.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// vCPUs, one thread each.
    pub vcpus: u32,
    /// Bytes per vCPU.
    pub bytes_per_vcpu: u64,
    /// Memslots the test memory is split into.
    pub slots: u32,
    /// Host backing.
    pub backing: BackingArg,
    /// Manual protect (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`).
    pub manual_protect: bool,
    /// With it, `KVM_DIRTY_LOG_INITIALLY_SET`.
    pub initially_set: bool,
}

impl Layout {
    /// All test memory, bytes.
    pub fn data_bytes(&self) -> u64 {
        u64::from(self.vcpus) * self.bytes_per_vcpu
    }
    /// Bytes per memslot.
    pub fn slot_bytes(&self) -> u64 {
        self.data_bytes() / u64::from(self.slots)
    }
    /// 4 KiB pages per memslot.
    pub fn slot_pages(&self) -> u64 {
        self.slot_bytes() / 4096
    }
    /// 4 KiB pages per vCPU.
    pub fn vcpu_pages(&self) -> u64 {
        self.bytes_per_vcpu / 4096
    }
}

/// MMU counters, each `None` where the side cannot tell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Faults the MMU took (vmmu: the vCPUs' EPT-violation exits, fast ones included;
    /// KVM: `pf_taken` over the vCPUs).
    pub faults: Option<u64>,
    /// Of them, fixed by the lockless fast path (`pf_fast`).
    pub fast: Option<u64>,
    /// Remote TLB flushes requested (`remote_tlb_flush_requests`).
    pub flushes: Option<u64>,
    /// Huge pages split (vmmu: TDP eager split count).
    pub split: Option<u64>,
    /// Huge pages rebuilt in place (vmmu: TDP recovery count).
    pub rebuilt: Option<u64>,
    /// Huge SPTEs mapped now (KVM: `pages_2m + pages_1g`, a gauge).
    pub huge_now: Option<u64>,
}

impl Counters {
    /// `self - before`, field by field (gauges: the difference, signed, in `huge_delta`).
    pub fn delta(&self, before: &Counters) -> Delta {
        let d = |a: Option<u64>, b: Option<u64>| Some(a?.wrapping_sub(b?));
        Delta {
            faults: d(self.faults, before.faults),
            fast: d(self.fast, before.fast),
            flushes: d(self.flushes, before.flushes),
            split: d(self.split, before.split),
            rebuilt: d(self.rebuilt, before.rebuilt),
            huge_delta: match (self.huge_now, before.huge_now) {
                (Some(a), Some(b)) => Some(a as i64 - b as i64),
                _ => None,
            },
        }
    }
}

/// What changed over a phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// See [`Counters::faults`].
    pub faults: Option<u64>,
    /// See [`Counters::fast`].
    pub fast: Option<u64>,
    /// See [`Counters::flushes`].
    pub flushes: Option<u64>,
    /// See [`Counters::split`].
    pub split: Option<u64>,
    /// See [`Counters::rebuilt`].
    pub rebuilt: Option<u64>,
    /// Change of the huge-SPTE gauge.
    pub huge_delta: Option<i64>,
}

/// One side of a test.
pub trait Side {
    /// `vmmu tdp-used`, `kvm`, ...: the JSON variant and the label of its lines.
    fn label(&self) -> String;
    /// Every vCPU runs its list once, in parallel; the wall time.
    fn run(&mut self, lists: &[Vec<u64>]) -> Result<Duration, PerfError>;
    /// LOG_DIRTY_PAGES on or off on every data slot; with `running`, the vCPUs keep
    /// running their last lists meanwhile (the selftest's `-e`). The time of the toggle.
    fn set_logging(&mut self, on: bool, running: bool) -> Result<Duration, PerfError>;
    /// GET_DIRTY_LOG of data slot `i` into `out`.
    fn get_dirty_log(&mut self, i: usize, out: &mut [u64]) -> Result<(), PerfError>;
    /// CLEAR_DIRTY_LOG of all of data slot `i` with `bitmap`.
    fn clear_dirty_log(&mut self, i: usize, bitmap: &[u64]) -> Result<(), PerfError>;
    /// The counters now.
    fn counters(&self) -> Counters;
    /// `KVM_PRE_FAULT_MEMORY` of each vCPU's range, all vCPUs in parallel; the wall time.
    fn pre_fault(&mut self, ranges: &[Option<(u64, u64)>]) -> Result<Duration, PerfError>;
    /// Mark the guest memory `[gpa, gpa + size)` of each range idle through the host's
    /// aging (vmmu: `age_hva_range`, the MMU notifier's `clear_young`), one range after
    /// the other from the host thread; the time of them all.
    fn mark_idle(&mut self, ranges: &[(u64, u64)]) -> Result<Duration, PerfError>;
    /// Pages of `[gpa, gpa + size)` still idle (no young SPTE: `test_age_hva_range`).
    fn idle_pages(&self, gpa: u64, size: u64) -> Result<u64, PerfError>;
    /// The host drops the guest memory `[gpa, gpa + size)`, `chunk` bytes a call (KVM:
    /// `madvise(MADV_DONTNEED)`, which reaches KVM through the MMU notifier; vmmu: the
    /// notifier's `unmap_hva_range`); the time of all the calls.
    fn discard(&mut self, gpa: u64, size: u64, chunk: u64) -> Result<Duration, PerfError>;
    /// While the vCPUs rerun their last lists, move data slot `i` to `to` and back (a
    /// delete and a create each way) until `budget` has passed; `(moves there and back,
    /// their time)`. With `active`, the lists touch the slot: its accesses exit to MMIO
    /// while it is away, and the vCPUs go on.
    fn move_slot_while_running(
        &mut self,
        i: usize,
        to: u64,
        budget: Duration,
        active: bool,
    ) -> Result<(u64, Duration), PerfError>;
}

/// The vmmu VM type of `vmmu perf`.
type SimVm = Vm<Arc<SimHostMemory>>;

/// vmmu's side.
pub struct VmmuSide {
    vm: SimVm,
    vcpus: Vec<Vcpu>,
    regions: Vec<MemoryRegion>,
    lists: Vec<Vec<u64>>,
    layout: Layout,
    mmu: MmuArg,
    eager_split: bool,
    /// Seed 000's predecessor: reverse maps scanned from the head at every step.
    restart_scan: bool,
    /// The vCPUs go on past MMIO exits (a slot they access is being moved).
    tolerate_mmio: bool,
}

impl VmmuSide {
    /// The host-virtual ranges `(hva, len)` backing `[gpa, gpa + size)`, slot by slot.
    fn hva_ranges(&self, gpa: u64, size: u64) -> Vec<(u64, u64)> {
        self.regions
            .iter()
            .filter_map(|r| {
                let lo = gpa.max(r.guest_phys_addr);
                let hi = (gpa + size).min(r.guest_phys_addr + r.memory_size);
                (lo < hi).then(|| (r.userspace_addr + (lo - r.guest_phys_addr), hi - lo))
            })
            .collect()
    }

    /// Build the VM, its memslots and vCPUs.
    pub fn new(layout: &Layout, common: &CommonArgs) -> Result<Self, PerfError> {
        let (mmu, eager_split) = (common.mmu, !common.no_eager_split);
        let restart_scan = common.rmap_iteration == Some(RmapIterArg::RestartScan);
        let kind = match mmu {
            MmuArg::Shadow => MmuKind::ShadowDirect,
            MmuArg::TdpScan => MmuKind::Tdp(TdpIteration::ScanAll),
            MmuArg::TdpSkip => MmuKind::Tdp(TdpIteration::SkipNonPresent),
            MmuArg::TdpUsed => MmuKind::Tdp(TdpIteration::UsedEntries),
        };
        let config = VmConfig {
            mmu: kind,
            max_vcpus: layout.vcpus.max(1),
            eager_split,
            algorithms: Algorithms {
                rmap_iteration: if restart_scan {
                    RmapIteration::RestartScan
                } else {
                    RmapIteration::Iterator
                },
                ..Algorithms::default()
            },
            dirty_log: DirtyLogConfig {
                manual_protect: layout.manual_protect,
                initially_all_set: layout.manual_protect && layout.initially_set,
                ..DirtyLogConfig::default()
            },
            ..VmConfig::default()
        };
        let host = Arc::new(SimHostMemory::new());
        let backing = match layout.backing {
            BackingArg::Anonymous => Backing::Page4K,
            BackingArg::AnonymousThp | BackingArg::AnonymousHugetlb => Backing::Thp,
            BackingArg::AnonymousHugetlb1gb => Backing::HugeTlb1G,
        };
        let vm = Vm::new(config, host.clone());
        let mut regions = Vec::new();
        for i in 0..layout.slots {
            let hva = host
                .mmap(layout.slot_bytes(), backing, true)
                .map_err(|e| PerfError::side("vmmu", format!("host mmap: {e}")))?;
            let region = MemoryRegion {
                slot: 1 + i,
                flags: MemslotFlags::empty(),
                guest_phys_addr: DATA_GPA + u64::from(i) * layout.slot_bytes(),
                memory_size: layout.slot_bytes(),
                userspace_addr: hva.0,
            };
            vm.set_user_memory_region(region)
                .map_err(|e| PerfError::side("vmmu", format!("set_user_memory_region: {e}")))?;
            regions.push(region);
        }
        let mut vcpus = Vec::new();
        for _ in 0..layout.vcpus {
            vcpus.push(
                vm.create_vcpu()
                    .map_err(|e| PerfError::side("vmmu", format!("create_vcpu: {e}")))?,
            );
        }
        Ok(VmmuSide {
            vm,
            vcpus,
            regions,
            lists: vec![Vec::new(); layout.vcpus as usize],
            layout: *layout,
            mmu,
            eager_split,
            restart_scan,
            tolerate_mmio: false,
        })
    }

    /// Run every vCPU's list once (then again and again while `f` runs, if `repeat`),
    /// each on its own thread. Returns the time to the end of every first run and `f`'s
    /// value.
    fn run_during<R>(
        &mut self,
        repeat: bool,
        f: impl FnOnce(&SimVm, &mut Vec<MemoryRegion>) -> R,
    ) -> Result<(Duration, R), PerfError> {
        let n = self.vcpus.len();
        let start_line = Barrier::new(n + 1);
        let first_done = Barrier::new(n + 1);
        let stop = AtomicBool::new(false);
        let vm = &self.vm;
        let regions = &mut self.regions;
        let tolerate = self.tolerate_mmio;
        std::thread::scope(|s| {
            let workers: Vec<_> = self
                .vcpus
                .iter_mut()
                .zip(&self.lists)
                .map(|(vcpu, list)| {
                    let (start_line, first_done, stop) = (&start_line, &first_done, &stop);
                    s.spawn(move || -> Result<(), String> {
                        start_line.wait();
                        start_line.wait();
                        let first = run_list(vm, vcpu, list, tolerate);
                        first_done.wait();
                        first?;
                        while repeat && !stop.load(Ordering::Relaxed) {
                            run_list(vm, vcpu, list, tolerate)?;
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
            let r = f(vm, regions);
            stop.store(true, Ordering::Relaxed);
            let mut result = Ok(());
            for w in workers {
                let r = w
                    .join()
                    .unwrap_or_else(|_| Err("a vCPU thread panicked".into()));
                if result.is_ok() {
                    result = r;
                }
            }
            result
                .map(|()| (elapsed, r))
                .map_err(|e| PerfError::side("vmmu", e))
        })
    }
}

/// One vCPU's run through vmmu's CPU model.
/// With `tolerate_mmio`, an access that exits to MMIO (its slot is away) is skipped, as
/// a VMM would complete it and resume the guest.
fn run_list(vm: &SimVm, vcpu: &mut Vcpu, list: &[u64], tolerate_mmio: bool) -> Result<(), String> {
    for &e in list {
        let kind = if e & WRITE != 0 {
            AccessKind::Write
        } else {
            AccessKind::Read
        };
        match vm.access(vcpu, Gpa(e & !WRITE), kind) {
            Ok(_) => {}
            Err(vmmu::Exit::Mmio { .. }) if tolerate_mmio => {}
            Err(exit) => return Err(format!("guest access at {:#x}: {exit}", e & !WRITE)),
        }
    }
    Ok(())
}

fn set_flags(vm: &SimVm, regions: &mut [MemoryRegion], on: bool) -> Result<(), String> {
    for r in regions {
        r.flags = if on {
            MemslotFlags::LOG_DIRTY_PAGES
        } else {
            MemslotFlags::empty()
        };
        vm.set_user_memory_region(*r)
            .map_err(|e| format!("set_user_memory_region (LOG_DIRTY_PAGES): {e}"))?;
    }
    Ok(())
}

impl Side for VmmuSide {
    fn label(&self) -> String {
        let eager = if self.eager_split || self.mmu == MmuArg::Shadow {
            ""
        } else {
            "-no-eager-split"
        };
        let rmap = if self.restart_scan && self.mmu == MmuArg::Shadow {
            "-restart-scan"
        } else {
            ""
        };
        format!("vmmu-{}{eager}{rmap}", self.mmu.name())
    }

    fn run(&mut self, lists: &[Vec<u64>]) -> Result<Duration, PerfError> {
        self.lists = lists.to_vec();
        self.run_during(false, |_, _| ()).map(|(d, ())| d)
    }

    fn set_logging(&mut self, on: bool, running: bool) -> Result<Duration, PerfError> {
        let toggle = |vm: &SimVm, regions: &mut Vec<MemoryRegion>| {
            let start = Instant::now();
            set_flags(vm, regions, on).map(|()| start.elapsed())
        };
        let r = if running {
            self.run_during(true, toggle)?.1
        } else {
            toggle(&self.vm, &mut self.regions)
        };
        r.map_err(|e| PerfError::side("vmmu", e))
    }

    fn get_dirty_log(&mut self, i: usize, out: &mut [u64]) -> Result<(), PerfError> {
        self.vm
            .get_dirty_log(self.regions[i].slot, out)
            .map(drop)
            .map_err(|e| PerfError::side("vmmu", format!("get_dirty_log: {e}")))
    }

    fn clear_dirty_log(&mut self, i: usize, bitmap: &[u64]) -> Result<(), PerfError> {
        self.vm
            .clear_dirty_log(self.regions[i].slot, 0, self.layout.slot_pages(), bitmap)
            .map(drop)
            .map_err(|e| PerfError::side("vmmu", format!("clear_dirty_log: {e}")))
    }

    fn counters(&self) -> Counters {
        let s = self.vm.stats();
        let (split, rebuilt) = match self.mmu {
            MmuArg::Shadow => (None, None),
            _ => self.vm.with_tdp(|_, m| {
                let st = m.stats();
                (
                    Some(st.huge_split.load(Ordering::Relaxed)),
                    Some(st.huge_recovered.load(Ordering::Relaxed)),
                )
            }),
        };
        Counters {
            // Every EPT-violation exit (the TDP MMU counts its faults per vCPU).
            faults: Some(self.vcpus.iter().map(|v| v.exits).sum()),
            fast: Some(s.fast_page_faults),
            flushes: Some(s.remote_tlb_flushes),
            split,
            rebuilt,
            huge_now: None,
        }
    }

    fn mark_idle(&mut self, ranges: &[(u64, u64)]) -> Result<Duration, PerfError> {
        let hvas: Vec<(u64, u64)> = ranges
            .iter()
            .map(|&(gpa, size)| self.hva_ranges(gpa, size))
            .collect::<Vec<_>>()
            .concat();
        let start = Instant::now();
        for (hva, len) in hvas {
            self.vm
                .age_hva_range(Hva(hva), Hva(hva + len))
                .map_err(|e| PerfError::side("vmmu", format!("age_hva_range: {e}")))?;
        }
        Ok(start.elapsed())
    }

    fn idle_pages(&self, gpa: u64, size: u64) -> Result<u64, PerfError> {
        let mut idle = 0;
        for (hva, len) in self.hva_ranges(gpa, size) {
            for p in (hva..hva + len).step_by(4096) {
                let young = self
                    .vm
                    .test_age_hva_range(Hva(p), Hva(p + 4096))
                    .map_err(|e| PerfError::side("vmmu", format!("test_age_hva_range: {e}")))?;
                idle += u64::from(!young);
            }
        }
        Ok(idle)
    }

    fn discard(&mut self, gpa: u64, size: u64, chunk: u64) -> Result<Duration, PerfError> {
        let ranges = self.hva_ranges(gpa, size);
        let start = Instant::now();
        for (hva, len) in ranges {
            for at in (hva..hva + len).step_by(chunk as usize) {
                let end = (at + chunk).min(hva + len);
                self.vm
                    .unmap_hva_range(Hva(at), Hva(end))
                    .map_err(|e| PerfError::side("vmmu", format!("unmap_hva_range: {e}")))?;
            }
        }
        Ok(start.elapsed())
    }

    fn move_slot_while_running(
        &mut self,
        i: usize,
        to: u64,
        budget: Duration,
        active: bool,
    ) -> Result<(u64, Duration), PerfError> {
        self.tolerate_mmio = active;
        let r = self.run_during(true, |vm, regions| -> Result<(u64, Duration), String> {
            let home = regions[i];
            let away = MemoryRegion {
                guest_phys_addr: to,
                ..home
            };
            let deleted = |r: MemoryRegion| MemoryRegion {
                memory_size: 0,
                ..r
            };
            let start = Instant::now();
            let mut n = 0;
            while start.elapsed() < budget {
                for (from, dest) in [(home, away), (away, home)] {
                    vm.set_user_memory_region(deleted(from))
                        .and_then(|()| vm.set_user_memory_region(dest))
                        .map_err(|e| format!("set_user_memory_region (move): {e}"))?;
                }
                n += 1;
            }
            Ok((n, start.elapsed()))
        });
        self.tolerate_mmio = false;
        r?.1.map_err(|e| PerfError::side("vmmu", e))
    }

    fn pre_fault(&mut self, ranges: &[Option<(u64, u64)>]) -> Result<Duration, PerfError> {
        let barrier = Barrier::new(self.vcpus.len() + 1);
        let vm = &self.vm;
        std::thread::scope(|s| {
            let workers: Vec<_> = self
                .vcpus
                .iter_mut()
                .zip(ranges.iter().chain(std::iter::repeat(&None)))
                .map(|(vcpu, range)| {
                    let barrier = &barrier;
                    let range = *range;
                    s.spawn(move || -> Result<(), String> {
                        barrier.wait();
                        barrier.wait();
                        let Some((gpa, size)) = range else {
                            return Ok(());
                        };
                        vm.pre_fault_memory(vcpu, Gpa(gpa), size)
                            .map(drop)
                            .map_err(|e| format!("pre_fault_memory: {e}"))
                    })
                })
                .collect();
            // Every vCPU thread is up; the clock starts as they are released.
            barrier.wait();
            let start = Instant::now();
            barrier.wait();
            let mut result = Ok(());
            for w in workers {
                let r = w
                    .join()
                    .unwrap_or_else(|_| Err("a vCPU thread panicked".into()));
                if result.is_ok() {
                    result = r;
                }
            }
            result
                .map(|()| start.elapsed())
                .map_err(|e| PerfError::side("vmmu", e))
        })
    }
}

/// The host's KVM side.
#[cfg(feature = "kvm")]
pub struct KvmSide {
    vm: vmmu_kvm::perf::KvmPerfVm,
    stats_error: Option<String>,
}

#[cfg(feature = "kvm")]
impl KvmSide {
    /// Open `/dev/kvm` and build the VM.
    pub fn new(layout: &Layout, list_entries: u64) -> Result<Self, PerfError> {
        use vmmu_kvm::perf::{KvmPerfVm, PerfBacking, PerfConfig};
        let backing = match layout.backing {
            BackingArg::Anonymous => PerfBacking::Anonymous,
            BackingArg::AnonymousThp => PerfBacking::Thp,
            BackingArg::AnonymousHugetlb => PerfBacking::HugeTlb,
            BackingArg::AnonymousHugetlb1gb => {
                return Err(PerfError::Unsupported(
                    "anonymous_hugetlb_1gb: 1 GiB hugetlb pages are not set up on the KVM side"
                        .into(),
                ))
            }
        };
        let config = PerfConfig {
            vcpus: layout.vcpus,
            bytes_per_vcpu: layout.bytes_per_vcpu,
            slots: layout.slots,
            backing,
            manual_protect: layout.manual_protect,
            initially_set: layout.initially_set,
            list_entries,
        };
        let vm = KvmPerfVm::new(&config).map_err(PerfError::kvm)?;
        let stats_error = vm.stats().err();
        Ok(KvmSide { vm, stats_error })
    }

    /// Why there are no KVM counters, if there are none.
    pub fn stats_error(&self) -> Option<&str> {
        self.stats_error.as_deref()
    }

    /// Bytes of test memory the host backs with huge pages, if known.
    pub fn host_huge_bytes(&self) -> Option<u64> {
        self.vm.host_huge_bytes()
    }
}

#[cfg(feature = "kvm")]
impl Side for KvmSide {
    fn label(&self) -> String {
        "kvm".into()
    }

    fn run(&mut self, lists: &[Vec<u64>]) -> Result<Duration, PerfError> {
        for (i, l) in lists.iter().enumerate() {
            self.vm.set_list(i, l);
        }
        self.vm.run_all().map_err(PerfError::kvm)
    }

    fn set_logging(&mut self, on: bool, running: bool) -> Result<Duration, PerfError> {
        let toggle = |ops: &mut vmmu_kvm::perf::KvmOps| {
            let start = Instant::now();
            ops.set_logging(on).map(|()| start.elapsed())
        };
        let r = if running {
            self.vm.run_all_during(toggle).map_err(PerfError::kvm)?.1
        } else {
            toggle(self.vm.ops())
        };
        r.map_err(PerfError::kvm)
    }

    fn get_dirty_log(&mut self, i: usize, out: &mut [u64]) -> Result<(), PerfError> {
        self.vm.ops().get_dirty_log(i, out).map_err(PerfError::kvm)
    }

    fn clear_dirty_log(&mut self, i: usize, bitmap: &[u64]) -> Result<(), PerfError> {
        self.vm
            .ops()
            .clear_dirty_log(i, bitmap)
            .map_err(PerfError::kvm)
    }

    fn counters(&self) -> Counters {
        let Ok(s) = self.vm.stats() else {
            return Counters::default();
        };
        let fast = s.vcpus("pf_fast");
        let huge = match (s.vm("pages_2m"), s.vm("pages_1g")) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        Counters {
            faults: s.vcpus("pf_taken"),
            fast,
            // Requests, as vmmu counts them (`remote_tlb_flush` counts only those that
            // found a vCPU to kick).
            flushes: s.vm("remote_tlb_flush_requests"),
            split: None,
            rebuilt: None,
            huge_now: huge,
        }
    }

    fn mark_idle(&mut self, _: &[(u64, u64)]) -> Result<Duration, PerfError> {
        Err(PerfError::Unsupported(idle_tracking_why()))
    }

    fn idle_pages(&self, _: u64, _: u64) -> Result<u64, PerfError> {
        Err(PerfError::Unsupported(idle_tracking_why()))
    }

    fn discard(&mut self, gpa: u64, size: u64, chunk: u64) -> Result<Duration, PerfError> {
        let start = Instant::now();
        self.vm
            .ops()
            .discard(gpa, size, chunk)
            .map_err(PerfError::kvm)?;
        Ok(start.elapsed())
    }

    fn move_slot_while_running(
        &mut self,
        i: usize,
        to: u64,
        budget: Duration,
        active: bool,
    ) -> Result<(u64, Duration), PerfError> {
        if active {
            return Err(PerfError::Unsupported(
                "moving the slot the guest accesses makes its accesses exit to MMIO, which \
                 this guest's loop does not handle"
                    .into(),
            ));
        }
        let (_, r) = self
            .vm
            .run_all_during(|ops| -> Result<(u64, Duration), vmmu_kvm::Error> {
                let home = ops.slot_gpa(i);
                let start = Instant::now();
                let mut n = 0;
                while start.elapsed() < budget {
                    ops.move_slot(i, to)?;
                    ops.move_slot(i, home)?;
                    n += 1;
                }
                Ok((n, start.elapsed()))
            })
            .map_err(PerfError::kvm)?;
        r.map_err(PerfError::kvm)
    }

    fn pre_fault(&mut self, ranges: &[Option<(u64, u64)>]) -> Result<Duration, PerfError> {
        self.vm.pre_fault_all(ranges).map_err(PerfError::kvm)
    }
}

/// Why the KVM side does not mark memory idle: the selftest does it through the host's
/// idle page tracking (`/sys/kernel/mm/page_idle/bitmap`, whose writes reach KVM's
/// `clear_young` through the MMU notifier).
#[cfg(feature = "kvm")]
fn idle_tracking_why() -> String {
    if std::path::Path::new("/sys/kernel/mm/page_idle/bitmap").exists() {
        "marking memory idle through /sys/kernel/mm/page_idle is not implemented on the KVM \
         side"
            .into()
    } else {
        "the host has no idle page tracking (/sys/kernel/mm/page_idle/bitmap is absent: \
         CONFIG_IDLE_PAGE_TRACKING is off), through which the selftest ages KVM's SPTEs"
            .into()
    }
}
