//! Sorted runs of fixed-size records: billing's bounded-memory sort.
//!
//! Records are collected into a buffer of a fixed capacity; a full buffer is sorted
//! (in parallel chunks) and either kept in memory (the day fits the memory setting) or
//! written to a run file. [`Merge`] then streams every run in order with a k-way merge,
//! holding one read buffer per run file. Records have a total order (their last fields
//! are the row's file and row number), so the merged order — and every output derived
//! from it — is the same whatever the run boundaries.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Read buffer per run file during a merge.
pub const RUN_READ_BUFFER_BYTES: usize = 64 << 10;

/// A record with a fixed little-endian encoding.
pub trait Fixed: Copy + Ord + Send + Sync {
    const BYTES: usize;
    fn put(&self, out: &mut [u8]);
    fn get(b: &[u8]) -> Self;
}

/// Sorts `v` in `threads` chunks in parallel; returns the chunk lengths.
pub fn sort_chunks<T: Fixed>(v: &mut [T], threads: usize) -> Vec<usize> {
    let n = v.len();
    let chunk = n.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for c in v.chunks_mut(chunk) {
            s.spawn(move || c.sort_unstable());
        }
    });
    v.chunks(chunk).map(<[T]>::len).collect()
}

/// A sorted run waiting to be merged.
pub enum Run {
    /// `len` records at `start` of the caller's in-memory vector.
    Mem {
        start: usize,
        len: usize,
    },
    File {
        path: PathBuf,
        len: u64,
    },
}

/// Writes sorted `recs` to a new run file in `dir`.
pub fn write_run<T: Fixed>(dir: &Path, name: &str, recs: &[T]) -> io::Result<Run> {
    let path = dir.join(name);
    let mut w = BufWriter::with_capacity(1 << 20, File::create(&path)?);
    let mut b = vec![0u8; T::BYTES];
    for r in recs {
        r.put(&mut b);
        w.write_all(&b)?;
    }
    w.into_inner().map_err(|e| e.into_error())?;
    Ok(Run::File {
        path,
        len: recs.len() as u64,
    })
}

/// Collects records into sorted runs: in memory when `spill` is `None`, else in run
/// files of at most `cap` records under that directory.
pub struct RunSet<T: Fixed> {
    pub buf: Vec<T>,
    pub runs: Vec<Run>,
    cap: usize,
    spill: Option<(PathBuf, String)>,
    threads: usize,
}

impl<T: Fixed> RunSet<T> {
    /// `cap`: records in memory at most (in memory mode: the exact number expected).
    pub fn new(cap: usize, spill: Option<(PathBuf, String)>, threads: usize) -> RunSet<T> {
        RunSet {
            buf: Vec::with_capacity(cap.max(1)),
            runs: Vec::new(),
            cap: cap.max(1),
            spill,
            threads,
        }
    }

    #[inline]
    pub fn push(&mut self, r: T) -> io::Result<()> {
        if self.spill.is_some() && self.buf.len() == self.cap {
            self.flush()?;
        }
        self.buf.push(r);
        Ok(())
    }

    /// Sorts the buffer; spills it as run files (spill mode) or keeps it as the
    /// in-memory runs (only once, at the end, in memory mode).
    pub fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let lens = sort_chunks(&mut self.buf, self.threads);
        match &self.spill {
            Some((dir, prefix)) => {
                let mut at = 0;
                for len in lens {
                    let name = format!("{prefix}-{:06}", self.runs.len());
                    let run = write_run(dir, &name, &self.buf[at..at + len])?;
                    self.runs.push(run);
                    at += len;
                }
                self.buf.clear();
            }
            None => {
                let mut at = self.runs_mem_end();
                for len in lens {
                    self.runs.push(Run::Mem { start: at, len });
                    at += len;
                }
            }
        }
        Ok(())
    }

    fn runs_mem_end(&self) -> usize {
        self.runs
            .iter()
            .map(|r| match r {
                Run::Mem { start, len } => start + len,
                Run::File { .. } => 0,
            })
            .max()
            .unwrap_or(0)
    }

    /// Flushes and returns the runs with the in-memory records they point into.
    pub fn finish(mut self) -> io::Result<(Vec<T>, Vec<Run>)> {
        self.flush()?;
        Ok((self.buf, self.runs))
    }
}

