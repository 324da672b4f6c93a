//! The vmmu side of `vmmu kvm compare`'s harvest, alone, for profiling and for comparing
//! variants of the harvest in one sitting (no /dev/kvm needed):
//!
//! ```sh
//! cargo run --release -p vmmu-kvm --example harvest_prof -- RATIO [get|clear|ring] [ROUNDS] [shadow|tdp]
//! ```
//!
//! A 1 GiB slot at 4 KiB, every page written and harvested once, then ROUNDS rounds of
//! writing every round(1/RATIO)-th page (as kvm compare's guest does) and harvesting (GET,
//! or GET + CLEAR of what GET reported, or the ring's entries and its reset, every 32,768
//! pages). Prints the mean and the minimum harvest time.
//! `WRPROT=pergfn|walk` forces the shadow MMU's write-protection method; `EVICT=1` writes
//! 64 MiB between rounds, so the harvest finds its caches as cold as after KVM's turn.

use std::time::Duration;
use vmmu_kvm::compare::run_and_harvest;
use vmmu_kvm::model::VmmuGuest;
use vmmu_kvm::{DirtyLog, HostBacking, Schedule, SlotConfig};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ratio: f64 = args.get(1).map(|s| s.parse().unwrap()).unwrap_or(0.01);
    let mode = match args.get(2).map(|s| s.as_str()) {
        Some("clear") => DirtyLog::GetClear,
        Some("ring") => DirtyLog::Ring,
        _ => DirtyLog::Get,
    };
    let iters: usize = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(200);
    let mmu = args.get(4).cloned().unwrap_or_default();
    let cfg = SlotConfig::new(1 << 30, HostBacking::Page4K, mode);
    let vmc = match mmu.as_str() {
        "tdp" => vmmu::VmConfig {
            mmu: vmmu::MmuKind::Tdp(vmmu::TdpIteration::SkipNonPresent),
            ..Default::default()
        },
        _ => vmmu::VmConfig::default(),
    };
    let vmc = match std::env::var("WRPROT").as_deref() {
        Ok("pergfn") => vmmu::VmConfig {
            algorithms: vmmu::Algorithms {
                dirty_wrprot: vmmu::DirtyWrprot::PerGfn,
                ..Default::default()
            },
            ..vmc
        },
        Ok("walk") => vmmu::VmConfig {
            algorithms: vmmu::Algorithms {
                dirty_wrprot: vmmu::DirtyWrprot::WalkPages,
                ..Default::default()
            },
            ..vmc
        },
        _ => vmc,
    };
    let mut g = VmmuGuest::with_vm_config(&cfg, vmc).unwrap();
    let npages = cfg.pages();
    let mut out = vec![0u64; cfg.bitmap_words()];
    run_and_harvest(&mut g, &Schedule::every_page(npages), &mut out).unwrap();
    let s = Schedule::for_ratio(npages, ratio);
    let mut tot = Duration::ZERO;
    let mut min = Duration::MAX;
    let evict = std::env::var_os("EVICT").is_some();
    let mut junk = vec![0u64; 64 << 17];
    for i in 0..iters {
        if evict {
            for (k, w) in junk.iter_mut().enumerate().step_by(8) {
                *w = w.wrapping_add(k as u64 ^ i as u64);
            }
        }
        let t = run_and_harvest(&mut g, &s, &mut out).unwrap();
        tot += t;
        min = min.min(t);
    }
    std::hint::black_box(&junk);
    println!(
        "ratio {ratio} {mode:?} {mmu}: mean {:.1} us min {:.1} us",
        tot.as_secs_f64() * 1e6 / iters as f64,
        min.as_secs_f64() * 1e6
    );
}
