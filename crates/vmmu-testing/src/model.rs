//! The reference model: what the public API must answer and what the guest must see,
//! with none of the machinery (no tables, no reverse maps, no TLBs).
//!
//! - Memslots are plain ranges `[base, base + npages)` of gfns with their host-virtual
//!   start and flags; the checks of `KVM_SET_USER_MEMORY_REGION` in KVM's order.
//! - The guest's view of gfn -> (pfn, writable, executable) is a function, not a stored
//!   map: the memslot containing the gfn, then the host's current translation of its hva
//!   (the host is the ground truth; every host change the interpreter makes is announced
//!   through the MMU notifier, as a host kernel does), READONLY, write tracking.
//!   Everything the guest can reach is executable.
//! - Dirty logging, per mode ([`DirtyMode`]):
//!   - bitmap (`Get`, `Manual`, `ManualInitSet`): per logging slot, the exact set of pages
//!     the bitmap must hold: every page written since it was last harvested (GET without
//!     manual protect) or cleared (CLEAR), all pages when logging starts with
//!     KVM_DIRTY_LOG_INITIALLY_SET. A page may be writable in the tables only while its
//!     bit is set (so no write escapes the log);
//!   - ring (`Ring`): a write to a page that is not "armed" (made writable and logged
//!     since it was last re-protected) must push an entry into the writing vCPU's ring,
//!     which that vCPU's next harvest must return; harvested pages stay armed until the
//!     reset re-protects them. Every entry a harvest returns must name a page that vCPU
//!     wrote (or tried to) while its slot logged: KVM allows duplicates, not inventions.
//! - A dirty bitmap survives a memslot move, as KVM keeps it (`kvm_prepare_memory_region`);
//!   [`Model::move_keeps_dirty`] says so.

use std::collections::{BTreeMap, BTreeSet};

use vmmu::host::{HostMemory, SimHostMemory};
use vmmu::memslot::MemslotLimits;
use vmmu::types::{AccessKind, Gpa, Hpa, Hva, PAGE_SHIFT, PAGE_SIZE};
use vmmu::{DirtyLogConfig, Error, Exit, MemoryRegion, MemslotFlags};

/// How the VM reports dirty pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyMode {
    /// `get_dirty_log` returns, clears and re-protects.
    Get,
    /// Manual protect: `get_dirty_log` copies, `clear_dirty_log` clears and re-protects.
    Manual,
    /// Manual protect with KVM_DIRTY_LOG_INITIALLY_SET.
    ManualInitSet,
    /// Per-vCPU dirty rings of this many entries.
    Ring(u32),
}

impl DirtyMode {
    /// The VM configuration for this mode.
    pub fn config(self) -> DirtyLogConfig {
        DirtyLogConfig {
            manual_protect: matches!(self, DirtyMode::Manual | DirtyMode::ManualInitSet),
            initially_all_set: self == DirtyMode::ManualInitSet,
            ring_size: match self {
                DirtyMode::Ring(n) => Some(n),
                _ => None,
            },
            ..DirtyLogConfig::default()
        }
    }
    /// Whether dirty pages go to rings.
    pub fn is_ring(self) -> bool {
        matches!(self, DirtyMode::Ring(_))
    }
    /// Whether manual protect is on.
    pub fn manual(self) -> bool {
        matches!(self, DirtyMode::Manual | DirtyMode::ManualInitSet)
    }
    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            DirtyMode::Get => "get",
            DirtyMode::Manual => "get+clear",
            DirtyMode::ManualInitSet => "get+clear/initially-set",
            DirtyMode::Ring(_) => "ring",
        }
    }
}

/// A memslot as the model sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelSlot {
    /// Slot id.
    pub id: u32,
    /// First gfn.
    pub base: u64,
    /// Pages.
    pub npages: u64,
    /// First host-virtual byte.
    pub hva: u64,
    /// Flags.
    pub flags: MemslotFlags,
}

