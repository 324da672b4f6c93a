//! The operations the interpreter applies, and their decoding from arbitrary bytes.
//!
//! Slots are named by index: `0..NSHAPES` have a fixed shape (size, host backing, offset
//! into their host region; see [`crate::interp`]) so random sequences create, move and
//! delete them over and over; [`Op::Region`] sets any region at all (any id, flags,
//! addresses and size), for malformed input. Page numbers are reduced modulo the slot's
//! size where a slot exists, so most accesses land in memory.

use vmmu::types::AccessKind;

/// One operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Create (or re-set) slot `slot` in its shape at window offset `at` (bytes).
    Create {
        /// Shape index.
        slot: u8,
        /// Offset in the guest-physical window.
        at: u64,
        /// LOG_DIRTY_PAGES.
        log: bool,
        /// READONLY.
        readonly: bool,
    },
    /// Delete slot `slot` (size 0; an error if it does not exist).
    Delete {
        /// Slot id.
        slot: u8,
    },
    /// Move slot `slot` to window offset `at`, flags kept.
    Move {
        /// Slot id.
        slot: u8,
        /// New offset in the window.
        at: u64,
    },
    /// Set slot `slot`'s flags (READONLY changes are errors).
    Flags {
        /// Slot id.
        slot: u8,
        /// LOG_DIRTY_PAGES.
        log: bool,
        /// READONLY.
        readonly: bool,
    },
    /// Any region at all.
    Region {
        /// Slot id.
        slot: u32,
        /// Raw flags.
        flags: u32,
        /// guest_phys_addr.
        gpa: u64,
        /// memory_size.
        size: u64,
        /// userspace_addr: `None` = the shape's host region (of `slot % NSHAPES`) plus
        /// `hva_off`.
        hva: Option<u64>,
        /// Added to the shape's hva when `hva` is `None`.
        hva_off: u64,
    },
    /// A guest access by vCPU `vcpu` to page `page` (modulo the slot size) of slot `slot`
    /// at byte `off` of the page; if the slot does not exist, to that page of the window.
    Access {
        /// vCPU index (modulo the vCPUs).
        vcpu: u8,
        /// Slot id.
        slot: u8,
        /// Page.
        page: u64,
        /// Byte in the page.
        off: u16,
        /// Read, write or fetch.
        kind: AccessKind,
    },
    /// A guest access to any guest-physical address.
    AccessGpa {
        /// vCPU index (modulo the vCPUs).
        vcpu: u8,
        /// The address.
        gpa: u64,
        /// Read, write or fetch.
        kind: AccessKind,
    },
    /// `get_dirty_log(slot)` with a buffer `short` words shorter than needed (0: one word
    /// longer, to see the tail is left alone).
    GetLog {
        /// Slot id.
        slot: u32,
        /// Words missing.
        short: u8,
    },
    /// `clear_dirty_log(slot, first, num, bitmap)`: `pattern` 0 clears what the model
    /// says is dirty there, 1 every page, else random bits seeded by it; the bitmap is
    /// `short` words shorter than the range needs.
    ClearLog {
        /// Slot id.
        slot: u32,
        /// first_page.
        first: u64,
        /// num_pages.
        num: u64,
        /// Which bits.
        pattern: u64,
        /// Words missing.
        short: u8,
    },
    /// `get_dirty_ranges(slot)`: the dirty pages as runs, checked against the model's
    /// bits.
    GetRanges {
        /// Slot id.
        slot: u32,
    },
    /// `clear_dirty_ranges(slot, ranges)`: `pattern` 0 clears the model's dirty runs of
    /// the slot, else random ranges seeded by it (some reaching past the slot).
    ClearRanges {
        /// Slot id.
        slot: u32,
        /// Which ranges.
        pattern: u64,
    },
    /// `harvest_dirty_ring(vcpu)` (the index is not reduced: it may not exist).
    Harvest {
        /// vCPU index.
        vcpu: u8,
    },
    /// The VMM harvesting vCPU `vcpu`'s ring entry by entry through `Vm::dirty_ring` (KVM's
    /// protocol: read with acquire, mark harvested), from the first entry not harvested,
    /// at most `count` entries; then one mark the view must refuse (the next entry, unread
    /// or not pushed) with its typed error and no change.
    RingView {
        /// vCPU index (not reduced: it may not exist).
        vcpu: u8,
        /// Entries to take.
        count: u8,
    },
    /// `reset_dirty_rings()`.
    Reset,
    /// `unmap_hva_range` over pages `[page, page + pages)` of slot `slot`'s host memory.
    Unmap {
        /// Shape index.
        slot: u8,
        /// First page.
        page: u64,
        /// Pages (0 is an invalid range).
        pages: u64,
    },
    /// `age_hva_range` (or, with `test`, `test_age_hva_range`) over those pages.
    Age {
        /// Shape index.
        slot: u8,
        /// First page.
        page: u64,
        /// Pages.
        pages: u64,
        /// test_age instead.
        test: bool,
    },
    /// The host gives the page a new frame (KSM, migration), then `change_pte`.
    ChangePte {
        /// Shape index.
        slot: u8,
        /// Page.
        page: u64,
    },
    /// The host gives the page a new frame inside an invalidation (start, remap, end).
    HostRemap {
        /// Shape index.
        slot: u8,
        /// Page.
        page: u64,
    },
    /// mprotect of the pages; making them read-only is announced (start/end), making them
    /// writable only if `notify`.
    HostProtect {
        /// Shape index.
        slot: u8,
        /// First page.
        page: u64,
        /// Pages.
        pages: u64,
        /// Writable.
        writable: bool,
        /// Announce a change to writable too.
        notify: bool,
    },
    /// munmap of the pages, announced.
    HostUnmap {
        /// Shape index.
        slot: u8,
        /// First page.
        page: u64,
        /// Pages.
        pages: u64,
    },
    /// Map fresh memory in the holes HostUnmap left in the shape's host region.
    HostRestore {
        /// Shape index.
        slot: u8,
    },
    /// The host splits the huge page around the page, announced.
    HostSplit {
        /// Shape index.
        slot: u8,
        /// Page.
        page: u64,
    },
    /// `invalidate_range_start` over those pages, left open until [`Op::InvalidateEnd`].
    InvalidateStart {
        /// Shape index.
        slot: u8,
        /// First page.
        page: u64,
        /// Pages.
        pages: u64,
    },
    /// `invalidate_range_end()`.
    InvalidateEnd,
    /// unmap (0), age (1) or test_age (2) of any host-virtual range.
    HvaRange {
        /// Which.
        which: u8,
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// `zap_gfn_range` of `[WIN + start, + len)` in gfns (len <= 0 is invalid).
    Zap {
        /// First gfn from the window's.
        start: u64,
        /// Length (may be zero or negative).
        len: i64,
    },
    /// `zap_gfn_range` of any range.
    ZapRaw {
        /// Start gfn.
        start: u64,
        /// End gfn.
        end: u64,
    },
    /// `zap_memslot(slot)`.
    ZapSlot {
        /// Slot id.
        slot: u32,
    },
    /// `zap_all()`.
    ZapAll,
    /// `zap_all_fast()`.
    ZapAllFast,
    /// `track_write` (or `untrack_write`) of page `page` of slot `slot`.
    Track {
        /// Slot id.
        slot: u8,
        /// Page (modulo the slot size).
        page: u64,
        /// Untrack instead.
        untrack: bool,
    },
    /// `track_write` / `untrack_write` of any gfn.
    TrackGfn {
        /// The gfn.
        gfn: u64,
        /// Untrack instead.
        untrack: bool,
    },
    /// `create_vcpu()`.
    CreateVcpu,
    /// Table memory runs short: each of the next [`FAIL_ALLOC_OPS`] operations runs with
    /// the allocator refusing every allocation after its first `after`, until one of them
    /// meets the failure. That operation must return `OutOfTableMemory` and change
    /// nothing (then it is applied again with memory back), or succeed as the model says.
    FailAlloc {
        /// Allocations that still succeed in each armed operation.
        after: u8,
    },
    /// The host remaps (or, with `unmap`, munmaps) one page inside a range an open
    /// invalidation covers (the host changes what it announced, inside the window):
    /// skipped when no invalidation is open.
    HostChangeInWindow {
        /// Which page of the open ranges.
        page: u64,
        /// munmap instead of remap.
        unmap: bool,
    },
    /// A second VM, on a host of its own, and its vCPU: `call` 0 writes (odd `page`:
    /// reads) its memory through its own vCPU; 1 hands its vCPU (or the vCPU of a dropped
    /// VM, when one is kept) to this VM's calls; 2 hands this VM's vCPU to the other VM's
    /// calls; 3 drops the other VM, keeping its vCPU, and makes a new one; 4 has this VM
    /// release a vCPU not its own. Every foreign use is refused with `ForeignVcpu` and
    /// changes neither VM.
    OtherVm {
        /// Which call.
        call: u8,
        /// A page of the other VM's slot (and a vCPU index of this one).
        page: u16,
    },
    /// Build a VM from a configuration made of `bits`, malformed ones included (a shadow
    /// paging MMU without guest memory, any guest-physical width, any ring size, no
    /// vCPUs allowed): it succeeds or fails as the model says, a failure before any
    /// table is allocated; a VM built runs one write.
    BadConfig {
        /// The configuration's bits.
        bits: u64,
    },
}

