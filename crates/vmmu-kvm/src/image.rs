//! The guest's memory image: code, identity-mapped page tables and the write list, all in
//! a small system memslot at guest-physical 0; the data memslot lies at [`DATA_GPA`].
//!
//! The guest runs at CPL 3 from its first instruction: the host loads long mode, paging,
//! user code and stack segments and RFLAGS.IOPL = 3 straight into the vCPU, so no
//! kernel-mode code ever runs. (Under KVM's PVM vendor module, CPL 0 code is interpreted
//! by the instruction emulator and never reaches the MMU; user code runs on the real
//! shadow page tables, which is what is being measured.) IOPL 3 lets the user loop signal
//! the host with `out`, which still exits to the VMM.
//!
//! Every guest page-table entry has P, R/W, U/S and A set, and every leaf D as well, so
//! the CPU never writes a guest page table: the only guest writes are the loop's stores
//! into the data slot. The tables live in the system slot, which does not log, so the data
//! slot's dirty bitmap holds exactly the pages the loop stored to.
//!
//! Layout of the system slot (4 KiB pages; the slot is a whole number of 2 MiB pages,
//! mapped 2 MiB at a time so the loop can read the list):
//!
//! ```text
//! 0x0000        unused
//! 0x1000        code: the stride loop at +0x00, the list loop at +0x10
//! 0x2000        PML4
//! 0x3000        PDPT (one covers 512 GiB: the system slot and a data slot of <= 64 GiB)
//! 0x4000        PD of the first GiB (maps the system slot)
//! 0x5000 ...    one PD per GiB of the data slot, then (4 KiB guest pages) its PTs
//! list          the write list: one guest-physical address (u64) per store
//! ```

/// Guest-physical address of the data slot: above 4 GiB, as a VMM places high memory.
pub const DATA_GPA: u64 = 1 << 32;
/// KVM memslot id of the system slot (code, tables, list).
pub const SYSTEM_SLOT: u32 = 0;
/// KVM memslot id of the data slot: the one that logs dirty pages and is compared.
pub const DATA_SLOT: u32 = 1;
/// The port the loop writes to when it is done.
pub const DONE_PORT: u16 = 0x10;
/// Largest data slot the image can map (one PDPT below 512 GiB, above [`DATA_GPA`]).
pub const MAX_DATA_BYTES: u64 = 64 << 30;

const PAGE: u64 = 4096;
const MIB2: u64 = 2 << 20;
const GIB: u64 = 1 << 30;

const CODE: u64 = 0x1000;
const PML4: u64 = 0x2000;
const PDPT: u64 = 0x3000;
const PD_SYSTEM: u64 = 0x4000;
const DATA_TABLES: u64 = 0x5000;

/// Entry bits: present, writable, user, accessed, dirty, page size.
const P: u64 = 1;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const TABLE: u64 = P | RW | US | A;
const LEAF: u64 = P | RW | US | A | D;

/// The guest's code (hand-assembled; `rdi`, `rsi`, `rdx` are set by the host):
///
/// ```text
/// stride: cmp rdi, rsi ; jae done ; mov [rdi], al ; add rdi, rdx ; jmp stride   (+0x00)
/// done:   out 0x10, al ; jmp done                                               (+0x0c)
/// list:   cmp rdi, rsi ; jae done ; mov rcx, [rdi] ; mov [rcx], al ;
///         add rdi, 8 ; jmp list                                                 (+0x10)
/// ```
///
/// The stride loop stores one byte at `rdi`, `rdi + rdx`, ... below `rsi`; the list loop
/// stores one byte at each address of the u64 array `[rdi, rsi)`. Both then write
/// [`DONE_PORT`]. No stack, no calls: nothing but the stores touches memory.
pub const CODE_BYTES: [u8; 32] = [
    0x48, 0x39, 0xf7, // cmp rdi, rsi
    0x73, 0x07, // jae done
    0x88, 0x07, // mov byte [rdi], al
    0x48, 0x01, 0xd7, // add rdi, rdx
    0xeb, 0xf4, // jmp stride
    0xe6, 0x10, // done: out 0x10, al
    0xeb, 0xfc, // jmp done
    0x48, 0x39, 0xf7, // list: cmp rdi, rsi
    0x73, 0xf7, // jae done
    0x48, 0x8b, 0x0f, // mov rcx, [rdi]
    0x88, 0x01, // mov byte [rcx], al
    0x48, 0x83, 0xc7, 0x08, // add rdi, 8
    0xeb, 0xf0, // jmp list
];
/// Guest-physical address of the PML4 (the vCPU's CR3).
pub const PML4_GPA: u64 = PML4;
/// Guest address of the stride loop.
pub const STRIDE_ENTRY: u64 = CODE;
/// Guest address of the list loop.
pub const LIST_ENTRY: u64 = CODE + 0x10;