impl ModelSlot {
    /// One past the last gfn.
    pub fn end(&self) -> u64 {
        self.base + self.npages
    }
    /// Whether `gfn` is in the slot.
    pub fn contains(&self, gfn: u64) -> bool {
        gfn >= self.base && gfn < self.end()
    }
    /// The host-virtual address of `gfn` (in the slot).
    pub fn hva_of(&self, gfn: u64) -> u64 {
        self.hva + (gfn - self.base) * PAGE_SIZE
    }
    /// READONLY.
    pub fn readonly(&self) -> bool {
        self.flags.contains(MemslotFlags::READONLY)
    }
    /// LOG_DIRTY_PAGES.
    pub fn logging(&self) -> bool {
        self.flags.contains(MemslotFlags::LOG_DIRTY_PAGES)
    }
    /// The region that creates this slot.
    pub fn region(&self) -> MemoryRegion {
        MemoryRegion {
            slot: self.id,
            flags: self.flags,
            guest_phys_addr: self.base * PAGE_SIZE,
            memory_size: self.npages * PAGE_SIZE,
            userspace_addr: self.hva,
        }
    }
}

/// What a region update does (KVM's `enum kvm_mr_change`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// A new slot.
    Create,
    /// The slot goes.
    Delete,
    /// A new base.
    Move,
    /// New flags.
    Flags,
    /// Nothing.
    None,
}

/// What a guest access must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// This result.
    Done(Result<Hpa, Exit>),
    /// The access would wait for an invalidation this thread holds open (never issued).
    Blocked,
}

/// The reference model.
#[derive(Clone, Debug)]
pub struct Model {
    /// Slot limits and guest-physical width.
    pub limits: MemslotLimits,
    /// Dirty-log mode.
    pub mode: DirtyMode,
    /// Whether a move keeps the dirty bitmap (KVM's behaviour).
    pub move_keeps_dirty: bool,
    /// Slots by id.
    pub slots: BTreeMap<u32, ModelSlot>,
    /// Bumped by every region update that changes something.
    pub generation: u64,
    /// Write-tracking counts by (slot, page offset).
    pub track: BTreeMap<(u32, u64), u16>,
    /// Bitmap modes: the pages each logging slot's bitmap must hold.
    pub dirty: BTreeMap<u32, BTreeSet<u64>>,
    /// Ring mode: pages that may be writable (pushed, not yet re-protected by a reset).
    pub armed: BTreeSet<(u32, u64)>,
    /// Ring mode: pages the given vCPU's next harvest must return.
    pub required: BTreeMap<(u32, u64), usize>,
    /// Ring mode: per vCPU, the pages it wrote (or tried to) while their slot logged.
    pub written_by: Vec<BTreeSet<(u32, u64)>>,
    /// Ring mode: entries harvested and not yet reset.
    pub harvested: Vec<(u32, u64)>,
    /// Open invalidations and the union of their ranges.
    pub invalidations: u32,
    /// The union `[start, end)` of the open invalidation ranges.
    pub inval_range: (u64, u64),
    /// vCPUs created.
    pub vcpus: usize,
    /// Most vCPUs.
    pub max_vcpus: u32,
}

const RING_MODE: &str = "the VM logs dirty pages in per-vCPU rings";
const NOT_RING: &str = "the VM logs dirty pages in bitmaps, not rings";
const NOT_MANUAL: &str = "clear_dirty_log needs manual protect";
const NOT_MANUAL_RANGES: &str = "clear_dirty_ranges needs manual protect";

impl Model {
    /// An empty model.
    pub fn new(limits: MemslotLimits, mode: DirtyMode, max_vcpus: u32) -> Self {
        Model {
            limits,
            mode,
            move_keeps_dirty: true,
            slots: BTreeMap::new(),
            generation: 0,
            track: BTreeMap::new(),
            dirty: BTreeMap::new(),
            armed: BTreeSet::new(),
            required: BTreeMap::new(),
            written_by: Vec::new(),
            harvested: Vec::new(),
            invalidations: 0,
            inval_range: (0, 0),
            vcpus: 0,
            max_vcpus,
        }
    }

