//! Reading the archive for billing: only the columns a pass needs, one row group at a
//! time, on several threads.
//!
//! Every file's footer is read once ([`ArchiveFile::open`]); a pass then decodes
//! `(file, row group)` units in parallel ([`for_each_unit`]), each with a projection of
//! the columns it reads, so the columns billing never needs (`user_id` aside, the
//! `rules` list, the dataplane's flags) are never decompressed.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use arrow_array::RecordBatch;
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::ProjectionMask;
use parquet::file::statistics::Statistics;

use crate::archive::writer::{schema, COLUMNS};

/// Rows per decoded batch.
pub const BATCH_ROWS: usize = 8192;

/// One archive file with its footer.
pub struct ArchiveFile {
    pub path: PathBuf,
    meta: ArrowReaderMetadata,
    /// Rows of each row group.
    pub groups: Vec<u64>,
    pub rows: u64,
}

impl ArchiveFile {
    /// Reads the footer and checks the columns billing reads have the archive's types.
    pub fn open(path: &Path) -> anyhow::Result<ArchiveFile> {
        let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let meta = ArrowReaderMetadata::load(&f, ArrowReaderOptions::new())
            .with_context(|| format!("{}: not a Parquet file", path.display()))?;
        let want = schema();
        for (name, field) in COLUMNS.iter().zip(want.fields()) {
            match meta.schema().field_with_name(name) {
                Ok(f) if f.data_type() == field.data_type() => {}
                Ok(f) => bail!(
                    "{}: column {name} is {} (expected {})",
                    path.display(),
                    f.data_type(),
                    field.data_type()
                ),
                Err(_) => bail!("{}: column {name} is missing", path.display()),
            }
        }
        let meta = dictionary_hint(meta)
            .with_context(|| format!("{}: reading the footer", path.display()))?;
        let groups: Vec<u64> = meta
            .metadata()
            .row_groups()
            .iter()
            .map(|g| g.num_rows().max(0) as u64)
            .collect();
        let rows = groups.iter().sum();
        if rows > u64::from(u32::MAX) {
            bail!(
                "{}: {rows} rows; billing reads files of at most {} rows",
                path.display(),
                u32::MAX
            );
        }
        Ok(ArchiveFile {
            path: path.to_path_buf(),
            meta,
            groups,
            rows,
        })
    }

    /// First row (within the file) of row group `g`.
    pub fn group_start(&self, g: usize) -> u64 {
        self.groups[..g].iter().sum()
    }

    /// The one `source` of row group `g` when its statistics say so exactly (files
    /// clickgate writes hold one source each); `None`: decode the column to know.
    pub fn single_source(&self, g: usize) -> Option<String> {
        let md = self.meta.metadata();
        let leaf = md
            .file_metadata()
            .schema_descr()
            .columns()
            .iter()
            .position(|c| c.path().string() == "source")?;
        let Some(Statistics::ByteArray(s)) = md.row_group(g).column(leaf).statistics() else {
            return None;
        };
        if !(s.min_is_exact() && s.max_is_exact()) {
            return None;
        }
        let (min, max) = (s.min_opt()?, s.max_opt()?);
        if min.data() != max.data() {
            return None;
        }
        min.as_utf8().ok().map(str::to_string)
    }

    /// Decodes row group `g` (or every group: `None`), columns `names` only, calling
    /// `each` with each batch (its columns in `names` order) and the file row of its
    /// first row.
    pub fn read(
        &self,
        group: Option<usize>,
        names: &[&str],
        mut each: impl FnMut(&RecordBatch, u64) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let f =
            File::open(&self.path).with_context(|| format!("opening {}", self.path.display()))?;
        let roots: Vec<usize> = names
            .iter()
            .map(|n| self.meta.schema().index_of(n).expect("schema checked"))
            .collect();
        let mask = ProjectionMask::roots(self.meta.parquet_schema(), roots);
        let mut b = ParquetRecordBatchReaderBuilder::new_with_metadata(f, self.meta.clone())
            .with_projection(mask)
            .with_batch_size(BATCH_ROWS);
        let (mut at, end) = match group {
            Some(g) => {
                b = b.with_row_groups(vec![g]);
                let s = self.group_start(g);
                (s, s + self.groups[g])
            }
            None => (0, self.rows),
        };
        // The projection yields columns in file order: put them in `names` order.
        let mut order: Option<Vec<usize>> = None;
        for batch in b.build()? {
            let batch = batch.with_context(|| format!("reading {}", self.path.display()))?;
            let order = match &order {
                Some(o) => o,
                None => order.insert(
                    names
                        .iter()
                        .map(|n| batch.schema().index_of(n))
                        .collect::<Result<_, _>>()?,
                ),
            };
            let batch = batch.project(order)?;
            each(&batch, at)?;
            at += batch.num_rows() as u64;
        }
        if at != end {
            bail!(
                "{}: decoded {} rows where the footer says {}",
                self.path.display(),
                at,
                end
            );
        }
        Ok(())
    }
}

/// Columns decoded as dictionaries (keys into the column chunk's dictionary, not one
/// string per row): few distinct values, judged once per value.
pub const DICTIONARY_COLUMNS: [&str; 1] = ["user_agent"];

/// The footer again, with [`DICTIONARY_COLUMNS`] read as `Dictionary(Int32, Utf8)`.
fn dictionary_hint(meta: ArrowReaderMetadata) -> parquet::errors::Result<ArrowReaderMetadata> {
    let fields: Vec<Field> = meta
        .schema()
        .fields()
        .iter()
        .map(|f| {
            if DICTIONARY_COLUMNS.contains(&f.name().as_str()) {
                Field::new(
                    f.name(),
                    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
                    f.is_nullable(),
                )
            } else {
                f.as_ref().clone()
            }
        })
        .collect();
    let schema = Arc::new(Schema::new_with_metadata(
        fields,
        meta.schema().metadata().clone(),
    ));
    ArrowReaderMetadata::try_new(
        meta.metadata().clone(),
        ArrowReaderOptions::new().with_schema(schema),
    )
}

/// Runs `work(unit)` for `0..units` on `threads` threads; the first error stops the
/// others (they finish their current unit) and is returned.
pub fn parallel<S: Send>(
    threads: usize,
    units: usize,
    mut state: impl FnMut() -> S,
    work: impl Fn(&mut S, usize) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<Vec<S>> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let threads = threads.clamp(1, units.max(1));
    let mut states: Vec<S> = (0..threads).map(|_| state()).collect();
    std::thread::scope(|s| {
        for st in states.iter_mut() {
            let (next, failed, error, work) = (&next, &failed, &error, &work);
            s.spawn(move || loop {
                if failed.load(Ordering::Relaxed) {
                    return;
                }
                let u = next.fetch_add(1, Ordering::Relaxed);
                if u >= units {
                    return;
                }
                if let Err(e) = work(st, u) {
                    failed.store(true, Ordering::Relaxed);
                    let mut slot = error.lock().expect("not poisoned");
                    if slot.is_none() {
                        *slot = Some(e);
                    }
                    return;
                }
            });
        }
    });
    match error.into_inner().expect("not poisoned") {
        Some(e) => Err(e),
        None => Ok(states),
    }
}
