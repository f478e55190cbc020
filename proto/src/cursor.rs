//! Consumer cursors on the local log: how far a reader of a core's log (the Kafka
//! forwarder, the archiver) has durably consumed it.
//!
//! ```text
//! <data_dir>/cursors/<consumer>/core-<k>      text: "<lsn>\n"
//! ```
//!
//! The LSN is the position *after* the last consumed frame (the `from_lsn` to resume
//! with). A cursor is written atomically ([`crate::fsutil::write_atomic`]: temporary
//! file, fsync, rename, fsync of the directory), so after any crash it holds either the
//! old or the new position, never a torn one. The dataplane's log retention never deletes
//! a segment that a registered consumer has not passed (see [`min_cursor`]); a consumer
//! registers by writing its first cursor, and unregisters by removing its directory.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The directory holding every consumer's cursors.
pub fn cursors_root(data_dir: &Path) -> PathBuf {
    data_dir.join("cursors")
}

/// The cursor file of `consumer` on core `core`.
pub fn cursor_path(data_dir: &Path, consumer: &str, core: u32) -> PathBuf {
    cursors_root(data_dir)
        .join(consumer)
        .join(format!("core-{core}"))
}

/// A consumer name is a directory name: `[a-z0-9_-]`, 1 to 64 characters.
pub fn valid_consumer_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Reads a cursor; `Ok(None)` when the consumer has none for this core yet.
pub fn read_cursor(data_dir: &Path, consumer: &str, core: u32) -> io::Result<Option<u64>> {
    read_cursor_file(&cursor_path(data_dir, consumer, core))
}

fn read_cursor_file(path: &Path) -> io::Result<Option<u64>> {
    match fs::read_to_string(path) {
        Ok(s) => s.trim().parse::<u64>().map(Some).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "cursor {} does not hold an LSN: {:?}",
                    path.display(),
                    s.trim()
                ),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Durably replaces the cursor of `consumer` on `core` with `lsn`.
pub fn write_cursor(data_dir: &Path, consumer: &str, core: u32, lsn: u64) -> io::Result<()> {
    if !valid_consumer_name(consumer) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("consumer name {consumer:?} must be 1-64 of [a-z0-9_-]"),
        ));
    }
    let path = cursor_path(data_dir, consumer, core);
    crate::fsutil::write_atomic(&path, format!("{lsn}\n").as_bytes())
}

/// The lowest cursor on `core` over every registered consumer: the log must keep every
/// frame at or after it. `Ok(None)`: no consumer is registered for this core.
pub fn min_cursor(data_dir: &Path, core: u32) -> io::Result<Option<u64>> {
    let root = cursors_root(data_dir);
    let entries = match fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut min: Option<u64> = None;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !valid_consumer_name(name) || !entry.file_type()?.is_dir() {
            continue;
        }
        let dir = entry.path();
        // A registered consumer without a cursor for this core has consumed nothing of it.
        let has_any = fs::read_dir(&dir)?.next().is_some();
        match read_cursor_file(&dir.join(format!("core-{core}")))? {
            Some(lsn) => min = Some(min.map_or(lsn, |m: u64| m.min(lsn))),
            None if has_any => min = Some(0),
            None => {}
        }
    }
    Ok(min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_min() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(read_cursor(d, "kafka", 0).unwrap(), None);
        assert_eq!(min_cursor(d, 0).unwrap(), None);
        write_cursor(d, "kafka", 0, 4096).unwrap();
        write_cursor(d, "kafka", 0, 8192).unwrap();
        assert_eq!(read_cursor(d, "kafka", 0).unwrap(), Some(8192));
        write_cursor(d, "archive", 0, 100).unwrap();
        assert_eq!(min_cursor(d, 0).unwrap(), Some(100));
        // archive registered for core 1 only: core 0 of kafka is then the bound there…
        write_cursor(d, "archive", 1, 7).unwrap();
        assert_eq!(
            min_cursor(d, 1).unwrap(),
            Some(0),
            "kafka has nothing of core 1"
        );
        assert!(write_cursor(d, "Bad/Name", 0, 1).is_err());
    }

    #[test]
    fn garbage_cursor_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = cursor_path(dir.path(), "x", 3);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, "nope").unwrap();
        let e = read_cursor(dir.path(), "x", 3).unwrap_err();
        assert!(e.to_string().contains("does not hold an LSN"), "{e}");
    }
}
