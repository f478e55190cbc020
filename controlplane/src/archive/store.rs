//! Where archive files go and are read from: a local directory (the embedded default) or
//! an S3-compatible bucket (`s3://bucket/prefix`, through the `object_store` crate).
//!
//! ```text
//! local   <dir>/.staging/<stream>/<hour>.parquet.tmp ─fsync, rename─▶ <dir>/<partition>/<name>
//! s3      <data_dir>/archive-staging/<stream>/<hour>.parquet.tmp ─multipart upload─▶
//!         s3://bucket/prefix/<partition>/<name>        (invisible until the upload completes)
//! intents <dir>/_intents/<stream>  |  s3://bucket/prefix/_intents/<stream>   ("from to")
//! ```
//!
//! A file becomes visible under its final name in one step (rename; S3's
//! CompleteMultipartUpload), so a reader never sees a partial file. A crash mid-upload
//! leaves an incomplete multipart upload, which S3 never shows as an object (a bucket
//! lifecycle rule `AbortIncompleteMultipartUpload` reclaims its parts); the range is
//! redone under the same name. Intents live in the archive itself, so an archiver that
//! takes over a Kafka partition from a crashed one finds the range to redo.
//!
//! S3 settings come from the usual AWS environment variables: `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`), `AWS_REGION` /
//! `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL` (an S3-compatible server; path-style requests
//! are used, and `http://` is allowed for it).

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, WriteMultipart,
};

use super::writer::{create_partition_dir, sync_dir};
use super::{parse_file_name, partition_path};

/// Parts of a multipart upload, in bytes (S3's minimum is 5 MiB).
pub const UPLOAD_PART_BYTES: usize = 8 << 20;
/// Parts of one upload in flight at once.
const UPLOAD_PARTS_INFLIGHT: usize = 4;
/// One S3 request gives up after this long; retries of one call stop after
/// [`S3_RETRY_SECS`].
const S3_REQUEST_SECS: u64 = 30;
const S3_RETRY_SECS: u64 = 10;
const S3_RETRIES_MAX: usize = 3;

/// Where the archive lives, from `archive_url`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArchiveLocation {
    Dir(PathBuf),
    /// `s3://bucket/prefix`: the bucket and the key prefix (no leading or trailing `/`,
    /// possibly empty).
    S3 {
        bucket: String,
        prefix: String,
    },
}

impl ArchiveLocation {
    /// `None` or empty: `<data_dir>/archive`; a path or `file://` URL: that directory;
    /// `s3://bucket[/prefix]`: that bucket. Any other scheme is refused, naming it.
    pub fn parse(url: Option<&str>, data_dir: &Path) -> Result<ArchiveLocation, String> {
        let url = url.map(str::trim).unwrap_or("");
        if url.is_empty() {
            return Ok(ArchiveLocation::Dir(data_dir.join("archive")));
        }
        if let Some(rest) = url.strip_prefix("file://") {
            return Ok(ArchiveLocation::Dir(PathBuf::from(rest)));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let ok_bucket = (3..=63).contains(&bucket.len())
                && bucket
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b));
            if !ok_bucket {
                return Err(format!(
                    "archive_url {url:?}: {bucket:?} is not an S3 bucket name \
                     (3-63 of [a-z0-9.-]); expected s3://bucket/prefix"
                ));
            }
            let prefix = prefix.trim_matches('/');
            if prefix
                .split('/')
                .any(|p| p.is_empty() && !prefix.is_empty())
                || prefix.split('/').any(|p| p == "." || p == "..")
            {
                return Err(format!(
                    "archive_url {url:?}: the prefix {prefix:?} has an empty, . or .. part"
                ));
            }
            return Ok(ArchiveLocation::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.to_owned(),
            });
        }
        if let Some((scheme, _)) = url.split_once("://") {
            return Err(format!(
                "archive_url {url:?}: scheme {scheme}:// is not supported; use a local \
                 directory or s3://bucket/prefix"
            ));
        }
        Ok(ArchiveLocation::Dir(PathBuf::from(url)))
    }

    /// The directory of a local archive; `None` for S3.
    pub fn local_dir(&self) -> Option<&Path> {
        match self {
            ArchiveLocation::Dir(d) => Some(d),
            ArchiveLocation::S3 { .. } => None,
        }
    }

    /// The directory of a local archive; for S3 a path that names no directory (callers
    /// that read files of any location use [`ArchiveReader`]).
    pub fn dir(&self) -> &Path {
        match self {
            ArchiveLocation::Dir(d) => d,
            ArchiveLocation::S3 { .. } => {
                Path::new("s3:// (read it through archive::ArchiveReader)")
            }
        }
    }
}

