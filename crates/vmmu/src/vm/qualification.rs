//! The exit qualification of an EPT violation, as the SDM defines it (Intel SDM vol. 3C,
//! "Exit Qualification for EPT Violations"), decoded into what vmmu's fault handler takes.
//!
//! | Bit | Meaning |
//! | --- | --- |
//! | 0 | the access was a data read |
//! | 1 | the access was a data write |
//! | 2 | the access was an instruction fetch |
//! | 3 | the guest-physical address was readable (bit 0 of every EPT entry on the walk) |
//! | 4 | ... writable (bit 1 of every entry) |
//! | 5 | ... executable (bit 2 of every entry; for supervisor-mode linear addresses with mode-based execute control) |
//! | 6 | ... executable for user-mode linear addresses (mode-based execute control only) |
//! | 7 | the guest linear-address field is valid |
//! | 8 | with bit 7: the access was to the translation of a linear address (clear: to a guest paging-structure entry) |
//! | 9 to 11 | advanced information on the linear address (user-mode, read/write, execute-disable) |
//! | 12 | NMI unblocking due to IRET |
//! | 13 to 16 | shadow-stack access, supervisor shadow stack, guest-paging verification, asynchronous to instruction execution |
//! | 17 to 63 | reserved (zero) |
//!
//! KVM's `handle_ept_violation` makes a page-fault error code of it: the access bits give
//! WRITE and FETCH, any of bits 3 to 5 gives PRESENT (a translation existed but forbade
//! the access), and bit 8 tells a final translation from a guest page-table access. vmmu
//! does the same ([`EptViolation::error_code`]).

use crate::error::Error;
use crate::types::{AccessKind, ErrorCode};

const READ: u64 = 1 << 0;
const WRITE: u64 = 1 << 1;
const FETCH: u64 = 1 << 2;
const READABLE: u64 = 1 << 3;
const WRITABLE: u64 = 1 << 4;
const EXECUTABLE: u64 = 1 << 5;
const USER_EXECUTABLE: u64 = 1 << 6;
const GLA_VALID: u64 = 1 << 7;
const TRANSLATED: u64 = 1 << 8;
/// Bits 17 to 63: reserved, cleared by the processor.
const RESERVED: u64 = !((1 << 17) - 1);

/// An EPT violation's exit qualification, decoded ([`EptViolation::decode`]) or built by
/// the CPU model ([`EptViolation::encode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EptViolation {
    /// Bit 0: the access was a data read.
    pub read: bool,
    /// Bit 1: the access was a data write.
    pub write: bool,
    /// Bit 2: the access was an instruction fetch.
    pub fetch: bool,
    /// Bit 3: the translation allowed reads (the AND of the entries' read bits).
    pub readable: bool,
    /// Bit 4: the translation allowed writes.
    pub writable: bool,
    /// Bit 5: the translation allowed instruction fetches (supervisor fetches, with
    /// mode-based execute control).
    pub executable: bool,
    /// Bit 6: user-mode fetches allowed (mode-based execute control only; vmmu does not
    /// enable it, so its tables never set it, but it is decoded as reported).
    pub user_executable: bool,
    /// Bit 7: the guest linear-address field of the VMCS is valid.
    pub gla_valid: bool,
    /// Bit 8 (meaningful with bit 7): the access was to the final translation of a linear
    /// address, not to a guest paging-structure entry.
    pub translated: bool,
    /// Bits 9 to 16, as reported (advanced information, NMI unblocking, shadow stacks);
    /// vmmu's fault handler does not use them.
    pub other: u16,
}

impl EptViolation {
    /// Decode an exit qualification. [`Error::InvalidExitQualification`] when a reserved
    /// bit (17 to 63) is set or no access bit (0 to 2) is: no processor reports that.
    pub fn decode(qualification: u64) -> Result<EptViolation, Error> {
        if qualification & RESERVED != 0 {
            return Err(Error::InvalidExitQualification {
                qualification,
                why: "bits 17 to 63 are reserved",
            });
        }
        if qualification & (READ | WRITE | FETCH) == 0 {
            return Err(Error::InvalidExitQualification {
                qualification,
                why: "no access bit (read, write or fetch; bits 0 to 2) is set",
            });
        }
        let bit = |b: u64| qualification & b != 0;
        Ok(EptViolation {
            read: bit(READ),
            write: bit(WRITE),
            fetch: bit(FETCH),
            readable: bit(READABLE),
            writable: bit(WRITABLE),
            executable: bit(EXECUTABLE),
            user_executable: bit(USER_EXECUTABLE),
            gla_valid: bit(GLA_VALID),
            translated: bit(GLA_VALID) && bit(TRANSLATED),
            other: ((qualification >> 9) & 0xff) as u16,
        })
    }

