//! Shadow pages (KVM's `struct kvm_mmu_page`): one page table plus what the MMU knows
//! about it, and the store that names them by compact table ids.
//!
//! # Invariants (checked by `audit`)
//! - `present` equals the number of shadow-present entries in the table and `mmio` the
//!   number of MMIO entries; an entry is one or the other or zero.
//! - For a non-leaf page, `children[i]` is the id of the page whose frame entry `i` holds,
//!   and is 0 exactly when entry `i` is not a present non-leaf SPTE.
//! - `parent_ptes` holds one [`SpteRef`] for every non-leaf SPTE that points at this page.
//! - A page's frame stays allocated for as long as the page is in the store; the store
//!   gives frames back only through `Pages::free` (crate-private), which the MMU calls
//!   after a flush; pages are made only by `Pages::create` (crate-private), under an MMU
//!   that holds its allocator for as long as they live.
//!
//! # Locking
//! The store lives inside the MMU lock. The tables themselves are also read by CPU
//! walkers without the lock; that is why entries are atomics (see [`crate::table`]).

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;
use core::ptr::NonNull;

use crate::rmap::{RmapHead, SpteRef};
use crate::spte::{Spte, SpteFormat};
use crate::table::{Table, TableAllocator};
use crate::types::{AccessFlags, Gfn, Level, Pfn, SPTE_ENT_PER_PAGE};

/// What a shadow page shadows, packed as KVM's `kvm_mmu_page_role` word.
///
/// Bits 0..=3 level (always 1..=4: roles are only built from a [`Level`]), bit 4
/// direct, bits 5..=7 access, bit 8 invalid; for shadow paging, bit 9 CR0.WP and bit 10
/// EFER.NX of the context the page was built in (pages built under different values
/// are not shared, as KVM's role keeps them apart), bit 11 "shadow paging".
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Role(u32);

impl Role {
    const LEVEL_MASK: u32 = 0xf;
    const DIRECT: u32 = 1 << 4;
    const ACCESS_SHIFT: u32 = 5;
    const INVALID: u32 = 1 << 8;
    const CR0_WP: u32 = 1 << 9;
    const EFER_NX: u32 = 1 << 10;
    const PAGING: u32 = 1 << 11;

    /// A direct-map role (the page maps a contiguous gfn range; KVM's `role.direct`).
    pub const fn direct(level: Level) -> Role {
        Role(level as u32 | Self::DIRECT | ((AccessFlags::ALL.bits() as u32) << Self::ACCESS_SHIFT))
    }
    /// A shadow-paging role: a page shadowing a guest table of `level` (`direct` false), or
    /// a direct page standing for part of a guest huge page (`direct` true), granting
    /// `access` to its children, built under CR0.WP `wp` and EFER.NX `nx`.
    pub const fn paging(
        level: Level,
        direct: bool,
        access: AccessFlags,
        wp: bool,
        nx: bool,
    ) -> Role {
        Role(
            level as u32
                | if direct { Self::DIRECT } else { 0 }
                | ((access.bits() as u32) << Self::ACCESS_SHIFT)
                | if wp { Self::CR0_WP } else { 0 }
                | if nx { Self::EFER_NX } else { 0 }
                | Self::PAGING,
        )
    }
    /// Whether the page belongs to a shadow-paging MMU (indirect, or direct under a guest
    /// huge page); such pages are hashed by gfn and role.
    pub const fn is_paging(self) -> bool {
        self.0 & Self::PAGING != 0
    }
    /// CR0.WP of the context the page was built in (shadow paging).
    pub const fn cr0_wp(self) -> bool {
        self.0 & Self::CR0_WP != 0
    }
    /// EFER.NX of the context the page was built in (shadow paging).
    pub const fn efer_nx(self) -> bool {
        self.0 & Self::EFER_NX != 0
    }
    /// The role of a child page `below` this one, reached through an entry granting
    /// `access` (shadow paging).
    pub const fn child(self, below: Level, direct: bool, access: AccessFlags) -> Role {
        Role::paging(below, direct, access, self.cr0_wp(), self.efer_nx())
    }
    /// The level of the table.
    #[inline]
    pub fn level(self) -> Level {
        match self.0 & Self::LEVEL_MASK {
            1 => Level::L4K,
            2 => Level::L2M,
            3 => Level::L1G,
            _ => Level::L512G,
        }
    }
    /// Whether the page maps gfns directly (no guest table behind it).
    pub const fn is_direct(self) -> bool {
        self.0 & Self::DIRECT != 0
    }
    /// Access rights the page grants its children.
    pub const fn access(self) -> AccessFlags {
        AccessFlags::from_bits_truncate((self.0 >> Self::ACCESS_SHIFT) as u8)
    }
    /// Whether the page has been zapped while still referenced (a root in use).
    pub const fn is_invalid(self) -> bool {
        self.0 & Self::INVALID != 0
    }
    /// The same role marked invalid.
    pub const fn invalidated(self) -> Role {
        Role(self.0 | Self::INVALID)
    }
    /// The SPTE format of the page's table: legacy for shadow paging's pages, EPT for
    /// the direct shadow MMU's (the format each builds, [`crate::shadow::ShadowMmu::format`]).
    #[inline]
    pub const fn format(self) -> SpteFormat {
        if self.is_paging() {
            SpteFormat::LEGACY
        } else {
            SpteFormat::EPT
        }
    }
    /// Raw word.
    pub const fn word(self) -> u32 {
        self.0
    }
}

