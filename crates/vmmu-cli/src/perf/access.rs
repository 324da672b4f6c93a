//! The guest's accesses, as the selftests' `memstress` guest makes them: each vCPU walks
//! its pages once per iteration, in order or (`-a`) at random, and writes each page with
//! probability `-w` percent (reads it otherwise). Here the walk is drawn on the host
//! before the phase starts, one list per vCPU, so both sides run exactly the same
//! accesses; the generator of vCPU `i` is seeded from `seed + i` (memstress seeds each
//! vCPU's from the test's seed and its index) and carries over between iterations.

use super::side::{Layout, DATA_GPA, WRITE};

/// How the vCPUs access their memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pattern {
    /// Percentage of accesses that write (0..=100).
    pub write_percent: u32,
    /// Pages in random order (with repeats) instead of address order.
    pub random: bool,
    /// Every vCPU walks all of the test memory instead of its own part (`-o`).
    pub overlap: bool,
}

impl Pattern {
    /// Populating: every page written once, in order (memstress forces 100% writes and
    /// sequential access for the populate pass).
    pub const POPULATE: Pattern = Pattern {
        write_percent: 100,
        random: false,
        overlap: false,
    };
}

// The generator: splitmix64, the one the migration workloads draw pages with.
use vmmu_testing::migrate::Rng;

/// Every vCPU's generator.
pub struct Accesses {
    rngs: Vec<Rng>,
}

impl Accesses {
    /// Generators for `vcpus` vCPUs from `seed`.
    pub fn new(seed: u64, vcpus: u32) -> Self {
        Accesses {
            rngs: (0..u64::from(vcpus))
                .map(|i| Rng::new(seed.wrapping_add(i)))
                .collect(),
        }
    }

    /// The first gpa and the pages vCPU `i` walks.
    pub fn range(layout: &Layout, pattern: Pattern, i: u32) -> (u64, u64) {
        if pattern.overlap {
            (DATA_GPA, layout.data_bytes() / 4096)
        } else {
            (
                DATA_GPA + u64::from(i) * layout.bytes_per_vcpu,
                layout.vcpu_pages(),
            )
        }
    }

    /// One iteration's lists, one per vCPU.
    pub fn lists(&mut self, layout: &Layout, pattern: Pattern) -> Vec<Vec<u64>> {
        self.rngs
            .iter_mut()
            .enumerate()
            .map(|(i, rng)| {
                let (base, pages) = Self::range(layout, pattern, i as u32);
                (0..pages)
                    .map(|j| {
                        let page = if pattern.random { rng.below(pages) } else { j };
                        let write = pattern.write_percent >= 100
                            || rng.below(100) < u64::from(pattern.write_percent);
                        (base + page * 4096) | if write { WRITE } else { 0 }
                    })
                    .collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perf::BackingArg;

    fn layout(vcpus: u32) -> Layout {
        Layout {
            vcpus,
            bytes_per_vcpu: 64 * 4096,
            slots: 1,
            backing: BackingArg::Anonymous,
            manual_protect: true,
            initially_set: true,
        }
    }

    #[test]
    fn partitioned_sequential_writes_cover_each_vcpus_own_pages() {
        let l = layout(2);
        let lists = Accesses::new(1, 2).lists(&l, Pattern::POPULATE);
        assert_eq!(lists.len(), 2);
        for (i, list) in lists.iter().enumerate() {
            assert_eq!(list.len(), 64);
            for (j, &e) in list.iter().enumerate() {
                assert_eq!(e, (DATA_GPA + (i as u64 * 64 + j as u64) * 4096) | WRITE);
            }
        }
    }

    #[test]
    fn random_reads_and_writes_stay_in_range_and_follow_the_percentage() {
        let l = layout(2);
        let p = Pattern {
            write_percent: 30,
            random: true,
            overlap: true,
        };
        let mut a = Accesses::new(7, 2);
        let lists = a.lists(&l, p);
        let all: Vec<u64> = lists.concat();
        let writes = all.iter().filter(|&&e| e & WRITE != 0).count();
        assert_eq!(all.len(), 256);
        assert!(writes > 40 && writes < 120, "{writes} of {}", all.len());
        assert!(all
            .iter()
            .all(|&e| (DATA_GPA..DATA_GPA + 128 * 4096).contains(&(e & !WRITE))));
        // The generators carry over: the next iteration differs; the same seed repeats.
        assert_ne!(a.lists(&l, p), lists);
        assert_eq!(Accesses::new(7, 2).lists(&l, p), lists);
    }
}