    /// The qualification a processor reports for an access of `kind` to a translation
    /// whose permissions are `rwx` (bit 0 readable, bit 1 writable, bit 2 executable; 0
    /// when not present), made by a guest linear access's final translation (bits 7 and
    /// 8 set). What the CPU model reports.
    pub fn for_access(kind: AccessKind, rwx: u8) -> EptViolation {
        EptViolation {
            read: kind == AccessKind::Read,
            write: kind == AccessKind::Write,
            fetch: kind == AccessKind::Fetch,
            readable: rwx & 1 != 0,
            writable: rwx & 2 != 0,
            executable: rwx & 4 != 0,
            user_executable: false,
            gla_valid: true,
            translated: true,
            other: 0,
        }
    }

    /// The raw qualification.
    pub fn encode(&self) -> u64 {
        let b = |on: bool, bit: u64| if on { bit } else { 0 };
        b(self.read, READ)
            | b(self.write, WRITE)
            | b(self.fetch, FETCH)
            | b(self.readable, READABLE)
            | b(self.writable, WRITABLE)
            | b(self.executable, EXECUTABLE)
            | b(self.user_executable, USER_EXECUTABLE)
            | b(self.gla_valid, GLA_VALID)
            | b(self.gla_valid && self.translated, TRANSLATED)
            | (u64::from(self.other & 0xff) << 9)
    }

    /// Whether a translation existed (any of bits 3 to 5): the access was forbidden, not
    /// unmapped.
    pub fn present(&self) -> bool {
        self.readable || self.writable || self.executable
    }

    /// The page-fault error code vmmu's fault handler takes (KVM's, but for the USER bit
    /// KVM sets on reads, which vmmu's direct MMUs do not use): WRITE for a write, FETCH
    /// for a fetch, PRESENT when a translation existed.
    pub fn error_code(&self) -> ErrorCode {
        let mut ec = ErrorCode::empty();
        if self.write {
            ec = ec.union(ErrorCode::WRITE);
        }
        if self.fetch {
            ec = ec.union(ErrorCode::FETCH);
        }
        if self.present() {
            ec = ec.union(ErrorCode::PRESENT);
        }
        ec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_encode_round_trip_and_error_code() {
        // A write to a read-only page, final translation of a linear address.
        let q = WRITE | READABLE | EXECUTABLE | GLA_VALID | TRANSLATED;
        let v = EptViolation::decode(q).unwrap();
        assert!(v.write && !v.read && !v.fetch);
        assert!(v.readable && !v.writable && v.executable && v.present());
        assert!(v.gla_valid && v.translated);
        assert_eq!(v.encode(), q);
        assert_eq!(v.error_code(), ErrorCode::WRITE.union(ErrorCode::PRESENT));
        // A not-present read of a guest page-table entry; NMI unblocking reported.
        let q = READ | GLA_VALID | (1 << 12);
        let v = EptViolation::decode(q).unwrap();
        assert!(v.read && !v.present() && v.gla_valid && !v.translated);
        assert_eq!(v.other, 1 << 3);
        assert_eq!(v.encode(), q);
        assert_eq!(v.error_code(), ErrorCode::empty());
        // Bit 8 means nothing without bit 7.
        let v = EptViolation::decode(FETCH | TRANSLATED).unwrap();
        assert!(!v.translated);
        assert_eq!(v.error_code(), ErrorCode::FETCH);
        // The model's encoding decodes to the same error code its walk reports.
        for (kind, rwx) in [
            (AccessKind::Write, 5),
            (AccessKind::Read, 0),
            (AccessKind::Fetch, 3),
        ] {
            let v = EptViolation::for_access(kind, rwx);
            let mut want = ErrorCode::for_access(kind);
            if rwx != 0 {
                want = want.union(ErrorCode::PRESENT);
            }
            assert_eq!(EptViolation::decode(v.encode()).unwrap(), v);
            assert_eq!(v.error_code(), want);
        }
    }

    #[test]
    fn bad_qualifications_are_refused() {
        for q in [0, READABLE | WRITABLE, 1 << 17 | READ, 1 << 63 | WRITE] {
            assert!(
                matches!(
                    EptViolation::decode(q),
                    Err(Error::InvalidExitQualification { qualification, .. }) if qualification == q
                ),
                "{q:#x}"
            );
        }
    }
}