/// The page size of the guest's own page tables over the data slot. (1 GiB guest pages
/// are not offered by PVM's shadow MMU.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GuestPaging {
    /// 2 MiB guest pages: KVM shadows each with a direct shadow page.
    Huge2M,
    /// 4 KiB guest pages: KVM shadows the guest's own page tables.
    Page4K,
}

impl GuestPaging {
    /// The name used in output (`2m`, `4k`).
    pub fn name(self) -> &'static str {
        match self {
            GuestPaging::Huge2M => "2m",
            GuestPaging::Page4K => "4k",
        }
    }
}

/// Where everything is in the system slot, for a data slot of a given size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Size of the data slot in bytes (a multiple of 4 KiB, at most [`MAX_DATA_BYTES`]).
    pub data_bytes: u64,
    /// The guest's page size over the data slot.
    pub paging: GuestPaging,
    /// Guest-physical address of the write list.
    pub list: u64,
    /// How many addresses the list holds.
    pub list_entries: u64,
    /// Size of the system slot in bytes (a multiple of 2 MiB).
    pub system_bytes: u64,
}

impl Layout {
    /// The layout for a data slot of `data_bytes` with a list of at least `list_entries`.
    ///
    /// # Panics
    /// If `data_bytes` is zero, not a multiple of 4 KiB or above [`MAX_DATA_BYTES`].
    pub fn new(data_bytes: u64, paging: GuestPaging, list_entries: u64) -> Self {
        assert!(
            data_bytes > 0 && data_bytes.is_multiple_of(PAGE) && data_bytes <= MAX_DATA_BYTES,
            "data slot size {data_bytes:#x}"
        );
        let gibs = data_bytes.div_ceil(GIB);
        let pts = match paging {
            GuestPaging::Huge2M => 0,
            GuestPaging::Page4K => data_bytes.div_ceil(MIB2),
        };
        let list = DATA_TABLES + (gibs + pts) * PAGE;
        let list_bytes = (list_entries.max(1) * 8).next_multiple_of(PAGE);
        let system_bytes = (list + list_bytes).next_multiple_of(MIB2);
        // Whatever the rounding left over goes to the list.
        let list_entries = (system_bytes - list) / 8;
        assert!(system_bytes <= GIB, "the system slot must fit in its GiB");
        Layout {
            data_bytes,
            paging,
            list,
            list_entries,
            system_bytes,
        }
    }

    /// Number of 4 KiB pages in the data slot.
    pub fn data_pages(&self) -> u64 {
        self.data_bytes / PAGE
    }