impl fmt::Debug for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Role({} {}{}{:?})",
            self.level().name(),
            if self.is_direct() { "direct " } else { "" },
            if self.is_invalid() { "invalid " } else { "" },
            self.access()
        )
    }
}

/// A shadow page: one table and its metadata.
pub struct ShadowPage {
    table: NonNull<Table>,
    /// Frame of the table, as hardware sees it.
    pub frame: Pfn,
    /// What the page shadows.
    pub role: Role,
    /// First gfn the page maps (direct pages), or the gfn of the guest table it shadows
    /// (indirect pages).
    pub gfn: Gfn,
    /// Reverse map of the non-leaf SPTEs that point at this page.
    pub parent_ptes: RmapHead,
    /// vCPUs using the page as their root.
    pub root_count: u32,
    /// Shadow-present entries. (32 bits, as `mmio`: `used` loads both, and a wider load
    /// over a narrower store cannot be store-forwarded, a stall per zapped leaf.)
    pub present: u32,
    /// MMIO entries.
    pub mmio: u32,
    /// MMU generation the page was created in (KVM's `mmu_valid_gen`).
    pub mmu_valid_gen: u64,
    /// Seed 001: leaf SPTEs that are writable or can be made writable by the lockless
    /// fast path (KVM's `possible_writable_spte_bitmap`), and how many there are. Exact
    /// after every change made through the `spte_*` funnels; the fast path never changes
    /// membership (it only sets W on an SPTE that is already counted).
    writable_bitmap: [u64; SPTE_ENT_PER_PAGE / 64],
    /// Number of bits set in `writable_bitmap`.
    pub possible_writable: u16,
    children: Option<Box<[u32; SPTE_ENT_PER_PAGE]>>,
    /// Shadow paging: what each entry maps (KVM's `shadowed_translation`): the gfn of a
    /// leaf, in an indirect page whose gfns do not follow from its position.
    translations: Option<Box<[u64; SPTE_ENT_PER_PAGE]>>,
    /// Shadow paging: the page is unsync: the guest writes its table directly and the
    /// entries are brought back in line at the next sync point.
    pub unsync: bool,
    /// Shadow paging: entries whose child is unsync or has unsync descendants
    /// (KVM's `unsync_child_bitmap`), and how many.
    pub unsync_child_bitmap: [u64; SPTE_ENT_PER_PAGE / 64],
    /// Number of bits set in `unsync_child_bitmap`.
    pub unsync_children: u16,
    /// Shadow paging: emulated writes since the page was last used by a fault.
    pub write_flooding_count: u8,
    /// Shadow paging: the page is in the MMU's hash (KVM's `mmu_page_hash`).
    pub hashed: bool,
    /// Creation order (reclaim zaps the oldest first, as KVM's active list).
    pub seq: u64,
}

