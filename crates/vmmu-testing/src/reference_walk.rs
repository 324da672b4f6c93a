//! A reference x86-64 4-level page walker, computed straight from guest memory by the
//! rules of the Intel SDM (vol. 3, 4.5 "4-level paging", 4.6 "access rights", 4.7
//! "page-fault exceptions", 4.8 "accessed and dirty flags"), reporting what KVM's shadow
//! walker (`FNAME(walk_addr_generic)` + `permission_fault`) reports.
//!
//! It is the oracle of the shadow-paging tests and deliberately shares nothing with the
//! MMU's own guest walker: it only reads [`GuestMemory`] and the bit definitions of
//! [`vmmu::guest::pte`].
//!
//! # What it models
//! - Long mode, 4-level paging: PML4 -> PDPT -> PD -> PT. CR3 bits 51:12 locate the PML4.
//!   MAXPHYADDR is 52, so no address bit is reserved.
//! - PS in a PML4E is reserved; PS in a PDPTE maps a 1 GiB page, in a PDE a 2 MiB page
//!   (bit 7 of a PTE is PAT, not PS). In a huge leaf, bit 12 is PAT and the bits from 13
//!   up to below the page size are reserved.
//! - NX (bit 63) is reserved when EFER.NXE = 0.
//! - Rights are the AND of RW and US over every level and the OR of NX. A user access
//!   (CPL 3) needs US everywhere, a user write RW everywhere; a supervisor write needs RW
//!   everywhere only with CR0.WP = 1; a fetch is refused if any level has NX (with
//!   EFER.NXE = 1). No SMEP, SMAP or protection keys.
//! - Faults: not present at some level -> error code without PRESENT; a reserved bit ->
//!   PRESENT | RSVD (the walk stops at the first offending level, top-down, a not-present
//!   entry winning over reserved bits in the same entry); a protection violation over the
//!   complete walk -> PRESENT. WRITE if the access writes, USER at CPL 3, FETCH if the
//!   access is a fetch and EFER.NXE = 1 (the I/D bit is only reported when NX is on).
//! - Accessed and dirty bits, only when the access succeeds (KVM updates them after the
//!   permission check): A in every entry walked, D in the leaf too on a write. D is never
//!   set in a non-leaf entry (bit 6 is ignored there).
//!
//! [`walk`] predicts without touching memory; [`walk_and_update`] also performs the A/D
//! updates (with compare-exchange, as a CPU does), for a reference machine that runs on
//! its own copy of guest memory.

use std::collections::BTreeMap;
use std::fmt;

use vmmu::guest::pte;
use vmmu::guest::{GuestMemory, PagingState};
use vmmu::types::{AccessKind, ErrorCode, Gpa, Gva, Level};

/// Reserved bits of a 2 MiB leaf: 20:13 (bit 12 is PAT).
pub const RSVD_2M: u64 = ((1 << 21) - 1) & !((1 << 13) - 1);
/// Reserved bits of a 1 GiB leaf: 29:13 (bit 12 is PAT).
pub const RSVD_1G: u64 = ((1 << 30) - 1) & !((1 << 13) - 1);

/// One paging-structure entry the walk read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkedEntry {
    /// Its level (4 = PML4E .. 1 = PTE).
    pub level: Level,
    /// Where it lives.
    pub gpa: Gpa,
    /// What the walk read.
    pub read: u64,
}

/// The rights a successful translation grants (the combination over every level).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rights {
    /// RW set at every level.
    pub writable: bool,
    /// US set at every level.
    pub user: bool,
    /// NX set at some level (only meaningful with EFER.NXE).
    pub nx: bool,
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The guest-physical address reached: the leaf's frame plus the offset of the gva in
    /// the page (of the leaf's size).
    pub gpa: Gpa,
    /// The level of the leaf (4K, 2M or 1G).
    pub level: Level,
    /// The leaf entry as read.
    pub leaf: u64,
    /// Combined rights.
    pub rights: Rights,
}

