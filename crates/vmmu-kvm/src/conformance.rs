//! Conformance: random write schedules, run on KVM and on vmmu round after round, every
//! harvested bitmap compared word for word.
//!
//! One VM per peer lives through all the rounds, so state carries over: pages written in
//! one round are write-protected, re-dirtied, cleared or left dirty in later ones. A round
//! is:
//!
//! 1. one to three guest runs, each a schedule of one kind: nothing; a few pages anywhere
//!    (the slot's first and last page among them at times); a cluster in a sub-range; many
//!    pages over the slot; a stride from a random page; a small hot set written many
//!    times. Lists are shuffled and padded with repeats, so pages come in random order and
//!    more than once; most pages are never touched.
//! 2. `KVM_GET_DIRTY_LOG` on both peers, compared; with the dirty ring, each peer's ring
//!    entries collected into a bitmap and `KVM_RESET_DIRTY_RINGS`, compared. In GET and
//!    ring modes, sometimes a second harvest at once (both must report nothing new).
//! 3. In GET + CLEAR mode, one of: clear everything GET reported; clear one to four
//!    sub-ranges (64-page aligned starts, lengths in 64-page units or up to the slot's
//!    end) with masks that keep some reported bits, add clean ones or set every bit; or
//!    no clear at all, so bits accumulate. Sometimes a GET right after, compared.
//!
//! 4. Once in a while (5% of rounds), logging goes off, the guest writes a random
//!    schedule (logged nowhere; over THP the slot may map 2 MiB again), and logging goes
//!    back on with an empty bitmap and the slot write-protected; the next round's writes
//!    must be logged again.
//!
//! Each round draws from its own generator, seeded from the run's seed and the round
//! number, so a reported mismatch names what to replay. Beside the peer-to-peer check,
//! each KVM bitmap is also checked against what the schedule and the clears imply (the
//! "oracle"); a difference there is reported, not failed on: it is a fact about KVM.

use std::fmt;

use crate::compare::Diff;
use crate::{DirtyLog, Error, GuestPaging, HostBacking, Peer, Rng, Schedule, SlotConfig};

/// A harvest where the two peers' bitmaps differ.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// The round (0-based).
    pub round: u64,
    /// Which harvest of the round: `get`, `get-again`, `get-after-clear`, `ring`,
    /// `ring-again`.
    pub step: &'static str,
    /// Where the bitmaps differ.
    pub diff: Diff,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "round {} {}: {}", self.round, self.step, self.diff)
    }
}

/// What a conformance run did and found.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// The slot both peers used.
    pub slot: SlotConfig,
    /// Rounds run.
    pub rounds: u64,
    /// The run's seed.
    pub seed: u64,
    /// Guest stores, repeats counted.
    pub writes: u64,
    /// Bitmaps compared.
    pub harvests: u64,
    /// `KVM_CLEAR_DIRTY_LOG` calls made on each peer.
    pub clears: u64,
    /// Times logging was turned off, written through, and turned on again.
    pub relogs: u64,
    /// Dirty bits KVM reported, summed over the harvests.
    pub dirty_bits: u64,
    /// Harvests whose bitmaps differ.
    pub mismatch_count: u64,
    /// The first few of them.
    pub mismatches: Vec<Mismatch>,
    /// Harvests where KVM's bitmap differs from what the schedule and clears imply.
    pub kvm_vs_oracle: u64,
}

impl Report {
    /// Whether every harvested bitmap was identical on both peers.
    pub fn identical(&self) -> bool {
        self.mismatch_count == 0
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.slot;
        write!(
            f,
            "mode {:<9} slot {} pages, host {}, guest pages {}: {} rounds (seed {:#x}), \
             {} writes, {} bitmaps compared ({} dirty bits), {} clears, {} relogs: ",
            s.log.name(),
            s.pages(),
            s.backing.name(),
            s.paging.name(),
            self.rounds,
            self.seed,
            self.writes,
            self.harvests,
            self.dirty_bits,
            self.clears,
            self.relogs
        )?;
        if self.identical() {
            write!(f, "all identical")?;
        } else {
            write!(f, "{} DIFFER", self.mismatch_count)?;
        }
        if self.kvm_vs_oracle != 0 {
            write!(
                f,
                "; KVM differs from the schedule in {} harvests",
                self.kvm_vs_oracle
            )?;
        }
        Ok(())
    }
}