// SAFETY: the table pointer is owned by the page (the frame is allocated for the page's
// life) and the table's entries are atomics; all other fields are plain data.
unsafe impl Send for ShadowPage {}
// SAFETY: as above; shared access only reads plain fields or uses atomics.
unsafe impl Sync for ShadowPage {}

impl ShadowPage {
    /// The page's table.
    #[inline]
    pub fn table(&self) -> &Table {
        // SAFETY: the frame is allocated for as long as the page exists (module invariant).
        unsafe { self.table.as_ref() }
    }
    /// Entries in use (present or MMIO).
    #[inline]
    pub fn used(&self) -> u32 {
        self.present + self.mmio
    }
    /// The child page id under entry `i` (0 if none).
    #[inline]
    pub fn child(&self, i: usize) -> u32 {
        self.children.as_ref().map_or(0, |c| c[i])
    }
    /// The gfn mapped by entry `i`: from the position for a direct page, from the recorded
    /// translation for an indirect one (KVM's `kvm_mmu_page_get_gfn`).
    #[inline]
    pub fn gfn_at(&self, i: usize) -> Gfn {
        match &self.translations {
            Some(t) => Gfn(t[i]),
            None => Gfn(self.gfn.0 + ((i as u64) << self.role.level().gfn_shift())),
        }
    }
    /// Record the gfn entry `i` maps (indirect pages).
    #[inline]
    pub fn set_gfn_at(&mut self, i: usize, gfn: Gfn) {
        self.translations
            .as_mut()
            .expect("direct page has no translations")[i] = gfn.0;
    }
    /// Whether the page records per-entry gfns (an indirect shadow-paging page).
    #[inline]
    pub fn has_translations(&self) -> bool {
        self.translations.is_some()
    }
    /// Mark entry `i` as leading to unsync pages; whether the page had none before.
    #[inline]
    pub fn set_unsync_child(&mut self, i: usize) -> bool {
        let (w, b) = (i / 64, 1u64 << (i % 64));
        if self.unsync_child_bitmap[w] & b != 0 {
            return false;
        }
        self.unsync_child_bitmap[w] |= b;
        self.unsync_children += 1;
        self.unsync_children == 1
    }
    /// Clear entry `i`'s unsync mark; whether the page has none left (and had one).
    #[inline]
    pub fn clear_unsync_child(&mut self, i: usize) -> bool {
        let (w, b) = (i / 64, 1u64 << (i % 64));
        if self.unsync_child_bitmap[w] & b == 0 {
            return false;
        }
        self.unsync_child_bitmap[w] &= !b;
        self.unsync_children -= 1;
        self.unsync_children == 0
    }
    /// Record (or clear, with 0) the child page id under entry `i`.
    #[inline]
    pub fn set_child(&mut self, i: usize, id: u32) {
        self.children.as_mut().expect("leaf page has no children")[i] = id;
    }
    /// Install `new` in entry `i`, which holds no shadow-present SPTE (KVM's
    /// `mmu_spte_set`). A non-present entry has no bits a CPU could set, so a plain store
    /// loses nothing.
    #[inline]
    pub fn spte_set(&mut self, i: usize, new: Spte) {
        let old = self.table().get(i);
        debug_assert!(!old.is_shadow_present(), "spte_set over a present SPTE");
        self.table().set(i, new);
        self.account_at(i, old, new);
    }

    /// Replace the shadow-present entry `i` with `new`, returning the old value with every
    /// bit the CPU set until the replacement (KVM's `mmu_spte_update`).
    #[inline]
    pub fn spte_update(&mut self, i: usize, new: Spte) -> Spte {
        let t = self.table();
        let old = t.get(i);
        let old = if self.role.format().has_volatile_bits(old) {
            t.swap(i, new)
        } else {
            t.set(i, new);
            old
        };
        self.account_at(i, old, new);
        old
    }

