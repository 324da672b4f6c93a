//! Memory-access traces: what a real program touched, replayed as a migrating guest's
//! workload (so the dirty pattern is one nobody here designed).
//!
//! # Format
//! Text, one record a line: `<time> <vcpu> <R|W> <page>`, `time` in nanoseconds (or any
//! increasing tick; replay keeps the order, the rate comes from the migration's dirty
//! rate), `page` a page number in decimal or `0x` hex. Blank lines and lines starting
//! with `#` are ignored.
//!
//! [`Trace::from_lackey`] converts the output of `valgrind --tool=lackey --trace-mem=yes`
//! (lines ` L addr,size`, ` S addr,size`, ` M addr,size`, `I  addr,size`): loads become
//! reads, stores and modifies writes, instruction fetches are dropped; the program's
//! sparse virtual pages are renumbered densely in order of first touch, so they fit a
//! guest; time is the record's index.

use std::collections::HashMap;
use std::io::BufRead;

/// One access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// When (ns or ticks).
    pub time: u64,
    /// Which vCPU.
    pub vcpu: u32,
    /// A write (else a read).
    pub write: bool,
    /// The page.
    pub page: u64,
}

/// A trace: named records in order.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// Where it came from.
    pub name: String,
    /// The accesses.
    pub records: Vec<Record>,
}

impl Trace {
    /// vCPUs the trace names (highest vCPU + 1).
    pub fn vcpus(&self) -> u32 {
        self.records.iter().map(|r| r.vcpu + 1).max().unwrap_or(0)
    }

    /// Distinct pages written.
    pub fn pages_written(&self) -> usize {
        let mut v: Vec<u64> = self
            .records
            .iter()
            .filter(|r| r.write)
            .map(|r| r.page)
            .collect();
        v.sort_unstable();
        v.dedup();
        v.len()
    }

    /// Parse the text format (see the module docs). Errors name the line.
    pub fn parse(name: &str, input: impl BufRead) -> Result<Trace, String> {
        let mut records = Vec::new();
        for (k, line) in input.lines().enumerate() {
            let line = line.map_err(|e| format!("{name}: line {}: {e}", k + 1))?;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |what: &str| format!("{name}: line {}: {what}: {line:?}", k + 1);
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() != 4 {
                return Err(bad("expected `<time> <vcpu> <R|W> <page>`"));
            }
            let num = |s: &str| match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => s.parse(),
            };
            let time = num(f[0]).map_err(|_| bad("bad time"))?;
            let vcpu = f[1]
                .parse::<u32>()
                .ok()
                .filter(|&v| v < 1024)
                .ok_or_else(|| bad("bad vcpu (0..1024)"))?;
            let write = match f[2] {
                "W" | "w" => true,
                "R" | "r" => false,
                _ => return Err(bad("access must be R or W")),
            };
            let page = num(f[3]).map_err(|_| bad("bad page"))?;
            records.push(Record {
                time,
                vcpu,
                write,
                page,
            });
        }
        Ok(Trace {
            name: name.into(),
            records,
        })
    }

    /// Write in the text format.
    pub fn write_to(&self, mut out: impl std::io::Write) -> std::io::Result<()> {
        writeln!(
            out,
            "# vmmu trace {}: <time> <vcpu> <R|W> <page>",
            self.name
        )?;
        for r in &self.records {
            let a = if r.write { 'W' } else { 'R' };
            writeln!(out, "{} {} {a} {:#x}", r.time, r.vcpu, r.page)?;
        }
        Ok(())
    }

    /// At most `max` records, evenly spread: every `k`-th record, `k` the smallest that
    /// fits (keeps the trace's phases, loses detail within them).
    pub fn thinned(&self, max: usize) -> Trace {
        let k = self.records.len().div_ceil(max.max(1)).max(1);
        Trace {
            name: self.name.clone(),
            records: self.records.iter().step_by(k).copied().collect(),
        }
    }

    /// Convert `valgrind --tool=lackey --trace-mem=yes` output (see the module docs),
    /// keeping at most `max_records` data accesses; consecutive accesses to the same page
    /// of the same kind collapse into one (the trace stays small; the dirty pattern is
    /// the same). All records go to vCPU 0.
    pub fn from_lackey(name: &str, input: impl BufRead, max_records: usize) -> Trace {
        let mut dense: HashMap<u64, u64> = HashMap::new();
        let mut records: Vec<Record> = Vec::new();
        for (k, line) in input.lines().map_while(Result::ok).enumerate() {
            if records.len() >= max_records {
                break;
            }
            let b = line.as_bytes();
            if b.len() < 4 || b[0] != b' ' {
                continue;
            }
            let write = match b[1] {
                b'S' | b'M' => true,
                b'L' => false,
                _ => continue,
            };
            let Some(addr) = line[3..]
                .split(',')
                .next()
                .and_then(|a| u64::from_str_radix(a.trim(), 16).ok())
            else {
                continue;
            };
            let next = dense.len() as u64;
            let page = *dense.entry(addr >> 12).or_insert(next);
            if records
                .last()
                .is_some_and(|r| r.page == page && r.write == write)
            {
                continue;
            }
            records.push(Record {
                time: k as u64,
                vcpu: 0,
                write,
                page,
            });
        }
        Trace {
            name: name.into(),
            records,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reports_bad_lines() {
        let t = Trace::parse("t", "# c\n1 0 W 0x10\n2 1 R 7\n\n".as_bytes()).unwrap();
        assert_eq!(t.records.len(), 2);
        assert_eq!(t.vcpus(), 2);
        let mut out = Vec::new();
        t.write_to(&mut out).unwrap();
        let back = Trace::parse("t", &out[..]).unwrap();
        assert_eq!(back.records, t.records);
        let e = Trace::parse("t", "1 0 X 3\n".as_bytes()).unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        assert!(Trace::parse("t", "1 0 W\n".as_bytes()).is_err());
    }

    #[test]
    fn lackey_output_becomes_dense_pages() {
        let lackey = "I  04000000,3\n L 1fff000,8\n S 1fff008,8\n M 5000,4\n S 1fff010,4\n";
        let t = Trace::from_lackey("l", lackey.as_bytes(), 100);
        let got: Vec<(u64, bool)> = t.records.iter().map(|r| (r.page, r.write)).collect();
        assert_eq!(got, vec![(0, false), (0, true), (1, true), (0, true)]);
    }
}
