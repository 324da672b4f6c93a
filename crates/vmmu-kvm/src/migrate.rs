//! Pre-copy migration rounds on a [`Peer`]: the same protocol on the host's KVM (whose
//! guest memory is real: it is copied to a destination and compared byte for byte) and
//! on vmmu's peer (simulated host memory: its rounds and MMU time only).
//!
//! The peers run one vCPU synchronously, so the rounds alternate: the guest runs the
//! round's stores (each round stores a new byte value, so a page not sent again after a
//! store differs), then the VMM harvests in the slot's mode (GET; GET then CLEAR; the
//! ring read then `KVM_RESET_DIRTY_RINGS`, after at most [`RING_BATCH`] stores) and
//! copies the pages found. Time on the link is modelled: a round's stores are those the
//! guest makes at `dirty_rate` while the previous round's pages cross the link at
//! `bandwidth`, so the dirty rate meets the link as in a live migration. The migration
//! stops when the pages found cross within the downtime budget, or after `max_rounds`.
//!
//! The MMU time of a migration is the time of the guest's runs (its write faults, exits
//! included) and of the harvests: what KVM's MMU and vmmu's do for it, measured the way
//! [`crate::compare`] does.

use std::time::Duration;

use crate::{DirtyLog, Error, Peer, Schedule, RING_BATCH};

const PAGE: u64 = 4096;

/// One migration's parameters.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Guest stores per second.
    pub dirty_rate: u64,
    /// Link bytes per second (> 0).
    pub bandwidth: u64,
    /// The downtime budget.
    pub downtime: Duration,
    /// Most rounds after round 0.
    pub max_rounds: u32,
}

/// What a migration did on one peer.
#[derive(Clone, Debug, Default)]
pub struct PeerMigration {
    /// Pages sent per round, round 0 (everything) first, the stop-and-copy round last.
    pub pages_sent: Vec<u64>,
    /// Guest stores per round (round 0: none).
    pub stores: Vec<u64>,
    /// Whether the last round fit the downtime budget.
    pub converged: bool,
    /// Modelled time on the link, all rounds.
    pub link: Duration,
    /// Modelled downtime: the stop-and-copy round on the link.
    pub downtime: Duration,
    /// The guest's runs (stores, write faults, exits).
    pub run: Duration,
    /// The harvests.
    pub harvest: Duration,
    /// `Some(first differing page)`, `None` if identical; not compared (`compared` false)
    /// on a peer without real guest memory.
    pub first_difference: Option<u64>,
    /// Pages that differ.
    pub differing_pages: u64,
    /// Whether the destination was compared (the peer has real guest memory).
    pub compared: bool,
    /// Pages whose final contents differ from the prefill: the guest's stores really
    /// changed memory (so an identical destination is not a coincidence).
    pub changed_pages: u64,
}

impl PeerMigration {
    /// The MMU's time for the migration: runs and harvests.
    pub fn mmu_time(&self) -> Duration {
        self.run + self.harvest
    }
}

/// The prefill byte at offset `i` of the slot.
fn prefill(i: usize) -> u8 {
    (i as u64 / PAGE).wrapping_mul(0x9e37_79b9) as u8 ^ (i as u8)
}

fn link(pages: u64, bandwidth: u64) -> Duration {
    Duration::from_nanos(((pages * PAGE) as u128 * 1_000_000_000 / bandwidth.max(1) as u128) as u64)
}

/// Harvest the slot into `bitmap` (zeroed first) in the slot's mode.
fn harvest(peer: &mut dyn Peer, bitmap: &mut [u64], took: &mut Duration) -> Result<(), Error> {
    let npages = peer.config().pages();
    match peer.config().log {
        DirtyLog::Get => {
            bitmap.iter_mut().for_each(|w| *w = 0);
            *took += peer.get_dirty_log(bitmap)?;
        }
        DirtyLog::GetClear => {
            bitmap.iter_mut().for_each(|w| *w = 0);
            *took += peer.get_dirty_log(bitmap)?;
            *took += peer.clear_dirty_log(0, npages, bitmap)?;
        }
        // Ring: the caller accumulates into its bitmap across pieces.
        DirtyLog::Ring => *took += peer.harvest_ring(bitmap)?,
        DirtyLog::Off => {
            return Err(Error::KvmUnsupported(
                "migration needs a dirty-logging slot".into(),
            ))
        }
    }
    Ok(())
}

/// Run one migration on `peer` (its slot logging in the mode to migrate with);
/// `pages(round, n)` gives the `n` pages the guest stores to in `round`.
pub fn migrate(
    peer: &mut dyn Peer,
    plan: &Plan,
    mut pages: impl FnMut(u32, u64) -> Vec<u64>,
) -> Result<PeerMigration, Error> {
    let cfg = *peer.config();
    let npages = cfg.pages();
    let mut out = PeerMigration::default();
    // Prefill (the guest's memory before migration) and the destination.
    let mut dest = Vec::new();
    if let Some(mem) = peer.data_bytes() {
        for (i, b) in mem.iter_mut().enumerate() {
            *b = prefill(i);
        }
        dest = mem.to_vec();
        out.compared = true;
    }
    // Round 0: every page (the copy above).
    out.pages_sent.push(npages);
    out.stores.push(0);
    let mut last_link = link(npages, plan.bandwidth);
    out.link += last_link;
    let mut bitmap = vec![0u64; cfg.bitmap_words()];
    for round in 1.. {
        let n = ((plan.dirty_rate as u128 * last_link.as_nanos()) / 1_000_000_000) as u64;
        let n = n.min(4 * npages);
        // A new value each round: it differs from the previous round's.
        peer.set_store_value((round % 251 + 1) as u8);
        let list = pages(round, n);
        bitmap.iter_mut().for_each(|w| *w = 0);
        if cfg.log == DirtyLog::Ring {
            for piece in list.chunks(RING_BATCH as usize) {
                out.run += peer.run(&Schedule::Pages(piece.to_vec()))?;
                harvest(peer, &mut bitmap, &mut out.harvest)?;
            }
            if list.is_empty() {
                harvest(peer, &mut bitmap, &mut out.harvest)?;
            }
        } else {
            out.run += peer.run(&Schedule::Pages(list.clone()))?;
            harvest(peer, &mut bitmap, &mut out.harvest)?;
        }
        out.stores.push(list.len() as u64);
        let found: u64 = bitmap.iter().map(|w| w.count_ones() as u64).sum();
        if let Some(mem) = peer.data_bytes() {
            for (w, &bits) in bitmap.iter().enumerate() {
                let mut bits = bits;
                while bits != 0 {
                    let p = (w * 64) as u64 + bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    let r = (p * PAGE) as usize..((p + 1) * PAGE) as usize;
                    dest[r.clone()].copy_from_slice(&mem[r]);
                }
            }
        }
        out.pages_sent.push(found);
        last_link = link(found, plan.bandwidth);
        out.link += last_link;
        let fits = last_link <= plan.downtime;
        if fits || round > plan.max_rounds {
            // This round was the stop-and-copy: the guest does not run again.
            out.converged = fits;
            out.downtime = last_link;
            break;
        }
    }
    if let Some(mem) = peer.data_bytes() {
        for p in 0..npages {
            let r = (p * PAGE) as usize..((p + 1) * PAGE) as usize;
            if dest[r.clone()] != mem[r.clone()] {
                out.differing_pages += 1;
                out.first_difference.get_or_insert(p);
            }
            if mem[r.clone()].iter().zip(r).any(|(&b, i)| b != prefill(i)) {
                out.changed_pages += 1;
            }
        }
    }
    Ok(out)
}
