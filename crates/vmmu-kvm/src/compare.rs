//! The same step on both peers: a harvest after the same writes, or fault-in and deletion
//! of a fresh slot; each peer's call timed on its own, the bitmaps compared word for word.

use std::fmt;
use std::time::Duration;

use crate::{DirtyLog, Error, Peer, Schedule, RING_BATCH};

/// Harvest the data slot as a VMM does in the slot's mode: `KVM_GET_DIRTY_LOG` into
/// `out`, with manual protect then a `KVM_CLEAR_DIRTY_LOG` of exactly what GET reported;
/// with a ring, the ring's entries into `out` (adding to its bits) and
/// `KVM_RESET_DIRTY_RINGS`. Returns the time of the calls together.
pub fn harvest(peer: &mut dyn Peer, out: &mut [u64]) -> Result<Duration, Error> {
    match peer.config().log {
        DirtyLog::Ring => peer.harvest_ring(out),
        log => {
            let mut t = peer.get_dirty_log(out)?;
            if log == DirtyLog::GetClear {
                let npages = peer.config().pages();
                t += peer.clear_dirty_log(0, npages, out)?;
            }
            Ok(t)
        }
    }
}

/// Run `schedule` on `peer` and harvest into `out` (which then holds every page the run
/// dirtied); returns the harvest time. With a ring, the run goes in pieces of at most
/// [`RING_BATCH`] pages, each followed by a harvest, as a VMM keeps a ring from filling;
/// the time is their sum (one harvest of the empty ring at ratio 0).
pub fn run_and_harvest(
    peer: &mut dyn Peer,
    schedule: &Schedule,
    out: &mut [u64],
) -> Result<Duration, Error> {
    if peer.config().log != DirtyLog::Ring {
        peer.run(schedule)?;
        return harvest(peer, out);
    }
    out.fill(0);
    let mut pieces = schedule.split(RING_BATCH);
    if pieces.is_empty() {
        pieces.push(Schedule::empty());
    }
    let mut t = Duration::ZERO;
    for piece in &pieces {
        peer.run(piece)?;
        t += peer.harvest_ring(out)?;
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
    let t_kvm = run_and_harvest(kvm, schedule, &mut bufs.kvm)?;
    let mut times = Vec::with_capacity(vmmu.len());
    for (peer, out) in vmmu.iter_mut().zip(&mut bufs.vmmu) {
        times.push(run_and_harvest(&mut **peer, schedule, out)?);
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

    #[test]
    fn a_ring_round_longer_than_the_batch_is_harvested_in_pieces() {
        use crate::model::VmmuGuest;
        use crate::{HostBacking, SlotConfig};
        // More pages than one batch: the round needs two harvests.
        let pages = RING_BATCH + 1000;
        let slot = SlotConfig::new(pages * 4096, HostBacking::Page4K, DirtyLog::Ring);
        let mut a = VmmuGuest::new(&slot).unwrap();
        let mut b = VmmuGuest::new(&slot).unwrap();
        let mut bufs = Bitmaps::new(slot.bitmap_words(), 1);
        let mut peers: [&mut dyn Peer; 1] = [&mut b];
        let all = Schedule::every_page(pages);
        let r = harvest_round(&mut a, &mut peers, &all, &mut bufs).unwrap();
        assert_eq!((r.writes, r.dirty), (pages, pages));
        assert_eq!(r.diff, [None]);
        // Everything was reset: writing a few pages again logs exactly those.
        let few = Schedule::Pages(vec![3, RING_BATCH + 7]);
        let r = harvest_round(&mut a, &mut peers, &few, &mut bufs).unwrap();
        assert_eq!(r.dirty, 2);
        assert_eq!(bufs.kvm[0], 1 << 3);
        // Nothing written: an empty ring is still harvested, and reports nothing.
        let r = harvest_round(&mut a, &mut peers, &Schedule::empty(), &mut bufs).unwrap();
        assert_eq!(r.dirty, 0);
        a.vm().audit().unwrap();
    }
}