/// Why a walk did not end in a translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkFault {
    /// A page fault (#PF) with this error code: what KVM reflects into the guest.
    PageFault {
        /// The error code.
        error_code: ErrorCode,
        /// The level of the entry that caused it (not present or reserved bits), or
        /// `None` for a protection violation (decided over the complete walk).
        level: Option<Level>,
    },
    /// The gva is not canonical: a #GP, not a page fault. No memory is read.
    NonCanonical,
    /// A paging-structure entry lies outside guest memory (the walk could not read it).
    /// KVM would reflect a not-present #PF; the tests never build such tables.
    BadTableGpa(Gpa),
}

/// The complete result of one reference walk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefWalk {
    /// The address walked.
    pub gva: Gva,
    /// The access.
    pub kind: AccessKind,
    /// The paging registers.
    pub state: PagingState,
    /// The translation, or why there is none.
    pub result: Result<Translation, WalkFault>,
    /// Every entry read, top-down (PML4E first), up to the leaf or the faulting entry.
    pub entries: Vec<WalkedEntry>,
    /// The A/D updates the access performs: `(gpa, before, after)` for each distinct
    /// entry address walked, in walk order (empty on a fault; `before == after` when
    /// nothing changes). An address walked at two levels (self-referencing tables) gets
    /// every bit either level sets.
    pub updates: Vec<(Gpa, u64, u64)>,
}

impl RefWalk {
    /// The error code of the page fault, if the walk faulted with one.
    pub fn error_code(&self) -> Option<ErrorCode> {
        match self.result {
            Err(WalkFault::PageFault { error_code, .. }) => Some(error_code),
            _ => None,
        }
    }

    /// The translated gpa, if the access succeeds.
    pub fn gpa(&self) -> Option<Gpa> {
        self.result.as_ref().ok().map(|t| t.gpa)
    }

    /// What each entry walked must hold after the access: the value read, with the A/D
    /// bits the access sets. `(gpa, expected)`, one per distinct address.
    pub fn expected_entries(&self) -> Vec<(Gpa, u64)> {
        let mut out: Vec<(Gpa, u64)> = Vec::new();
        for e in &self.entries {
            if out.iter().any(|&(g, _)| g == e.gpa) {
                continue;
            }
            let after = self
                .updates
                .iter()
                .find(|&&(g, _, _)| g == e.gpa)
                .map_or(e.read, |&(_, _, a)| a);
            out.push((e.gpa, after));
        }
        out
    }
}

impl fmt::Display for RefWalk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} gva {} cpl {} wp {} nx {} cr3 {}: ",
            self.kind,
            self.gva,
            self.state.cpl,
            self.state.cr0_wp as u8,
            self.state.efer_nx as u8,
            self.state.cr3
        )?;
        match &self.result {
            Ok(t) => write!(f, "-> gpa {} ({})", t.gpa, t.level.name())?,
            Err(e) => write!(f, "-> {e:?}")?,
        }
        for e in &self.entries {
            write!(
                f,
                "\n    L{} @{}: {:#018x} {}",
                e.level.as_u8(),
                e.gpa,
                e.read,
                describe_entry(e.read)
            )?;
        }
        Ok(())
    }
}

/// The named bits of an entry, for messages: `P RW US A D PS NX ...`, `-` for clear.
pub fn describe_entry(v: u64) -> String {
    let names = [
        (pte::P, "P"),
        (pte::RW, "RW"),
        (pte::US, "US"),
        (pte::PWT, "PWT"),
        (pte::PCD, "PCD"),
        (pte::A, "A"),
        (pte::D, "D"),
        (pte::PS, "PS"),
        (pte::G, "G"),
        (pte::NX, "NX"),
    ];
    let mut s = String::from("[");
    for (bit, name) in names {
        if v & bit != 0 {
            if s.len() > 1 {
                s.push(' ');
            }
            s.push_str(name);
        }
    }
    s.push(']');
    s
}

/// The index of `gva` into a table of `level` (bits 47:39, 38:30, 29:21, 20:12).
#[inline]
pub fn table_index(gva: Gva, level: Level) -> u64 {
    (gva.0 >> (12 + 9 * (level.as_u8() as u32 - 1))) & 0x1ff
}