impl std::fmt::Display for ArchiveLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArchiveLocation::Dir(d) => write!(f, "{}", d.display()),
            ArchiveLocation::S3 { bucket, prefix } if prefix.is_empty() => {
                write!(f, "s3://{bucket}")
            }
            ArchiveLocation::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// A connection to an S3 bucket with a private single-thread runtime: the archiver and
/// billing are blocking code, every call here blocks until done (bounded by the request
/// timeout and the retry budget).
pub struct S3 {
    store: Arc<AmazonS3>,
    prefix: String,
    url: String,
    /// `None` only while dropping (see the `Drop` impl).
    rt: Option<tokio::runtime::Runtime>,
}

impl S3 {
    /// Builds the client from the AWS environment variables; fails naming the setting
    /// that is missing or wrong.
    pub fn connect(bucket: &str, prefix: &str) -> anyhow::Result<S3> {
        let url = if prefix.is_empty() {
            format!("s3://{bucket}")
        } else {
            format!("s3://{bucket}/{prefix}")
        };
        let has = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty());
        if !has("AWS_ACCESS_KEY_ID") || !has("AWS_SECRET_ACCESS_KEY") {
            bail!(
                "archive_url {url}: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set \
                 (the archive's S3 credentials)"
            );
        }
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_virtual_hosted_style_request(false)
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(Duration::from_secs(S3_REQUEST_SECS))
                    .with_connect_timeout(Duration::from_secs(5)),
            )
            .with_retry(RetryConfig {
                max_retries: S3_RETRIES_MAX,
                retry_timeout: Duration::from_secs(S3_RETRY_SECS),
                ..RetryConfig::default()
            });
        if let Ok(ep) = std::env::var("AWS_ENDPOINT_URL") {
            if ep.starts_with("http://") {
                b = b.with_allow_http(true);
            }
            b = b.with_endpoint(ep);
        }
        if !has("AWS_REGION") && !has("AWS_DEFAULT_REGION") {
            b = b.with_region("us-east-1");
        }
        let store = b
            .build()
            .with_context(|| format!("archive_url {url}: S3 settings (AWS_* variables)"))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(S3 {
            store: Arc::new(store),
            prefix: prefix.to_owned(),
            url,
            rt: Some(rt),
        })
    }

    fn key(&self, rel: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(rel)
        } else {
            ObjPath::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// Names the call, the key and, for refused credentials, the settings to check.
    fn err(&self, what: &str, key: &ObjPath, e: object_store::Error) -> anyhow::Error {
        let text = e.to_string();
        let creds = [
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AccessDenied",
            "403",
        ]
        .iter()
        .any(|m| text.contains(m));
        if creds {
            anyhow!(
                "{what} s3://{}/{key}: the server refused the credentials \
                 (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY): {text}",
                self.bucket()
            )
        } else {
            anyhow!(
                "{what} s3://{}/{key} ({}; AWS_ENDPOINT_URL={}): {text}",
                self.bucket(),
                self.url,
                std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| "<AWS default>".into())
            )
        }
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("the S3 runtime lives until drop")
    }

    /// Runs one S3 call on this store's runtime: on its own scoped thread when the caller
    /// is itself inside a tokio runtime (the controlplane's start), directly otherwise.
    fn block<T: Send>(&self, f: impl std::future::Future<Output = T> + Send) -> T {
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| {
                s.spawn(|| self.runtime().block_on(f))
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            })
        } else {
            self.runtime().block_on(f)
        }
    }

    fn bucket(&self) -> &str {
        self.url
            .strip_prefix("s3://")
            .and_then(|r| r.split('/').next())
            .unwrap_or("")
    }

    /// Checks that the bucket answers and takes these credentials (a list of the prefix).
    pub fn check(&self) -> anyhow::Result<()> {
        let key = self.key("_intents");
        self.block(self.store.list_with_delimiter(Some(&key)))
            .map(|_| ())
            .map_err(|e| self.err("listing", &key, e))
    }

    /// Uploads the local file `src` as `rel` with a multipart upload; the object appears
    /// only when the upload completes. An upload that fails is aborted (best effort).
    pub fn upload(&self, src: &Path, rel: &str) -> anyhow::Result<()> {
        let key = self.key(rel);
        let mut f = File::open(src).with_context(|| format!("opening {}", src.display()))?;
        self.block(async {
            let up = self
                .store
                .put_multipart(&key)
                .await
                .map_err(|e| self.err("starting the upload of", &key, e))?;
            let mut w = WriteMultipart::new_with_chunk_size(up, UPLOAD_PART_BYTES);
            let mut buf = vec![0u8; 1 << 20];
            let r: anyhow::Result<()> = async {
                loop {
                    let n = f
                        .read(&mut buf)
                        .with_context(|| format!("reading {}", src.display()))?;
                    if n == 0 {
                        return Ok(());
                    }
                    w.wait_for_capacity(UPLOAD_PARTS_INFLIGHT)
                        .await
                        .map_err(|e| self.err("uploading", &key, e))?;
                    w.write(&buf[..n]);
                }
            }
            .await;
            match r {
                Ok(()) => w
                    .finish()
                    .await
                    .map(|_| ())
                    .map_err(|e| self.err("completing the upload of", &key, e)),
                Err(e) => {
                    let _ = w.abort().await;
                    Err(e)
                }
            }
        })
    }

    pub fn put(&self, rel: &str, bytes: Vec<u8>) -> anyhow::Result<()> {
        let key = self.key(rel);
        self.block(self.store.put(&key, PutPayload::from(bytes)))
            .map(|_| ())
            .map_err(|e| self.err("writing", &key, e))
    }

    /// The object's bytes; `None` when it does not exist.
    pub fn get(&self, rel: &str) -> anyhow::Result<Option<Bytes>> {
        let key = self.key(rel);
        self.block(async {
            match self.store.get(&key).await {
                Ok(r) => r
                    .bytes()
                    .await
                    .map(Some)
                    .map_err(|e| self.err("reading", &key, e)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.err("reading", &key, e)),
            }
        })
    }

    /// Every object under the prefix: (key relative to the prefix, size), sorted.
    pub fn list_all(&self) -> anyhow::Result<Vec<(String, u64)>> {
        let root = self.key("");
        let mut out = Vec::new();
        let mut todo = vec![if self.prefix.is_empty() {
            None
        } else {
            Some(root.clone())
        }];
        while let Some(dir) = todo.pop() {
            let r = self
                .block(self.store.list_with_delimiter(dir.as_ref()))
                .map_err(|e| self.err("listing", &root, e))?;
            for o in r.objects {
                let k = o.location.as_ref();
                let rel = k
                    .strip_prefix(self.prefix.as_str())
                    .unwrap_or(k)
                    .trim_start_matches('/');
                out.push((rel.to_owned(), o.size));
            }
            todo.extend(r.common_prefixes.into_iter().map(Some));
        }
        out.sort();
        Ok(out)
    }

    /// Names (last path part) and sizes of the objects directly under `rel/`, sorted.
    pub fn list(&self, rel: &str) -> anyhow::Result<Vec<(String, u64)>> {
        let key = self.key(rel);
        let r = self
            .block(self.store.list_with_delimiter(Some(&key)))
            .map_err(|e| self.err("listing", &key, e))?;
        let mut out: Vec<(String, u64)> = r
            .objects
            .into_iter()
            .filter_map(|o| Some((o.location.filename()?.to_owned(), o.size)))
            .collect();
        out.sort();
        Ok(out)
    }
}