    /// One past the largest gfn.
    pub fn max_gfn(&self) -> u64 {
        1u64 << (self.limits.gpa_bits as u32 - PAGE_SHIFT)
    }

    /// The slot containing `gfn`.
    pub fn lookup(&self, gfn: u64) -> Option<&ModelSlot> {
        self.slots.values().find(|s| s.contains(gfn))
    }

    // ---------------------------------------------------------------------------------
    // Memslots.
    // ---------------------------------------------------------------------------------

    /// What `set_user_memory_region(r)` must do: KVM's checks, in KVM's order.
    pub fn check_region(&self, r: &MemoryRegion) -> Result<Change, Error> {
        if r.slot >= self.limits.id_limit {
            return Err(Error::InvalidSlotId {
                slot: r.slot,
                limit: self.limits.id_limit,
            });
        }
        if r.flags.bits() & !3 != 0 {
            return Err(Error::InvalidFlags(r.flags.bits()));
        }
        if !r.memory_size.is_multiple_of(PAGE_SIZE) {
            return Err(Error::UnalignedSize(r.memory_size));
        }
        if !r.guest_phys_addr.is_multiple_of(PAGE_SIZE) {
            return Err(Error::UnalignedGuestPhysAddr(r.guest_phys_addr));
        }
        if !r.userspace_addr.is_multiple_of(PAGE_SIZE) {
            return Err(Error::UnalignedUserspaceAddr(r.userspace_addr));
        }
        let old = self.slots.get(&r.slot);
        if r.memory_size == 0 {
            return match old {
                Some(_) => Ok(Change::Delete),
                None => Err(Error::ZeroSize { slot: r.slot }),
            };
        }
        let end = r
            .guest_phys_addr
            .checked_add(r.memory_size)
            .ok_or(Error::AddressOverflow)?;
        r.userspace_addr
            .checked_add(r.memory_size)
            .ok_or(Error::AddressOverflow)?;
        if end > self.max_gfn() * PAGE_SIZE {
            return Err(Error::BeyondGuestPhysWidth {
                end,
                width_bits: self.limits.gpa_bits,
            });
        }
        let base = r.guest_phys_addr / PAGE_SIZE;
        let change = match old {
            None => {
                if self.slots.len() as u32 >= self.limits.max_slots {
                    return Err(Error::TooManySlots {
                        max: self.limits.max_slots,
                    });
                }
                Change::Create
            }
            Some(old) => {
                if old.npages * PAGE_SIZE != r.memory_size {
                    return Err(Error::SlotResize { slot: r.slot });
                }
                if old.hva != r.userspace_addr {
                    return Err(Error::SlotHvaChange { slot: r.slot });
                }
                if old.readonly() != r.flags.contains(MemslotFlags::READONLY) {
                    return Err(Error::ReadonlyFlagChange { slot: r.slot });
                }
                if old.base != base {
                    Change::Move
                } else if old.flags != r.flags {
                    Change::Flags
                } else {
                    Change::None
                }
            }
        };
        if matches!(change, Change::Create | Change::Move) {
            let end_gfn = base + r.memory_size / PAGE_SIZE;
            // The lowest-based slot it overlaps (the VM keeps its slots sorted by base).
            if let Some(other) = self
                .slots
                .values()
                .filter(|s| s.id != r.slot && s.base < end_gfn && base < s.end())
                .min_by_key(|s| s.base)
            {
                return Err(Error::Overlap {
                    slot: r.slot,
                    other: other.id,
                });
            }
        }
        Ok(change)
    }