/// The reserved bits of `entry` at `level` (KVM's `is_rsvd_bits_set`), for this state.
pub fn reserved_bits(entry: u64, level: Level, state: &PagingState) -> u64 {
    let mut rsvd = 0;
    if !state.efer_nx {
        rsvd |= pte::NX;
    }
    match level {
        Level::L512G => rsvd |= pte::PS,
        Level::L1G if entry & pte::PS != 0 => rsvd |= RSVD_1G,
        Level::L2M if entry & pte::PS != 0 => rsvd |= RSVD_2M,
        _ => {}
    }
    entry & rsvd
}

/// Whether the entry at `level` is a leaf (PTE, or PS in a PDE / PDPTE).
#[inline]
fn is_leaf(entry: u64, level: Level) -> bool {
    match level {
        Level::L4K => true,
        Level::L2M | Level::L1G => entry & pte::PS != 0,
        Level::L512G => false,
    }
}

/// Whether the access is allowed with these combined rights (SDM 4.6, no SMEP/SMAP/PKE).
pub fn access_allowed(rights: Rights, kind: AccessKind, state: &PagingState) -> bool {
    let user = state.cpl == 3;
    if user && !rights.user {
        return false;
    }
    match kind {
        AccessKind::Read => true,
        AccessKind::Write => rights.writable || (!user && !state.cr0_wp),
        AccessKind::Fetch => !(state.efer_nx && rights.nx),
    }
}

/// The error-code bits describing the access itself (WRITE, USER, FETCH).
pub fn access_error_bits(kind: AccessKind, state: &PagingState) -> ErrorCode {
    let mut ec = ErrorCode::empty();
    if kind == AccessKind::Write {
        ec = ec | ErrorCode::WRITE;
    }
    if state.cpl == 3 {
        ec = ec | ErrorCode::USER;
    }
    if kind == AccessKind::Fetch && state.efer_nx {
        ec = ec | ErrorCode::FETCH;
    }
    ec
}

/// Predict the access `kind` to `gva` under `state`: the translation or the fault, the
/// entries read and the A/D updates. Guest memory is only read.
pub fn walk(mem: &dyn GuestMemory, state: &PagingState, gva: Gva, kind: AccessKind) -> RefWalk {
    let mut out = RefWalk {
        gva,
        kind,
        state: *state,
        result: Err(WalkFault::NonCanonical),
        entries: Vec::new(),
        updates: Vec::new(),
    };
    if !gva.is_canonical() {
        return out;
    }
    let access_bits = access_error_bits(kind, state);
    let mut table = state.cr3.0 & pte::ADDR_MASK;
    let mut level = Level::L512G;
    let mut rights = Rights {
        writable: true,
        user: true,
        nx: false,
    };
    let leaf = loop {
        let gpa = Gpa(table + 8 * table_index(gva, level));
        let entry = match mem.read_u64(gpa) {
            Ok(v) => v,
            Err(_) => {
                out.result = Err(WalkFault::BadTableGpa(gpa));
                return out;
            }
        };
        out.entries.push(WalkedEntry {
            level,
            gpa,
            read: entry,
        });
        if entry & pte::P == 0 {
            out.result = Err(WalkFault::PageFault {
                error_code: access_bits,
                level: Some(level),
            });
            return out;
        }
        if reserved_bits(entry, level, state) != 0 {
            out.result = Err(WalkFault::PageFault {
                error_code: access_bits | ErrorCode::PRESENT | ErrorCode::RSVD,
                level: Some(level),
            });
            return out;
        }
        rights.writable &= entry & pte::RW != 0;
        rights.user &= entry & pte::US != 0;
        rights.nx |= entry & pte::NX != 0;
        if is_leaf(entry, level) {
            break entry;
        }
        table = entry & pte::ADDR_MASK;
        level = level.below().expect("a PTE is always a leaf");
    };

    if !access_allowed(rights, kind, state) {
        out.result = Err(WalkFault::PageFault {
            error_code: access_bits | ErrorCode::PRESENT,
            level: None,
        });
        return out;
    }

    let size = level.bytes();
    let frame = match level {
        Level::L4K => leaf & pte::ADDR_MASK,
        // Bit 12 is PAT and bits 13.. below the size are zero (checked above).
        _ => leaf & pte::ADDR_MASK & !(size - 1),
    };
    out.result = Ok(Translation {
        gpa: Gpa(frame | (gva.0 & (size - 1))),
        level,
        leaf,
        rights,
    });

    // A/D: A everywhere, D in the leaf on a write. Merge by address so that an entry
    // walked at two levels gets both.
    let mut merged: BTreeMap<u64, (usize, u64, u64)> = BTreeMap::new();
    let n = out.entries.len();
    for (i, e) in out.entries.iter().enumerate() {
        let mut set = pte::A;
        if i == n - 1 && kind == AccessKind::Write {
            set |= pte::D;
        }
        merged
            .entry(e.gpa.0)
            .and_modify(|(_, _, after)| *after |= set)
            .or_insert((i, e.read, e.read | set));
    }
    let mut ups: Vec<(usize, Gpa, u64, u64)> = merged
        .into_iter()
        .map(|(g, (i, b, a))| (i, Gpa(g), b, a))
        .collect();
    ups.sort_by_key(|u| u.0);
    out.updates = ups.into_iter().map(|(_, g, b, a)| (g, b, a)).collect();
    out
}

