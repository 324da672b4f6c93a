//! # Embedding vmmu
//!
//! How a Rust hypervisor that owns the hardware runs its vCPUs on vmmu's tables. The
//! whole of it is in the default (`no_std` + `alloc`) public API; `examples/embed` in the
//! repository is a complete program doing all of it, with the CPU model standing in for
//! VMX (`cargo run -p vmmu-embed`).
//!
//! ## What the embedder provides
//! - **Table frames**: a [`TableAllocator`](crate::table::TableAllocator) over its
//!   host-physical frame allocator and its direct map (an `unsafe` trait: it vouches that
//!   frames are zeroed, not handed out twice, and mapped where `table_ptr` says while
//!   allocated). vmmu never frees a frame a vCPU may still walk (see the guarantees).
//! - **Host memory**: a [`HostMemory`](crate::host::HostMemory) that translates the
//!   host-virtual addresses of its memslots to frames, with the level it maps them at;
//!   and the MMU-notifier calls ([`Vm::invalidate_range_start`](crate::Vm::invalidate_range_start)
//!   and `_end`, [`Vm::unmap_hva_range`](crate::Vm::unmap_hva_range)) around every change
//!   of that memory.
//! - **A kick**: a [`Kick`](crate::Kick) that makes a vCPU leave guest mode promptly (an
//!   IPI to the physical CPU running it). It is called from any thread, possibly under
//!   the MMU lock: it must not block or call into the VM. Installed with
//!   [`Vm::set_kick`](crate::Vm::set_kick) before any vCPU that stays in guest mode is
//!   created ([`Vm::create_run_loop_vcpu`](crate::Vm::create_run_loop_vcpu) refuses
//!   with [`Error::NoKick`](crate::Error::NoKick) otherwise).
//! - **The run loop** on each vCPU thread, below, and the VMX (or SVM) work vmmu cannot
//!   do: the VMCS, VMLAUNCH/VMRESUME, INVEPT, interrupt masking, instruction emulation
//!   for MMIO.
//!
//! ## The protocol, step by step
//! For each vCPU, on its own thread, with host interrupts disabled from step 1 to the
//! VM exit:
//!
//! 1. `let entry = vm.enter_guest(&mut vcpu)?` ([`Vm::enter_guest`](crate::Vm::enter_guest)):
//!    vmmu services the vCPU's pending requests (a root reload loads the MMU's current
//!    root), stores the vCPU's mode as in guest mode, fences, and re-checks the requests.
//!    From here on the vCPU is in guest mode. A soft-full dirty ring refuses entry
//!    ([`Exit::DirtyRingFull`](crate::Exit::DirtyRingFull)): harvest, then retry.
//! 2. If [`entry.load_eptp`](crate::EntryState::load_eptp): write
//!    [`entry.eptp.bits()`](crate::Eptp::bits) into the VMCS's EPT pointer (write-back
//!    memory type, a 4-level walk, accessed/dirty flags on).
//! 3. If [`entry.invept`](crate::EntryState::invept) is
//!    [`Invept::SingleContext(eptp)`](crate::Invept::SingleContext): execute INVEPT type 1
//!    for that EPTP. (On the CPU model: [`Vcpu::model_invept`](crate::Vcpu::model_invept).)
//! 4. VMLAUNCH/VMRESUME. The guest runs until a VM exit (on the model:
//!    [`Vm::model_access`](crate::Vm::model_access) per access, each returning the
//!    host-physical address or the exit).
//! 5. On the VM exit, first [`Vm::exit_guest`](crate::Vm::exit_guest): the release store
//!    of the mode that a flusher waiting for this vCPU acknowledges. Then re-enable
//!    interrupts (a kick's IPI is taken here).
//! 6. Handle the exit: an EPT violation with
//!    [`Vm::handle_ept_violation(vcpu, gpa, exit_qualification)`](crate::Vm::handle_ept_violation)
//!    (the guest-physical address and the qualification as the VMCS reports them;
//!    decoded as the SDM defines it, [`EptViolation`](crate::EptViolation)), an EPT
//!    misconfiguration with [`Vm::handle_ept_misconfig(vcpu, gpa)`](crate::Vm::handle_ept_misconfig),
//!    an external interrupt (the kick) with nothing.
//! 7. Act on the [`ExitAction`](crate::ExitAction): `Resume` (go to 1), `Retry` (the host
//!    is invalidating the page: pause, go to 1), `EmulateMmio` / `EmulateWrite` (emulate
//!    the instruction, go to 1), `DirtyRingFull` or `MemoryFault` (exit to the VMM).
//!
//! ## What vmmu guarantees
//! - **Table lifetime**: from `enter_guest` to `exit_guest`, every table reachable from
//!   the entry's EPTP stays allocated and is not reused. vmmu frees a table only after a
//!   remote flush that followed its unlinking, and a remote flush waits for every vCPU
//!   in guest mode to call `exit_guest`.
//! - **Remote flushes**: every VM operation that removes or restricts a translation
//!   (zaps, memslot changes, MMU notifiers, dirty-log harvests) ends with a remote
//!   flush, before it returns and before any table is freed: it posts a request to every
//!   vCPU, then for each vCPU it finds in guest mode calls the kick and waits until that
//!   vCPU has called `exit_guest` (KVM's `kvm_make_all_cpus_request` with wait). So when
//!   the operation returns, no vCPU still runs with a removed translation: each one that
//!   was in guest mode has left it, and its next entry owes the INVEPT (or loads a new
//!   root and flushes it).
//! - **Entries**: `Invept::None` means no flush was requested since the last INVEPT the
//!   vCPU was told to execute; the first entry of a vCPU, and every entry that loads a
//!   new root, owes one.
//! - **Exit handlers** take the MMU lock only outside guest mode (they refuse a vCPU in
//!   guest mode with [`Error::InGuestMode`](crate::Error::InGuestMode)), so a flusher
//!   holding the lock never waits for a vCPU that waits for the lock.
//! - **Misuse** from safe code (a vCPU of another VM, a second entry, a bad
//!   qualification, an access outside guest mode) gets a typed error and changes nothing.
//!
//! ## What the embedder guarantees
//! - Between `enter_guest` and `exit_guest` the vCPU thread runs the guest only: it takes
//!   no lock and calls no VM method (a remote flush it waited for would wait for it).
//! - It loads the entry's EPTP and executes the entry's INVEPT before VM entry, and calls
//!   `exit_guest` after every VM exit before anything else.
//! - Its kick makes the vCPU exit soon, from any thread, without blocking.
//!
//! ## Without a kick
//! A VM without a kick has only vCPUs that stay in guest mode for one access:
//! [`Vm::create_vcpu`](crate::Vm::create_vcpu) and [`Vm::access`](crate::Vm::access)
//! (and [`read`](crate::Vm::read), [`write`](crate::Vm::write)), which run one try of the
//! same protocol per call with the CPU model. A remote flush then waits at most one
//! access for each vCPU.
//!
//! ## Example: the run loop on the CPU model
//! ```
//! use std::sync::Arc;
//! use vmmu::host::{Backing, SimHostMemory};
//! use vmmu::types::{AccessKind, Gpa};
//! use vmmu::{ExitAction, MemoryRegion, MemslotFlags, ModelKick, Vm, VmConfig, VmExit};
//!
//! let host = Arc::new(SimHostMemory::new());
//! let hva = host.mmap(2 << 20, Backing::Page4K, true).unwrap();
//! let mut vm = Vm::new(VmConfig::default(), host.clone());
//! let kick = Arc::new(ModelKick::new());
//! vm.set_kick(kick.clone());
//! vm.set_user_memory_region(MemoryRegion {
//!     slot: 0,
//!     flags: MemslotFlags::empty(),
//!     guest_phys_addr: 1 << 30,
//!     memory_size: 2 << 20,
//!     userspace_addr: hva.0,
//! })
//! .unwrap();
//! let mut vcpu = vm.create_run_loop_vcpu().unwrap();
//! kick.register(&vcpu);
//! let gpa = Gpa((1 << 30) + 0x1008);
//! let hpa = loop {
//!     let entry = vm.enter_guest(&mut vcpu).unwrap(); // 1
//!     // 2: vmcs_write(EPT_POINTER, entry.eptp.bits()) if entry.load_eptp
//!     vcpu.model_invept(entry.invept); // 3
//!     let exit = match vm.model_access(&mut vcpu, gpa, AccessKind::Write).unwrap() {
//!         Ok(hpa) => break hpa, // 4: the guest ran
//!         Err(exit) => exit,
//!     };
//!     vm.exit_guest(&mut vcpu).unwrap(); // 5
//!     let action = match exit { // 6
//!         VmExit::EptViolation { gpa, qualification } => {
//!             vm.handle_ept_violation(&mut vcpu, gpa, qualification).unwrap()
//!         }
//!         VmExit::EptMisconfig { gpa } => vm.handle_ept_misconfig(&mut vcpu, gpa).unwrap(),
//!         VmExit::ExternalInterrupt => ExitAction::Resume,
//!     };
//!     assert_eq!(action, ExitAction::Resume); // 7: the fault mapped the page
//! };
//! vm.exit_guest(&mut vcpu).unwrap();
//! assert_eq!(hpa.0 & 0xfff, 0x008);
//! vm.audit().unwrap();
//! ```
