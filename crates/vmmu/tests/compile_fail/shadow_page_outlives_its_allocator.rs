//! Issue 13, finding 2: `Pages::create` keeps a pointer into the allocator's memory, so a
//! shadow page made from an allocator that is then dropped points at freed memory.
//! `Pages::create` is crate-private in every build.
//! expect: E0603 E0624
//! modes: default internals
use vmmu::page::{Pages, Role};
use vmmu::table::HeapTableAllocator;
use vmmu::types::{Gfn, Level};

pub fn reproducer() {
    let mut pages = Pages::new();
    let id = {
        let alloc = HeapTableAllocator::new();
        let role = Role::direct(Level::L4K);
        pages.create(&alloc, role, Gfn(0), 0).unwrap()
    };
    let _ = pages.get(id).table();
}
