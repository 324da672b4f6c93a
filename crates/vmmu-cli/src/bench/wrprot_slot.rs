//! `wrprot-slot` (seed 004): the cost of `KVM_GET_DIRTY_LOG` — harvesting the dirty bitmap
//! and write-protecting the harvested pages again — by how write protection finds the
//! SPTEs: through each dirty gfn's reverse map (`per-gfn`), by walking every shadow page
//! (`walk-pages`), by seed 004's rule choosing between them (`kvm-2012`: per gfn when there
//! are fewer dirty pages than shadow pages), or by vmmu's cost estimate (`adaptive`).
//!
//! Per variant and dirty `ratio`, on a fresh VM with a `--mem-gib` GiB slot on 4 KiB host
//! pages (untimed): the guest writes every page (fault-in), LOG_DIRTY_PAGES goes on (which
//! write-protects the whole slot), and the guest writes `ratio` of the pages, distinct and
//! chosen at random (the same pages for every variant). Timed: one `get_dirty_log` in the
//! default mode (copy and clear the bitmap, write-protect, flush).
//!
//! Which method `kvm-2012` and `adaptive` chose at each ratio goes to stderr.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use vmmu::types::AccessKind;
use vmmu::{Algorithms, DirtyWrprot, MmuKind, VmConfig};

use super::dirty_ratio::{dirty_count, random_pages, ratio_params, RATIOS};
use super::guest::{Guest, HostBacking, SLOT};
use super::names::wrprot_slot as names;
use super::{BenchConfig, BenchError, Context, Sample, Scenario};

/// Registry entry.
pub const SCENARIO: Scenario = Scenario {
    name: names::NAME,
    about: "GET_DIRTY_LOG with write protection per dirty gfn vs walking the shadow pages vs the rules choosing (us), by dirty ratio",
    run,
};

const VARIANTS: [(&str, DirtyWrprot); 4] = [
    (names::PER_GFN, DirtyWrprot::PerGfn),
    (names::WALK_PAGES, DirtyWrprot::WalkPages),
    (names::KVM_2012, DirtyWrprot::Kvm2012),
    (names::ADAPTIVE, DirtyWrprot::Adaptive),
];

fn run(config: &BenchConfig) -> Result<Vec<Sample>, BenchError> {
    let mut samples = Vec::new();
    // Variant -> the method it used at each ratio, for the stderr note.
    let mut chosen: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for ratio in RATIOS {
        for (name, dirty_wrprot) in VARIANTS {
            let (us, how) = get_dirty_log_us(config, dirty_wrprot, ratio)?;
            samples.push(Sample::new(
                name,
                names::US,
                ratio_params(config, ratio),
                us,
                "us",
            ));
            if matches!(dirty_wrprot, DirtyWrprot::Kvm2012 | DirtyWrprot::Adaptive) {
                chosen
                    .entry(name)
                    .or_default()
                    .push(format!("{ratio}={}", method_name(how)));
            }
        }
    }
    let note: Vec<String> = chosen
        .iter()
        .map(|(name, v)| format!("{name} chose {}", v.join(" ")))
        .collect();
    note_once(&format!("wrprot-slot: {}", note.join("; ")));
    Ok(samples)
}

/// One measurement on a fresh VM (see the module doc): the time of the GET, and how it
/// write-protected.
fn get_dirty_log_us(
    config: &BenchConfig,
    dirty_wrprot: DirtyWrprot,
    ratio: f64,
) -> Result<(f64, Option<DirtyWrprot>), BenchError> {
    let vm_config = VmConfig {
        // The seeds' mechanisms live in the shadow MMU (KVM's mmu.c).
        mmu: MmuKind::ShadowDirect,
        algorithms: Algorithms {
            dirty_wrprot,
            ..Algorithms::default()
        },
        ..VmConfig::default()
    };
    let mut guest = Guest::with_vm_config(config, HostBacking::Page4K, vm_config)?;
    guest.write_every_page()?;
    guest.set_logging(true)?;
    let dirty = random_pages(guest.pages, dirty_count(guest.pages, ratio));
    for &page in &dirty {
        guest.access_page(page, AccessKind::Write)?;
    }
    // Filled, not zeroed, so its memory is touched now and not on the first copy-out.
    let mut bitmap = vec![u64::MAX; guest.pages.div_ceil(64) as usize];

    let start = Instant::now();
    let report = guest
        .vm
        .get_dirty_log(SLOT, &mut bitmap)
        .context("get_dirty_log")?;
    let elapsed = start.elapsed();

    if report.dirty_pages != dirty.len() as u64 {
        return Err(BenchError::new(format!(
            "wrprot-slot: wrote {} distinct pages, get_dirty_log reported {}",
            dirty.len(),
            report.dirty_pages
        )));
    }
    Ok((elapsed.as_nanos() as f64 / 1e3, report.wrprot))
}

fn method_name(how: Option<DirtyWrprot>) -> &'static str {
    match how {
        None => "none",
        Some(DirtyWrprot::PerGfn) => "per-gfn",
        Some(DirtyWrprot::WalkPages) => "walk-pages",
        Some(DirtyWrprot::Kvm2012) => "kvm-2012",
        Some(DirtyWrprot::Adaptive) => "adaptive",
    }
}

/// Prints `line` to stderr unless it is the line printed last: the choices are the same
/// every run, so `--runs` repeats would only add noise.
fn note_once(line: &str) {
    static LAST: Mutex<String> = Mutex::new(String::new());
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if *last != line {
        eprintln!("{line}");
        line.clone_into(&mut last);
    }
}
