//! Where the archiver's records come from.
//!
//! A source is a set of *streams*, each an ordered sequence of raw records with `u64`
//! positions and a durable committed position: a core's local log (LSNs, cursor files of
//! consumer [`CURSOR_CONSUMER`]) or, later, a partition of the Kafka topic `raw_clicks`
//! (offsets, committed by the consumer group). The archiver only needs this trait, so a
//! `raw_clicks` consumer-group source is one more implementation (docs/ARCHIVE.md).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use clickgate_proto::cursor;
use clickgate_proto::segment::{core_dirs, LogReader};

use super::{ArchiveLocation, CURSOR_CONSUMER};

pub trait RecordSource: Send {
    /// The streams there are now (names are `[a-z0-9-]`, used in file names), sorted; the
    /// list may grow (a core appears).
    fn streams(&mut self) -> io::Result<Vec<String>>;
    /// The committed position of `stream`: where reading resumes after a restart.
    fn committed(&mut self, stream: &str) -> io::Result<u64>;
    /// (Re)positions the reader of `stream` at `pos`.
    fn seek(&mut self, stream: &str, pos: u64) -> io::Result<()>;
    /// The next record of `stream`: (its position, the position after it, its bytes),
    /// or `None` at the current end (a later call may return more).
    fn next(&mut self, stream: &str) -> io::Result<Option<(u64, u64, &[u8])>>;
    /// Durably records that everything of `stream` before `pos` is archived.
    fn commit(&mut self, stream: &str, pos: u64) -> io::Result<()>;
    /// Streams taken away since the last call (a consumer group's rebalance): the
    /// archiver drops what it read of them, uncommitted; their new owner redoes it.
    fn revoked(&mut self) -> Vec<String> {
        Vec::new()
    }
}

/// The local log of every dataplane core: `<data_dir>/log/core-<k>/`, streams
/// `core-<k>` (or `<box id>-core-<k>` in an archive that boxes share, see
/// [`LocalLogSource::for_location`]).
pub struct LocalLogSource {
    data_dir: PathBuf,
    log_root: PathBuf,
    prefix: String,
    readers: BTreeMap<String, (u32, LogReader)>,
}

impl LocalLogSource {
    pub fn new(data_dir: &Path) -> LocalLogSource {
        LocalLogSource {
            data_dir: data_dir.to_path_buf(),
            log_root: data_dir.join("log"),
            prefix: String::new(),
            readers: BTreeMap::new(),
        }
    }

    /// For a local directory, streams `core-<k>`; for S3, which many boxes may share,
    /// `<box id, 16 hex digits>-core-<k>`, so two boxes' files never share a name.
    pub fn for_location(data_dir: &Path, loc: &ArchiveLocation) -> io::Result<LocalLogSource> {
        let mut s = LocalLogSource::new(data_dir);
        if let ArchiveLocation::S3 { .. } = loc {
            let id = clickgate_proto::box_id::resolve(data_dir, None)?;
            s.prefix = format!("{id:016x}-");
        }
        Ok(s)
    }

    fn core_of(&self, stream: &str) -> io::Result<u32> {
        stream
            .strip_prefix(self.prefix.as_str())
            .and_then(|s| s.strip_prefix("core-"))
            .and_then(|k| k.parse().ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("not a local log stream: {stream:?}"),
                )
            })
    }

    fn reader(&mut self, stream: &str) -> io::Result<&mut LogReader> {
        if !self.readers.contains_key(stream) {
            let pos = self.committed(stream)?;
            self.seek(stream, pos)?;
        }
        Ok(&mut self.readers.get_mut(stream).expect("seeked").1)
    }
}

impl RecordSource for LocalLogSource {
    fn streams(&mut self) -> io::Result<Vec<String>> {
        Ok(core_dirs(&self.log_root)?
            .into_iter()
            .map(|(k, _)| format!("{}core-{k}", self.prefix))
            .collect())
    }

    fn committed(&mut self, stream: &str) -> io::Result<u64> {
        let core = self.core_of(stream)?;
        Ok(cursor::read_cursor(&self.data_dir, CURSOR_CONSUMER, core)?.unwrap_or(0))
    }

    fn seek(&mut self, stream: &str, pos: u64) -> io::Result<()> {
        let core = self.core_of(stream)?;
        let reader = LogReader::open(&self.log_root.join(format!("core-{core}")), pos)?;
        self.readers.insert(stream.to_owned(), (core, reader));
        Ok(())
    }

    fn next(&mut self, stream: &str) -> io::Result<Option<(u64, u64, &[u8])>> {
        let r = self.reader(stream)?;
        // The position after the record is known once it is read; take it from a second
        // borrow-free call after `next` (LogReader advances `position` as it returns).
        let next = r.next()?;
        match next {
            None => Ok(None),
            Some((lsn, bytes)) => {
                let after =
                    lsn + (clickgate_proto::segment::FRAME_HEADER_BYTES + bytes.len()) as u64;
                Ok(Some((lsn, after, bytes)))
            }
        }
    }

    fn commit(&mut self, stream: &str, pos: u64) -> io::Result<()> {
        let core = self.core_of(stream)?;
        cursor::write_cursor(&self.data_dir, CURSOR_CONSUMER, core, pos)
    }
}
