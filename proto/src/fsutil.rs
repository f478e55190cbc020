//! Durable file replacement, shared by every crate that keeps small state files in the
//! data directory (cursors, offsets, snapshots, rules, address files), and the one
//! judgement of which I/O errors pass by themselves ([`is_transient`]).

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// Replaces `path` with `bytes` atomically and durably: writes `.<name>.tmp` beside it,
/// fsyncs it, renames it over `path`, fsyncs the directory. A reader sees the old file or
/// the new one, never a torn one, and after `Ok` the new one survives a crash. Creates
/// the directory if missing.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Fsyncs a directory, making the names created, renamed or removed in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_creating_the_directory_and_leaves_no_temp_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a/b/state");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state"]);
    }
}

/// Errors a box recovers from by itself once space or descriptors return — disk or quota
/// full, descriptor tables full, memory short, a short write — so the writer that met
/// one stalls and retries instead of stopping for good. Glommio keeps an error's kind but
/// not its OS code, so descriptor exhaustion (no kind of its own) is recognised in the
/// message too.
pub fn is_transient(e: &io::Error) -> bool {
    use io::ErrorKind as K;
    if matches!(
        e.kind(),
        K::StorageFull | K::QuotaExceeded | K::WriteZero | K::OutOfMemory | K::Interrupted
    ) {
        return true;
    }
    const CODES: [i32; 6] = [
        libc::ENOSPC,
        libc::EDQUOT,
        libc::EMFILE,
        libc::ENFILE,
        libc::ENOMEM,
        libc::EAGAIN,
    ];
    if let Some(code) = e.raw_os_error() {
        return CODES.contains(&code);
    }
    let text = e.to_string();
    CODES
        .iter()
        .any(|c| text.contains(&format!("(os error {c})")))
}

#[cfg(test)]
mod transient_tests {
    use super::*;

    #[test]
    fn full_disks_and_descriptor_tables_pass_other_errors_do_not() {
        for code in [libc::ENOSPC, libc::EDQUOT, libc::EMFILE, libc::ENFILE] {
            let e = io::Error::from_raw_os_error(code);
            assert!(is_transient(&e), "{e}");
            // As glommio reports it: the kind kept, the code only in the message.
            let wrapped = io::Error::new(e.kind(), format!("{e}, op: Writing path: x"));
            assert!(is_transient(&wrapped), "{wrapped}");
        }
        for code in [libc::EIO, libc::EBADF, libc::EACCES, libc::EROFS] {
            assert!(!is_transient(&io::Error::from_raw_os_error(code)));
        }
        assert!(!is_transient(&io::Error::other("checksum mismatch")));
    }
}
