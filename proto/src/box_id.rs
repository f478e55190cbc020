//! The box id: a stable `u64` naming one clickgate box, carried in every delta frame so
//! that boxes flushing to one Redis never share an exactly-once mark.
//!
//! `<data_dir>/box_id` holds it as decimal text. It is generated once (wall-clock ns,
//! pid and a stack address, mixed) the first time either plane starts without a
//! `box_id` setting, and read back ever after; both planes read the same file. A
//! configured `box_id` wins and is not written (an operator who sets it owns it).

use std::io;
use std::path::Path;

/// The file under the data directory.
pub const BOX_ID_FILE: &str = "box_id";

/// The configured id, or the one in `<data_dir>/box_id`, created if missing.
pub fn resolve(data_dir: &Path, configured: Option<u64>) -> io::Result<u64> {
    if let Some(id) = configured {
        return Ok(id);
    }
    let path = data_dir.join(BOX_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) => t.trim().parse::<u64>().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} holds {:?}, not a box id (a decimal u64); fix it or set box_id",
                    path.display(),
                    t.trim()
                ),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir)?;
            let ns = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            let local = 0u8;
            let addr = &local as *const u8 as u64;
            let id = clickgate_core::hash::mix64(
                ns ^ (std::process::id() as u64).rotate_left(32) ^ addr.rotate_left(17),
            )
            .max(1);
            // Written to a temp file and linked: if both planes race, the first wins and
            // the other reads it.
            let tmp = data_dir.join(format!(".box_id.{}.tmp", std::process::id()));
            std::fs::write(&tmp, format!("{id}\n"))?;
            std::fs::File::open(&tmp)?.sync_all()?;
            let linked = std::fs::hard_link(&tmp, &path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => Ok(id),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => resolve(data_dir, None),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_read_back_and_a_setting_wins() {
        let tmp = tempfile::tempdir().unwrap();
        let a = resolve(tmp.path(), None).unwrap();
        assert_eq!(resolve(tmp.path(), None).unwrap(), a);
        assert_eq!(resolve(tmp.path(), Some(7)).unwrap(), 7);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(resolve(other.path(), None).unwrap(), a);
        std::fs::write(tmp.path().join(BOX_ID_FILE), "x").unwrap();
        let e = resolve(tmp.path(), None).unwrap_err().to_string();
        assert!(e.contains("box_id"), "{e}");
    }
}
