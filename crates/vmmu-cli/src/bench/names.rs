//! Every published scenario, variant and metric name, defined once.
//!
//! The scenarios emit their samples with these constants, and the report (`report/`: the
//! figures, the tables' floors, the seed rules) finds records by the same constants, so
//! renaming one is a compile error on both sides, or a change of the public contract in
//! one place, never a figure silently left empty.
//!
//! One module per scenario, in the registry's order: its `NAME`, then its variants, then
//! its metrics. The TDP MMU's iteration modes, the variants of every `tdp-*` scenario, are
//! in [`tdp`]. Then the two sources the report adds: [`floor`] and [`kvm_compare`].
//!
//! # Invariants
//! The strings are the public contract (`vmmu bench --json`, `results.json`): once
//! published they are kept, and new ones are added beside them. Each `NAME` is unique (the
//! registry's test checks it), and every scenario's record names come from its module here
//! (or from [`tdp`]), never from a literal in the scenario's file.

/// The TDP MMU's iteration modes (seed 002), as the variants of `tdp-zap-hello`, `tdp-zap`,
/// `tdp-fault-in` and `tdp-fault-parallel` name them.
pub mod tdp {
    /// Every entry of every table, at every pass (KVM before seed 002).
    pub const SCAN_ALL: &str = "scan-all";
    /// Fast-forward over non-present entries, still reading them (seed 002's patch).
    pub const SKIP_NON_PRESENT: &str = "skip-non-present";
    /// A used-entries bitmap per table: read only what is in use.
    pub const USED_ENTRIES: &str = "used-entries";
}

/// `fault-in`: first touch of every page on the shadow MMU.
pub mod fault_in {
    /// The scenario.
    pub const NAME: &str = "fault-in";
    /// The shadow MMU in direct mode (the only variant).
    pub const SHADOW_DIRECT: &str = "shadow-direct";
    /// Time per 4 KiB page written.
    pub const NS_PER_PAGE: &str = "ns_per_page";
}

/// `zap`: zapping a fully mapped memslot on the shadow MMU.
pub mod zap {
    /// The scenario.
    pub const NAME: &str = "zap";
    /// The shadow MMU in direct mode (the only variant).
    pub const SHADOW_DIRECT: &str = "shadow-direct";
    /// Time of the zap.
    pub const US: &str = "us";
}

/// `rmap-iter` (seed 000): walking reverse maps.
pub mod rmap_iter {
    /// The scenario.
    pub const NAME: &str = "rmap-iter";
    /// Restart the scan from the head on every step (before the seed).
    pub const RESTART_SCAN: &str = "restart-scan";
    /// The iterator that keeps its place (the seed).
    pub const ITERATOR: &str = "iterator";
    /// Time per SPTE visited.
    pub const NS_PER_SPTE: &str = "ns_per_spte";
}

/// `pte-list-destroy` (seed 003): dropping long reverse maps.
pub mod pte_list_destroy {
    /// The scenario.
    pub const NAME: &str = "pte-list-destroy";
    /// Remove entries one by one from the head (before the seed).
    pub const ONE_BY_ONE: &str = "one-by-one";
    /// Clear in one pass, free the descriptors together (the seed).
    pub const DESTROY: &str = "destroy";
    /// Time per SPTE dropped.
    pub const NS_PER_SPTE: &str = "ns_per_spte";
}

/// `writable-bitmap` (seed 001): write-protecting a shadow page.
pub mod writable_bitmap {
    /// The scenario.
    pub const NAME: &str = "writable-bitmap";
    /// Read all 512 entries (before the seed).
    pub const SCAN_512: &str = "scan-512";
    /// Follow the possibly-writable bitmap (the seed).
    pub const BITMAP: &str = "bitmap";
    /// Time per leaf table.
    pub const NS_PER_PAGE: &str = "ns_per_page";
}

/// `wrprot-slot` (seed 004): GET_DIRTY_LOG's write protection.
pub mod wrprot_slot {
    /// The scenario.
    pub const NAME: &str = "wrprot-slot";
    /// Through each dirty gfn's reverse map.
    pub const PER_GFN: &str = "per-gfn";
    /// Walk every shadow page.
    pub const WALK_PAGES: &str = "walk-pages";
    /// Seed 004's rule choosing between the two.
    pub const KVM_2012: &str = "kvm-2012";
    /// vmmu's cost estimate choosing between the two.
    pub const ADAPTIVE: &str = "adaptive";
    /// Time of the GET.
    pub const US: &str = "us";
}