enum Source<'a, T> {
    Mem(std::slice::Iter<'a, T>),
    File(BufReader<File>, u64, Vec<u8>),
}

impl<T: Fixed> Source<'_, T> {
    fn next(&mut self) -> io::Result<Option<T>> {
        match self {
            Source::Mem(it) => Ok(it.next().copied()),
            Source::File(r, left, b) => {
                if *left == 0 {
                    return Ok(None);
                }
                r.read_exact(b)?;
                *left -= 1;
                Ok(Some(T::get(b)))
            }
        }
    }
}

/// The k-way merge of sorted runs.
pub struct Merge<'a, T: Fixed> {
    sources: Vec<Source<'a, T>>,
    heap: BinaryHeap<Reverse<(T, usize)>>,
    /// With one source the heap is skipped.
    single: bool,
}

impl<'a, T: Fixed> Merge<'a, T> {
    /// Opens every run (file runs are removed once opened: the open handle keeps them).
    pub fn new(mem: &'a [T], runs: &[Run]) -> io::Result<Merge<'a, T>> {
        let mut sources = Vec::with_capacity(runs.len());
        for r in runs {
            sources.push(match r {
                Run::Mem { start, len } => Source::Mem(mem[*start..start + len].iter()),
                Run::File { path, len } => {
                    let f = File::open(path)?;
                    std::fs::remove_file(path)?;
                    Source::File(
                        BufReader::with_capacity(RUN_READ_BUFFER_BYTES, f),
                        *len,
                        vec![0; T::BYTES],
                    )
                }
            });
        }
        let mut m = Merge {
            single: sources.len() == 1,
            sources,
            heap: BinaryHeap::new(),
        };
        if !m.single {
            for i in 0..m.sources.len() {
                if let Some(r) = m.sources[i].next()? {
                    m.heap.push(Reverse((r, i)));
                }
            }
        }
        Ok(m)
    }

    /// The next record in order (`None`: every run is exhausted).
    #[inline]
    pub fn pop(&mut self) -> io::Result<Option<T>> {
        if self.single {
            return self.sources[0].next();
        }
        let Some(mut top) = self.heap.peek_mut() else {
            return Ok(None);
        };
        let (r, i) = top.0;
        match self.sources[i].next()? {
            Some(n) => top.0 = (n, i),
            None => {
                std::collections::binary_heap::PeekMut::pop(top);
            }
        }
        Ok(Some(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
    struct R(u64, u32);

    impl Fixed for R {
        const BYTES: usize = 12;
        fn put(&self, out: &mut [u8]) {
            out[..8].copy_from_slice(&self.0.to_le_bytes());
            out[8..12].copy_from_slice(&self.1.to_le_bytes());
        }
        fn get(b: &[u8]) -> R {
            R(
                u64::from_le_bytes(b[..8].try_into().unwrap()),
                u32::from_le_bytes(b[8..12].try_into().unwrap()),
            )
        }
    }

    fn all(set: RunSet<R>) -> Vec<R> {
        let (mem, runs) = set.finish().unwrap();
        let mut m = Merge::new(&mem, &runs).unwrap();
        let mut out = Vec::new();
        while let Some(r) = m.pop().unwrap() {
            out.push(r);
        }
        out
    }

    #[test]
    fn spilled_and_in_memory_runs_merge_to_the_same_sorted_order() {
        let dir = tempfile::tempdir().unwrap();
        let input: Vec<R> = (0..10_007u64)
            .map(|i| R(clickgate_core::hash::mix64(i) % 997, i as u32))
            .collect();
        let mut want = input.clone();
        want.sort();
        for threads in [1, 3] {
            let mut mem = RunSet::new(input.len(), None, threads);
            for r in &input {
                mem.push(*r).unwrap();
            }
            assert_eq!(all(mem), want);
            for cap in [1, 7, 1000, 20_000] {
                let mut sp = RunSet::new(cap, Some((dir.path().into(), "t".into())), threads);
                for r in &input {
                    sp.push(*r).unwrap();
                }
                assert_eq!(all(sp), want, "cap {cap}");
                assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
            }
        }
        assert!(all(RunSet::new(4, None, 2)).is_empty());
    }
}