    /// Apply a region [`check_region`](Self::check_region) accepted.
    pub fn apply_region(&mut self, r: &MemoryRegion, change: Change) {
        let id = r.slot;
        let new = ModelSlot {
            id,
            base: r.guest_phys_addr / PAGE_SIZE,
            npages: r.memory_size / PAGE_SIZE,
            hva: r.userspace_addr,
            flags: r.flags,
        };
        let was_logging = self.slots.get(&id).is_some_and(|s| s.logging());
        match change {
            Change::None => return,
            Change::Create => {
                self.slots.insert(id, new);
                self.dirty.remove(&id);
                if new.logging() {
                    self.start_logging(&new);
                }
            }
            Change::Delete => {
                self.slots.remove(&id);
                self.dirty.remove(&id);
                self.forget_slot(id);
            }
            Change::Move => {
                self.slots.insert(id, new);
                self.forget_slot(id);
                match (was_logging, new.logging()) {
                    (true, true) if self.move_keeps_dirty => {}
                    (_, true) => self.start_logging(&new),
                    (_, false) => {
                        self.dirty.remove(&id);
                    }
                }
            }
            Change::Flags => {
                self.slots.insert(id, new);
                match (was_logging, new.logging()) {
                    (false, true) => self.start_logging(&new),
                    (true, false) => {
                        self.dirty.remove(&id);
                    }
                    _ => {}
                }
            }
        }
        self.generation += 1;
    }

    /// A slot's mappings and per-page metadata go (delete, move): write tracking, armed
    /// ring pages. Ring entries already pushed stay in their rings.
    fn forget_slot(&mut self, id: u32) {
        self.track.retain(|&(s, _), _| s != id);
        self.armed.retain(|&(s, _)| s != id);
    }

    fn start_logging(&mut self, s: &ModelSlot) {
        let bits = if self.mode == DirtyMode::ManualInitSet {
            (0..s.npages).collect()
        } else {
            BTreeSet::new()
        };
        self.dirty.insert(s.id, bits);
        // Logging starts write-protected (rings: every page must push again).
        self.armed.retain(|&(sl, _)| sl != s.id);
    }

    // ---------------------------------------------------------------------------------
    // The guest's view.
    // ---------------------------------------------------------------------------------

    /// Whether a fault on `hva` must wait for an open invalidation.
    pub fn inval_covers(&self, hva: u64) -> bool {
        self.invalidations != 0 && hva >= self.inval_range.0 && hva < self.inval_range.1
    }

    /// Write-tracking count of page `off` of slot `id`.
    pub fn tracked(&self, id: u32, off: u64) -> u16 {
        self.track.get(&(id, off)).copied().unwrap_or(0)
    }

    /// What an access of `kind` to `gpa` must return.
    pub fn expect_access(&self, host: &SimHostMemory, gpa: u64, kind: AccessKind) -> Expect {
        let gfn = gpa >> PAGE_SHIFT;
        if gpa >> self.limits.gpa_bits != 0 {
            return Expect::Done(Err(Exit::Error(Error::InvalidRange {
                start: gfn,
                end: gfn + 1,
            })));
        }
        let write = kind == AccessKind::Write;
        let mmio = Expect::Done(Err(Exit::Mmio {
            gpa: Gpa(gpa),
            write,
        }));
        let Some(s) = self.lookup(gfn) else {
            return mmio;
        };
        if write && s.readonly() {
            return mmio;
        }
        let hva = s.hva_of(gfn);
        if self.inval_covers(hva) {
            return Expect::Blocked;
        }
        let Some(hp) = host.translate(Hva(hva)) else {
            return Expect::Done(Err(Exit::Error(Error::NoHostMapping {
                gpa: Gpa(gpa),
                hva: Hva(hva),
            })));
        };
        if write && !hp.writable {
            return Expect::Done(Err(Exit::Error(Error::HostReadOnly {
                gpa: Gpa(gpa),
                hva: Hva(hva),
            })));
        }
        if write && self.tracked(s.id, gfn - s.base) != 0 {
            return Expect::Done(Err(Exit::WriteTracked { gpa: Gpa(gpa) }));
        }
        Expect::Done(Ok(Hpa(hp.pfn.0 * PAGE_SIZE + gpa % PAGE_SIZE)))
    }

