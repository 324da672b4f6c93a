//! KVM conformance: random write schedules on the host's KVM and on vmmu, every harvested
//! dirty bitmap compared. See `vmmu_kvm::conformance` for what a round does.
//!
//! `VMMU_KVM_ROUNDS` sets the rounds per slot configuration (default 100) and
//! `VMMU_KVM_SEED` the seed. Where `/dev/kvm` cannot be opened the test compares nothing
//! and says so on stderr (bypassing the test harness's capture); with
//! `VMMU_KVM_REQUIRE=1` it fails instead.

use std::io::Write;

use vmmu_kvm::conformance::{self, Report};
use vmmu_kvm::model::VmmuGuest;

/// Straight to stderr: `eprintln!` output of a passing test is captured and never shown.
fn say(msg: &str) {
    let mut e = std::io::stderr();
    let _ = writeln!(e, "{msg}");
    let _ = e.flush();
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
        }
        Err(_) => default,
    }
}

#[test]
fn kvm_and_vmmu_harvest_identical_bitmaps() {
    if let Err(e) = vmmu_kvm::kvm_available() {
        let msg = format!("kvm conformance: NOT RUN, nothing was compared: {e}");
        if std::env::var("VMMU_KVM_REQUIRE").is_ok_and(|v| v == "1") {
            panic!("{msg} (VMMU_KVM_REQUIRE=1)");
        }
        say(&msg);
        return;
    }
    let rounds = env_u64("VMMU_KVM_ROUNDS", 100);
    let seed = env_u64("VMMU_KVM_SEED", 0x766d_6d75);
    let mut reports: Vec<Report> = Vec::new();
    for (i, slot) in conformance::standard_slots().iter().enumerate() {
        let mut kvm = vmmu_kvm::open_kvm(slot).expect("KVM VM");
        let mut vmmu = VmmuGuest::new(slot).expect("vmmu VM");
        let report = conformance::run(&mut *kvm, &mut vmmu, rounds, seed + i as u64)
            .expect("conformance run");
        vmmu.vm().audit().expect("vmmu audit after the run");
        say(&format!("kvm conformance: {report}"));
        reports.push(report);
    }
    let harvests: u64 = reports.iter().map(|r| r.harvests).sum();
    say(&format!(
        "kvm conformance: {harvests} bitmaps compared over {} configurations",
        reports.len()
    ));
    for r in &reports {
        assert!(r.harvests >= r.rounds);
        for m in &r.mismatches {
            say(&format!(
                "kvm conformance: MISMATCH {}: {m}",
                r.slot.log.name()
            ));
        }
        assert!(r.identical(), "{r}");
    }
}

/// A vmmu peer that silently drops the guest's writes to some pages: what a lost dirty
/// bit looks like. Shows the comparison is not vacuous (needs no KVM).
struct LosesWrites(VmmuGuest);

impl vmmu_kvm::Peer for LosesWrites {
    fn name(&self) -> &'static str {
        "loses-writes"
    }
    fn config(&self) -> &vmmu_kvm::SlotConfig {
        self.0.config()
    }
    fn run(&mut self, s: &vmmu_kvm::Schedule) -> Result<std::time::Duration, vmmu_kvm::Error> {
        let kept = s.pages().filter(|p| p % 97 != 3).collect();
        self.0.run(&vmmu_kvm::Schedule::Pages(kept))
    }
    fn get_dirty_log(&mut self, out: &mut [u64]) -> Result<std::time::Duration, vmmu_kvm::Error> {
        self.0.get_dirty_log(out)
    }
    fn clear_dirty_log(
        &mut self,
        first_page: u64,
        num_pages: u64,
        bitmap: &[u64],
    ) -> Result<std::time::Duration, vmmu_kvm::Error> {
        self.0.clear_dirty_log(first_page, num_pages, bitmap)
    }
    fn harvest_ring(&mut self, out: &mut [u64]) -> Result<std::time::Duration, vmmu_kvm::Error> {
        self.0.harvest_ring(out)
    }
    fn set_dirty_logging(&mut self, on: bool) -> Result<std::time::Duration, vmmu_kvm::Error> {
        self.0.set_dirty_logging(on)
    }
    fn delete_slot(&mut self) -> Result<std::time::Duration, vmmu_kvm::Error> {
        self.0.delete_slot()
    }
}

#[test]
fn a_peer_that_loses_writes_is_caught() {
    for slot in conformance::standard_slots() {
        let mut good = VmmuGuest::new(&slot).unwrap();
        let mut bad = LosesWrites(VmmuGuest::new(&slot).unwrap());
        let r = conformance::run(&mut good, &mut bad, 30, 1).unwrap();
        assert!(!r.identical(), "{r}");
        assert!(!r.mismatches.is_empty());
        // And two faithful peers agree.
        let mut a = VmmuGuest::new(&slot).unwrap();
        let mut b = VmmuGuest::new(&slot).unwrap();
        let r = conformance::run(&mut a, &mut b, 30, 1).unwrap();
        assert!(r.identical() && r.kvm_vs_oracle == 0, "{r}");
    }
}