/// `dirty-log`: one round of dirty logging, every mode.
pub mod dirty_log {
    /// The scenario.
    pub const NAME: &str = "dirty-log";
    /// `get` under shadow paging, with a guest OS.
    pub const SHADOW_GET: &str = "shadow-get";
    /// KVM_GET_DIRTY_LOG, shadow MMU.
    pub const GET: &str = "get";
    /// Manual protect (GET + CLEAR), shadow MMU.
    pub const GET_CLEAR: &str = "get-clear";
    /// The dirty ring, shadow MMU.
    pub const RING: &str = "ring";
    /// KVM_GET_DIRTY_LOG, TDP MMU.
    pub const TDP_GET: &str = "tdp-get";
    /// Manual protect (GET + CLEAR), TDP MMU.
    pub const TDP_GET_CLEAR: &str = "tdp-get-clear";
    /// The dirty ring, TDP MMU.
    pub const TDP_RING: &str = "tdp-ring";
    /// The guest's writes, per page written (not reported at ratio 0).
    pub const WRITE_NS_PER_PAGE: &str = "write_ns_per_page";
    /// Time of the harvest.
    pub const HARVEST_US: &str = "harvest_us";
}

/// `tdp-zap-hello` (seed 002): tearing down a tiny VM on the TDP MMU. Variants: [`tdp`].
pub mod tdp_zap_hello {
    /// The scenario.
    pub const NAME: &str = "tdp-zap-hello";
    /// The iterator's positions.
    pub const LOOPS: &str = "loops";
    /// SPTEs the iterator loaded.
    pub const READS: &str = "reads";
    /// Time of the teardown.
    pub const NS: &str = "ns";
}

/// `tdp-zap`: zapping a fully mapped slot on the TDP MMU. Variants: [`tdp`].
pub mod tdp_zap {
    /// The scenario.
    pub const NAME: &str = "tdp-zap";
    /// Time of the zap.
    pub const US: &str = "us";
}

/// `tdp-fault-in`: first touch on the TDP MMU. Variants: [`tdp::SCAN_ALL`] and
/// [`tdp::USED_ENTRIES`].
pub mod tdp_fault_in {
    /// The scenario.
    pub const NAME: &str = "tdp-fault-in";
    /// Time per 4 KiB page written.
    pub const NS_PER_PAGE: &str = "ns_per_page";
}

/// `tdp-fault-parallel`: TDP faults from one and two vCPU threads. Variant:
/// [`tdp::USED_ENTRIES`].
pub mod tdp_fault_parallel {
    /// The scenario.
    pub const NAME: &str = "tdp-fault-parallel";
    /// Faults per second over all threads.
    pub const FAULTS_PER_S: &str = "faults_per_s";
}

/// `memory`: MMU metadata bytes per mapped page.
pub mod memory {
    /// The scenario.
    pub const NAME: &str = "memory";
    /// The shadow MMU in direct mode.
    pub const SHADOW_DIRECT: &str = "shadow-direct";
    /// The TDP MMU.
    pub const TDP: &str = "tdp";
    /// All of it.
    pub const BYTES_PER_PAGE: &str = "bytes_per_page";
    /// Page tables.
    pub const TABLE_BYTES_PER_PAGE: &str = "table_bytes_per_page";
    /// The MMU's per-table structures.
    pub const STRUCT_BYTES_PER_PAGE: &str = "struct_bytes_per_page";
    /// Reverse-map heads and descriptors.
    pub const RMAP_BYTES_PER_PAGE: &str = "rmap_bytes_per_page";
    /// The rest of the memslot's metadata.
    pub const SLOT_BYTES_PER_PAGE: &str = "slot_bytes_per_page";
}