    /// The translation the guest may hold for `gfn`: (pfn, writable); `None` if nothing
    /// may be mapped there (outside every slot, or no host page).
    pub fn translation(&self, host: &SimHostMemory, gfn: u64) -> Option<(u64, bool)> {
        let s = self.lookup(gfn)?;
        let hp = host.translate(Hva(s.hva_of(gfn)))?;
        let writable = !s.readonly() && hp.writable && self.tracked(s.id, gfn - s.base) == 0;
        Some((hp.pfn.0, writable))
    }

    /// Whether a write to page `off` of logging slot `id` may go without a fault: it is
    /// already logged (its bit is set, or it is armed in a ring).
    pub fn logged(&self, id: u32, off: u64) -> bool {
        if self.mode.is_ring() {
            self.armed.contains(&(id, off))
        } else {
            self.dirty.get(&id).is_some_and(|d| d.contains(&off))
        }
    }

    /// A write by vCPU `vcpu` to `gpa` completed.
    pub fn wrote(&mut self, vcpu: usize, gpa: u64) {
        let gfn = gpa >> PAGE_SHIFT;
        let Some(s) = self.lookup(gfn).copied() else {
            return;
        };
        if !s.logging() {
            return;
        }
        let off = gfn - s.base;
        if self.mode.is_ring() {
            self.tried_write(vcpu, s.id, off);
            if self.armed.insert((s.id, off)) {
                self.required.insert((s.id, off), vcpu);
            }
        } else {
            self.dirty.entry(s.id).or_default().insert(off);
        }
    }

    /// vCPU `vcpu` tried to write page `off` of logging slot `id` (it may have pushed).
    pub fn tried_write(&mut self, vcpu: usize, id: u32, off: u64) {
        if self.written_by.len() <= vcpu {
            self.written_by.resize(vcpu + 1, BTreeSet::new());
        }
        self.written_by[vcpu].insert((id, off));
    }

    // ---------------------------------------------------------------------------------
    // Dirty-log calls.
    // ---------------------------------------------------------------------------------

    /// What `get_dirty_log(slot, out)` must return, and the bitmap words it must copy.
    pub fn get_dirty_log(&self, slot: u32, out_len: usize) -> Result<Vec<u64>, Error> {
        if self.mode.is_ring() {
            return Err(Error::WrongDirtyLogMode(RING_MODE));
        }
        let s = self.slots.get(&slot).ok_or(Error::NoSuchSlot(slot))?;
        let bits = self.dirty.get(&slot).ok_or(Error::NotLogging(slot))?;
        let words = s.npages.div_ceil(64) as usize;
        if out_len < words {
            return Err(Error::BitmapTooSmall {
                needed: words,
                got: out_len,
            });
        }
        let mut w = vec![0u64; words];
        for &p in bits {
            w[(p / 64) as usize] |= 1 << (p % 64);
        }
        Ok(w)
    }

    /// A successful `get_dirty_log(slot)`: without manual protect the bits are cleared.
    pub fn got_dirty_log(&mut self, slot: u32) {
        if !self.mode.manual() {
            if let Some(d) = self.dirty.get_mut(&slot) {
                d.clear();
            }
        }
    }