    /// Clear W in entry `i`, which held the writable leaf `old` (dirty-logging
    /// protection). Only W changes: present, MMIO and possibly-writable (MMU-writable is
    /// kept) stay as they were, so no counter moves and `&self` suffices. Returns the old
    /// value with every bit a CPU set until the change.
    #[inline]
    pub fn spte_write_protect(&self, i: usize, old: Spte) -> Spte {
        debug_assert!(old.is_writable());
        let t = self.table();
        if self.role.format().has_volatile_bits(old) {
            t.swap(i, old.write_protected())
        } else {
            t.set(i, old.write_protected());
            old
        }
    }

    /// The possibly-writable bitmap words (seed 001).
    #[inline]
    pub fn possible_writable_words(&self) -> [u64; SPTE_ENT_PER_PAGE / 64] {
        self.writable_bitmap
    }

    /// Clear entry `i`, returning the old value with every bit the CPU set until the
    /// clear (KVM's `mmu_spte_clear_track_bits`).
    #[inline]
    pub fn spte_clear(&mut self, i: usize) -> Spte {
        self.spte_update(i, Spte::NONE)
    }

    /// Clear entry `i`, which holds a shadow-present leaf, for a zap: as
    /// [`spte_clear`](Self::spte_clear), but the counters move by what is known of the old
    /// entry (present; possibly-writable as its bitmap bit says), which spares the zap
    /// loops recomputing it for every leaf.
    #[inline]
    pub fn spte_zap_leaf(&mut self, i: usize) -> Spte {
        let t = self.table();
        let old = t.get(i);
        let old = if self.role.format().has_volatile_bits(old) {
            t.swap(i, Spte::NONE)
        } else {
            t.set(i, Spte::NONE);
            old
        };
        debug_assert!(old.is_shadow_present() && old.is_leaf(self.role.level()));
        self.present -= 1;
        let (w, bit) = (i / 64, 1u64 << (i % 64));
        if self.writable_bitmap[w] & bit != 0 {
            self.writable_bitmap[w] &= !bit;
            self.possible_writable -= 1;
        }
        old
    }

    /// Clear every entry of this last-level page, which holds leaves and nothing else (no
    /// MMIO entry), for a zap that drops them all: 512 stores in table order, no load,
    /// and the counters reset at once instead of leaf by leaf. Returns how many leaves it
    /// held. The old values are not returned: a zap keeps none of their bits.
    pub fn zap_all_leaves(&mut self) -> u32 {
        debug_assert!(self.role.level() == Level::L4K && self.mmio == 0);
        let t = self.table();
        for i in 0..SPTE_ENT_PER_PAGE {
            t.set(i, Spte::NONE);
        }
        let n = self.present;
        self.present = 0;
        self.writable_bitmap = [0; SPTE_ENT_PER_PAGE / 64];
        self.possible_writable = 0;
        n
    }

    /// Whether `spte`, an entry of this page, is a leaf that is writable or can be made
    /// writable locklessly (seed 001's "possible writable").
    #[inline]
    pub fn is_possible_writable(&self, spte: Spte) -> bool {
        spte.is_leaf(self.role.level())
            && (spte.is_writable() || spte.can_be_made_writable_locklessly())
    }