/// The slots a conformance run covers, for each mode: 64 MiB of 2 MiB guest pages over
/// 4 KiB host pages, and over THP (so the slot maps 2 MiB while logging is off); and
/// 4133 pages (not a multiple of 64, so the last bitmap word is partial and a clear may
/// end at the slot's end with an odd length) under 4 KiB guest pages over THP.
///
/// The ring's slots have fewer pages than [`RING_BATCH`](crate::RING_BATCH), so the
/// distinct pages a round dirties always fit the ring: no round needs a harvest inside it.
pub fn standard_slots() -> Vec<SlotConfig> {
    let mut v = Vec::new();
    for log in [DirtyLog::Get, DirtyLog::GetClear, DirtyLog::Ring] {
        v.push(SlotConfig::new(64 << 20, HostBacking::Page4K, log));
        v.push(SlotConfig::new(64 << 20, HostBacking::Thp, log));
        v.push(SlotConfig {
            paging: GuestPaging::Page4K,
            ..SlotConfig::new((16 << 20) + 37 * 4096, HostBacking::Thp, log)
        });
    }
    v
}

/// How many mismatches a report keeps in full.
const KEEP: usize = 8;

/// The generator for round `round` of a run seeded `seed`.
pub fn round_rng(seed: u64, round: u64) -> Rng {
    let mut r = Rng::new(seed ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    r.next_u64();
    r
}

/// A random write schedule for a slot of `npages` (see the module docs).
pub fn random_schedule(rng: &mut Rng, npages: u64) -> Schedule {
    let kind = rng.below(100);
    let mut pages: Vec<u64> = match kind {
        0..10 => return Schedule::empty(),
        10..35 => {
            let mut v: Vec<u64> = (0..rng.range(1, 8)).map(|_| rng.below(npages)).collect();
            if rng.percent(20) {
                v.push(0);
            }
            if rng.percent(20) {
                v.push(npages - 1);
            }
            v
        }
        35..60 => {
            let len = rng.range(1, npages.min(4096));
            let start = rng.below(npages - len + 1);
            (0..rng.range(1, len))
                .map(|_| start + rng.below(len))
                .collect()
        }
        60..75 => (0..rng.range(1, (npages / 4).max(1)))
            .map(|_| rng.below(npages))
            .collect(),
        75..90 => {
            let first = rng.below(npages);
            let end = rng.range(first + 1, npages);
            return Schedule::Stride {
                first,
                end,
                step: rng.range(1, 64),
            };
        }
        _ => {
            let hot: Vec<u64> = (0..rng.range(1, 16)).map(|_| rng.below(npages)).collect();
            (0..rng.range(16, 512))
                .map(|_| hot[rng.below(hot.len() as u64) as usize])
                .collect()
        }
    };
    if rng.percent(30) {
        for _ in 0..rng.range(1, pages.len() as u64) {
            let p = pages[rng.below(pages.len() as u64) as usize];
            pages.push(p);
        }
    }
    rng.shuffle(&mut pages);
    Schedule::Pages(pages)
}

/// One `KVM_CLEAR_DIRTY_LOG` argument: a range and a mask.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Clear {
    first_page: u64,
    num_pages: u64,
    bitmap: Vec<u64>,
}

/// A valid random sub-range of a slot of `npages`: the start a multiple of 64, the length
/// a multiple of 64 or reaching the slot's end (KVM's rule).
fn random_range(rng: &mut Rng, npages: u64) -> (u64, u64) {
    let words = npages.div_ceil(64);
    let first_word = rng.below(words);
    let first_page = first_word * 64;
    let left = npages - first_page;
    let num_pages = if rng.percent(25) {
        left
    } else {
        (rng.range(1, words - first_word) * 64).min(left)
    };
    (first_page, num_pages)
}

