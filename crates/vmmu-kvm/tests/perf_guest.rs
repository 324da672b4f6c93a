//! The multi-vCPU guest of `vmmu perf` on the host's KVM: every vCPU's list runs, writes
//! land in the dirty log, reads do not. Skipped (with the reason printed) where
//! `/dev/kvm` cannot be opened.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use vmmu_kvm::perf::{KvmPerfVm, PerfBacking, PerfConfig, DATA_GPA, WRITE};

fn config() -> PerfConfig {
    PerfConfig {
        vcpus: 2,
        bytes_per_vcpu: 4 << 20,
        slots: 2,
        backing: PerfBacking::Anonymous,
        manual_protect: false,
        initially_set: false,
        list_entries: 1024,
    }
}

#[test]
fn two_vcpus_write_their_pages_and_the_log_has_exactly_those() {
    let mut vm = match KvmPerfVm::new(&config()) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("skipped: {e}");
            return;
        }
    };
    if let Ok(s) = vm.stats() {
        eprintln!("KVM VM stats: {:?}", s.vm);
    }
    vm.ops().set_logging(true).unwrap();
    // vCPU 0 writes pages 0, 2, 4 of its 4 MiB and reads page 1; vCPU 1 writes its page 7.
    let mb4 = 4u64 << 20;
    vm.set_list(
        0,
        &[
            DATA_GPA | WRITE,
            DATA_GPA + 4096,
            (DATA_GPA + 2 * 4096) | WRITE,
            (DATA_GPA + 4 * 4096) | WRITE,
        ],
    );
    vm.set_list(1, &[(DATA_GPA + mb4 + 7 * 4096) | WRITE]);
    vm.run_all().unwrap();
    let words = (vm.ops().slot_pages() / 64) as usize;
    // Two slots of 4 MiB: vCPU 0's memory is slot 1, vCPU 1's slot 2.
    let mut b0 = vec![0u64; words];
    let mut b1 = vec![0u64; words];
    vm.ops().get_dirty_log(0, &mut b0).unwrap();
    vm.ops().get_dirty_log(1, &mut b1).unwrap();
    // Page 1 was only read, but its first access faulted with logging on: KVM maps a read
    // fault writable where the guest and host allow it, and a writable SPTE in a logging
    // slot is logged (`make_spte`), so it may be reported too.
    assert_eq!(b0[0] & !0b10, 0b10101);
    assert!(b0[1..].iter().all(|&w| w == 0));
    assert_eq!(b1[0], 1 << 7);
    // Logging was cleared by GET: a second run of vCPU 1 alone dirties its page again.
    vm.set_list(0, &[]);
    vm.run_all().unwrap();
    vm.ops().get_dirty_log(1, &mut b1).unwrap();
    assert_eq!(b1[0], 1 << 7);
    let stats = vm.stats();
    if let Ok(s) = stats {
        assert_eq!(s.vcpus.len(), 2);
    }
}