    /// Indices of the possibly-writable entries, in order (seed 001).
    #[inline]
    pub fn possible_writable_indices(&self) -> impl Iterator<Item = usize> + '_ {
        self.writable_bitmap
            .iter()
            .enumerate()
            .flat_map(|(w, &bits)| {
                let mut bits = bits;
                core::iter::from_fn(move || {
                    if bits == 0 {
                        return None;
                    }
                    let b = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    Some(w * 64 + b)
                })
            })
    }

    /// Whether entry `i` is marked possibly-writable.
    #[inline]
    pub fn writable_bit(&self, i: usize) -> bool {
        self.writable_bitmap[i / 64] & (1 << (i % 64)) != 0
    }

    #[inline]
    fn account_at(&mut self, i: usize, old: Spte, new: Spte) {
        let level = self.role.level();
        let pw =
            |s: Spte| s.is_leaf(level) && (s.is_writable() || s.can_be_made_writable_locklessly());
        let (was, is) = (pw(old), pw(new));
        if was != is {
            self.writable_bitmap[i / 64] ^= 1 << (i % 64);
            if is {
                self.possible_writable += 1;
            } else {
                self.possible_writable -= 1;
            }
        }
        self.account_counts(old, new);
    }

    #[inline]
    fn account_counts(&mut self, old: Spte, new: Spte) {
        self.present =
            self.present + new.is_shadow_present() as u32 - old.is_shadow_present() as u32;
        self.mmio = self.mmio + new.is_mmio() as u32 - old.is_mmio() as u32;
    }
}

impl fmt::Debug for ShadowPage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShadowPage")
            .field("frame", &self.frame)
            .field("role", &self.role)
            .field("gfn", &self.gfn)
            .field("present", &self.present)
            .field("mmio", &self.mmio)
            .field("root_count", &self.root_count)
            .finish()
    }
}

/// All shadow pages, by table id (ids start at 1 so a [`SpteRef`] is never zero).
pub struct Pages {
    slots: Vec<Option<ShadowPage>>,
    free_ids: Vec<u32>,
    live: usize,
    created: u64,
    freed: u64,
    seq: u64,
}

impl Default for Pages {
    fn default() -> Self {
        Self::new()
    }
}

impl Pages {
    /// An empty store.
    pub fn new() -> Self {
        Pages {
            slots: alloc::vec![None],
            free_ids: Vec::new(),
            live: 0,
            created: 0,
            freed: 0,
            seq: 0,
        }
    }

    /// Allocate a table and create a page for it. `None` when the allocator is out of
    /// frames or the id space (22 bits) is exhausted. Crate-private: the page's table
    /// lives in `alloc`'s memory, which the MMU that calls this keeps alive (it holds an
    /// `Arc` of it) until [`free`](Self::free).
    pub(crate) fn create(
        &mut self,
        alloc: &dyn TableAllocator,
        role: Role,
        gfn: Gfn,
        gen: u64,
    ) -> Option<u32> {
        let id = match self.free_ids.pop() {
            Some(id) => id,
            None => {
                let id = self.slots.len() as u32;
                if id > SpteRef::MAX_TABLE_ID {
                    return None;
                }
                self.slots.push(None);
                id
            }
        };
        let Some(frame) = alloc.alloc_table() else {
            self.free_ids.push(id);
            return None;
        };
        let children = (role.level() > Level::L4K).then(|| Box::new([0u32; SPTE_ENT_PER_PAGE]));
        let translations =
            (role.is_paging() && !role.is_direct()).then(|| Box::new([0u64; SPTE_ENT_PER_PAGE]));
        self.seq += 1;
        self.slots[id as usize] = Some(ShadowPage {
            table: alloc.table_ptr(frame),
            frame,
            role,
            gfn,
            parent_ptes: RmapHead::default(),
            root_count: 0,
            present: 0,
            mmio: 0,
            mmu_valid_gen: gen,
            writable_bitmap: [0; SPTE_ENT_PER_PAGE / 64],
            possible_writable: 0,
            children,
            translations,
            unsync: false,
            unsync_child_bitmap: [0; SPTE_ENT_PER_PAGE / 64],
            unsync_children: 0,
            write_flooding_count: 0,
            hashed: false,
            seq: self.seq,
        });
        self.live += 1;
        self.created += 1;
        Some(id)
    }

    /// The page with id `id`.
    ///
    /// # Panics
    /// If no such page exists: a dangling id is an MMU bug.
    #[inline]
    pub fn get(&self, id: u32) -> &ShadowPage {
        self.slots[id as usize].as_ref().expect("dangling table id")
    }

    /// The page with id `id`, mutably.
    #[inline]
    pub fn get_mut(&mut self, id: u32) -> &mut ShadowPage {
        self.slots[id as usize].as_mut().expect("dangling table id")
    }