/// The archiver's side of a location: staging, publishing, range intents.
pub(crate) enum Target {
    Local {
        root: PathBuf,
        /// `<data_dir>/archive-ranges`: where intents were kept before they moved into
        /// the archive (read once, for an upgrade mid-range).
        legacy_intents: PathBuf,
    },
    S3 {
        s3: S3,
        staging: PathBuf,
    },
}

impl Target {
    pub(crate) fn open(loc: &ArchiveLocation, data_dir: &Path) -> anyhow::Result<Target> {
        Ok(match loc {
            ArchiveLocation::Dir(root) => {
                fs::create_dir_all(root).with_context(|| {
                    format!("creating the archive directory {}", root.display())
                })?;
                Target::Local {
                    root: root.clone(),
                    legacy_intents: data_dir.join("archive-ranges"),
                }
            }
            ArchiveLocation::S3 { bucket, prefix } => {
                let s3 = S3::connect(bucket, prefix)?;
                s3.check()?;
                Target::S3 {
                    s3,
                    staging: data_dir.join("archive-staging"),
                }
            }
        })
    }

    /// The directory the open files of `stream` are written in; emptied when a stream
    /// (re)starts, since what is there belongs to a range that will be redone.
    pub(crate) fn staging(&self, stream: &str) -> PathBuf {
        match self {
            Target::Local { root, .. } => root.join(".staging").join(stream),
            Target::S3 { staging, .. } => staging.join(stream),
        }
    }