    /// What `clear_dirty_log` must return (pages cleared), applying it if it succeeds.
    pub fn clear_dirty_log(
        &mut self,
        slot: u32,
        first_page: u64,
        num_pages: u64,
        bitmap: &[u64],
    ) -> Result<u64, Error> {
        if self.mode.is_ring() {
            return Err(Error::WrongDirtyLogMode(RING_MODE));
        }
        if !self.mode.manual() {
            return Err(Error::WrongDirtyLogMode(NOT_MANUAL));
        }
        let s = *self.slots.get(&slot).ok_or(Error::NoSuchSlot(slot))?;
        if !self.dirty.contains_key(&slot) {
            return Err(Error::NotLogging(slot));
        }
        if !first_page.is_multiple_of(64) {
            return Err(Error::ClearLogUnaligned { first_page });
        }
        let npages = s.npages;
        if first_page > npages
            || num_pages > npages - first_page
            || (!num_pages.is_multiple_of(64) && first_page + num_pages != npages)
        {
            return Err(Error::ClearLogRange {
                first_page,
                num_pages,
                npages,
            });
        }
        let nwords = num_pages.div_ceil(64) as usize;
        if bitmap.len() < nwords {
            return Err(Error::BitmapTooSmall {
                needed: nwords,
                got: bitmap.len(),
            });
        }
        let d = self.dirty.get_mut(&slot).expect("checked");
        let mut cleared = 0;
        for i in 0..num_pages {
            if bitmap[(i / 64) as usize] & (1 << (i % 64)) != 0 && d.remove(&(first_page + i)) {
                cleared += 1;
            }
        }
        Ok(cleared)
    }

    /// What `clear_dirty_ranges(slot, ranges)` must return (pages cleared; ranges as
    /// (first page, pages)), applying it if it succeeds.
    pub fn clear_dirty_ranges(&mut self, slot: u32, ranges: &[(u64, u64)]) -> Result<u64, Error> {
        if self.mode.is_ring() {
            return Err(Error::WrongDirtyLogMode(RING_MODE));
        }
        if !self.mode.manual() {
            return Err(Error::WrongDirtyLogMode(NOT_MANUAL_RANGES));
        }
        let s = *self.slots.get(&slot).ok_or(Error::NoSuchSlot(slot))?;
        if !self.dirty.contains_key(&slot) {
            return Err(Error::NotLogging(slot));
        }
        let npages = s.npages;
        if let Some(&(first_page, num_pages)) =
            ranges.iter().find(|&&(f, n)| f > npages || n > npages - f)
        {
            return Err(Error::ClearLogRange {
                first_page,
                num_pages,
                npages,
            });
        }
        let d = self.dirty.get_mut(&slot).expect("checked");
        let mut cleared = 0;
        for &(f, n) in ranges {
            let pages: Vec<u64> = d.range(f..f + n).copied().collect();
            cleared += pages.len() as u64;
            for p in pages {
                d.remove(&p);
            }
        }
        Ok(cleared)
    }

    /// Check what `harvest_dirty_ring(vcpu)` returned (`Ok` with the entries) against the
    /// model, and apply it. `Err` describes a broken property.
    pub fn harvested_ring(&mut self, vcpu: usize, entries: &[(u32, u64)]) -> Result<(), String> {
        self.harvested_ring_entries(vcpu, entries, true)
    }

    /// Check entries the VMM took from `vcpu`'s ring through its view (`Vm::dirty_ring`),
    /// some of what the ring owes, and apply them: each must be a page the vCPU wrote
    /// while logging (a view may take fewer than the ring owes).
    pub fn harvested_ring_view(
        &mut self,
        vcpu: usize,
        entries: &[(u32, u64)],
    ) -> Result<(), String> {
        self.harvested_ring_entries(vcpu, entries, false)
    }

    fn harvested_ring_entries(
        &mut self,
        vcpu: usize,
        entries: &[(u32, u64)],
        all: bool,
    ) -> Result<(), String> {
        let got: BTreeSet<(u32, u64)> = entries.iter().copied().collect();
        for (&p, &owner) in self.required.iter().filter(|_| all) {
            if owner == vcpu && !got.contains(&p) {
                return Err(format!(
                    "vCPU {vcpu}'s ring harvest misses page {} of slot {} (written, never reported): a lost dirty page",
                    p.1, p.0
                ));
            }
        }
        let written = self.written_by.get(vcpu);
        for &e in entries {
            if !written.is_some_and(|w| w.contains(&e)) {
                return Err(format!(
                    "vCPU {vcpu}'s ring reports page {} of slot {}, which it never wrote while logging",
                    e.1, e.0
                ));
            }
            self.required.remove(&e);
        }
        self.harvested.extend_from_slice(entries);
        Ok(())
    }

