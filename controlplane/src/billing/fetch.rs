//! Billing an archive in S3: the hour partitions of the billed day and its margin are
//! copied into a staging directory next to the invoices (`<out>/.archive-<day>`), then
//! billed like a local archive; the copy is removed when billing ends, failed or not.
//!
//! Only whole archive files are listed (a range's files are published whole, see
//! `archive::store`), so the copy holds exactly what a local archive would. Memory: one
//! object at a time (a file is at most `archive_roll_bytes` of records, compressed);
//! disk: the day's files once.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::{billed_hours, BillingError};
use crate::archive::{ArchiveLocation, ArchiveReader, Date, FileData};

/// The staged copy; removed on drop.
pub struct Staged {
    dir: PathBuf,
    pub files: usize,
    pub bytes: u64,
}

impl Staged {
    /// The local archive root to bill.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "billing: could not remove the staged archive copy");
        }
    }
}

/// Copies the files of `loc` (S3) billing `day` reads into `<out_dir>/.archive-<day>`.
pub fn stage(
    loc: &ArchiveLocation,
    day: Date,
    margin_hours: u32,
    out_dir: &Path,
) -> Result<Staged, BillingError> {
    let reader = ArchiveReader::open_location(loc)
        .map_err(|e| BillingError::BadInput(format!("--archive-url {loc}: {e:#}")))?;
    let dir = out_dir.join(format!(".archive-{day}"));
    if dir.exists() {
        // A copy left by a billing run that was killed: start over.
        fs::remove_dir_all(&dir).map_err(|e| {
            BillingError::BadInput(format!("--out: removing {}: {e}", dir.display()))
        })?;
    }
    fs::create_dir_all(&dir)
        .map_err(|e| BillingError::BadInput(format!("--out: creating {}: {e}", dir.display())))?;
    let mut staged = Staged {
        dir,
        files: 0,
        bytes: 0,
    };
    for hour in billed_hours(day, margin_hours) {
        copy_hour(&reader, hour, &mut staged)
            .with_context(|| format!("copying the archive's hour {hour} from {loc}"))
            .map_err(BillingError::Failed)?;
    }
    tracing::info!(files = staged.files, bytes = staged.bytes, from = %loc, "billing: archive files copied from S3");
    Ok(staged)
}

fn copy_hour(reader: &ArchiveReader, hour: u64, staged: &mut Staged) -> anyhow::Result<()> {
    for f in reader.hour_files(hour)? {
        let data = reader.open_file(&f)?;
        let dst = staged.dir.join(&f.rel);
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        match data {
            FileData::Remote(bytes) => {
                fs::write(&dst, &bytes).with_context(|| format!("writing {}", dst.display()))?;
                staged.bytes += bytes.len() as u64;
            }
            FileData::Local(_) => {
                anyhow::bail!("{}: a local file where S3 was expected", f.rel);
            }
        }
        staged.files += 1;
    }
    Ok(())
}
