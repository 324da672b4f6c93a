//! The shadow-paging half of the VM API: a vCPU's paging registers, guest-virtual
//! accesses through the CPU model, and the guest's TLB maintenance (MOV CR3, INVLPG, a
//! full flush), as KVM handles them when it shadows the guest's page tables.
//!
//! # Locking
//! Faults, emulated writes, root switches and syncs take the MMU lock exclusively. A TLB
//! miss walks the shadow tables under the shared lock, taken before the vCPU enters guest
//! mode (a flusher holding the exclusive lock never waits for a vCPU that waits for the
//! lock). Guest-memory accesses through a translation happen in guest mode, so a sync
//! that write-protects a table and flushes every vCPU sees every write made before it.
//! An access that keeps losing races to zaps between its fault and its walk completes
//! under the exclusive lock, which it then holds across the walk (the retry protocol of
//! `vm/fault.rs`).

use alloc::sync::Arc;

use super::MmuKind;
use super::Vcpu;
use crate::error::Error;
use crate::flush::Flush;
use crate::flush::Removed;
use crate::guest::{GuestMemory, PagingState};
use crate::host::HostMemory;
use crate::mmu::DirtyGfn;
use crate::mmu::FaultOutcome;
use crate::page::Role;
use crate::shadow::{GvaFault, ShadowMmu};
use crate::table::{HeapTableAllocator, TableAllocator};
use crate::types::{AccessFlags, AccessKind, Gfn, Gpa, Gva, Level};

use super::dirty_log::DirtyRoom;
use super::fault::Again;
use super::{Exit, Vm, VmConfig, VmState};

impl<H: HostMemory> Vm<H, HeapTableAllocator> {
    /// A shadow-paging VM ([`MmuKind::ShadowPaging`]) whose guest page tables live in
    /// `guest`, with tables from the heap.
    ///
    /// # Panics
    /// If the configuration is invalid or the MMU cannot be created.
    pub fn new_paging(config: VmConfig, host: H, guest: Arc<dyn GuestMemory>) -> Self {
        Self::with_guest_memory(config, host, Arc::new(HeapTableAllocator::new()), guest)
            .unwrap_or_else(|e| panic!("cannot create the VM: {e}"))
    }
}

/// What a data access does once translated.
#[derive(Clone, Copy)]
enum Data {
    None,
    Read,
    Write(u64),
}

