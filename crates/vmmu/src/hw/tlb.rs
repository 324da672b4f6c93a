//! A per-vCPU TLB: translations stay cached until the vCPU handles a flush request, so a
//! missing flush shows up as a stale translation, as on hardware.
//!
//! Three direct-mapped arrays, one per page size. An entry caches the leaf's permissions
//! and whether its dirty bit was already set: a write through an entry filled by a read
//! re-walks to set D, as x86 CPUs do.

use alloc::boxed::Box;

use crate::types::{AccessKind, Gfn, Level, Pfn};

/// A cached translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlbEntry {
    /// First gfn of the leaf page, plus one (0 = empty slot).
    tag: u64,
    /// First pfn of the leaf page.
    pub pfn: Pfn,
    /// Leaf level.
    pub level: Level,
    /// Writable.
    pub writable: bool,
    /// Executable.
    pub executable: bool,
    /// The leaf's D bit was set when the entry was filled.
    pub dirty: bool,
    /// User-accessible (shadow paging; always true for EPT).
    pub user: bool,
    /// Shadow paging: the first guest frame of the leaf page (what the guest's tables
    /// translated the virtual page to). Unused for EPT, where the tag is the gfn.
    pub gfn: Gfn,
    /// The TLB generation the entry was filled in (see [`Tlb::flush`]).
    gen: u32,
}

const EMPTY: TlbEntry = TlbEntry {
    tag: 0,
    pfn: Pfn(0),
    level: Level::L4K,
    writable: false,
    executable: false,
    dirty: false,
    user: false,
    gfn: Gfn(0),
    gen: 0,
};

const SETS: [usize; 3] = [1024, 64, 8];
/// Where each page size's sets start in the one array.
const OFFSETS: [usize; 3] = [0, SETS[0], SETS[0] + SETS[1]];
const TOTAL: usize = SETS[0] + SETS[1] + SETS[2];

/// The TLB.
pub struct Tlb {
    /// The sets of every page size, one array (a fixed size: the masked indices need no
    /// bounds checks).
    sets: Box<[TlbEntry; TOTAL]>,
    /// Current generation (never 0: empty entries have generation 0).
    gen: u32,
    hits: u64,
    misses: u64,
    flushes: u64,
}

impl Default for Tlb {
    fn default() -> Self {
        Self::new()
    }
}

impl Tlb {
    /// An empty TLB.
    pub fn new() -> Self {
        Tlb {
            sets: Box::new([EMPTY; TOTAL]),
            gen: 1,
            hits: 0,
            misses: 0,
            flushes: 0,
        }
    }

    /// The index in `sets` and the tag of `gfn`'s leaf page of `level`.
    #[inline]
    fn slot(level: Level, gfn: Gfn) -> (usize, u64) {
        let page = gfn.0 >> level.gfn_shift();
        let l = level.leaf_index();
        (
            OFFSETS[l] + ((page as usize) & (SETS[l] - 1)),
            (page << level.gfn_shift()) + 1,
        )
    }

    /// A translation of `gfn` that allows `kind`, if cached. Returns the pfn of `gfn`.
    #[inline]
    pub fn lookup(&mut self, gfn: Gfn, kind: AccessKind) -> Option<Pfn> {
        // EPT entries are keyed by gfn and always user-accessible.
        self.lookup_virt(gfn.0, kind, false).map(|(pfn, _)| pfn)
    }

    /// Shadow paging: a translation of virtual page `vpn` that allows `kind` by a user
    /// (`user`) or supervisor access, if cached. Returns the pfn and gfn of `vpn`.
    #[inline]
    pub fn lookup_virt(&mut self, vpn: u64, kind: AccessKind, user: bool) -> Option<(Pfn, Gfn)> {
        for level in Level::LEAF_LEVELS {
            let (i, tag) = Self::slot(level, Gfn(vpn));
            let e = &self.sets[i];
            if e.tag == tag && e.gen == self.gen {
                let ok = (!user || e.user)
                    && match kind {
                        AccessKind::Read => true,
                        AccessKind::Write => e.writable && e.dirty,
                        AccessKind::Fetch => e.executable,
                    };
                if ok {
                    self.hits += 1;
                    let off = vpn & (level.pages() - 1);
                    return Some((Pfn(e.pfn.0 + off), Gfn(e.gfn.0 + off)));
                }
                break;
            }
        }
        self.misses += 1;
        None
    }

    /// Drop the translation of virtual page `vpn`, at any page size (INVLPG).
    pub fn flush_virt(&mut self, vpn: u64) {
        for level in Level::LEAF_LEVELS {
            let (i, tag) = Self::slot(level, Gfn(vpn));
            let e = &mut self.sets[i];
            if e.tag == tag && e.gen == self.gen {
                *e = EMPTY;
            }
        }
    }

    /// Cache a translation of the leaf page of `level` containing `gfn`.
    #[inline]
    pub fn fill(&mut self, gfn: Gfn, entry: TlbEntry) {
        let (i, tag) = Self::slot(entry.level, gfn);
        self.sets[i] = TlbEntry {
            tag,
            gen: self.gen,
            ..entry
        };
    }

    /// A new entry (tag filled in by [`fill`](Self::fill)).
    pub fn entry(
        pfn: Pfn,
        level: Level,
        writable: bool,
        executable: bool,
        dirty: bool,
    ) -> TlbEntry {
        TlbEntry {
            tag: 0,
            pfn,
            level,
            writable,
            executable,
            dirty,
            user: true,
            gfn: Gfn(0),
            gen: 0,
        }
    }

    /// Drop every translation: O(1), by moving to a new generation (entries of older
    /// generations never match); the array is cleared only when the generation wraps.
    pub fn flush(&mut self) {
        self.gen = self.gen.wrapping_add(1);
        if self.gen == 0 {
            self.sets.fill(EMPTY);
            self.gen = 1;
        }
        self.flushes += 1;
    }

    /// (hits, misses, flushes) so far.
    pub fn counters(&self) -> (u64, u64, u64) {
        (self.hits, self.misses, self.flushes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_misses_and_flush() {
        let mut t = Tlb::new();
        assert_eq!(t.lookup(Gfn(5), AccessKind::Read), None);
        t.fill(Gfn(5), Tlb::entry(Pfn(100), Level::L4K, true, false, false));
        assert_eq!(t.lookup(Gfn(5), AccessKind::Read), Some(Pfn(100)));
        // Writable but D clear: a write must re-walk.
        assert_eq!(t.lookup(Gfn(5), AccessKind::Write), None);
        assert_eq!(t.lookup(Gfn(5), AccessKind::Fetch), None);
        t.fill(
            Gfn(0x200 + 7),
            Tlb::entry(Pfn(0x400), Level::L2M, true, true, true),
        );
        assert_eq!(
            t.lookup(Gfn(0x200 + 9), AccessKind::Write),
            Some(Pfn(0x409))
        );
        assert_eq!(t.lookup(Gfn(0x400), AccessKind::Read), None);
        t.flush();
        assert_eq!(t.lookup(Gfn(5), AccessKind::Read), None);
        assert_eq!(t.lookup(Gfn(0x209), AccessKind::Read), None);
        let (h, m, f) = t.counters();
        assert_eq!((h, f), (2, 1));
        assert!(m >= 5);
    }
}
