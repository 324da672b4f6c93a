//! The same step on both peers: a harvest after the same writes, or fault-in and deletion
//! of a fresh slot; each peer's call timed on its own, the bitmaps compared word for word.

use std::fmt;
use std::time::Duration;

use crate::{DirtyLog, Error, Peer, Schedule};

/// Harvest the data slot as a VMM does in the slot's mode: `KVM_GET_DIRTY_LOG` into
/// `out`, and with manual protect a `KVM_CLEAR_DIRTY_LOG` of exactly what GET reported.
/// Returns the time of the ioctl(s) together.
pub fn harvest(peer: &mut dyn Peer, out: &mut [u64]) -> Result<Duration, Error> {
    let mut t = peer.get_dirty_log(out)?;
    if peer.config().log == DirtyLog::GetClear {
        let npages = peer.config().pages();
        t += peer.clear_dirty_log(0, npages, out)?;
    }
    Ok(t)
}

/// Where two bitmaps first differ.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diff {
    /// Index of the first differing word.
    pub word: usize,
    /// KVM's word.
    pub kvm: u64,
    /// vmmu's word.
    pub vmmu: u64,
    /// Number of differing words.
    pub words: usize,
}

impl Diff {
    /// The first difference between `kvm` and `vmmu`, if any.
    pub fn find(kvm: &[u64], vmmu: &[u64]) -> Option<Diff> {
        let mut diffs = kvm
            .iter()
            .zip(vmmu)
            .enumerate()
            .filter(|(_, (a, b))| a != b);
        let (word, (&k, &v)) = diffs.next()?;
        Some(Diff {
            word,
            kvm: k,
            vmmu: v,
            words: 1 + diffs.count(),
        })
    }

    /// Pages dirty in one bitmap and not the other, within the first differing word.
    pub fn pages(&self) -> (Vec<u64>, Vec<u64>) {
        let bits = |m: u64| -> Vec<u64> {
            (0..64)
                .filter(|b| m >> b & 1 == 1)
                .map(|b| self.word as u64 * 64 + b)
                .collect()
        };
        (bits(self.kvm & !self.vmmu), bits(self.vmmu & !self.kvm))
    }
}

impl fmt::Display for Diff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kvm_only, vmmu_only) = self.pages();
        write!(
            f,
            "{} word(s) differ; first at word {} (pages {}..{}): kvm {:#018x}, vmmu {:#018x}; \
             dirty only on kvm: {kvm_only:?}, only on vmmu: {vmmu_only:?}",
            self.words,
            self.word,
            self.word * 64,
            self.word * 64 + 64,
            self.kvm,
            self.vmmu
        )
    }
}

/// One measured harvest on KVM and on each vmmu peer.
#[derive(Clone, Debug, PartialEq)]
pub struct HarvestRound {
    /// Pages the schedule stored to (repeats counted).
    pub writes: u64,
    /// Pages KVM reported dirty.
    pub dirty: u64,
    /// KVM's harvest time.
    pub kvm: Duration,
    /// Each vmmu peer's harvest time, in the order given.
    pub vmmu: Vec<Duration>,
    /// Where each vmmu peer's bitmap differs from KVM's, if it does.
    pub diff: Vec<Option<Diff>>,
}

/// Bitmaps for harvesting a slot on KVM and on vmmu peers, reused round after round.
pub struct Bitmaps {
    /// KVM's.
    pub kvm: Vec<u64>,
    /// Each vmmu peer's.
    pub vmmu: Vec<Vec<u64>>,
}

impl Bitmaps {
    /// Zeroed bitmaps of `words` words: KVM's and `peers` vmmu ones.
    pub fn new(words: usize, peers: usize) -> Self {
        Bitmaps {
            kvm: vec![0; words],
            vmmu: vec![vec![0; words]; peers],
        }
    }
}

/// Run `schedule` and harvest (timed) on KVM, then on each vmmu peer in turn, and compare
/// each vmmu bitmap with KVM's. Each harvest follows its own peer's run directly, so none
/// finds its caches cooled by another's run.
pub fn harvest_round(
    kvm: &mut dyn Peer,
    vmmu: &mut [&mut dyn Peer],
    schedule: &Schedule,
    bufs: &mut Bitmaps,
) -> Result<HarvestRound, Error> {
    assert_eq!(vmmu.len(), bufs.vmmu.len(), "one bitmap per vmmu peer");
    kvm.run(schedule)?;
    let t_kvm = harvest(kvm, &mut bufs.kvm)?;
    let mut times = Vec::with_capacity(vmmu.len());
    for (peer, out) in vmmu.iter_mut().zip(&mut bufs.vmmu) {
        peer.run(schedule)?;
        times.push(harvest(&mut **peer, out)?);
    }
    Ok(HarvestRound {
        writes: schedule.len(),
        dirty: bufs.kvm.iter().map(|w| u64::from(w.count_ones())).sum(),
        kvm: t_kvm,
        vmmu: times,
        diff: bufs.vmmu.iter().map(|v| Diff::find(&bufs.kvm, v)).collect(),
    })
}

/// First touch of every page of a fresh slot, then deletion of the fully mapped slot.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaultDelete {
    /// Pages written (every page of the slot once).
    pub pages: u64,
    /// The guest's run over them (every fault, with entries and exits).
    pub fault: Duration,
    /// `KVM_SET_USER_MEMORY_REGION` deleting the slot.
    pub delete: Duration,
}

impl FaultDelete {
    /// Fault-in cost per page, in nanoseconds.
    pub fn fault_ns_per_page(&self) -> f64 {
        self.fault.as_nanos() as f64 / self.pages.max(1) as f64
    }
}

/// Write every page of `peer`'s fresh slot once (timed), then delete the slot (timed).
pub fn fault_in_and_delete(peer: &mut dyn Peer) -> Result<FaultDelete, Error> {
    let pages = peer.config().pages();
    let fault = peer.run(&Schedule::every_page(pages))?;
    let delete = peer.delete_slot()?;
    Ok(FaultDelete {
        pages,
        fault,
        delete,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_names_the_pages() {
        assert_eq!(Diff::find(&[1, 2], &[1, 2]), None);
        let d = Diff::find(&[0, 0b101, 7], &[0, 0b110, 0]).unwrap();
        assert_eq!((d.word, d.words), (1, 2));
        assert_eq!(d.pages(), (vec![64], vec![65]));
        assert!(d.to_string().contains("only on kvm: [64]"), "{d}");
    }
}