impl<H: HostMemory, A: TableAllocator + 'static> Vm<H, A> {
    /// A VM whose guest memory is `guest` (required by shadow paging: the MMU reads the
    /// guest's page tables there; `config.mmu` must be [`MmuKind::ShadowPaging`]).
    pub fn with_guest_memory(
        config: VmConfig,
        host: H,
        alloc: Arc<A>,
        guest: Arc<dyn GuestMemory>,
    ) -> Result<Self, Error> {
        Self::build(config, host, alloc, Some(guest))
    }

    /// The guest memory, under shadow paging.
    pub fn guest_memory(&self) -> Option<&Arc<dyn GuestMemory>> {
        self.guest.as_ref()
    }

    fn paging_guest(&self) -> Result<&dyn GuestMemory, Error> {
        match &self.guest {
            Some(g) if self.config.mmu == MmuKind::ShadowPaging => Ok(&**g),
            _ => Err(Error::WrongPagingMode(
                "this VM does not shadow guest page tables (MmuKind::ShadowPaging)",
            )),
        }
    }

    /// Set `vcpu`'s paging registers at once (CR0.WP, EFER.NX, CR3, CPL), as a guest
    /// entering long mode or changing them does: the vCPU loads the root for the new
    /// state and its TLB is flushed.
    pub fn set_paging(&self, vcpu: &mut Vcpu, state: PagingState) -> Result<(), Error> {
        self.check_vcpu(vcpu)?;
        self.paging_guest()?;
        let mut guard = self.lock();
        let old = vcpu.cpu.paging;
        vcpu.cpu.paging = PagingState {
            cpl: state.cpl & 3,
            ..state
        };
        if let Err(e) = self.switch_root(&mut guard, vcpu) {
            vcpu.cpu.paging = old;
            return Err(e);
        }
        Ok(())
    }

    /// MOV to CR3: switch `vcpu` to the address space whose top-level table is at `cr3`.
    /// Unsync shadow pages reachable from the new root are synced; the vCPU's TLB is
    /// flushed; a root among the vCPU's previous roots is reused without a lookup.
    pub fn load_cr3(&self, vcpu: &mut Vcpu, cr3: Gpa) -> Result<(), Error> {
        self.check_vcpu(vcpu)?;
        self.set_paging(
            vcpu,
            PagingState {
                cr3,
                ..vcpu.cpu.paging
            },
        )
    }

    /// INVLPG: drop `vcpu`'s translation of `gva` and sync the unsync shadow entry that
    /// maps it.
    pub fn invlpg(&self, vcpu: &mut Vcpu, gva: Gva) -> Result<(), Error> {
        self.check_vcpu(vcpu)?;
        let guest = self.paging_guest()?;
        check_canonical(gva)?;
        let mut guard = self.lock();
        let st = &mut *guard;
        if let Some(root) = vcpu.proot {
            let (slots, m) = split(st);
            if m.paging_root_valid(&root) {
                let flush = m.invlpg_sync(slots, guest, root.id, gva)?;
                self.commit(st, Removed::flush_only(flush));
            }
        }
        vcpu.cpu.tlb.flush_virt(gva.vpn());
        Ok(())
    }

    /// A full guest TLB flush (CR4.PGE toggle, or INVPCID all): every unsync page under
    /// the vCPU's root is synced and its TLB flushed.
    pub fn flush_guest_tlb(&self, vcpu: &mut Vcpu) -> Result<(), Error> {
        self.check_vcpu(vcpu)?;
        self.paging_guest()?;
        let mut guard = self.lock();
        self.switch_root(&mut guard, vcpu)
    }

    /// Load the root for `vcpu`'s paging state (from its cache of previous roots if it is
    /// there), sync what is unsync under it and flush the vCPU's TLB. Exclusive lock.
    fn switch_root(&self, st: &mut VmState<A>, vcpu: &mut Vcpu) -> Result<(), Error> {
        let guest = self.paging_guest()?;
        let p = vcpu.cpu.paging;
        let (gfn, wp, nx) = (p.root_gfn(), p.cr0_wp, p.efer_nx);
        let role = Role::paging(Level::ROOT, false, AccessFlags::ALL, wp, nx);
        let (slots, m) = split(st);
        let keep = m.paging.as_ref().map_or(0, |p| p.cfg.prev_roots) as usize;
        // Roots zapped while cached are let go.
        vcpu.prev_roots.retain(|r| {
            let valid = m.paging_root_valid(r);
            if !valid {
                m.put_paging_root(r);
            }
            valid
        });
        if let Some(cur) = vcpu.proot.filter(|c| !m.paging_root_valid(c)) {
            m.put_paging_root(&cur);
            vcpu.proot = None;
        }
        let wanted = |r: &crate::shadow::RootRef| r.gfn == gfn && r.role == role;
        let mut flush = Flush::NONE;
        if !vcpu.proot.is_some_and(|r| wanted(&r)) {
            let new = if let Some(i) = vcpu.prev_roots.iter().position(wanted) {
                m.paging_mut().stats.root_cache_hits += 1;
                vcpu.prev_roots.remove(i)
            } else {
                let (r, f) = m.get_paging_root(slots, gfn, wp, nx)?;
                // Counted once the root is there: a load refused for lack of table memory
                // changes nothing, counters included.
                m.paging_mut().stats.root_cache_misses += 1;
                flush |= f;
                r
            };
            let (_, m) = split(st);
            if let Some(old) = vcpu.proot.replace(new) {
                vcpu.prev_roots.insert(0, old);
            }
            while vcpu.prev_roots.len() > keep {
                let r = vcpu.prev_roots.pop().expect("longer than keep");
                m.put_paging_root(&r);
            }
        }
        let root = vcpu.proot.expect("loaded above");
        vcpu.cpu.root = root.frame;
        vcpu.cpu.tlb.flush();
        self.commit(st, Removed::flush_only(flush));
        self.sync_under(st, guest, root.id)
    }

    /// Sync every unsync page under `root`: write-protect them, flush every vCPU, then
    /// check their entries against the guest's (KVM's `mmu_sync_children`).
    fn sync_under(
        &self,
        st: &mut VmState<A>,
        guest: &dyn GuestMemory,
        root: u32,
    ) -> Result<(), Error> {
        let (slots, m) = split(st);
        let pages = m.unsync_pages_under(root);
        if pages.is_empty() {
            return Ok(());
        }
        let flush = m.protect_for_sync(slots, &pages);
        self.commit(st, Removed::flush_only(flush));
        let (slots, m) = split(st);
        let flush = m.sync_pages(slots, guest, &pages)?;
        self.commit(st, Removed::flush_only(flush));
        Ok(())
    }

    /// One guest access to `gva` through the CPU model, at the vCPU's CPL: TLB hit, or
    /// walk of the shadow tables, or exit to the MMU (which may reflect a page fault into
    /// the guest: [`Exit::GuestPageFault`]). Returns the guest-physical address reached.
    ///
    /// A write that reaches a write-protected guest page table is emulated as a write of
    /// the value already there (the access carries no data; see
    /// [`gva_write_u64`](Self::gva_write_u64)).
    pub fn gva_access(&self, vcpu: &mut Vcpu, gva: Gva, kind: AccessKind) -> Result<Gpa, Exit> {
        self.check_vcpu(vcpu)?;
        self.gva_op(vcpu, gva, kind, Data::None).map(|(gpa, _)| gpa)
    }

    /// A guest read of the 8-byte-aligned word at `gva`.
    pub fn gva_read_u64(&self, vcpu: &mut Vcpu, gva: Gva) -> Result<u64, Exit> {
        self.check_vcpu(vcpu)?;
        check_aligned(gva)?;
        self.gva_op(vcpu, gva, AccessKind::Read, Data::Read)
            .map(|(_, v)| v)
    }

    /// A guest write of the 8-byte-aligned word at `gva`. A write to a write-protected
    /// guest page table is emulated by the MMU (guest memory updated, the shadow entries
    /// of that table fixed).
    pub fn gva_write_u64(&self, vcpu: &mut Vcpu, gva: Gva, val: u64) -> Result<(), Exit> {
        self.check_vcpu(vcpu)?;
        check_aligned(gva)?;
        self.gva_op(vcpu, gva, AccessKind::Write, Data::Write(val))
            .map(|_| ())
    }

    fn gva_op(
        &self,
        vcpu: &mut Vcpu,
        gva: Gva,
        kind: AccessKind,
        data: Data,
    ) -> Result<(Gpa, u64), Exit> {
        let guest = self.paging_guest()?;
        check_canonical(gva)?;
        vcpu.accesses += 1;
        self.retry_access(Gpa(gva.0), |held| {
            self.try_gva(vcpu, guest, gva, kind, data, held)
        })
    }

    /// One try of a guest-virtual access (see `Vm::retry_access`): TLB lookup, or the
    /// walk of the shadow tables, or the MMU's fault and what its outcome asks (a guest
    /// page fault, an emulated write). With `held`, under the exclusive lock throughout.
    fn try_gva(
        &self,
        vcpu: &mut Vcpu,
        guest: &dyn GuestMemory,
        gva: Gva,
        kind: AccessKind,
        data: Data,
        mut held: Option<&mut VmState<A>>,
    ) -> Result<Result<(Gpa, u64), Again>, Exit> {
        if vcpu.dirty_ring_soft_full() {
            return Err(Exit::DirtyRingFull);
        }
        let user = vcpu.cpu.paging.user();
        let vpn = gva.vpn();
        if vcpu.proot.is_none() || !vcpu.cpu.enter_guest() {
            match held {
                Some(st) => self.switch_root(st, vcpu)?,
                None => self.paging_reload(vcpu)?,
            }
            return Ok(Err(Again::Lost));
        }
        if let Some((_, gfn)) = vcpu.cpu.tlb.lookup_virt(vpn, kind, user) {
            let r = do_data(guest, gfn, gva, data);
            vcpu.cpu.exit_guest();
            return r.map(Ok);
        }
        vcpu.cpu.exit_guest();
        // TLB miss: the hardware walk, under the shared lock (taken outside guest mode,
        // see the module docs) or the exclusive one held.
        let walk = |st: &VmState<A>, vcpu: &mut Vcpu| {
            if !vcpu.cpu.enter_guest() {
                return None;
            }
            let m = st.mmu.shadow().expect("shadow paging runs the shadow MMU");
            let root = vcpu.proot.expect("loaded above").id;
            let r = m.translate(root, gva, kind, user).ok().map(|e| {
                vcpu.cpu.tlb.fill(Gfn(vpn), e);
                let off = vpn & (e.level.pages() - 1);
                do_data(guest, Gfn(e.gfn.0 + off), gva, data)
            });
            vcpu.cpu.exit_guest();
            Some(r)
        };
        let walked = match held.as_deref() {
            Some(st) => walk(st, vcpu),
            None => walk(&self.lock_shared_untimed(), vcpu),
        };
        match walked {
            // A reload was requested meanwhile.
            None => {
                match held {
                    Some(st) => self.switch_root(st, vcpu)?,
                    None => self.paging_reload(vcpu)?,
                }
                return Ok(Err(Again::Lost));
            }
            Some(Some(r)) => return r.map(Ok),
            Some(None) => {}
        }
        vcpu.exits += 1;
        let (outcome, gpa) = match held.as_deref_mut() {
            Some(st) => {
                let room = DirtyRoom::take(vcpu)?;
                self.paging_page_fault_under(st, vcpu, guest, gva, kind, room)?
            }
            None => self.paging_page_fault(vcpu, gva, kind)?,
        };
        let write = kind == AccessKind::Write;
        // Every outcome but a guest fault (and the retries) names the gpa.
        let gpa = || gpa.expect("the guest's tables translated the gva");
        match outcome {
            FaultOutcome::Mapped(_) | FaultOutcome::Spurious => Ok(Err(Again::Lost)),
            FaultOutcome::Retry => Ok(Err(Again::Wait(gpa()))),
            FaultOutcome::GuestFault(error_code) => Err(Exit::GuestPageFault { gva, error_code }),
            FaultOutcome::Mmio | FaultOutcome::ReadOnlyWrite => {
                Err(Exit::Mmio { gpa: gpa(), write })
            }
            FaultOutcome::WriteTracked => Err(Exit::WriteTracked { gpa: gpa() }),
            FaultOutcome::Emulate => {
                let gpa = gpa();
                let word = Gpa(gpa.0 & !7);
                let val = match data {
                    Data::Write(v) => v,
                    _ => guest.read_u64(word)?,
                };
                let room = DirtyRoom::take(vcpu)?;
                match held {
                    Some(st) => self.emulate_write_under(st, guest, word, val, room)?,
                    None => self.emulate_write_under(&mut self.lock(), guest, word, val, room)?,
                }
                Ok(Ok((gpa, val)))
            }
        }
    }

    /// The root of `vcpu` was zapped (or never loaded): load the one for its CR3.
    fn paging_reload(&self, vcpu: &mut Vcpu) -> Result<(), Error> {
        let mut guard = self.lock();
        self.switch_root(&mut guard, vcpu)
    }

    /// The MMU's side of a fault on `gva`, under the exclusive lock.
    fn paging_page_fault(
        &self,
        vcpu: &mut Vcpu,
        gva: Gva,
        kind: AccessKind,
    ) -> Result<(FaultOutcome, Option<Gpa>), Error> {
        let guest = self.paging_guest()?;
        // Room for the page the fault may log, before it can make one writable (dropped
        // after the guard: unused room goes back outside the lock).
        let room = DirtyRoom::take(vcpu)?;
        let mut guard = self.lock();
        self.paging_page_fault_under(&mut guard, vcpu, guest, gva, kind, room)
    }

    /// [`paging_page_fault`](Self::paging_page_fault) under the exclusive lock, held by
    /// the caller, with the room taken.
    fn paging_page_fault_under(
        &self,
        st: &mut VmState<A>,
        vcpu: &mut Vcpu,
        guest: &dyn GuestMemory,
        gva: Gva,
        kind: AccessKind,
        room: DirtyRoom,
    ) -> Result<(FaultOutcome, Option<Gpa>), Error> {
        let root = vcpu.proot.expect("the access loaded a root");
        let (slots, m) = split(st);
        if !m.paging_root_valid(&root) {
            // Zapped since the walk: reload and retry.
            self.switch_root(st, vcpu)?;
            return Ok((FaultOutcome::Spurious, None));
        }
        let fault = m.paging_fault(
            slots,
            &self.host,
            guest,
            GvaFault {
                root: root.id,
                paging: &vcpu.cpu.paging,
                gva,
                kind,
            },
        )?;
        let sync = core::mem::take(&mut m.paging_mut().sync_needed);
        if let Some(d) = fault.dirty {
            let slot = st.slots.by_id(d.slot).expect("the fault found this slot");
            room.log(d, slot.dirty_bitmap());
        }
        self.commit(st, Removed::flush_only(fault.flush));
        if sync {
            // A subtree with unsync pages was linked: sync before the access retries
            // (KVM's KVM_REQ_MMU_SYNC).
            self.sync_under(st, guest, root.id)?;
            vcpu.cpu.tlb.flush();
            let outcome = match fault.outcome {
                FaultOutcome::Mapped(_) => FaultOutcome::Spurious,
                o => o,
            };
            return Ok((outcome, fault.gpa));
        }
        Ok((fault.outcome, fault.gpa))
    }

    /// Emulate the guest's write of `val` to the guest page table word at `gpa`, and log
    /// the page dirty if its slot logs, in `room` (taken before the lock: without room
    /// the access got [`Error::DirtyRingFull`] and nothing was written). Exclusive lock.
    fn emulate_write_under(
        &self,
        st: &mut VmState<A>,
        guest: &dyn GuestMemory,
        gpa: Gpa,
        val: u64,
        room: DirtyRoom,
    ) -> Result<(), Error> {
        let (slots, m) = split(st);
        let (flush, _) = m.emulate_pte_write(slots, guest, gpa, val)?;
        let gfn = gpa.gfn();
        if let Some(slot) = st.slots.lookup(gfn) {
            if slot.is_logging() {
                let d = DirtyGfn {
                    slot: slot.id,
                    offset: gfn.0 - slot.base_gfn.0,
                };
                room.log(d, slot.dirty_bitmap());
            }
        }
        self.commit(st, Removed::flush_only(flush));
        Ok(())
    }

    /// Zap up to `n` shadow pages, oldest first, as KVM's shrinker and its shadow-page
    /// limit do (roots in use are invalidated and their vCPUs reload). Returns the pages
    /// zapped; 0 on a VM that does not shadow guest page tables.
    pub fn reclaim_shadow_pages(&self, n: usize) -> usize {
        let mut guard = self.lock();
        let st = &mut *guard;
        let Some(m) = st.mmu.shadow_mut().filter(|m| m.is_paging()) else {
            return 0;
        };
        let before = m.paging_stats().reclaimed_pages;
        let (flush, _) = m.reclaim(&mut st.slots, n);
        let zapped = (m.paging_stats().reclaimed_pages - before) as usize;
        self.commit(st, Removed::flush_only(flush));
        zapped
    }

    /// The longest reverse map now: the most SPTEs mapping one gfn at one level (the TDP
    /// MMU has no reverse maps: 0).
    pub fn max_rmap_len(&self) -> usize {
        let st = self.lock_shared();
        st.mmu.max_rmap_len(&st.slots)
    }
}

