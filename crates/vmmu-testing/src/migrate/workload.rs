//! The write workloads a migrating guest runs: which page each access of each vCPU
//! touches, and whether it writes. Deterministic from a seed.

use std::sync::Arc;

use super::trace::Trace;

/// Which pages a vCPU's accesses touch.
#[derive(Clone, Debug)]
pub enum Workload {
    /// Every page equally likely.
    Uniform,
    /// Page after page, each vCPU starting at its share of the guest, wrapping.
    Sequential,
    /// A hot set of `hot_percent` of the pages (spread over the guest, one page in
    /// `100 / hot_percent`) gets `skew_percent` of the writes; the rest are uniform.
    HotSet {
        /// Size of the hot set, percent of the guest's pages (1..=100).
        hot_percent: u32,
        /// Share of the writes that go to the hot set, percent (0..=100).
        skew_percent: u32,
    },
    /// A recorded trace, replayed in order (each vCPU replays the records of its vCPU
    /// number modulo the trace's vCPUs, looping; pages modulo the guest's size).
    Trace(Arc<Trace>),
}

impl Workload {
    /// A short name for reports.
    pub fn name(&self) -> String {
        match self {
            Workload::Uniform => "uniform".into(),
            Workload::Sequential => "sequential".into(),
            Workload::HotSet {
                hot_percent,
                skew_percent,
            } => format!("hot{hot_percent}/{skew_percent}"),
            Workload::Trace(t) => format!("trace:{}", t.name),
        }
    }

    /// Check the parameters (before anything is allocated).
    pub fn check(&self) -> Result<(), String> {
        match self {
            Workload::HotSet {
                hot_percent,
                skew_percent,
            } => {
                if !(1..=100).contains(hot_percent) || *skew_percent > 100 {
                    return Err(format!(
                        "hot set {hot_percent}% with skew {skew_percent}%: the hot set must be \
                         1..=100% and the skew 0..=100%"
                    ));
                }
                Ok(())
            }
            Workload::Trace(t) if t.records.is_empty() => {
                Err(format!("trace {} has no records", t.name))
            }
            _ => Ok(()),
        }
    }
}

/// splitmix64: small, fast, good enough to pick pages.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// One vCPU's stream of accesses.
pub struct Stream {
    workload: Workload,
    npages: u64,
    rng: Rng,
    n: u64,
    start: u64,
    /// Trace replay: the records of this vCPU, by index into the trace.
    mine: Vec<u32>,
}

impl Stream {
    /// vCPU `vcpu` of `vcpus` on a guest of `npages` pages.
    pub fn new(workload: &Workload, npages: u64, vcpu: u32, vcpus: u32, seed: u64) -> Self {
        let mine = match workload {
            Workload::Trace(t) => {
                let tv = t.vcpus().max(1);
                let want = vcpu % tv;
                t.records
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.vcpu % tv == want)
                    .map(|(i, _)| i as u32)
                    .collect()
            }
            _ => Vec::new(),
        };
        Stream {
            workload: workload.clone(),
            npages,
            rng: Rng::new(seed ^ (vcpu as u64).wrapping_mul(0x2545_f491_4f6c_dd1d)),
            n: 0,
            start: npages * vcpu as u64 / vcpus.max(1) as u64,
            mine,
        }
    }

    /// The next access: (page, is a write).
    pub fn next_access(&mut self) -> (u64, bool) {
        let n = self.n;
        self.n += 1;
        let page = match &self.workload {
            Workload::Uniform => self.rng.below(self.npages),
            Workload::Sequential => (self.start + n) % self.npages,
            Workload::HotSet {
                hot_percent,
                skew_percent,
            } => {
                let step = (100 / *hot_percent as u64).max(1);
                let hot = self.npages.div_ceil(step);
                if self.rng.below(100) < *skew_percent as u64 {
                    (self.rng.below(hot) * step) % self.npages
                } else {
                    self.rng.below(self.npages)
                }
            }
            Workload::Trace(t) => {
                if self.mine.is_empty() {
                    // This vCPU has no records: it idles on reads of page 0.
                    return (0, false);
                }
                let r = &t.records[self.mine[(n % self.mine.len() as u64) as usize] as usize];
                return (r.page % self.npages, r.write);
            }
        };
        (page, true)
    }
}