    pub(crate) fn reset_staging(&self, stream: &str) -> io::Result<()> {
        let d = self.staging(stream);
        match fs::remove_dir_all(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fs::create_dir_all(&d)
    }

    /// Makes the durable staged file `tmp` visible as `<partition of hour>/<name>`.
    pub(crate) fn publish(&self, tmp: &Path, hour_ms: u64, name: &str) -> anyhow::Result<()> {
        let rel = partition_path(hour_ms);
        match self {
            Target::Local { root, .. } => {
                create_partition_dir(root, &rel)
                    .with_context(|| format!("creating {}", root.join(&rel).display()))?;
                let dir = root.join(&rel);
                let path = dir.join(name);
                fs::rename(tmp, &path)
                    .with_context(|| format!("renaming to {}", path.display()))?;
                sync_dir(&dir).with_context(|| format!("fsync {}", dir.display()))?;
            }
            Target::S3 { s3, .. } => {
                let rel = format!("{}/{name}", rel.display());
                s3.upload(tmp, &rel)?;
                let _ = fs::remove_file(tmp);
            }
        }
        Ok(())
    }

    /// The range `(from, to)` of `stream` whose files may exist from before a crash.
    pub(crate) fn read_intent(&self, stream: &str) -> anyhow::Result<Option<(u64, u64)>> {
        let text = match self {
            Target::Local {
                root,
                legacy_intents,
            } => {
                let read = |p: PathBuf| match fs::read_to_string(&p) {
                    Ok(t) => Ok(Some(t)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
                };
                match read(root.join("_intents").join(stream))? {
                    Some(t) => Some(t),
                    None => read(legacy_intents.join(stream))?,
                }
            }
            Target::S3 { s3, .. } => s3
                .get(&format!("_intents/{stream}"))?
                .map(|b| String::from_utf8_lossy(&b).into_owned()),
        };
        Ok(text.and_then(|t| {
            let mut it = t.split_whitespace().map(str::parse::<u64>);
            match (it.next(), it.next()) {
                (Some(Ok(f)), Some(Ok(to))) if to > f => Some((f, to)),
                _ => None,
            }
        }))
    }

    /// Durably records that the files of range `[from, to)` of `stream` are about to be
    /// published.
    pub(crate) fn write_intent(&self, stream: &str, from: u64, to: u64) -> anyhow::Result<()> {
        let text = format!("{from} {to}\n");
        match self {
            Target::Local { root, .. } => {
                let dir = root.join("_intents");
                fs::create_dir_all(&dir)?;
                clickgate_proto::control_files::write_atomic(&dir.join(stream), text.as_bytes())
                    .context("writing the range intent")
            }
            Target::S3 { s3, .. } => s3.put(&format!("_intents/{stream}"), text.into_bytes()),
        }
    }
}

/// An archive opened for reading (billing, tools): a local directory or an S3 prefix.
pub struct ArchiveReader {
    inner: ReaderInner,
}

enum ReaderInner {
    Dir(PathBuf),
    S3(S3),
}

/// One archive file of an hour partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveFile {
    /// `<partition>/<name>`, relative to the archive root.
    pub rel: String,
    pub name: String,
    pub size: u64,
}

impl ArchiveReader {
    /// Opens `archive_url` as [`ArchiveLocation::parse`] reads it (S3 credentials from the
    /// AWS environment variables). Checks that it can be listed.
    pub fn open(url: Option<&str>, data_dir: &Path) -> anyhow::Result<ArchiveReader> {
        let loc = ArchiveLocation::parse(url, data_dir).map_err(anyhow::Error::msg)?;
        ArchiveReader::open_location(&loc)
    }