    /// Write code and page tables into `system` (the system slot's memory, zeroed).
    ///
    /// # Panics
    /// If `system` is not `system_bytes` long.
    pub fn build(&self, system: &mut [u8]) {
        assert_eq!(system.len() as u64, self.system_bytes);
        let mut put = |at: u64, v: u64| {
            let at = at as usize;
            system[at..at + 8].copy_from_slice(&v.to_le_bytes());
        };
        put(PML4, PDPT | TABLE);
        // The system slot: 2 MiB pages in the first GiB.
        put(PDPT, PD_SYSTEM | TABLE);
        for i in 0..self.system_bytes / MIB2 {
            put(PD_SYSTEM + 8 * i, (i * MIB2) | LEAF | PS);
        }
        // The data slot: one PD per GiB, 2 MiB leaves or PTs of 4 KiB leaves.
        let gibs = self.data_bytes.div_ceil(GIB);
        let first_gib = DATA_GPA / GIB;
        let mut next_pt = DATA_TABLES + gibs * PAGE;
        for g in 0..gibs {
            let pd = DATA_TABLES + g * PAGE;
            put(PDPT + 8 * (first_gib + g), pd | TABLE);
            for i in 0..512 {
                let addr = DATA_GPA + g * GIB + i * MIB2;
                if addr >= DATA_GPA + self.data_bytes {
                    break;
                }
                match self.paging {
                    GuestPaging::Huge2M => put(pd + 8 * i, addr | LEAF | PS),
                    GuestPaging::Page4K => {
                        put(pd + 8 * i, next_pt | TABLE);
                        for j in 0..512 {
                            let page = addr + j * PAGE;
                            if page >= DATA_GPA + self.data_bytes {
                                break;
                            }
                            put(next_pt + 8 * j, page | LEAF);
                        }
                        next_pt += PAGE;
                    }
                }
            }
        }
        let code = CODE as usize;
        system[code..code + CODE_BYTES.len()].copy_from_slice(&CODE_BYTES);
    }

    /// Translate guest-virtual `va` through the tables in `system` as the CPU would for a
    /// user-mode write: `Some(gpa)` if every level is present, writable and user.
    pub fn translate(system: &[u8], va: u64) -> Option<u64> {
        let get = |at: u64| -> Option<u64> {
            let at = at as usize;
            Some(u64::from_le_bytes(system.get(at..at + 8)?.try_into().ok()?))
        };
        let mut table = PML4;
        for level in (1..=4u32).rev() {
            let shift = 12 + 9 * (level - 1);
            let e: u64 = get(table + 8 * ((va >> shift) & 511))?;
            if e & (P | RW | US) != (P | RW | US) {
                return None;
            }
            let addr = e & 0x000f_ffff_ffff_f000;
            if level == 1 || (e & PS != 0 && level <= 3) {
                let mask = (1u64 << shift) - 1;
                return Some((addr & !mask) | (va & mask));
            }
            table = addr;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(data_bytes: u64, paging: GuestPaging) -> (Layout, Vec<u8>) {
        let l = Layout::new(data_bytes, paging, 1000);
        let mut mem = vec![0u8; l.system_bytes as usize];
        l.build(&mut mem);
        (l, mem)
    }

    #[test]
    fn identity_maps_code_list_and_every_data_page() {
        for paging in [GuestPaging::Huge2M, GuestPaging::Page4K] {
            let size = (3 << 30) + (5 << 20) + 7 * PAGE; // odd tail: not 2 MiB aligned
            let (l, mem) = image(size, paging);
            assert!(l.list_entries >= 1000);
            assert_eq!(l.system_bytes % MIB2, 0);
            for va in [
                STRIDE_ENTRY,
                LIST_ENTRY,
                l.list,
                l.list + 8 * (l.list_entries - 1),
            ] {
                assert_eq!(Layout::translate(&mem, va), Some(va), "{paging:?} {va:#x}");
            }
            for page in (0..l.data_pages()).step_by(509).chain([l.data_pages() - 1]) {
                let va = DATA_GPA + page * PAGE + 0x123;
                assert_eq!(Layout::translate(&mem, va), Some(va), "{paging:?} {va:#x}");
            }
        }
    }

    #[test]
    fn nothing_past_the_data_slot_with_4k_pages() {
        let (l, mem) = image(16 * PAGE + 3 * PAGE, GuestPaging::Page4K);
        let end = DATA_GPA + l.data_bytes;
        assert_eq!(Layout::translate(&mem, end - 1), Some(end - 1));
        assert_eq!(Layout::translate(&mem, end), None);
        assert_eq!(Layout::translate(&mem, DATA_GPA - 1), None);
    }

    #[test]
    fn tables_do_not_overlap_the_list() {
        let (l, _) = image(MAX_DATA_BYTES, GuestPaging::Page4K);
        let tables_end = DATA_TABLES + (64 + 64 * 512) * PAGE;
        assert_eq!(l.list, tables_end);
        assert!(l.system_bytes <= GIB);
    }
}