/// The memslots and the shadow MMU of a shadow-paging VM.
fn split<A: TableAllocator + 'static>(
    st: &mut VmState<A>,
) -> (&mut crate::memslot::Memslots, &mut ShadowMmu<Arc<A>>) {
    let m = st
        .mmu
        .shadow_mut()
        .expect("shadow paging runs the shadow MMU");
    (&mut st.slots, m)
}

fn check_canonical(gva: Gva) -> Result<(), Error> {
    if gva.is_canonical() {
        Ok(())
    } else {
        Err(Error::NonCanonical { gva })
    }
}

fn check_aligned(gva: Gva) -> Result<(), Error> {
    if gva.0.is_multiple_of(8) {
        Ok(())
    } else {
        Err(Error::Unaligned { gva })
    }
}

/// The data part of an access that translated to `gfn` (in guest mode).
#[inline]
fn do_data(guest: &dyn GuestMemory, gfn: Gfn, gva: Gva, data: Data) -> Result<(Gpa, u64), Exit> {
    let gpa = Gpa(gfn.gpa().0 | gva.page_offset());
    let v = match data {
        Data::None => 0,
        Data::Read => guest.read_u64(gpa)?,
        Data::Write(v) => {
            guest.write_u64(gpa, v)?;
            v
        }
    };
    Ok((gpa, v))
}