/// Operations a [`Op::FailAlloc`] arms.
pub const FAIL_ALLOC_OPS: u32 = 8;

impl Op {
    /// A short name of the operation's kind (for counts).
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Delete { .. } => "delete",
            Op::Move { .. } => "move",
            Op::Flags { .. } => "flags",
            Op::Region { .. } => "region",
            Op::Access { kind, .. } | Op::AccessGpa { kind, .. } => match kind {
                AccessKind::Read => "read",
                AccessKind::Write => "write",
                AccessKind::Fetch => "fetch",
            },
            Op::GetLog { .. } => "get-dirty-log",
            Op::ClearLog { .. } => "clear-dirty-log",
            Op::GetRanges { .. } => "get-dirty-ranges",
            Op::ClearRanges { .. } => "clear-dirty-ranges",
            Op::Harvest { .. } => "ring-harvest",
            Op::RingView { .. } => "ring-view",
            Op::Reset => "ring-reset",
            Op::Unmap { .. } => "unmap",
            Op::Age { test: false, .. } => "age",
            Op::Age { test: true, .. } => "test-age",
            Op::ChangePte { .. } => "change-pte",
            Op::HostRemap { .. } => "host-remap",
            Op::HostProtect { .. } => "host-mprotect",
            Op::HostUnmap { .. } => "host-munmap",
            Op::HostRestore { .. } => "host-mmap",
            Op::HostSplit { .. } => "host-split",
            Op::InvalidateStart { .. } => "invalidate-start",
            Op::InvalidateEnd => "invalidate-end",
            Op::HvaRange { .. } => "hva-range",
            Op::Zap { .. } | Op::ZapRaw { .. } => "zap-range",
            Op::ZapSlot { .. } => "zap-slot",
            Op::ZapAll => "zap-all",
            Op::ZapAllFast => "zap-all-fast",
            Op::Track { .. } | Op::TrackGfn { .. } => "write-track",
            Op::CreateVcpu => "create-vcpu",
            Op::FailAlloc { .. } => "fail-alloc",
            Op::HostChangeInWindow { .. } => "host-change-in-window",
            Op::OtherVm { .. } => "other-vm",
            Op::BadConfig { .. } => "bad-config",
        }
    }

    /// Decode operations from arbitrary bytes (the fuzz target's input), at most `max`.
    /// Every byte string decodes to something; missing bytes read as zero.
    pub fn decode_all(bytes: &[u8], max: usize) -> Vec<Op> {
        let mut r = Bytes(bytes);
        let mut ops = Vec::new();
        while !r.0.is_empty() && ops.len() < max {
            ops.push(Op::decode(&mut r));
        }
        ops
    }

    fn decode(r: &mut Bytes<'_>) -> Op {
        let kind = |b: u8| match b % 3 {
            0 => AccessKind::Read,
            1 => AccessKind::Write,
            _ => AccessKind::Fetch,
        };
        // Accesses are the most common operation, as in the property tests.
        match r.u8() % 40 {
            0..=11 => Op::Access {
                vcpu: r.u8(),
                slot: r.u8(),
                page: r.u16() as u64 | (r.u8() as u64) << 16,
                off: r.u16(),
                kind: kind(r.u8()),
            },
            12 => Op::AccessGpa {
                vcpu: r.u8(),
                gpa: r.u64(),
                kind: kind(r.u8()),
            },
            13 | 14 => Op::Create {
                slot: r.u8(),
                at: r.u32() as u64 * 4096 / 8,
                log: r.bool(),
                readonly: r.bool(),
            },
            15 => Op::Delete { slot: r.u8() },
            16 => Op::Move {
                slot: r.u8(),
                at: r.u32() as u64 * 4096 / 8,
            },
            17 | 18 => Op::Flags {
                slot: r.u8(),
                log: r.bool(),
                readonly: r.u8().is_multiple_of(8),
            },
            19 => {
                let slot = match r.u8() % 4 {
                    0 => r.u32(),
                    _ => r.u8() as u32 % 8,
                };
                let flags = match r.u8() % 4 {
                    0 => r.u32(),
                    _ => r.u8() as u32 % 4,
                };
                let gpa = match r.u8() % 3 {
                    0 => r.u64(),
                    1 => (1 << 30) + r.u32() as u64 * 512,
                    _ => (1 << 30) + (r.u16() as u64) * 4096,
                };
                // Sizes are capped at 1 GiB (+ a few bytes): a slot's metadata grows with
                // its size, and a 256 TiB slot would only measure the heap.
                let size = match r.u8() % 4 {
                    0 => r.u64() % ((1 << 30) + 8),
                    1 => 0,
                    _ => (r.u16() as u64 + 1) * 4096,
                };
                let (hva, hva_off) = match r.u8() % 4 {
                    0 => (Some(r.u64()), 0),
                    _ => (None, r.u16() as u64 * 512),
                };
                Op::Region {
                    slot,
                    flags,
                    gpa,
                    size,
                    hva,
                    hva_off,
                }
            }
            21 => Op::GetRanges {
                slot: r.u8() as u32 % 8,
            },
            23 => Op::ClearRanges {
                slot: r.u8() as u32 % 8,
                pattern: r.u64() % 8,
            },
            20 => Op::GetLog {
                slot: r.u8() as u32 % 8,
                short: if r.u8().is_multiple_of(4) {
                    r.u8() % 4
                } else {
                    0
                },
            },
            22 => Op::ClearLog {
                slot: r.u8() as u32 % 8,
                first: match r.u8() % 4 {
                    0 => r.u64(),
                    1 => r.u16() as u64,
                    _ => (r.u8() as u64 % 16) * 64,
                },
                num: match r.u8() % 4 {
                    0 => r.u64(),
                    1 => u64::MAX - r.u8() as u64,
                    _ => r.u16() as u64,
                },
                pattern: r.u64() % 8,
                short: if r.u8().is_multiple_of(4) {
                    r.u8() % 4
                } else {
                    0
                },
            },
            24 => Op::Harvest { vcpu: r.u8() % 5 },
            25 => Op::Reset,
            26 => Op::Unmap {
                slot: r.u8(),
                page: r.u16() as u64,
                pages: r.u8() as u64,
            },
            27 => Op::Age {
                slot: r.u8(),
                page: r.u16() as u64,
                pages: r.u8() as u64,
                test: r.bool(),
            },
            28 => Op::ChangePte {
                slot: r.u8(),
                page: r.u16() as u64,
            },
            29 => Op::HostRemap {
                slot: r.u8(),
                page: r.u16() as u64,
            },
            30 => Op::HostProtect {
                slot: r.u8(),
                page: r.u16() as u64,
                pages: r.u8() as u64 + 1,
                writable: r.bool(),
                notify: r.bool(),
            },
            31 => match r.u8() % 2 {
                0 => Op::HostUnmap {
                    slot: r.u8(),
                    page: r.u16() as u64,
                    pages: r.u8() as u64 + 1,
                },
                _ => Op::HostRestore { slot: r.u8() },
            },
            32 => Op::HostSplit {
                slot: r.u8(),
                page: r.u16() as u64,
            },
            33 => match r.u8() % 4 {
                0 | 2 => Op::InvalidateStart {
                    slot: r.u8(),
                    page: r.u16() as u64,
                    pages: r.u8() as u64,
                },
                1 => Op::HostChangeInWindow {
                    page: r.u16() as u64,
                    unmap: r.bool(),
                },
                _ => Op::InvalidateEnd,
            },
            34 => Op::HvaRange {
                which: r.u8() % 3,
                start: r.u64(),
                end: r.u64(),
            },
            35 => match r.u8() % 2 {
                0 => Op::Zap {
                    start: r.u16() as u64,
                    len: r.u16() as i16 as i64,
                },
                _ => Op::ZapRaw {
                    start: r.u64(),
                    end: r.u64(),
                },
            },
            36 => Op::ZapSlot {
                slot: r.u8() as u32 % 8,
            },
            37 => match r.u8() % 8 {
                0 => Op::ZapAllFast,
                1 => Op::CreateVcpu,
                2 | 3 => Op::FailAlloc {
                    // Most faults allocate one to three tables: fail early most often.
                    after: [0, 0, 0, 1, 1, 2, 3, 5][r.u8() as usize % 8],
                },
                4 => Op::OtherVm {
                    call: r.u8() % 5,
                    page: r.u16(),
                },
                5 => Op::BadConfig { bits: r.u64() },
                6 => Op::ZapAll,
                _ => Op::RingView {
                    vcpu: r.u8() % 5,
                    count: r.u8() % 8,
                },
            },
            38 => Op::Track {
                slot: r.u8(),
                page: r.u16() as u64,
                untrack: r.bool(),
            },
            _ => Op::TrackGfn {
                gfn: match r.u8() % 3 {
                    0 => r.u64(),
                    _ => (1 << 18) + r.u16() as u64,
                },
                untrack: r.bool(),
            },
        }
    }
}

/// A reader over the fuzz input; reads past the end give zeros.
pub struct Bytes<'a>(pub &'a [u8]);

impl Bytes<'_> {
    /// One byte.
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    /// A flag.
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }
    /// Little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    /// Little-endian u32.
    pub fn u32(&mut self) -> u32 {
        self.u16() as u32 | (self.u16() as u32) << 16
    }
    /// Little-endian u64.
    pub fn u64(&mut self) -> u64 {
        self.u32() as u64 | (self.u32() as u64) << 32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_input_decodes() {
        assert!(Op::decode_all(&[], 10).is_empty());
        let ops = Op::decode_all(&[0; 3], 10);
        assert!(!ops.is_empty());
        let bytes: Vec<u8> = (0..4096u32).map(|i| (i * 7 + i / 3) as u8).collect();
        let ops = Op::decode_all(&bytes, 1000);
        assert!(ops.len() > 100);
        assert_eq!(Op::decode_all(&bytes, 5).len(), 5);
    }
}