/// `shadow-fork`: unmapping a forked process's memory under shadow paging, by rmap
/// algorithm.
pub mod shadow_fork {
    /// The scenario.
    pub const NAME: &str = "shadow-fork";
    /// Restart-scan iteration, one-by-one drop (before seeds 000 and 003).
    pub const RESTART_SCAN: &str = "restart-scan";
    /// Iterator, one-by-one drop (seed 000 only).
    pub const ONE_BY_ONE: &str = "one-by-one";
    /// Restart-scan iteration, destroy (seed 003 only).
    pub const DESTROY: &str = "destroy";
    /// Iterator, destroy (both seeds: KVM today).
    pub const ITERATOR: &str = "iterator";
    /// The MMU's time of the whole run, boot to the last exit.
    pub const US: &str = "us";
    /// The MMU's time of the host's unmap.
    pub const UNMAP_US: &str = "unmap_us";
    /// The MMU's time of the processes' exits.
    pub const EXIT_US: &str = "exit_us";
    /// Wall-clock time of the host's unmap.
    pub const UNMAP_WALL_US: &str = "unmap_wall_us";
    /// The longest reverse map, just before the unmap.
    pub const MAX_RMAP_LEN: &str = "max_rmap_len";
    /// MMU faults over the run.
    pub const FAULTS: &str = "faults";
}

/// `shadow-ctxsw`: context switches under shadow paging, with and without the root cache.
pub mod shadow_ctxsw {
    /// The scenario.
    pub const NAME: &str = "shadow-ctxsw";
    /// 3 previous roots cached (KVM's `prev_roots`).
    pub const ROOT_CACHE: &str = "root-cache";
    /// None: every CR3 load looks its root up.
    pub const NO_ROOT_CACHE: &str = "no-root-cache";
    /// Wall-clock time per switch.
    pub const US_PER_SWITCH: &str = "us_per_switch";
    /// The MMU's time per switch.
    pub const MMU_US_PER_SWITCH: &str = "mmu_us_per_switch";
    /// Hits over CR3 loads in the timed loop.
    pub const ROOT_CACHE_HIT_RATIO: &str = "root_cache_hit_ratio";
}

/// `shadow-pt-churn`: page-table churn under shadow paging, with and without unsync pages.
pub mod shadow_pt_churn {
    /// The scenario.
    pub const NAME: &str = "shadow-pt-churn";
    /// Every guest table write-protected, each PTE write emulated.
    pub const SYNC: &str = "sync";
    /// Last-level tables go unsync, resynced at the flush (KVM's default).
    pub const UNSYNC: &str = "unsync";
    /// The MMU's time of the loop.
    pub const US: &str = "us";
    /// Wall-clock time of the loop.
    pub const WALL_US: &str = "wall_us";
}