/// [`walk`], then perform its A/D updates in `mem` with compare-exchange. If an entry
/// changed under the walk (another writer), the walk is redone, as KVM does.
pub fn walk_and_update(
    mem: &dyn GuestMemory,
    state: &PagingState,
    gva: Gva,
    kind: AccessKind,
) -> RefWalk {
    'retry: loop {
        let w = walk(mem, state, gva, kind);
        for &(gpa, before, after) in &w.updates {
            if before == after {
                continue;
            }
            match mem.cmpxchg_u64(gpa, before, after) {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => continue 'retry,
                Err(e) => panic!("A/D update at {gpa}: {e}"),
            }
        }
        return w;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmmu::guest::SimGuestMemory;

    const FULL: u64 = pte::P | pte::RW | pte::US;

    /// Hand-built tables: PML4 at 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000.
    struct T {
        mem: SimGuestMemory,
    }

    const PML4: u64 = 0x1000;
    const PDPT: u64 = 0x2000;
    const PD: u64 = 0x3000;
    const PT: u64 = 0x4000;

    /// gva with indices (l4, l3, l2, l1) and offset.
    fn gva(l4: u64, l3: u64, l2: u64, l1: u64, off: u64) -> Gva {
        let v = (l4 << 39) | (l3 << 30) | (l2 << 21) | (l1 << 12) | off;
        // sign-extend bit 47
        if v & (1 << 47) != 0 {
            Gva(v | 0xffff_0000_0000_0000)
        } else {
            Gva(v)
        }
    }

    impl T {
        fn new() -> Self {
            T {
                mem: SimGuestMemory::new(64 << 20),
            }
        }
        fn set(&self, gpa: u64, v: u64) {
            self.mem.write_u64(Gpa(gpa), v).unwrap();
        }
        fn get(&self, gpa: u64) -> u64 {
            self.mem.read_u64(Gpa(gpa)).unwrap()
        }
        /// A 4K mapping of gva(1, 2, 3, 4) to `data` with the given leaf and upper bits.
        fn map4k(&self, upper: [u64; 3], leaf: u64, data: u64) {
            self.set(PML4 + 8, PDPT | upper[0]);
            self.set(PDPT + 16, PD | upper[1]);
            self.set(PD + 24, PT | upper[2]);
            self.set(PT + 32, data | leaf);
        }
        fn walk(&self, state: PagingState, g: Gva, kind: AccessKind) -> RefWalk {
            walk(&self.mem, &state, g, kind)
        }
    }

    fn st(cpl: u8, wp: bool, nx: bool) -> PagingState {
        PagingState {
            cr3: Gpa(PML4 | 0x18), // PWT|PCD in CR3 are ignored
            cr0_wp: wp,
            efer_nx: nx,
            cpl,
        }
    }

    fn pf(w: &RefWalk) -> ErrorCode {
        w.error_code()
            .unwrap_or_else(|| panic!("expected a #PF: {w}"))
    }

    #[test]
    fn translates_4k_and_sets_accessed_everywhere() {
        let t = T::new();
        t.map4k([FULL; 3], FULL, 0x80_0000);
        let g = gva(1, 2, 3, 4, 0x5a8);
        let w = t.walk(st(3, true, true), g, AccessKind::Read);
        let tr = w.result.unwrap();
        assert_eq!(tr.gpa, Gpa(0x80_05a8));
        assert_eq!(tr.level, Level::L4K);
        assert_eq!(w.entries.len(), 4);
        let want: Vec<u64> = vec![PML4 + 8, PDPT + 16, PD + 24, PT + 32];
        assert_eq!(w.entries.iter().map(|e| e.gpa.0).collect::<Vec<_>>(), want);
        for (i, &(g, before, after)) in w.updates.iter().enumerate() {
            assert_eq!(g.0, want[i]);
            assert_eq!(after, before | pte::A, "read sets A only");
        }
        // Pure: memory untouched.
        assert_eq!(t.get(PT + 32), 0x80_0000 | FULL);
        // Write: D in the leaf only.
        let w = t.walk(st(3, true, true), g, AccessKind::Write);
        let ex = w.expected_entries();
        assert_eq!(ex[3].1, 0x80_0000 | FULL | pte::A | pte::D);
        for e in &ex[..3] {
            assert_eq!(e.1 & pte::D, 0, "no D in a non-leaf entry");
            assert_ne!(e.1 & pte::A, 0);
        }
        // walk_and_update applies it.
        let w2 = walk_and_update(&t.mem, &st(3, true, true), g, AccessKind::Write);
        assert_eq!(w2, w);
        for (g, v) in ex {
            assert_eq!(t.mem.read_u64(g).unwrap(), v);
        }
        // A second walk changes nothing more.
        let w3 = t.walk(st(3, true, true), g, AccessKind::Write);
        assert!(w3.updates.iter().all(|&(_, b, a)| b == a));
    }

    #[test]
    fn translates_2m_and_1g_with_offsets() {
        let t = T::new();
        // 2M: PDE with PS and PAT (bit 12) set: PAT is not part of the address.
        t.set(PML4 + 8, PDPT | FULL);
        t.set(PDPT + 16, PD | FULL);
        t.set(PD + 24, 0x4000_0000 | pte::HUGE_PAT | pte::PS | FULL);
        let g = gva(1, 2, 3, 0x1ab, 0x5a8);
        let w = t.walk(st(0, true, true), g, AccessKind::Write);
        let tr = w.result.unwrap();
        assert_eq!(tr.level, Level::L2M);
        assert_eq!(tr.gpa, Gpa(0x4000_0000 | (0x1ab << 12) | 0x5a8));
        assert_eq!(w.entries.len(), 3);
        let ex = w.expected_entries();
        assert_ne!(ex[2].1 & pte::D, 0, "D in the 2M leaf");
        assert_eq!(ex[1].1 & pte::D, 0);

        // 1G: PDPTE with PS.
        t.set(PDPT + 16, 0x8000_0000 | pte::PS | FULL);
        let g = gva(1, 2, 0x123, 0x1ab, 0x5a8);
        let w = t.walk(st(3, true, true), g, AccessKind::Fetch);
        let tr = w.result.unwrap();
        assert_eq!(tr.level, Level::L1G);
        assert_eq!(
            tr.gpa,
            Gpa(0x8000_0000 | (0x123 << 21) | (0x1ab << 12) | 0x5a8)
        );
        assert_eq!(w.entries.len(), 2);
        assert!(w.expected_entries().iter().all(|e| e.1 & pte::D == 0));

        // A PTE with bit 7 (PAT) is an ordinary 4K leaf.
        t.map4k([FULL; 3], FULL | pte::PS, 0x9000);
        let w = t.walk(st(3, true, true), gva(1, 2, 3, 4, 8), AccessKind::Read);
        assert_eq!(w.gpa(), Some(Gpa(0x9008)));
        assert_eq!(w.result.unwrap().level, Level::L4K);
    }

    #[test]
    fn not_present_at_each_level() {
        for lvl in 0..4 {
            let t = T::new();
            let mut upper = [FULL; 3];
            let mut leaf = FULL;
            if lvl < 3 {
                upper[lvl] &= !pte::P;
            } else {
                leaf &= !pte::P;
            }
            t.map4k(upper, leaf, 0x9000);
            for (kind, cpl, nx, want) in [
                (AccessKind::Read, 0, true, ErrorCode::empty()),
                (
                    AccessKind::Write,
                    3,
                    true,
                    ErrorCode::WRITE | ErrorCode::USER,
                ),
                (AccessKind::Fetch, 0, true, ErrorCode::FETCH),
                (AccessKind::Fetch, 3, false, ErrorCode::USER),
            ] {
                let w = t.walk(st(cpl, true, nx), gva(1, 2, 3, 4, 0), kind);
                assert_eq!(pf(&w), want, "level {lvl} {kind:?}: {w}");
                assert_eq!(w.entries.len(), lvl + 1);
                assert!(w.updates.is_empty(), "no A/D on a fault");
                assert_eq!(
                    w.result,
                    Err(WalkFault::PageFault {
                        error_code: want,
                        level: Level::from_u8(4 - lvl as u8)
                    })
                );
            }
        }
    }

    #[test]
    fn reserved_bits() {
        let rsvd = ErrorCode::PRESENT | ErrorCode::RSVD;
        let t = T::new();
        // PS in the PML4E.
        t.map4k([FULL | pte::PS, FULL, FULL], FULL, 0x9000);
        let w = t.walk(st(0, true, true), gva(1, 2, 3, 4, 0), AccessKind::Read);
        assert_eq!(pf(&w), rsvd);
        assert_eq!(w.entries.len(), 1);
        // NX without EFER.NXE, at each level, for every access kind.
        for lvl in 0..4 {
            let mut upper = [FULL; 3];
            let mut leaf = FULL;
            if lvl < 3 {
                upper[lvl] |= pte::NX;
            } else {
                leaf |= pte::NX;
            }
            t.map4k(upper, leaf, 0x9000);
            for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Fetch] {
                let w = t.walk(st(3, true, false), gva(1, 2, 3, 4, 0), kind);
                let mut want = rsvd | ErrorCode::USER;
                if kind == AccessKind::Write {
                    want = want | ErrorCode::WRITE;
                }
                // FETCH is not reported without NX.
                assert_eq!(pf(&w), want, "NX at {lvl} {kind:?}: {w}");
                assert_eq!(w.entries.len(), lvl + 1);
                // With NXE the same tables are fine for reads.
                let w = t.walk(st(3, true, true), gva(1, 2, 3, 4, 0), AccessKind::Read);
                assert!(w.result.is_ok(), "{w}");
            }
        }
        // Not-present wins over reserved bits in the same entry.
        t.map4k([FULL; 3], pte::NX | pte::RW, 0x9000);
        let w = t.walk(st(0, true, false), gva(1, 2, 3, 4, 0), AccessKind::Read);
        assert_eq!(pf(&w), ErrorCode::empty());
        // Reserved bits at an upper level win over a not-present leaf below it.
        t.map4k([FULL, FULL, FULL | pte::NX], 0, 0x9000);
        let w = t.walk(st(0, true, false), gva(1, 2, 3, 4, 0), AccessKind::Read);
        assert_eq!(pf(&w), rsvd);
        // Huge-leaf reserved bits: 2M bits 13..=20, 1G bits 13..=29; PAT (12) is fine.
        t.set(PML4 + 8, PDPT | FULL);
        t.set(PDPT + 16, PD | FULL);
        for bit in 12..=21 {
            t.set(PD + 24, 0x4000_0000 | (1 << bit) | pte::PS | FULL);
            let w = t.walk(st(0, true, true), gva(1, 2, 3, 0, 0), AccessKind::Read);
            if (13..=20).contains(&bit) {
                assert_eq!(pf(&w), rsvd, "2M bit {bit}");
            } else {
                assert!(w.result.is_ok(), "2M bit {bit}: {w}");
            }
        }
        for bit in [12, 13, 20, 21, 29, 30] {
            t.set(PDPT + 16, 0x8000_0000 | (1 << bit) | pte::PS | FULL);
            let w = t.walk(st(0, true, true), gva(1, 2, 0, 0, 0), AccessKind::Read);
            if (13..=29).contains(&bit) {
                assert_eq!(pf(&w), rsvd, "1G bit {bit}");
            } else {
                assert!(w.result.is_ok(), "1G bit {bit}: {w}");
            }
        }
        // Bits 13..=20 in a non-leaf PDE or a PTE are address bits, not reserved.
        t.set(PDPT + 16, PD | FULL);
        t.map4k([FULL; 3], FULL, 0x1f_e000);
        let w = t.walk(st(0, true, true), gva(1, 2, 3, 4, 0), AccessKind::Read);
        assert_eq!(w.gpa(), Some(Gpa(0x1f_e000)));
        // Bits 52..=62 (ignored) are not reserved with MAXPHYADDR 52.
        t.map4k([FULL | (0x7ff << 52); 3], FULL | (0x7ff << 52), 0x9000);
        let w = t.walk(st(0, true, false), gva(1, 2, 3, 4, 0), AccessKind::Read);
        assert_eq!(w.gpa(), Some(Gpa(0x9000)));
    }

    /// The permission rules, exhaustively over RW/US/NX at the leaf and one upper level.
    #[test]
    fn protection_rules() {
        let t = T::new();
        for bits in 0..64u32 {
            let b = |i: u32| bits & (1 << i) != 0;
            let flag = |rw: bool, us: bool, nx: bool| {
                pte::P
                    | if rw { pte::RW } else { 0 }
                    | if us { pte::US } else { 0 }
                    | if nx { pte::NX } else { 0 }
            };
            let leaf = flag(b(0), b(1), b(2));
            let pde = flag(b(3), b(4), b(5));
            t.map4k([FULL, FULL, pde], leaf, 0x9000);
            let w_all = b(0) && b(3);
            let u_all = b(1) && b(4);
            let nx_any = b(2) || b(5);
            for cpl in [0u8, 3] {
                for wp in [false, true] {
                    for nxe in [false, true] {
                        for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Fetch] {
                            let s = st(cpl, wp, nxe);
                            let w = t.walk(s, gva(1, 2, 3, 4, 0x10), kind);
                            let mut base = ErrorCode::empty();
                            if kind == AccessKind::Write {
                                base = base | ErrorCode::WRITE;
                            }
                            if cpl == 3 {
                                base = base | ErrorCode::USER;
                            }
                            if kind == AccessKind::Fetch && nxe {
                                base = base | ErrorCode::FETCH;
                            }
                            let want = if nx_any && !nxe {
                                Some(base | ErrorCode::PRESENT | ErrorCode::RSVD)
                            } else {
                                let ok = match (cpl == 3, kind) {
                                    (true, AccessKind::Read) => u_all,
                                    (true, AccessKind::Write) => u_all && w_all,
                                    (true, AccessKind::Fetch) => u_all && !nx_any,
                                    (false, AccessKind::Read) => true,
                                    (false, AccessKind::Write) => w_all || !wp,
                                    (false, AccessKind::Fetch) => !nx_any,
                                };
                                (!ok).then_some(base | ErrorCode::PRESENT)
                            };
                            assert_eq!(
                                w.error_code(),
                                want,
                                "bits {bits:06b} cpl {cpl} wp {wp} nx {nxe}: {w}"
                            );
                            if want.is_none() {
                                assert_eq!(w.gpa(), Some(Gpa(0x9010)));
                            } else {
                                assert!(w.updates.is_empty());
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn cr3_low_bits_and_noncanonical() {
        let t = T::new();
        t.map4k([FULL; 3], FULL, 0x9000);
        let w = t.walk(
            st(0, true, true),
            Gva(0x0000_8000_0000_0000),
            AccessKind::Read,
        );
        assert_eq!(w.result, Err(WalkFault::NonCanonical));
        assert!(w.entries.is_empty());
        // Upper half: PML4 index 256..
        t.set(PML4 + 256 * 8, PDPT | FULL);
        t.set(PDPT, PD | FULL);
        t.set(PD, PT | FULL);
        t.set(PT, 0xa000 | FULL);
        let w = t.walk(
            st(0, true, true),
            Gva(0xffff_8000_0000_0123 & !7),
            AccessKind::Read,
        );
        assert_eq!(w.gpa(), Some(Gpa(0xa120)));
        assert_eq!(w.entries[0].gpa, Gpa(PML4 + 256 * 8));
        // A table outside guest memory.
        t.set(PT + 32, FULL | (1 << 40));
        let w = t.walk(st(0, true, true), gva(1, 2, 3, 4, 0), AccessKind::Read);
        assert_eq!(w.gpa(), Some(Gpa(1 << 40)), "a leaf's frame is not read");
        t.set(PD + 24, FULL | (1 << 40));
        let w = t.walk(st(0, true, true), gva(1, 2, 3, 4, 0), AccessKind::Read);
        assert_eq!(w.result, Err(WalkFault::BadTableGpa(Gpa((1 << 40) + 32))));
    }

    #[test]
    fn self_referencing_entry_gets_both_updates() {
        // PML4[1] points back at the PML4: the walk of gva(1, 1, 2, 3) reads PML4[1]
        // twice (as PML4E and PDPTE), then PDPT[2] as the PDE... here PDPT is the PML4.
        let t = T::new();
        t.set(PML4 + 8, PML4 | FULL);
        t.set(PML4 + 16, PT | FULL); // used as a PDE
        t.set(PT + 24, 0x9000 | FULL);
        let g = gva(1, 1, 2, 3, 0);
        let w = t.walk(st(0, true, true), g, AccessKind::Write);
        assert_eq!(w.gpa(), Some(Gpa(0x9000)));
        assert_eq!(w.entries.len(), 4);
        assert_eq!(w.updates.len(), 3, "PML4[1] once");
        assert_eq!(
            w.updates[0],
            (Gpa(PML4 + 8), PML4 | FULL, PML4 | FULL | pte::A)
        );
        assert_eq!(w.updates[2].2, 0x9000 | FULL | pte::A | pte::D);
        let w2 = walk_and_update(&t.mem, &st(0, true, true), g, AccessKind::Write);
        assert_eq!(w2, w);
        assert_eq!(t.get(PML4 + 8), PML4 | FULL | pte::A);
    }

    #[test]
    fn faults_leave_memory_alone_and_supervisor_wp0_sets_dirty() {
        let t = T::new();
        t.map4k([FULL; 3], pte::P, 0x9000); // read-only supervisor leaf
        let g = gva(1, 2, 3, 4, 0);
        let before: Vec<u64> = [PML4 + 8, PDPT + 16, PD + 24, PT + 32]
            .iter()
            .map(|&a| t.get(a))
            .collect();
        let w = walk_and_update(&t.mem, &st(0, true, true), g, AccessKind::Write);
        assert_eq!(pf(&w), ErrorCode::PRESENT | ErrorCode::WRITE);
        let after: Vec<u64> = [PML4 + 8, PDPT + 16, PD + 24, PT + 32]
            .iter()
            .map(|&a| t.get(a))
            .collect();
        assert_eq!(before, after);
        // CR0.WP = 0: the supervisor write succeeds and dirties the read-only leaf.
        let w = walk_and_update(&t.mem, &st(0, false, true), g, AccessKind::Write);
        assert_eq!(w.gpa(), Some(Gpa(0x9000)));
        assert_eq!(t.get(PT + 32), 0x9000 | pte::P | pte::A | pte::D);
        // User read of it: US clear -> protection fault.
        let w = t.walk(st(3, false, true), g, AccessKind::Read);
        assert_eq!(pf(&w), ErrorCode::PRESENT | ErrorCode::USER);
    }
}