    pub fn open_location(loc: &ArchiveLocation) -> anyhow::Result<ArchiveReader> {
        Ok(ArchiveReader {
            inner: match loc {
                ArchiveLocation::Dir(d) => ReaderInner::Dir(d.clone()),
                ArchiveLocation::S3 { bucket, prefix } => {
                    let s3 = S3::connect(bucket, prefix)?;
                    s3.check()?;
                    ReaderInner::S3(s3)
                }
            },
        })
    }

    /// The archive files of the hour starting at `hour_ms`, sorted by name (no
    /// temporaries; an absent partition has none).
    pub fn hour_files(&self, hour_ms: u64) -> anyhow::Result<Vec<ArchiveFile>> {
        let rel = partition_path(hour_ms).display().to_string();
        let mut out = Vec::new();
        match &self.inner {
            ReaderInner::Dir(root) => {
                let dir = root.join(&rel);
                let entries = match fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
                    Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
                };
                for e in entries {
                    let e = e?;
                    let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                        continue;
                    };
                    if parse_file_name(&name).is_some() {
                        out.push(ArchiveFile {
                            rel: format!("{rel}/{name}"),
                            size: e.metadata()?.len(),
                            name,
                        });
                    }
                }
            }
            ReaderInner::S3(s3) => {
                for (name, size) in s3.list(&rel)? {
                    if parse_file_name(&name).is_some() {
                        out.push(ArchiveFile {
                            rel: format!("{rel}/{name}"),
                            name,
                            size,
                        });
                    }
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Rows in an archive file, from its footer.
    pub fn file_rows(&self, f: &ArchiveFile) -> anyhow::Result<u64> {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let r = SerializedFileReader::new(self.open_file(f)?)
            .with_context(|| format!("reading the footer of {}", f.rel))?;
        Ok(r.metadata().file_metadata().num_rows().max(0) as u64)
    }

    /// The file's contents for a Parquet reader (`parquet::file::reader::ChunkReader`):
    /// the open local file, or the object's bytes fetched whole.
    pub fn open_file(&self, f: &ArchiveFile) -> anyhow::Result<FileData> {
        match &self.inner {
            ReaderInner::Dir(root) => {
                let p = root.join(&f.rel);
                Ok(FileData::Local(
                    File::open(&p).with_context(|| format!("opening {}", p.display()))?,
                ))
            }
            ReaderInner::S3(s3) => s3
                .get(&f.rel)?
                .map(FileData::Remote)
                .ok_or_else(|| anyhow!("{}: {} disappeared", s3.url, f.rel)),
        }
    }
}

/// An archive file's bytes: a local file or a fetched object.
pub enum FileData {
    Local(File),
    Remote(Bytes),
}

impl parquet::file::reader::Length for FileData {
    fn len(&self) -> u64 {
        match self {
            FileData::Local(f) => parquet::file::reader::Length::len(f),
            FileData::Remote(b) => b.len() as u64,
        }
    }
}

/// The reader [`FileData`] hands out.
pub enum FileDataRead {
    Local(<File as parquet::file::reader::ChunkReader>::T),
    Remote(<Bytes as parquet::file::reader::ChunkReader>::T),
}

impl Read for FileDataRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            FileDataRead::Local(r) => r.read(buf),
            FileDataRead::Remote(r) => r.read(buf),
        }
    }
}

impl parquet::file::reader::ChunkReader for FileData {
    type T = FileDataRead;

    fn get_read(&self, start: u64) -> parquet::errors::Result<FileDataRead> {
        Ok(match self {
            FileData::Local(f) => FileDataRead::Local(f.get_read(start)?),
            FileData::Remote(b) => FileDataRead::Remote(b.get_read(start)?),
        })
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        match self {
            FileData::Local(f) => f.get_bytes(start, length),
            FileData::Remote(b) => b.get_bytes(start, length),
        }
    }
}

impl Drop for S3 {
    /// The store may be dropped inside the controlplane's tokio runtime (a start that
    /// fails): shut its own runtime down without blocking there.
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
