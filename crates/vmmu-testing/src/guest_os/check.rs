//! What must hold after every step of the guest OS, computed without asking the MMU
//! anything but the translation under test:
//!
//! - [`check_process`]: every page of every VMA of a process: the model's record, the
//!   guest's tables in guest memory (the reference walk) and the CPU's translation agree:
//!   a present page is reached at its frame by reads (and writes, when its PTE is
//!   writable; a write to a read-only page faults with P|W|U), a page not present faults
//!   not-present; the pages around each VMA fault too; the direct-map slot is the
//!   kernel's;
//! - [`check_refcounts`]: each frame's reference count is the number of PTEs mapping it,
//!   over a set of processes that shares frames with no other;
//! - [`Kernel::check_free_frames_zero`](super::Kernel::check_free_frames_zero): free
//!   frames are zero.

use std::collections::HashMap;

use vmmu::guest::pte;
use vmmu::types::{AccessKind, ErrorCode, Gfn, Gva, PAGE_SIZE};

use super::cpu::{paging_state, Cpu};
use super::kernel::Kernel;
use super::layout::{entry_gpa, DIRECT_MAP_PML4_SLOT};
use super::process::Process;
use super::vma::PageRecord;
use super::walk::{translate, WalkError};

/// What [`check_process`] looked at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Checked {
    /// Present pages translated.
    pub present: u64,
    /// Pages not present, seen to fault.
    pub absent: u64,
}

/// Checks `p` on `cpu`, which it is made current on. See the module doc.
pub fn check_process(k: &Kernel, cpu: &mut impl Cpu, p: &Process) -> Result<Checked, String> {
    if cpu.cr3() != p.pml4() {
        cpu.load_cr3(p.pml4()).map_err(|e| e.to_string())?;
    }
    let pid = p.pid();
    let mem = &**k.memory();
    let slot = entry_gpa(p.pml4(), DIRECT_MAP_PML4_SLOT);
    let phys = mem.read_u64(slot).map_err(|e| e.to_string())?;
    let seen = cpu.kernel_read(slot).map_err(|e| e.to_string())?;
    if phys != k.kernel_pml4e() || seen != phys {
        return Err(format!(
            "pid {pid}: direct-map slot holds {phys:#x} (kernel reads {seen:#x}), want {:#x}",
            k.kernel_pml4e()
        ));
    }
    let user = paging_state(p.pml4(), 3);
    let mut out = Checked::default();
    for vma in p.mm().vmas() {
        for (i, rec) in vma.pages.iter().enumerate() {
            let gva = Gva(vma.start + i as u64 * PAGE_SIZE);
            let at = |what: &str| format!("pid {pid} gva {gva}: {what}");
            let walked = translate(mem, &user, gva, AccessKind::Read);
            match (rec.gfn(), walked) {
                (None, Err(WalkError::Fault(ec))) if !ec.contains(ErrorCode::PRESENT) => {}
                (Some(g), Ok(t)) if t.gpa == g.gpa() => {
                    let e = t.entry;
                    let want_w = rec.writable();
                    if (e & pte::RW != 0) != want_w
                        || e & pte::US == 0
                        || (e & pte::NX == 0) != vma.prot.exec
                    {
                        return Err(at(&format!("PTE {e:#x} vs record {rec:?}, {:?}", vma.prot)));
                    }
                    if want_w && !vma.prot.write {
                        return Err(at("writable PTE in a read-only VMA"));
                    }
                }
                (_, w) => return Err(at(&format!("record {rec:?}, guest tables say {w:?}"))),
            }
            expect_cpu(cpu, gva, *rec, vma.prot.exec).map_err(|e| at(&e))?;
            if rec.gfn().is_some() {
                out.present += 1;
            } else {
                out.absent += 1;
            }
        }
        for gva in [vma.start.wrapping_sub(PAGE_SIZE), vma.end()] {
            if p.mm().find(gva).is_some() || gva >= super::layout::USER_END {
                continue;
            }
            match cpu.user_access(Gva(gva), AccessKind::Read) {
                Ok(Err(ec)) if !ec.contains(ErrorCode::PRESENT) => {}
                other => {
                    return Err(format!(
                        "pid {pid} gva {gva:#x} (outside every VMA): CPU says {other:?}"
                    ))
                }
            }
        }
    }
    Ok(out)
}

/// The CPU's translation of one user page must match its record.
fn expect_cpu(cpu: &mut impl Cpu, gva: Gva, rec: PageRecord, exec: bool) -> Result<(), String> {
    let mut go = |kind| cpu.user_access(gva, kind).map_err(|e| e.to_string());
    let Some(g) = rec.gfn() else {
        return match go(AccessKind::Read)? {
            Err(ec) if !ec.contains(ErrorCode::PRESENT) => Ok(()),
            other => Err(format!("not present, CPU read says {other:?}")),
        };
    };
    let want = Ok(g.gpa());
    let r = go(AccessKind::Read)?;
    if r != want {
        return Err(format!("maps {g:?}, CPU read says {r:?}"));
    }
    let w = go(AccessKind::Write)?;
    if rec.writable() {
        if w != want {
            return Err(format!("writable {g:?}, CPU write says {w:?}"));
        }
    } else {
        let ec = ErrorCode::PRESENT
            .union(ErrorCode::WRITE)
            .union(ErrorCode::USER);
        if w != Err(ec) {
            return Err(format!("read-only {g:?}, CPU write says {w:?}"));
        }
    }
    if exec {
        let f = go(AccessKind::Fetch)?;
        if f != want {
            return Err(format!("text {g:?}, CPU fetch says {f:?}"));
        }
    }
    Ok(())
}

/// Checks that each frame mapped by `procs` has a reference count equal to the number of
/// their PTEs mapping it. `procs` must be every process mapping those frames.
pub fn check_refcounts<'a>(
    k: &Kernel,
    procs: impl IntoIterator<Item = &'a Process>,
) -> Result<usize, String> {
    let mut maps: HashMap<Gfn, u32> = HashMap::new();
    for p in procs {
        for v in p.mm().vmas() {
            for (addr, rec) in v.present() {
                let g = rec.gfn().expect("present");
                *maps.entry(g).or_default() += 1;
                if rec.writable() && k.frames().refcount(g) != 1 {
                    return Err(format!(
                        "pid {} {addr:#x}: writable PTE on shared frame {g:?} (count {})",
                        p.pid(),
                        k.frames().refcount(g)
                    ));
                }
            }
        }
    }
    for (g, n) in &maps {
        let rc = k.frames().refcount(*g);
        if rc != *n {
            return Err(format!("frame {g:?}: {n} PTEs map it, count {rc}"));
        }
    }
    Ok(maps.len())
}
