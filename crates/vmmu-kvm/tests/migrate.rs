//! Pre-copy migration on the host's KVM (`vmmu_kvm::migrate`): the CPL-3 guest stores a
//! new byte each round into real memory, the VMM harvests in every dirty-log mode and
//! copies what it found; the destination must equal the guest's memory byte for byte.
//! The same rounds on vmmu's peer must find the same pages (the same workload, the same
//! bitmaps). Not run (and says so) where /dev/kvm cannot be opened, unless
//! VMMU_KVM_REQUIRE=1.

use std::time::Duration;

use vmmu_kvm::migrate::{migrate, Plan};
use vmmu_kvm::model::VmmuGuest;
use vmmu_kvm::{DirtyLog, HostBacking, Rng, SlotConfig};

#[test]
fn kvm_destination_is_identical_in_every_mode() {
    if let Err(e) = vmmu_kvm::kvm_available() {
        let msg = format!("kvm migrate: NOT RUN, nothing was compared: {e}");
        if std::env::var("VMMU_KVM_REQUIRE").is_ok_and(|v| v == "1") {
            panic!("{msg} (VMMU_KVM_REQUIRE=1)");
        }
        eprintln!("{msg}");
        return;
    }
    let plan = Plan {
        dirty_rate: 2_000_000,
        bandwidth: 1 << 30,
        downtime: Duration::from_micros(200),
        max_rounds: 6,
    };
    let mut migrations = 0;
    for log in [DirtyLog::Get, DirtyLog::GetClear, DirtyLog::Ring] {
        for backing in HostBacking::ALL {
            for seed in 0..2u64 {
                let slot = SlotConfig::new(8 << 20, backing, log);
                let npages = slot.pages();
                let pages = |seed: u64| {
                    move |round: u32, n: u64| {
                        let mut rng = Rng::new(seed * 1000 + round as u64);
                        // A hot tenth of the slot gets half the stores.
                        (0..n)
                            .map(|_| {
                                if rng.percent(50) {
                                    rng.below(npages / 10) * 10
                                } else {
                                    rng.below(npages)
                                }
                            })
                            .collect::<Vec<u64>>()
                    }
                };
                let mut kvm = vmmu_kvm::open_kvm(&slot).expect("KVM VM");
                let k = migrate(&mut *kvm, &plan, pages(seed)).expect("KVM migration");
                assert!(k.compared);
                assert_eq!(
                    k.differing_pages,
                    0,
                    "KVM {} {}: first differing page {:?}",
                    log.name(),
                    backing.name(),
                    k.first_difference
                );
                assert!(k.pages_sent.len() >= 2 && k.changed_pages > 0, "{k:?}");
                let mut v = VmmuGuest::new(&slot).expect("vmmu VM");
                let m = migrate(&mut v, &plan, pages(seed)).expect("vmmu migration");
                assert!(!m.compared);
                // The same stores find the same pages on both MMUs, round by round.
                assert_eq!(
                    k.pages_sent,
                    m.pages_sent,
                    "{} {}",
                    log.name(),
                    backing.name()
                );
                v.vm().audit().expect("vmmu audit");
                migrations += 1;
            }
        }
    }
    eprintln!("kvm migrate: {migrations} migrations identical on KVM, same pages on vmmu");
}