/// `scale`: a guest of up to 1 TiB (4 KiB) or 12 TiB (2 MiB) through the life of a live
/// migration; the phase is the `phase` param, the harvest VM the `harvest` param.
pub mod scale {
    /// The scenario.
    pub const NAME: &str = "scale";
    /// KVM's TDP MMU (used-entries iteration).
    pub const TDP: &str = "tdp";
    /// The shadow MMU in direct mode.
    pub const SHADOW_DIRECT: &str = "shadow-direct";
    /// `harvest`: a manual-protect VM harvested by GET, CLEAR and dirty ranges.
    pub const BITMAP: &str = "bitmap";
    /// `harvest` (and `phase`): a dirty-ring VM; the harvest of every ring and the reset.
    pub const RING: &str = "ring";
    /// `phase`: the VM and its slots made.
    pub const SETUP: &str = "setup";
    /// `phase`: every page faulted in through the CPU model.
    pub const FAULT_IN: &str = "fault-in";
    /// `phase`: LOG_DIRTY_PAGES set on every slot.
    pub const ENABLE_LOGGING: &str = "enable-logging";
    /// `phase`: one page in 1000 written.
    pub const DIRTY: &str = "dirty";
    /// `phase`: KVM_GET_DIRTY_LOG of every slot (manual protect: a copy).
    pub const GET: &str = "get";
    /// `phase`: KVM_CLEAR_DIRTY_LOG of every slot with GET's bitmap.
    pub const CLEAR: &str = "clear";
    /// `phase`: `Vm::get_dirty_ranges` of every slot.
    pub const GET_RANGES: &str = "get-ranges";
    /// `phase`: `Vm::clear_dirty_ranges` of exactly the ranges reported.
    pub const CLEAR_RANGES: &str = "clear-ranges";
    /// `phase`: 1000 dirty pages harvested by the ring (best of five).
    pub const RING_1000: &str = "ring-1000";
    /// `phase`: 1000 dirty pages reported by `get_dirty_ranges` (best of five).
    pub const GET_RANGES_1000: &str = "get-ranges-1000";
    /// `phase`: 1000 dirty pages cleared by `clear_dirty_ranges` (best of five).
    pub const CLEAR_RANGES_1000: &str = "clear-ranges-1000";
    /// `phase`: LOG_DIRTY_PAGES cleared on every slot (huge pages recovered).
    pub const DISABLE_LOGGING: &str = "disable-logging";
    /// `phase`: every slot deleted, the VM dropped.
    pub const TEARDOWN: &str = "teardown";
    /// `phase`: the teardown of the guest's slots with only their first GiB mapped.
    pub const TEARDOWN_SPARSE: &str = "teardown-sparse";
    /// `phase`: the teardown of one fully mapped 1 GiB slot.
    pub const TEARDOWN_1G: &str = "teardown-1g";
    /// `phase`: the least work of harvesting 1000 pages spread over tables of the guest's
    /// size (bitmap RMW and SPTE store per page, one flush; best of five).
    pub const FLOOR_1000: &str = "floor-1000";
    /// Seconds of the phase.
    pub const S: &str = "s";
    /// Time per 4 KiB page of the guest (per page written or harvested for those phases).
    pub const NS_PER_PAGE: &str = "ns_per_page";
    /// The OS's peak resident memory over the phase.
    pub const PEAK_RSS_GIB: &str = "peak_rss_gib";
    /// That peak less the resident memory before the VM, per 4 KiB page of the guest.
    pub const RSS_BYTES_PER_PAGE: &str = "rss_bytes_per_page";
}

/// The floor (`report/floor.rs`): run through the bench harness, not registered.
pub mod floor {
    /// The source.
    pub const NAME: &str = "floor";
    /// The least work of a harvest: bitmap copy, RMW per non-zero word, store per dirty
    /// SPTE, flush (the harvests' floor).
    pub const HARVEST: &str = "harvest";
    /// `pattern` of a `harvest`: `dirty-log`'s and `wrprot-slot`'s random pages.
    pub const RANDOM: &str = "random";
    /// `pattern` of a `harvest`: `kvm-compare`'s stride of pages.
    pub const STRIDE: &str = "stride";
    /// One read per present entry (the zaps' floor).
    pub const ZAP: &str = "zap";
    /// A read and an atomic AND per SPTE (`rmap-iter`'s floor).
    pub const AGE: &str = "age";
    /// One atomic swap per SPTE (`pte-list-destroy`'s floor).
    pub const CLEAR: &str = "clear";
    /// Time of `harvest` and `zap`.
    pub const US: &str = "us";
    /// Time per SPTE of `age` and `clear`.
    pub const NS_PER_SPTE: &str = "ns_per_spte";
}

/// `vmmu kvm compare --json`: the host's KVM and vmmu side by side.
pub mod kvm_compare {
    /// The source.
    pub const NAME: &str = "kvm-compare";
    /// The host's KVM, through /dev/kvm.
    pub const KVM: &str = "kvm";
    /// vmmu on the same workload (its default MMU, the shadow MMU in direct mode).
    pub const VMMU: &str = "vmmu";
    /// vmmu's TDP MMU on the same workload (harvests only).
    pub const VMMU_TDP: &str = "vmmu-tdp";
    /// Time of the harvest (GET; GET + CLEAR; or, for the ring, collecting its entries and
    /// `KVM_RESET_DIRTY_RINGS`, summed over the round's pieces).
    pub const HARVEST_US: &str = "harvest_us";
    /// 1 if vmmu's bitmap equalled KVM's in every round (variants [`VMMU`] and
    /// [`VMMU_TDP`]).
    pub const BITMAP_EQUAL: &str = "bitmap_equal";
    /// First touch, per 4 KiB page.
    pub const FAULT_NS_PER_PAGE: &str = "fault_ns_per_page";
    /// Time of the memslot delete.
    pub const DELETE_US: &str = "delete_us";
}

