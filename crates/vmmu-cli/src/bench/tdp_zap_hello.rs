//! `tdp-zap-hello` (seed 002): the seed's "hello" VM — a tiny kernel that prints over a
//! serial port and shuts down — torn down on the TDP MMU. Guest memory is a 2 MiB slot at
//! gpa 0 (4 KiB host pages) plus a 64 KiB firmware ROM just below 4 GiB; the guest touches
//! what such a kernel touches: its page tables, code, data and stack pages, the reset
//! vector in the ROM, and the local APIC (an MMIO access). That gives the table shape the
//! seed counted for its first root: the root, one 1G table, two 2M tables (low memory and
//! the 3-4 GiB hole), and three 4K tables. Then every root is zapped in passes of
//! increasing level (VM teardown), and the iterator's positions (`loops`, the seed's
//! count), SPTE reads (`reads`) and the time (`ns`) are reported per iteration mode.
//!
//! The seed counted 9216 loops with `scan-all` over two roots (the second one, for SMM,
//! empty); vmmu has one root per VM, so the comparable figure is the first root's 7168.

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use vmmu::host::{Backing, SimHostMemory};
use vmmu::types::{AccessKind, Gpa};
use vmmu::{Exit, MemoryRegion, MemslotFlags, MmuKind, Vm, VmConfig};

use super::guest::TDP_MODES;
use super::names::tdp_zap_hello as names;
use super::{params, BenchConfig, BenchError, Context, Sample, Scenario};

/// Registry entry.
pub const SCENARIO: Scenario = Scenario {
    name: names::NAME,
    about: "tear down the seed's tiny \"hello\" VM on the TDP MMU: iterator loops, SPTE reads and ns per iteration mode (seed 002)",
    run,
};

const RAM: u64 = 2 << 20;
const ROM_GPA: u64 = 0xffff_0000;
const ROM: u64 = 64 << 10;
const LAPIC: u64 = 0xfee0_0000;

/// Pages of RAM a tiny kernel touches: page tables, code, data, stack.
const TOUCHED: [u64; 10] = [
    0x1000, 0x2000, 0x3000, 0x10_0000, 0x10_1000, 0x10_2000, 0x10_8000, 0x1f_d000, 0x1f_e000,
    0x1f_f000,
];

fn run(_config: &BenchConfig) -> Result<Vec<Sample>, BenchError> {
    let mut samples = Vec::new();
    for (mode, name) in TDP_MODES {
        let host = Arc::new(SimHostMemory::new());
        let ram = host.mmap(RAM, Backing::Page4K, true).context("host mmap")?;
        let rom = host
            .mmap(ROM, Backing::Page4K, false)
            .context("host mmap")?;
        let vm = Vm::new(
            VmConfig {
                mmu: MmuKind::Tdp(mode),
                ..VmConfig::default()
            },
            host,
        );
        for (slot, gpa, size, hva, flags) in [
            (0, 0, RAM, ram.0, MemslotFlags::empty()),
            (1, ROM_GPA, ROM, rom.0, MemslotFlags::READONLY),
        ] {
            vm.set_user_memory_region(MemoryRegion {
                slot,
                flags,
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: hva,
            })
            .context("set_user_memory_region")?;
        }
        let mut vcpu = vm.create_vcpu().context("create_vcpu")?;
        vm.access(&mut vcpu, Gpa(ROM_GPA + ROM - 16), AccessKind::Fetch)
            .context("reset vector")?;
        for gpa in TOUCHED {
            vm.access(&mut vcpu, Gpa(gpa), AccessKind::Write)
                .context("guest write")?;
        }
        match vm.access(&mut vcpu, Gpa(LAPIC + 0x30), AccessKind::Read) {
            Err(Exit::Mmio { .. }) => {}
            other => {
                return Err(BenchError::new(format!(
                    "LAPIC access should be MMIO, got {other:?}"
                )))
            }
        }
        let before = vm.with_tdp(|_, t| {
            let s = t.stats();
            (
                s.zap_loops.load(std::sync::atomic::Ordering::Relaxed),
                s.zap_reads.load(std::sync::atomic::Ordering::Relaxed),
            )
        });
        let start = Instant::now();
        vm.zap_all().context("zap_all")?;
        let ns = start.elapsed().as_nanos() as f64;
        let (loops, reads) = vm.with_tdp(|_, t| {
            let s = t.stats();
            (
                s.zap_loops.load(std::sync::atomic::Ordering::Relaxed),
                s.zap_reads.load(std::sync::atomic::Ordering::Relaxed),
            )
        });
        let p = || params([("touched_pages", json!(TOUCHED.len() + 1))]);
        samples.push(Sample::new(
            name,
            names::LOOPS,
            p(),
            (loops - before.0) as f64,
            "loops",
        ));
        samples.push(Sample::new(
            name,
            names::READS,
            p(),
            (reads - before.1) as f64,
            "sptes",
        ));
        samples.push(Sample::new(name, names::NS, p(), ns, "ns"));
    }
    Ok(samples)
}
