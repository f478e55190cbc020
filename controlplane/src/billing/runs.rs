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
    /// A hash of the record's group key (the records a pass reads together must have
    /// the same): [`group_sort`] buckets by it.
    fn group(&self) -> u64;
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

/// Buckets of [`group_sort`]: 2^16, a few dozen records each at millions of rows, so
/// each bucket sorts within the cache.
const GROUP_BITS: u32 = 16;

/// Sorts `v` in memory by (bucket of [`Fixed::group`], record): a counting pass, then
/// the records are scattered into 2^16 buckets by a hash of their group key (into a
/// second buffer: in place, the swap chains were measured 2x slower), then the
/// buckets are sorted in parallel, each small enough for the cache. Records of one
/// group (one event id, one IP) stay together and in their own order, which is all
/// the passes read; the result is a total order, the same on every run.
pub fn group_sort<T: Fixed>(v: &mut Vec<T>, threads: usize) {
    let n = v.len();
    if n < 1 << 15 {
        v.sort_unstable_by_key(|r| (r.group() >> (64 - GROUP_BITS), *r));
        return;
    }
    let buckets = 1usize << GROUP_BITS;
    let bucket = |r: &T| (r.group() >> (64 - GROUP_BITS)) as usize;
    let mut start = vec![0usize; buckets + 1];
    for r in v.iter() {
        start[bucket(r) + 1] += 1;
    }
    for b in 0..buckets {
        start[b + 1] += start[b];
    }
    let mut out: Vec<T> = Vec::with_capacity(n);
    {
        let slots = &mut out.spare_capacity_mut()[..n];
        let mut at = start.clone();
        for r in v.iter() {
            let b = bucket(r);
            slots[at[b]].write(*r);
            at[b] += 1;
        }
    }
    // SAFETY: bucket b's records go to start[b]..start[b + 1], those ranges tile 0..n,
    // and every record of `v` was written: each of the n slots exactly once.
    unsafe { out.set_len(n) };
    // Contiguous bucket ranges of about n / threads records, one per thread.
    let threads = threads.max(1);
    let mut chunks: Vec<&mut [T]> = Vec::with_capacity(threads);
    let mut rest: &mut [T] = &mut out;
    let mut cut = 0usize;
    let mut b = 0usize;
    for t in 1..=threads {
        let goal = n * t / threads;
        while b < buckets && start[b + 1] <= goal {
            b += 1;
        }
        let end = if t == threads { n } else { start[b] };
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(end - cut);
        chunks.push(head);
        rest = tail;
        cut = end;
    }
    let start = &start;
    std::thread::scope(|s| {
        let mut base = 0usize;
        for chunk in chunks {
            let from = base;
            base += chunk.len();
            s.spawn(move || {
                // The buckets inside this chunk: sort each.
                let mut b = start.partition_point(|&x| x <= from) - 1;
                let mut at = from;
                while at < from + chunk.len() {
                    let end = start[b + 1].min(from + chunk.len());
                    chunk[at - from..end - from].sort_unstable();
                    at = end;
                    b += 1;
                }
            });
        }
    });
    *v = out;
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
        match &self.spill {
            Some((dir, prefix)) => {
                let lens = sort_chunks(&mut self.buf, self.threads);
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
                // In memory the buffer is flushed once: one sorted run, nothing to merge.
                debug_assert!(self.runs.is_empty(), "an in-memory set is flushed once");
                group_sort(&mut self.buf, self.threads);
                self.runs.push(Run::Mem {
                    start: 0,
                    len: self.buf.len(),
                });
            }
        }
        Ok(())
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

    #[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Debug)]
    struct R(u64, u32);

    impl Fixed for R {
        const BYTES: usize = 12;
        fn group(&self) -> u64 {
            clickgate_core::hash::mix64(self.0)
        }
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

    /// The in-memory order: by bucket of the group hash, then by record.
    fn bucket_order(v: &[R]) -> Vec<R> {
        let mut v = v.to_vec();
        v.sort_by_key(|r| (r.group() >> (64 - GROUP_BITS), *r));
        v
    }

    #[test]
    fn spilled_runs_merge_sorted_and_in_memory_sets_come_out_grouped() {
        let dir = tempfile::tempdir().unwrap();
        // Below and above group_sort's scatter threshold; few groups and many.
        for (n, modulus) in [(10_007u64, 997u64), (70_001, 5), (70_001, 1 << 40)] {
            let input: Vec<R> = (0..n)
                .map(|i| R(clickgate_core::hash::mix64(i) % modulus, i as u32))
                .collect();
            let mut want = input.clone();
            want.sort();
            for threads in [1, 3] {
                let mut mem = RunSet::new(input.len(), None, threads);
                for r in &input {
                    mem.push(*r).unwrap();
                }
                assert_eq!(all(mem), bucket_order(&input), "n {n} threads {threads}");
                for cap in [7, 1000, 100_000] {
                    if n > 20_000 && cap == 7 {
                        continue;
                    }
                    let mut sp = RunSet::new(cap, Some((dir.path().into(), "t".into())), threads);
                    for r in &input {
                        sp.push(*r).unwrap();
                    }
                    assert_eq!(all(sp), want, "cap {cap}");
                    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
                }
            }
        }
        assert!(all(RunSet::new(4, None, 2)).is_empty());
    }
}