/// `perf-dirty-log`, `perf-pre-fault`, `perf-page-table`: `vmmu perf`'s tests as
/// scenarios (vmmu's side; `vmmu perf <test>` runs KVM's too). Variants are the side
/// (`vmmu-<mmu>`, `kvm`); metrics are the phases, in seconds, and the counters over each
/// phase, `<phase>_faults`, `_fast_faults`, `_tlb_flushes`, `_huge_split`,
/// `_huge_rebuilt`, `_huge_spte_delta` (counts); `params` carry the test's flags.
pub mod perf {
    /// `vmmu perf dirty-log`'s phases.
    pub mod dirty_log {
        /// The scenario.
        pub const NAME: &str = "perf-dirty-log";
        /// Phase `populate_memory`.
        pub const POPULATE_MEMORY: &str = "populate_memory";
        /// Phase `enabling_dirty_logging`.
        pub const ENABLING_DIRTY_LOGGING: &str = "enabling_dirty_logging";
        /// Phase `dirty_memory`.
        pub const DIRTY_MEMORY: &str = "dirty_memory";
        /// Phase `get_dirty_log`.
        pub const GET_DIRTY_LOG: &str = "get_dirty_log";
        /// Phase `clear_dirty_log`.
        pub const CLEAR_DIRTY_LOG: &str = "clear_dirty_log";
        /// Phase `disabling_dirty_logging`.
        pub const DISABLING_DIRTY_LOGGING: &str = "disabling_dirty_logging";
        /// Phase `get_dirty_log_total`.
        pub const GET_DIRTY_LOG_TOTAL: &str = "get_dirty_log_total";
        /// Phase `clear_dirty_log_total`.
        pub const CLEAR_DIRTY_LOG_TOTAL: &str = "clear_dirty_log_total";
    }
    /// `vmmu perf pre-fault`'s phases.
    pub mod pre_fault {
        /// The scenario.
        pub const NAME: &str = "perf-pre-fault";
        /// Phase `pre_fault_memory`.
        pub const PRE_FAULT_MEMORY: &str = "pre_fault_memory";
        /// Phase `read_memory`.
        pub const READ_MEMORY: &str = "read_memory";
    }
    /// `vmmu perf page-table`'s phases.
    pub mod page_table {
        /// The scenario.
        pub const NAME: &str = "perf-page-table";
        /// Phase `create_mappings`.
        pub const CREATE_MAPPINGS: &str = "create_mappings";
        /// Phase `enable_dirty_logging`.
        pub const ENABLE_DIRTY_LOGGING: &str = "enable_dirty_logging";
        /// Phase `update_mappings`.
        pub const UPDATE_MAPPINGS: &str = "update_mappings";
        /// Phase `disable_dirty_logging`.
        pub const DISABLE_DIRTY_LOGGING: &str = "disable_dirty_logging";
        /// Phase `adjust_mappings`.
        pub const ADJUST_MAPPINGS: &str = "adjust_mappings";
    }
    /// `vmmu perf access-tracking`'s phases.
    pub mod access_tracking {
        /// The scenario.
        pub const NAME: &str = "perf-access-tracking";
        /// Phase `populating_memory`.
        pub const POPULATING_MEMORY: &str = "populating_memory";
        /// Phase `writing_populated`.
        pub const WRITING_POPULATED: &str = "writing_populated";
        /// Phase `reading_populated`.
        pub const READING_POPULATED: &str = "reading_populated";
        /// Phase `mark_idle`.
        pub const MARK_IDLE: &str = "mark_idle";
        /// Phase `writing_idle`.
        pub const WRITING_IDLE: &str = "writing_idle";
        /// Phase `reading_idle`.
        pub const READING_IDLE: &str = "reading_idle";
    }
    /// `vmmu perf memslot`'s tests (best time per iteration) and its slot setup.
    pub mod memslot {
        /// The scenario.
        pub const NAME: &str = "perf-memslot";
        /// Each test's metric, in the selftest's order.
        pub const METRICS: [&str; 6] = [
            "map",
            "unmap",
            "unmap_chunked",
            "move_active_area",
            "move_inactive_area",
            "rw",
        ];
        /// The best slot setup time over the tests.
        pub const SLOT_SETUP: &str = "slot_setup";
    }
}
