//! Issue 13, finding 2: a `TdpPage` keeps a pointer into its allocator's memory; made from
//! an allocator that is then dropped, its table is freed memory (SIGSEGV on the write).
//! `TdpPage::new` is crate-private in every build.
//! expect: E0603 E0624
//! modes: default internals
use vmmu::table::HeapTableAllocator;
use vmmu::tdp::TdpPage;
use vmmu::types::{Gfn, Level};

pub fn reproducer() {
    let page = {
        let alloc = HeapTableAllocator::new();
        TdpPage::new(&alloc, Level::L4K, Gfn(0)).unwrap()
    };
    page.table().set(0, vmmu::spte::Spte(0x1000 | 7));
}