    /// What `harvest_dirty_ring(vcpu)` must fail with, if anything.
    pub fn harvest_error(&self, vcpu: u32) -> Option<Error> {
        if vcpu as usize >= self.vcpus {
            Some(Error::NoSuchVcpu(vcpu))
        } else if !self.mode.is_ring() {
            Some(Error::WrongDirtyLogMode(NOT_RING))
        } else {
            None
        }
    }

    /// `reset_dirty_rings`: the number it must return, applied.
    pub fn reset_rings(&mut self) -> Result<usize, Error> {
        if !self.mode.is_ring() {
            return Err(Error::WrongDirtyLogMode(NOT_RING));
        }
        let n = self.harvested.len();
        for e in self.harvested.drain(..) {
            self.armed.remove(&e);
        }
        Ok(n)
    }

    // ---------------------------------------------------------------------------------
    // Write tracking, invalidations, vCPUs.
    // ---------------------------------------------------------------------------------

    /// `track_write(gfn)` (`add`) or `untrack_write(gfn)`: the result, applied.
    pub fn track_write(&mut self, gfn: u64, add: bool) -> Result<(), Error> {
        let s = *self.lookup(gfn).ok_or(Error::InvalidRange {
            start: gfn,
            end: gfn.saturating_add(1),
        })?;
        let c = self.track.entry((s.id, gfn - s.base)).or_insert(0);
        match (add, *c) {
            (true, u16::MAX) | (false, 0) => {
                if *c == 0 {
                    self.track.remove(&(s.id, gfn - s.base));
                }
                Err(Error::WriteTrackCount { gfn })
            }
            (true, _) => {
                *c += 1;
                // Tracking re-protects the page: a ring must see the next write again.
                self.armed.remove(&(s.id, gfn - s.base));
                Ok(())
            }
            (false, _) => {
                *c -= 1;
                if *c == 0 {
                    self.track.remove(&(s.id, gfn - s.base));
                }
                Ok(())
            }
        }
    }

    /// `invalidate_range_start(start, end)`: the result, applied.
    pub fn invalidate_start(&mut self, start: u64, end: u64) -> Result<(), Error> {
        if start >= end {
            return Err(Error::InvalidHvaRange { start, end });
        }
        let start = start & !(PAGE_SIZE - 1);
        if self.invalidations == 0 {
            self.inval_range = (start, end);
        } else {
            self.inval_range = (self.inval_range.0.min(start), self.inval_range.1.max(end));
        }
        self.invalidations += 1;
        Ok(())
    }

    /// `invalidate_range_end()`: the result, applied.
    pub fn invalidate_end(&mut self) -> Result<(), Error> {
        if self.invalidations == 0 {
            return Err(Error::NoInvalidationInProgress);
        }
        self.invalidations -= 1;
        if self.invalidations == 0 {
            self.inval_range = (0, 0);
        }
        Ok(())
    }

    /// The gfn ranges (per slot) that host-virtual `[start, end)` backs.
    pub fn gfn_ranges(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let start = start & !(PAGE_SIZE - 1);
        self.slots
            .values()
            .filter_map(|s| {
                let (ua, ue) = (s.hva, s.hva + s.npages * PAGE_SIZE);
                let (lo, hi) = (start.max(ua), end.min(ue));
                (lo < hi).then(|| {
                    (
                        s.base + (lo - ua) / PAGE_SIZE,
                        s.base + (hi - ua).div_ceil(PAGE_SIZE),
                    )
                })
            })
            .collect()
    }