/// The clears of one GET + CLEAR round, given what GET reported (`got`).
fn random_clears(rng: &mut Rng, npages: u64, got: &[u64]) -> Vec<Clear> {
    let kind = rng.below(100);
    if kind < 35 {
        return vec![Clear {
            first_page: 0,
            num_pages: npages,
            bitmap: got.to_vec(),
        }];
    }
    if kind >= 80 {
        return Vec::new();
    }
    (0..rng.range(1, 4))
        .map(|_| {
            let (first_page, num_pages) = random_range(rng, npages);
            let w0 = (first_page / 64) as usize;
            let nw = num_pages.div_ceil(64) as usize;
            let style = rng.below(3);
            let bitmap = (0..nw)
                .map(|k| match style {
                    0 => got[w0 + k] & rng.next_u64(), // some of the reported bits
                    1 => got[w0 + k] | rng.next_u64(), // and clean ones too
                    _ => u64::MAX,                     // every page of the range
                })
                .collect();
            Clear {
                first_page,
                num_pages,
                bitmap,
            }
        })
        .collect()
}

/// What KVM's bitmap should hold: pages written since they were last reported (GET) or
/// cleared (GET + CLEAR).
struct Oracle {
    bits: Vec<u64>,
}

impl Oracle {
    fn clear(&mut self, c: &Clear) {
        let w0 = (c.first_page / 64) as usize;
        for (k, m) in c.bitmap.iter().enumerate() {
            let left = c.num_pages - 64 * k as u64;
            let m = if left < 64 { m & ((1 << left) - 1) } else { *m };
            self.bits[w0 + k] &= !m;
        }
    }
}

/// Both peers and what a run keeps between harvests.
struct Run<'a> {
    kvm: &'a mut dyn Peer,
    vmmu: &'a mut dyn Peer,
    kvm_bits: Vec<u64>,
    vmmu_bits: Vec<u64>,
    oracle: Oracle,
    report: Report,
}

impl Run<'_> {
    /// GET (or the ring's entries and reset) on both peers; compare them with each other,
    /// and KVM with the oracle.
    fn harvest(&mut self, round: u64, step: &'static str) -> Result<(), Error> {
        if self.report.slot.log == DirtyLog::Ring {
            self.kvm_bits.fill(0);
            self.vmmu_bits.fill(0);
            self.kvm.harvest_ring(&mut self.kvm_bits)?;
            self.vmmu.harvest_ring(&mut self.vmmu_bits)?;
        } else {
            self.kvm.get_dirty_log(&mut self.kvm_bits)?;
            self.vmmu.get_dirty_log(&mut self.vmmu_bits)?;
        }
        let r = &mut self.report;
        r.harvests += 1;
        r.dirty_bits += self
            .kvm_bits
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum::<u64>();
        if let Some(diff) = Diff::find(&self.kvm_bits, &self.vmmu_bits) {
            r.mismatch_count += 1;
            if r.mismatches.len() < KEEP {
                r.mismatches.push(Mismatch { round, step, diff });
            }
        }
        if self.kvm_bits != self.oracle.bits {
            r.kvm_vs_oracle += 1;
        }
        // Go on from what KVM reported, so one oracle difference is counted once.
        if r.slot.log != DirtyLog::GetClear {
            self.oracle.bits.fill(0);
        } else {
            self.oracle.bits.copy_from_slice(&self.kvm_bits);
        }
        Ok(())
    }

    fn round(&mut self, round: u64) -> Result<(), Error> {
        let slot = self.report.slot;
        let npages = slot.pages();
        let mut rng = round_rng(self.report.seed, round);
        for _ in 0..rng.range(1, 3) {
            let s = random_schedule(&mut rng, npages);
            self.report.writes += s.len();
            s.mark(&mut self.oracle.bits);
            self.kvm.run(&s)?;
            self.vmmu.run(&s)?;
        }
        let first = if slot.log == DirtyLog::Ring {
            "ring"
        } else {
            "get"
        };
        self.harvest(round, first)?;
        match slot.log {
            DirtyLog::Get | DirtyLog::Ring => {
                if rng.percent(10) {
                    let again = if slot.log == DirtyLog::Ring {
                        "ring-again"
                    } else {
                        "get-again"
                    };
                    self.harvest(round, again)?;
                }
            }
            DirtyLog::GetClear => {
                for c in random_clears(&mut rng, npages, &self.kvm_bits) {
                    self.kvm
                        .clear_dirty_log(c.first_page, c.num_pages, &c.bitmap)?;
                    self.vmmu
                        .clear_dirty_log(c.first_page, c.num_pages, &c.bitmap)?;
                    self.oracle.clear(&c);
                    self.report.clears += 1;
                }
                if rng.percent(20) {
                    self.harvest(round, "get-after-clear")?;
                }
            }
            DirtyLog::Off => unreachable!("checked in `run`"),
        }
        if rng.percent(5) {
            self.kvm.set_dirty_logging(false)?;
            self.vmmu.set_dirty_logging(false)?;
            let s = random_schedule(&mut rng, npages);
            self.report.writes += s.len();
            self.kvm.run(&s)?;
            self.vmmu.run(&s)?;
            self.kvm.set_dirty_logging(true)?;
            self.vmmu.set_dirty_logging(true)?;
            self.oracle.bits.fill(0);
            self.report.relogs += 1;
        }
        Ok(())
    }
}