    /// The page with id `id`, if it exists.
    #[inline]
    pub fn try_get(&self, id: u32) -> Option<&ShadowPage> {
        self.slots.get(id as usize).and_then(|s| s.as_ref())
    }

    /// The page `id`, mutably, if there is one.
    #[inline]
    pub fn try_get_mut(&mut self, id: u32) -> Option<&mut ShadowPage> {
        self.slots.get_mut(id as usize).and_then(|s| s.as_mut())
    }

    /// Remove the page and give its frame back.
    ///
    /// # Safety
    /// Nothing may read the table any more: it is unlinked and a TLB flush since the
    /// unlink has made every vCPU leave guest mode.
    pub(crate) unsafe fn free(&mut self, alloc: &dyn TableAllocator, id: u32) {
        let sp = self.slots[id as usize]
            .take()
            .expect("double free of a shadow page");
        // SAFETY: forwarded from the caller.
        unsafe { alloc.free_table(sp.frame) };
        self.free_ids.push(id);
        self.live -= 1;
        self.freed += 1;
    }

    /// Pages in the store.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Pages created and freed over the store's life.
    pub fn created_freed(&self) -> (u64, u64) {
        (self.created, self.freed)
    }

    /// Every (id, page).
    pub fn iter(&self) -> impl Iterator<Item = (u32, &ShadowPage)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i as u32, s)))
    }

    /// One past the largest id in use (ids below it may be free).
    pub fn id_limit(&self) -> u32 {
        self.slots.len() as u32
    }

    /// Ids of every page.
    pub fn ids(&self) -> Vec<u32> {
        self.iter().map(|(id, _)| id).collect()
    }

    /// Bytes of metadata the store holds (page structs, child arrays), not counting tables.
    pub fn metadata_bytes(&self) -> usize {
        self.slots.capacity() * core::mem::size_of::<Option<ShadowPage>>()
            + self.free_ids.capacity() * 4
            + self.iter().filter(|(_, p)| p.children.is_some()).count()
                * core::mem::size_of::<[u32; SPTE_ENT_PER_PAGE]>()
            + self
                .iter()
                .filter(|(_, p)| p.translations.is_some())
                .count()
                * core::mem::size_of::<[u64; SPTE_ENT_PER_PAGE]>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::HeapTableAllocator;

    #[test]
    fn role_packs_fields() {
        let r = Role::direct(Level::L2M);
        assert_eq!(r.level(), Level::L2M);
        assert!(r.is_direct());
        assert!(!r.is_invalid());
        assert!(r.invalidated().is_invalid());
        assert_eq!(r.access(), AccessFlags::ALL);
    }

    #[test]
    fn store_reuses_ids_and_frees_frames() {
        let a = HeapTableAllocator::new();
        let mut pages = Pages::new();
        let x = pages
            .create(&a, Role::direct(Level::L4K), Gfn(0), 0)
            .unwrap();
        let y = pages
            .create(&a, Role::direct(Level::L2M), Gfn(0), 0)
            .unwrap();
        assert_ne!(x, 0);
        assert_ne!(x, y);
        assert_eq!(pages.get(x).child(3), 0);
        pages.get_mut(y).set_child(3, x);
        assert_eq!(pages.get(y).child(3), x);
        assert_eq!(pages.get(y).gfn_at(2), Gfn(1024));
        // SAFETY: nothing reads the tables.
        unsafe { pages.free(&a, x) };
        assert!(pages.try_get(x).is_none());
        let z = pages
            .create(&a, Role::direct(Level::L4K), Gfn(0), 0)
            .unwrap();
        assert_eq!(z, x, "freed ids are reused");
        assert_eq!(pages.len(), 2);
        for id in pages.ids() {
            // SAFETY: as above.
            unsafe { pages.free(&a, id) };
        }
        assert_eq!(a.allocated(), a.freed());
        assert_eq!(pages.created_freed(), (3, 3));
    }
}