    /// `create_vcpu()`: the result, applied.
    pub fn create_vcpu(&mut self) -> Result<usize, Error> {
        if self.vcpus as u32 >= self.max_vcpus {
            return Err(Error::TooManyVcpus {
                max: self.max_vcpus,
            });
        }
        self.vcpus += 1;
        if self.written_by.len() < self.vcpus {
            self.written_by.resize(self.vcpus, BTreeSet::new());
        }
        Ok(self.vcpus - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(slot: u32, gpa: u64, size: u64, hva: u64, flags: MemslotFlags) -> MemoryRegion {
        MemoryRegion {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: hva,
        }
    }

    fn apply(m: &mut Model, r: MemoryRegion) -> Result<Change, Error> {
        let c = m.check_region(&r)?;
        m.apply_region(&r, c);
        Ok(c)
    }

    #[test]
    fn slots_and_errors_in_kvm_order() {
        let limits = MemslotLimits {
            max_slots: 2,
            ..MemslotLimits::default()
        };
        let mut m = Model::new(limits, DirtyMode::Get, 4);
        let e = MemslotFlags::empty();
        assert_eq!(
            apply(&mut m, region(0, 0x10_0000, 0x20_0000, 0x1000_0000, e)),
            Ok(Change::Create)
        );
        assert_eq!(
            apply(&mut m, region(1, 0x1f_f000, 0x2000, 0x2000_0000, e)),
            Err(Error::Overlap { slot: 1, other: 0 })
        );
        assert_eq!(
            apply(&mut m, region(0, 0x10_0001, 0, 0, MemslotFlags::empty())),
            Err(Error::UnalignedGuestPhysAddr(0x10_0001))
        );
        assert_eq!(
            apply(&mut m, region(1, 0, 0, 0, e)),
            Err(Error::ZeroSize { slot: 1 })
        );
        assert_eq!(
            apply(&mut m, region(1, 0, 0x1000, 0x3000_0000, e)),
            Ok(Change::Create)
        );
        assert_eq!(
            apply(&mut m, region(2, 0x100_0000, 0x1000, 0, e)),
            Err(Error::TooManySlots { max: 2 })
        );
        let log = MemslotFlags::LOG_DIRTY_PAGES;
        assert_eq!(
            apply(&mut m, region(0, 0x10_0000, 0x20_0000, 0x1000_0000, log)),
            Ok(Change::Flags)
        );
        m.wrote(0, 0x10_0000 + 5 * PAGE_SIZE);
        assert_eq!(m.get_dirty_log(0, 8).unwrap()[0], 1 << 5);
        m.got_dirty_log(0);
        assert_eq!(m.get_dirty_log(0, 8).unwrap()[0], 0);
        assert_eq!(
            apply(&mut m, region(0, 0x10_0000, 0, 0, e)),
            Ok(Change::Delete)
        );
        assert_eq!(m.generation, 4);
    }

    #[test]
    fn ring_requires_each_written_page_once_until_reset() {
        let mut m = Model::new(MemslotLimits::default(), DirtyMode::Ring(64), 4);
        m.create_vcpu().unwrap();
        m.create_vcpu().unwrap();
        let log = MemslotFlags::LOG_DIRTY_PAGES;
        apply(&mut m, region(3, 0, 0x10_0000, 0x1000_0000, log)).unwrap();
        m.wrote(0, 0x3000);
        m.wrote(1, 0x3000); // armed: no second push needed
        assert!(m.harvested_ring(1, &[]).is_ok());
        assert!(
            m.harvested_ring(0, &[]).is_err(),
            "page 3 is owed by vCPU 0"
        );
        assert!(m.harvested_ring(0, &[(3, 3), (3, 3)]).is_ok());
        assert!(m.harvested_ring(0, &[(3, 4)]).is_err(), "never written");
        assert_eq!(m.reset_rings(), Ok(2));
        assert!(!m.logged(3, 3));
    }
}