/// Run `rounds` random rounds on `kvm` and `vmmu` (built with the same [`SlotConfig`],
/// logging dirty pages) and compare every harvest.
///
/// # Panics
/// If the peers' configurations differ or the slot does not log.
pub fn run(
    kvm: &mut dyn Peer,
    vmmu: &mut dyn Peer,
    rounds: u64,
    seed: u64,
) -> Result<Report, Error> {
    let slot = *kvm.config();
    assert_eq!(slot, *vmmu.config(), "the peers must have the same slot");
    assert_ne!(slot.log, DirtyLog::Off, "conformance needs a logging slot");
    let words = slot.bitmap_words();
    let mut run = Run {
        kvm,
        vmmu,
        kvm_bits: vec![0; words],
        vmmu_bits: vec![0; words],
        oracle: Oracle {
            bits: vec![0; words],
        },
        report: Report {
            slot,
            rounds,
            seed,
            writes: 0,
            harvests: 0,
            clears: 0,
            relogs: 0,
            dirty_bits: 0,
            mismatch_count: 0,
            mismatches: Vec::new(),
            kvm_vs_oracle: 0,
        },
    };
    for round in 0..rounds {
        run.round(round)?;
    }
    Ok(run.report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_stay_in_the_slot_and_vary() {
        let mut rng = Rng::new(1);
        let (mut empty, mut repeats) = (0, 0);
        for npages in [1, 2, 64, 100, 16_421] {
            for _ in 0..500 {
                let s = random_schedule(&mut rng, npages);
                assert!(s.max_page().is_none_or(|m| m < npages), "{s:?}");
                empty += usize::from(s.is_empty());
                let mut v: Vec<u64> = s.pages().collect();
                let n = v.len();
                v.sort();
                v.dedup();
                repeats += usize::from(v.len() < n);
            }
        }
        assert!(empty > 0 && repeats > 0);
    }

    #[test]
    fn clear_ranges_follow_kvms_rule() {
        let mut rng = Rng::new(2);
        for npages in [1u64, 63, 64, 65, 1000, 4096] {
            for _ in 0..500 {
                let (first, num) = random_range(&mut rng, npages);
                assert_eq!(first % 64, 0);
                assert!(first < npages && num >= 1 && num <= npages - first);
                assert!(
                    num % 64 == 0 || first + num == npages,
                    "{npages} {first} {num}"
                );
            }
        }
    }

    #[test]
    fn oracle_clear_ignores_bits_past_the_range() {
        let mut o = Oracle {
            bits: vec![u64::MAX; 2],
        };
        o.clear(&Clear {
            first_page: 64,
            num_pages: 3,
            bitmap: vec![u64::MAX],
        });
        assert_eq!(o.bits, [u64::MAX, !0b111]);
    }
}
