//! KVM's binary statistics (`KVM_GET_STATS_FD`, `KVM_CAP_BINARY_STATS_FD`, Linux 5.14):
//! what KVM otherwise shows only through tracepoints and debugfs — faults, TLB flushes,
//! the number of 4 KiB / 2 MiB / 1 GiB SPTEs — read from a VM's or a vCPU's stats fd.
//!
//! The fd holds a header, then one descriptor per statistic (flags, exponent, size in
//! u64s, offset of its data, bucket size, then a NUL-padded name of `name_size` bytes),
//! then the data (u64s), as `Documentation/virt/kvm/api.rst` ("KVM_GET_STATS_FD")
//! describes. The descriptors are read once; each [`StatsFd::read`] reads the data block
//! again with one `pread`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `KVM_GET_STATS_FD`: `_IO(KVMIO, 0xce)`, on a VM or a vCPU fd.
const KVM_GET_STATS_FD: u64 = (0xAE << 8) | 0xce;
/// Size of `struct kvm_stats_header` (six u32s).
const HEADER_BYTES: usize = 24;
/// Size of `struct kvm_stats_desc` without its name.
const DESC_BYTES: usize = 16;

/// One statistic's place in the data block.
#[derive(Clone, Debug)]
struct Desc {
    name: String,
    /// Offset in bytes from the data block's start.
    offset: usize,
}

/// An open stats fd with its descriptors.
pub struct StatsFd {
    fd: OwnedFd,
    descs: Vec<Desc>,
    data_offset: u64,
    data_bytes: usize,
}

fn pread_exact(fd: &OwnedFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: `buf[done..]` is writable memory of the length given; `fd` is open.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "stats fd shorter than its header says",
            ));
        }
        done += n as usize;
    }
    Ok(())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

impl StatsFd {
    /// `KVM_GET_STATS_FD` on `fd` (a VM or vCPU fd), and its descriptors.
    pub fn open(fd: &impl AsRawFd) -> io::Result<Self> {
        // SAFETY: a KVM VM or vCPU fd; the ioctl takes no argument and returns a new fd.
        let raw = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD as _) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut header = [0u8; HEADER_BYTES];
        pread_exact(&fd, &mut header, 0)?;
        let name_size = u32_at(&header, 4) as usize;
        let num_desc = u32_at(&header, 8) as usize;
        let desc_offset = u64::from(u32_at(&header, 16));
        let data_offset = u64::from(u32_at(&header, 20));
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        if num_desc > 4096 || name_size > 4096 {
            return Err(bad("stats header out of range"));
        }
        let stride = DESC_BYTES + name_size;
        let mut raw_descs = vec![0u8; stride * num_desc];
        pread_exact(&fd, &mut raw_descs, desc_offset)?;
        let mut descs = Vec::with_capacity(num_desc);
        let mut data_bytes = 0;
        for d in raw_descs.chunks_exact(stride) {
            let size = u16::from_le_bytes([d[6], d[7]]) as usize;
            let offset = u32_at(d, 8) as usize;
            let name = &d[DESC_BYTES..];
            let len = name.iter().position(|&c| c == 0).unwrap_or(name.len());
            data_bytes = data_bytes.max(offset + 8 * size.max(1));
            descs.push(Desc {
                name: String::from_utf8_lossy(&name[..len]).into_owned(),
                offset,
            });
        }
        if data_bytes > 1 << 20 {
            return Err(bad("stats data block out of range"));
        }
        Ok(StatsFd {
            fd,
            descs,
            data_offset,
            data_bytes,
        })
    }

    /// Every statistic's name (its first value is what [`Stats::get`] returns).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.descs.iter().map(|d| d.name.as_str())
    }

    /// The current values.
    pub fn read(&self) -> io::Result<Stats> {
        let mut data = vec![0u8; self.data_bytes];
        pread_exact(&self.fd, &mut data, self.data_offset)?;
        let values = self
            .descs
            .iter()
            .map(|d| {
                let v = u64::from_le_bytes(data[d.offset..d.offset + 8].try_into().expect("8"));
                (d.name.clone(), v)
            })
            .collect();
        Ok(Stats(values))
    }
}

/// A snapshot of a stats fd: each statistic's first value, by name.
#[derive(Clone, Debug, Default)]
pub struct Stats(Vec<(String, u64)>);

impl Stats {
    /// The value of `name`, if the host's KVM has that statistic.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.0.iter().find(|(n, _)| n == name).map(|&(_, v)| v)
    }

    /// The sum over snapshots of `name` (`None` if none has it).
    pub fn sum<'a>(all: impl IntoIterator<Item = &'a Stats>, name: &str) -> Option<u64> {
        all.into_iter()
            .filter_map(|s| s.get(name))
            .fold(None, |acc, v| Some(acc.unwrap_or(0) + v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_number_matches_linux() {
        assert_eq!(KVM_GET_STATS_FD, 0xaece);
    }
}
