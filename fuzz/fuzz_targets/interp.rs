//! Fuzz target: arbitrary bytes -> a run configuration and operations -> the interpreter
//! (see `vmmu_fuzz::run_input`).
//!
//! With the `libfuzzer` feature (the default; `cargo fuzz run interp`) this is a
//! libFuzzer target. Without it (`--no-default-features`, any toolchain) it is a runner:
//!
//! ```text
//! interp [--seconds S] [--iterations N] [--seed X] [--max-len L] [FILE|DIR ...]
//! ```
//!
//! With files or directories it replays each input once; otherwise it runs random inputs
//! (fresh random bytes, or a random mutation of an earlier input) until the time or the
//! count is up. A failing input is written to `artifacts/interp/crash-<hash>` and the
//! runner exits with status 1.
#![cfg_attr(feature = "libfuzzer", no_main)]

#[cfg(feature = "libfuzzer")]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmmu_fuzz::run_input(data);
});

#[cfg(not(feature = "libfuzzer"))]
fn main() {
    std::process::exit(runner::main());
}

#[cfg(not(feature = "libfuzzer"))]
mod runner {
    use std::hash::{DefaultHasher, Hash, Hasher};
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use vmmu_testing::Rng;

    struct Args {
        seconds: Option<f64>,
        iterations: Option<u64>,
        seed: u64,
        max_len: usize,
        paths: Vec<PathBuf>,
    }

    fn parse() -> Result<Args, String> {
        let mut a = Args {
            seconds: None,
            iterations: None,
            seed: 1,
            max_len: 1024,
            paths: Vec::new(),
        };
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
            match arg.as_str() {
                "--seconds" => a.seconds = Some(val("--seconds")?.parse().map_err(|e| format!("{e}"))?),
                "--iterations" => a.iterations = Some(val("--iterations")?.parse().map_err(|e| format!("{e}"))?),
                "--seed" => a.seed = val("--seed")?.parse().map_err(|e| format!("{e}"))?,
                "--max-len" => a.max_len = val("--max-len")?.parse().map_err(|e| format!("{e}"))?,
                "-h" | "--help" => {
                    return Err("usage: interp [--seconds S] [--iterations N] [--seed X] [--max-len L] [FILE|DIR ...]".into())
                }
                s if s.starts_with('-') => return Err(format!("unknown option {s}")),
                s => a.paths.push(s.into()),
            }
        }
        Ok(a)
    }

    /// Run one input, catching a panic; on failure save it and return false.
    fn one(data: &[u8]) -> bool {
        let ok = std::panic::catch_unwind(|| vmmu_fuzz::run_input(data)).is_ok();
        if !ok {
            let mut h = DefaultHasher::new();
            data.hash(&mut h);
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("artifacts/interp");
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("crash-{:016x}", h.finish()));
            match std::fs::write(&path, data) {
                Ok(()) => eprintln!("failing input saved to {}", path.display()),
                Err(e) => eprintln!("could not save the failing input: {e}"),
            }
        }
        ok
    }

    fn inputs(paths: &[PathBuf]) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for p in paths {
            if p.is_dir() {
                if let Ok(rd) = std::fs::read_dir(p) {
                    let mut v: Vec<_> = rd
                        .flatten()
                        .map(|e| e.path())
                        .filter(|p| p.is_file())
                        .collect();
                    v.sort();
                    out.extend(v);
                }
            } else {
                out.push(p.clone());
            }
        }
        out
    }

    pub fn main() -> i32 {
        let args = match parse() {
            Ok(a) => a,
            Err(e) => {
                eprintln!("{e}");
                return 2;
            }
        };
        let start = Instant::now();
        if !args.paths.is_empty() {
            let files = inputs(&args.paths);
            let mut failed = 0;
            for f in &files {
                let data = match std::fs::read(f) {
                    Ok(d) => d,
                    Err(e) => {
                        eprintln!("{}: {e}", f.display());
                        return 2;
                    }
                };
                if !one(&data) {
                    eprintln!("FAILED: {}", f.display());
                    failed += 1;
                }
            }
            println!(
                "replayed {} inputs in {:.1} s: {} failures",
                files.len(),
                start.elapsed().as_secs_f64(),
                failed
            );
            return i32::from(failed > 0);
        }
        let limit = args.seconds.map(Duration::from_secs_f64);
        let iterations = args
            .iterations
            .unwrap_or(if limit.is_some() { u64::MAX } else { 1000 });
        let mut rng = Rng::new(args.seed);
        let mut pool: Vec<Vec<u8>> = Vec::new();
        let mut n = 0u64;
        let mut bytes = 0u64;
        while n < iterations && limit.is_none_or(|l| start.elapsed() < l) {
            let data = if !pool.is_empty() && rng.chance(1, 2) {
                // Mutate an earlier input: flip, overwrite, insert or cut bytes.
                let mut d = pool[rng.below(pool.len() as u64) as usize].clone();
                for _ in 0..1 + rng.below(8) {
                    let len = d.len() as u64;
                    match rng.below(4) {
                        0 if len > 0 => d[rng.below(len) as usize] ^= 1 << rng.below(8),
                        1 if len > 0 => d[rng.below(len) as usize] = rng.next_u64() as u8,
                        2 if d.len() < args.max_len => {
                            d.insert(rng.below(len + 1) as usize, rng.next_u64() as u8)
                        }
                        _ if len > 1 => d.truncate(rng.below(len) as usize + 1),
                        _ => d.push(rng.next_u64() as u8),
                    }
                }
                d
            } else {
                let len = rng.below(args.max_len as u64 + 1) as usize;
                (0..len).map(|_| rng.next_u64() as u8).collect()
            };
            bytes += data.len() as u64;
            if !one(&data) {
                println!("FAILED after {n} executions");
                return 1;
            }
            if pool.len() < 64 {
                pool.push(data);
            } else {
                let i = rng.below(64) as usize;
                pool[i] = data;
            }
            n += 1;
        }
        println!(
            "{n} executions ({bytes} input bytes) in {:.1} s, seed {}: 0 failures",
            start.elapsed().as_secs_f64(),
            args.seed
        );
        0
    }
}
