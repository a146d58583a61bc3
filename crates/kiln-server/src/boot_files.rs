//! `/boot/file/…`: the kernels, initrds and images machines load, with
//! single-range requests, conditional requests and exact lengths.
//!
//! A boot storm is many machines fetching the same few files at once. Files
//! up to a size are therefore kept in memory, loaded once and shared by every
//! response, so that sending one costs a single copy into the socket instead
//! of a read, a copy and a write per chunk (ServeDir's way, which cost about
//! four times nginx's CPU). Larger files are streamed from disk. The cache is
//! keyed by path and checked against the file's inode, size, mtime and ctime
//! on every request, so a file replaced on disk is served new at once.
//!
//! The HTTP semantics (which status, which range) are pure functions at the
//! top of this module, table-tested below; the I/O follows them.

use std::collections::HashMap;
use std::fs::Metadata;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::AppState;

/// Where `/boot/file/` is mounted.
pub const PREFIX: &str = "/boot/file/";

/// Chunk size when streaming a file that is not cached: a boot storm pulls
/// whole initrds, and fewer, larger reads cut per-chunk overhead.
const STREAM_CHUNK: usize = 1 << 20;

// ---------------------------------------------------------------- pure: paths

/// The file a request names, relative to the artifacts root, or `None` when
/// the path could leave the root or is not a plain file name: `..` and `.`
/// segments, empty segments (so no absolute path, no `//`), NUL. Percent
/// escapes are decoded first, so `%2e%2e` and `%2f` are judged as what they
/// mean. Symlinks are checked when the file is opened (`Artifacts::open`).
pub fn relative_path(raw: &str) -> Option<PathBuf> {
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(raw).collect();
    if decoded.is_empty() || decoded.contains(&0) {
        return None;
    }
    let mut path = PathBuf::new();
    for segment in decoded.split(|&b| b == b'/') {
        if segment.is_empty() || segment == b"." || segment == b".." {
            return None;
        }
        path.push(std::ffi::OsStr::from_bytes(segment));
    }
    // Belt and braces: every component must be a plain name.
    path.components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then_some(path)
}

// ---------------------------------------------------------------- pure: HTTP semantics

/// The request headers that decide the response.
#[derive(Debug, Default, Clone, Copy)]
pub struct Conditions<'a> {
    pub range: Option<&'a str>,
    pub if_range: Option<&'a str>,
    pub if_match: Option<&'a str>,
    pub if_none_match: Option<&'a str>,
    pub if_modified_since: Option<&'a str>,
    pub if_unmodified_since: Option<&'a str>,
}

impl<'a> Conditions<'a> {
    pub fn from_headers(h: &'a HeaderMap) -> Conditions<'a> {
        let get = |name| h.get(name).and_then(|v: &HeaderValue| v.to_str().ok());
        Conditions {
            range: get(header::RANGE),
            if_range: get(header::IF_RANGE),
            if_match: get(header::IF_MATCH),
            if_none_match: get(header::IF_NONE_MATCH),
            if_modified_since: get(header::IF_MODIFIED_SINCE),
            if_unmodified_since: get(header::IF_UNMODIFIED_SINCE),
        }
    }
}

/// What a file's response is, before any byte of it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// 200, the whole file.
    Full,
    /// 206, bytes `start..=end`.
    Partial { start: u64, end: u64 },
    /// 304: the client's copy is current.
    NotModified,
    /// 412: If-Match / If-Unmodified-Since failed.
    PreconditionFailed,
    /// 416: no byte of the file is in the requested range.
    Unsatisfiable,
}

/// The validators of one version of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validators {
    pub len: u64,
    /// Whole seconds since the epoch (HTTP dates have no finer resolution).
    pub modified: u64,
    /// A strong entity tag, quotes included.
    pub etag: String,
}

impl Validators {
    pub fn new(len: u64, mtime: SystemTime) -> Validators {
        let since = mtime.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        Validators {
            len,
            modified: since.as_secs(),
            etag: format!("\"{:x}.{:08x}-{:x}\"", since.as_secs(), since.subsec_nanos(), len),
        }
    }

    pub fn last_modified(&self) -> String {
        httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(self.modified))
    }
}

fn http_date(text: &str) -> Option<u64> {
    let t = httpdate::parse_http_date(text.trim()).ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_secs())
}

/// The entity tags of an If-Match / If-None-Match list (commas inside quotes
/// belong to the tag), or `None` for `*`.
fn etag_list(value: &str) -> Option<Vec<&str>> {
    if value.trim() == "*" {
        return None;
    }
    let mut tags = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, b) in value.bytes().enumerate() {
        match b {
            b'"' => quoted = !quoted,
            b',' if !quoted => {
                tags.push(value[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    tags.push(value[start..].trim());
    tags.retain(|t| !t.is_empty());
    Some(tags)
}

/// RFC 9110 §8.8.3.2: strong comparison (neither weak, same opaque tag).
fn strong_match(tag: &str, ours: &str) -> bool {
    !tag.starts_with("W/") && tag == ours
}

/// Weak comparison: the opaque tags match, `W/` ignored.
fn weak_match(tag: &str, ours: &str) -> bool {
    tag.strip_prefix("W/").unwrap_or(tag) == ours
}

/// What a `Range` header asks of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// Bytes `start..=end`, within the file.
    Bytes(u64, u64),
    /// No byte of the file is in it (416).
    Unsatisfiable,
}

/// A `Range` header's one byte range over a file of `len` bytes, or `None`
/// to ignore the header and send the whole file: a header that does not
/// parse, another unit than bytes, or several ranges (RFC 9110 §14.2 lets a
/// server ignore Range; no boot client asks for multipart).
pub fn byte_range(header: &str, len: u64) -> Option<ByteRange> {
    let spec = header.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let (first, last) = (first.trim(), last.trim());
    let number = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // Digits beyond u64 are still a valid (huge) position.
        Some(s.parse().unwrap_or(u64::MAX))
    };
    if first.is_empty() {
        // `-N`: the last N bytes.
        let n = number(last)?;
        if n == 0 || len == 0 {
            return Some(ByteRange::Unsatisfiable);
        }
        return Some(ByteRange::Bytes(len.saturating_sub(n), len - 1));
    }
    let start = number(first)?;
    let end = if last.is_empty() { u64::MAX } else { number(last)? };
    if end < start {
        return None; // invalid syntax: ignored
    }
    if start >= len {
        return Some(ByteRange::Unsatisfiable);
    }
    Some(ByteRange::Bytes(start, end.min(len - 1)))
}

/// The response to a GET or HEAD of a file with validators `v`, in the
/// order of RFC 9110 §13.2.2: If-Match, If-Unmodified-Since, If-None-Match,
/// If-Modified-Since, then Range (honoured only if If-Range still matches).
pub fn plan(c: &Conditions<'_>, v: &Validators) -> Plan {
    if let Some(value) = c.if_match {
        let pass = match etag_list(value) {
            None => true, // `*`: the file exists
            Some(tags) => tags.iter().any(|t| strong_match(t, &v.etag)),
        };
        if !pass {
            return Plan::PreconditionFailed;
        }
    } else if let Some(since) = c.if_unmodified_since.and_then(http_date)
        && v.modified > since
    {
        return Plan::PreconditionFailed;
    }
    if let Some(value) = c.if_none_match {
        let matched = match etag_list(value) {
            None => true,
            Some(tags) => tags.iter().any(|t| weak_match(t, &v.etag)),
        };
        if matched {
            return Plan::NotModified;
        }
    } else if let Some(since) = c.if_modified_since.and_then(http_date)
        && v.modified <= since
    {
        return Plan::NotModified;
    }
    let Some(range) = c.range else {
        return Plan::Full;
    };
    if let Some(cond) = c.if_range {
        let cond = cond.trim();
        // An entity tag must match strongly; a date must be exactly the
        // file's Last-Modified. Otherwise the client's partial copy is of
        // another version: it gets the whole file.
        let current = if cond.starts_with('"') || cond.starts_with("W/") {
            strong_match(cond, &v.etag)
        } else {
            http_date(cond) == Some(v.modified)
        };
        if !current {
            return Plan::Full;
        }
    }
    match byte_range(range, v.len) {
        None => Plan::Full,
        Some(ByteRange::Unsatisfiable) => Plan::Unsatisfiable,
        Some(ByteRange::Bytes(start, end)) => Plan::Partial { start, end },
    }
}

// ---------------------------------------------------------------- the cache

/// How much memory the file cache may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// All cached files together, in bytes; 0 turns the cache off.
    pub total: u64,
    /// Larger files are streamed from disk.
    pub max_file: u64,
}

/// Which version of a file an entry holds. ctime is in it because a write
/// in place changes ctime even when it restores size and mtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

#[derive(Debug)]
struct Slot {
    stamp: Stamp,
    /// Filled once, by whichever request gets there first; the others wait
    /// for it instead of reading the file again.
    data: tokio::sync::OnceCell<Bytes>,
    last_used: AtomicU64,
}

#[derive(Debug, Default)]
struct CacheState {
    slots: HashMap<PathBuf, Arc<Slot>>,
    /// Sum of the lengths of `slots`.
    used: u64,
    clock: u64,
}

/// Files kept in memory, at most `limits.total` bytes of them; the least
/// recently used go first. Responses still sending an evicted file keep
/// their copy until they finish, so memory can briefly exceed the limit by
/// what is in flight.
#[derive(Debug)]
pub struct FileCache {
    limits: CacheLimits,
    state: Mutex<CacheState>,
}

/// What a response's body comes from.
#[derive(Debug)]
pub enum Content {
    Cached(Bytes),
    Stream(std::fs::File),
}

impl FileCache {
    pub fn new(limits: CacheLimits) -> FileCache {
        FileCache {
            limits,
            state: Mutex::new(CacheState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        // A panic while holding the lock leaves consistent state (every
        // change is one insert or remove plus its `used` update).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes held by the cache now.
    pub fn used(&self) -> u64 {
        self.lock().used
    }

    /// The slot for this version of `path`, made (and room made for it)
    /// if needed; `None` if the file is not to be cached.
    fn slot(&self, path: &Path, stamp: Stamp) -> Option<Arc<Slot>> {
        let mut st = self.lock();
        st.clock += 1;
        let now = st.clock;
        if let Some(slot) = st.slots.get(path) {
            if slot.stamp == stamp {
                slot.last_used.store(now, Ordering::Relaxed);
                return Some(slot.clone());
            }
            // Another version: the old one is of no more use.
            let old = st.slots.remove(path).map(|s| s.stamp.len).unwrap_or(0);
            st.used -= old;
        }
        if stamp.len > self.limits.max_file || stamp.len > self.limits.total {
            return None;
        }
        while st.used + stamp.len > self.limits.total {
            let Some(victim) = st
                .slots
                .iter()
                .min_by_key(|(_, s)| s.last_used.load(Ordering::Relaxed))
                .map(|(p, _)| p.clone())
            else {
                break;
            };
            let freed = st.slots.remove(&victim).map(|s| s.stamp.len).unwrap_or(0);
            st.used -= freed;
            tracing::debug!(path = %victim.display(), bytes = freed, "evicted from the file cache");
        }
        let slot = Arc::new(Slot {
            stamp,
            data: tokio::sync::OnceCell::new(),
            last_used: AtomicU64::new(now),
        });
        st.slots.insert(path.to_path_buf(), slot.clone());
        st.used += stamp.len;
        Some(slot)
    }

    /// Forgets `slot` if it is still the one cached for `path`.
    fn forget(&self, path: &Path, slot: &Arc<Slot>) {
        let mut st = self.lock();
        if st.slots.get(path).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            st.slots.remove(path);
            st.used -= slot.stamp.len;
        }
    }

    /// The content of `file` (opened at `path`, with metadata `meta`):
    /// from memory, loaded now if this version is not there yet; or the
    /// file itself when it is too large, or when loading failed.
    pub async fn content(&self, path: &Path, file: std::fs::File, meta: &Metadata) -> Content {
        let stamp = Stamp::of(meta);
        let Some(slot) = self.slot(path, stamp) else {
            return Content::Stream(file);
        };
        let loaded = slot
            .data
            .get_or_try_init(|| async {
                // A duplicate descriptor and positioned reads: `file` is
                // left as it was, to stream from if loading fails.
                let dup = file.try_clone()?;
                let started = std::time::Instant::now();
                let bytes = tokio::task::spawn_blocking(move || load(&dup, stamp))
                    .await
                    .map_err(io::Error::other)??;
                tracing::info!(path = %path.display(), bytes = stamp.len,
                    ms = started.elapsed().as_millis() as u64, "artifact cached in memory");
                Ok::<_, io::Error>(bytes)
            })
            .await;
        match loaded {
            Ok(bytes) => Content::Cached(bytes.clone()),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot cache this file; streaming it instead");
                self.forget(path, &slot);
                Content::Stream(file)
            }
        }
    }
}

/// Reads exactly this version of the file, or fails if it changed meanwhile.
fn load(file: &std::fs::File, stamp: Stamp) -> io::Result<Bytes> {
    let len = usize::try_from(stamp.len).map_err(io::Error::other)?;
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match file.read_at(&mut buf[done..], done as u64) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file shrank while being read",
                ));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if Stamp::of(&file.metadata()?) != stamp {
        return Err(io::Error::other("the file changed while being read"));
    }
    Ok(Bytes::from(buf))
}

// ---------------------------------------------------------------- serving

/// The artifacts root and its cache.
#[derive(Debug)]
pub struct Artifacts {
    /// Canonical: a file is served only if its own canonical path is under it.
    root: PathBuf,
    /// Files served from elsewhere when the root has none of that name
    /// (request path → file): iPXE's first stages from Debian's `ipxe`
    /// package ([`crate::first_stage`]).
    fallback: HashMap<PathBuf, PathBuf>,
    cache: FileCache,
}

#[derive(Debug)]
enum OpenError {
    NotFound,
    Io(io::Error),
}

impl Artifacts {
    pub fn new(root: &Path, limits: CacheLimits) -> anyhow::Result<Artifacts> {
        let root = root
            .canonicalize()
            .with_context(|| format!("the artifacts directory {} does not exist", root.display()))?;
        anyhow::ensure!(
            root.is_dir(),
            "the artifacts directory {} is not a directory",
            root.display()
        );
        Ok(Artifacts {
            root,
            fallback: HashMap::new(),
            cache: FileCache::new(limits),
        })
    }

    /// Serves `fallback`'s files (request path → file) when the root has
    /// none of that name: the root's own file wins.
    pub fn with_fallback(mut self, fallback: impl IntoIterator<Item = (PathBuf, PathBuf)>) -> Artifacts {
        self.fallback = fallback.into_iter().collect();
        self
    }

    pub fn cache(&self) -> &FileCache {
        &self.cache
    }

    /// Opens the regular file `rel` names under the root. Symlinks are
    /// followed, but what they lead to must be under the root too.
    async fn open(&self, rel: PathBuf) -> Result<(PathBuf, std::fs::File, Metadata), OpenError> {
        let root = self.root.clone();
        let fallback = self.fallback.get(&rel).cloned();
        let opened = tokio::task::spawn_blocking(move || {
            let full = match root.join(&rel).canonicalize() {
                Ok(full) if full.starts_with(&root) => full,
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        "leads out of the artifacts root",
                    ));
                }
                // The root has no such file: a first stage comes from
                // Debian's iPXE.
                Err(e) if e.kind() == io::ErrorKind::NotFound => fallback.ok_or(e)?,
                Err(e) => return Err(e),
            };
            let file = std::fs::File::open(&full)?;
            let meta = file.metadata()?;
            if !meta.is_file() {
                return Err(io::Error::new(io::ErrorKind::NotFound, "not a regular file"));
            }
            Ok((full, file, meta))
        })
        .await
        .map_err(|e| OpenError::Io(io::Error::other(e)))?;
        opened.map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::NotADirectory | io::ErrorKind::InvalidInput => OpenError::NotFound,
            _ if e.raw_os_error() == Some(nix::libc::ELOOP) || e.raw_os_error() == Some(nix::libc::ENAMETOOLONG) => {
                OpenError::NotFound
            }
            _ => OpenError::Io(e),
        })
    }
}

/// The response `b` describes; a header that cannot be encoded (none of
/// ours should be) is a server error, not an empty 200.
fn finish(b: axum::http::response::Builder, body: Body) -> Response {
    b.body(body).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot build a file response");
        StatusCode::INTERNAL_SERVER_ERROR.into_response()
    })
}

fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "no such file under kiln's artifacts directory\n",
    )
        .into_response()
}

/// `GET|HEAD /boot/file/{path}`.
pub async fn serve(State(state): State<AppState>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let artifacts = &state.boot.files;
    let Some(rel) = uri.path().strip_prefix(PREFIX).and_then(relative_path) else {
        return not_found();
    };
    let (full, file, meta) = match artifacts.open(rel).await {
        Ok(opened) => opened,
        Err(OpenError::NotFound) => return not_found(),
        Err(OpenError::Io(e)) => {
            tracing::warn!(path = uri.path(), error = %e, "cannot open an artifact");
            let status = if e.kind() == io::ErrorKind::PermissionDenied {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            return (status, "kiln cannot read this file: see the server log\n").into_response();
        }
    };
    let v = Validators::new(meta.len(), meta.modified().unwrap_or(UNIX_EPOCH));
    let decision = plan(&Conditions::from_headers(&headers), &v);

    let mut resp = Response::builder()
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::LAST_MODIFIED, v.last_modified())
        .header(header::ETAG, &v.etag);
    let (start, len) = match decision {
        Plan::NotModified => {
            return finish(resp.status(StatusCode::NOT_MODIFIED), Body::empty());
        }
        Plan::PreconditionFailed => {
            return finish(resp.status(StatusCode::PRECONDITION_FAILED), Body::empty());
        }
        Plan::Unsatisfiable => {
            resp = resp
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{}", v.len));
            return finish(resp, Body::empty());
        }
        Plan::Full => (0, v.len),
        Plan::Partial { start, end } => {
            resp = resp
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{}", v.len));
            (start, end - start + 1)
        }
    };
    let mime = mime_guess::from_path(&full)
        .first_raw()
        .unwrap_or("application/octet-stream");
    resp = resp
        .header(header::CONTENT_TYPE, mime)
        .header(header::CONTENT_LENGTH, len);
    if method == Method::HEAD {
        return finish(resp, Body::empty());
    }
    let body = match artifacts.cache.content(&full, file, &meta).await {
        Content::Cached(bytes) => {
            // Both bounds are within the file's length, which is the
            // buffer's: `plan` clamps ranges to it.
            let (s, e) = (start as usize, (start + len) as usize);
            Body::from(bytes.slice(s..e))
        }
        Content::Stream(file) => {
            let mut file = tokio::fs::File::from_std(file);
            if start > 0
                && let Err(e) = file.seek(io::SeekFrom::Start(start)).await
            {
                tracing::warn!(path = uri.path(), error = %e, "cannot seek in an artifact");
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "kiln cannot read this file: see the server log\n",
                )
                    .into_response();
            }
            Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
                file.take(len),
                STREAM_CHUNK,
            ))
        }
    };
    finish(resp, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_under_the_root() {
        assert_eq!(relative_path("vmlinuz"), Some(PathBuf::from("vmlinuz")));
        assert_eq!(
            relative_path("debian/12/initrd.gz"),
            Some(PathBuf::from("debian/12/initrd.gz"))
        );
        assert_eq!(relative_path("with%20space"), Some(PathBuf::from("with space")));
        for bad in [
            "",
            "..",
            "../kiln.db",
            "a/../../x",
            "%2e%2e/kiln.db",
            "%2E%2E%2Fkiln.db",
            "a%2f..%2f..%2fx",
            "/etc/passwd",
            "%2fetc/passwd",
            "a//b",
            "./a",
            "a/.",
            "a/",
            "nul%00byte",
        ] {
            assert_eq!(relative_path(bad), None, "{bad:?}");
        }
    }

    fn v(len: u64) -> Validators {
        // 2026-11-21 13:00:00 UTC, 0.5 s
        Validators::new(len, UNIX_EPOCH + Duration::new(1_795_266_000, 500_000_000))
    }

    #[test]
    fn validators() {
        let v = v(100_000);
        assert_eq!(v.etag, format!("\"{:x}.1dcd6500-186a0\"", 1_795_266_000u64));
        assert_eq!(v.last_modified(), "Sat, 21 Nov 2026 13:00:00 GMT");
    }

    #[test]
    fn byte_ranges() {
        use ByteRange::{Bytes as B, Unsatisfiable as U};
        let cases: &[(&str, u64, Option<ByteRange>)] = &[
            ("bytes=0-99", 1000, Some(B(0, 99))),
            ("bytes=1000-1999", 100_000, Some(B(1000, 1999))),
            ("bytes=990-2000", 1000, Some(B(990, 999))), // clamped to the end
            ("bytes=500-", 1000, Some(B(500, 999))),
            ("bytes=-100", 1000, Some(B(900, 999))),
            ("bytes=-5000", 1000, Some(B(0, 999))),
            ("bytes=999-999", 1000, Some(B(999, 999))),
            (" bytes= 5 - 9 ", 1000, Some(B(5, 9))),
            ("bytes=99999999999999999999999-", 1000, Some(U)),
            ("bytes=1000-", 1000, Some(U)),
            ("bytes=1000-2000", 1000, Some(U)),
            ("bytes=-0", 1000, Some(U)),
            ("bytes=0-0", 0, Some(U)), // an empty file has no byte 0
            ("bytes=-1", 0, Some(U)),
            // Ignored: the whole file is sent.
            ("bytes=9-5", 1000, None),
            ("bytes=0-1,5-6", 1000, None),
            ("items=0-1", 1000, None),
            ("bytes=a-b", 1000, None),
            ("bytes=+1-2", 1000, None),
            ("bytes=-", 1000, None),
            ("bytes=5", 1000, None),
            ("", 1000, None),
        ];
        for (h, len, want) in cases {
            assert_eq!(byte_range(h, *len), *want, "{h:?} over {len}");
        }
    }

    #[test]
    fn plans() {
        let f = v(1000);
        let lm = f.last_modified();
        let before = "Sat, 21 Nov 2026 12:59:59 GMT";
        let after = "Sat, 21 Nov 2026 13:00:01 GMT";
        let weak = format!("W/{}", f.etag);
        let other = "\"other\"";
        let list = format!("\"x\", {} ,\"y,z\"", f.etag);
        let cases: Vec<(Conditions<'_>, Plan)> = vec![
            (Conditions::default(), Plan::Full),
            (
                Conditions {
                    range: Some("bytes=10-19"),
                    ..Default::default()
                },
                Plan::Partial { start: 10, end: 19 },
            ),
            (
                Conditions {
                    range: Some("bytes=5000-"),
                    ..Default::default()
                },
                Plan::Unsatisfiable,
            ),
            (
                Conditions {
                    range: Some("bytes=0-1,4-5"),
                    ..Default::default()
                },
                Plan::Full,
            ),
            // If-Match: strong, `*` passes, lists.
            (
                Conditions {
                    if_match: Some(&f.etag),
                    ..Default::default()
                },
                Plan::Full,
            ),
            (
                Conditions {
                    if_match: Some("*"),
                    ..Default::default()
                },
                Plan::Full,
            ),
            (
                Conditions {
                    if_match: Some(&list),
                    ..Default::default()
                },
                Plan::Full,
            ),
            (
                Conditions {
                    if_match: Some(other),
                    ..Default::default()
                },
                Plan::PreconditionFailed,
            ),
            (
                Conditions {
                    if_match: Some(&weak),
                    ..Default::default()
                },
                Plan::PreconditionFailed,
            ),
            // If-Unmodified-Since; ignored when If-Match is there.
            (
                Conditions {
                    if_unmodified_since: Some(&lm),
                    ..Default::default()
                },
                Plan::Full,
            ),
            (
                Conditions {
                    if_unmodified_since: Some(before),
                    ..Default::default()
                },
                Plan::PreconditionFailed,
            ),
            (
                Conditions {
                    if_match: Some(&f.etag),
                    if_unmodified_since: Some(before),
                    ..Default::default()
                },
                Plan::Full,
            ),
            (
                Conditions {
                    if_unmodified_since: Some("garbage"),
                    ..Default::default()
                },
                Plan::Full,
            ),
            // If-None-Match: weak, `*`; then If-Modified-Since only without it.
            (
                Conditions {
                    if_none_match: Some(&f.etag),
                    ..Default::default()
                },
                Plan::NotModified,
            ),
            (
                Conditions {
                    if_none_match: Some(&weak),
                    ..Default::default()
                },
                Plan::NotModified,
            ),
            (
                Conditions {
                    if_none_match: Some("*"),
                    ..Default::default()
                },
                Plan::NotModified,
            ),
            (
                Conditions {
                    if_none_match: Some(other),
                    ..Default::default()
                },
                Plan::Full,
            ),
            (
                Conditions {
                    if_none_match: Some(other),
                    if_modified_since: Some(&lm),
                    ..Default::default()
                },
                Plan::Full,
            ),
            (
                Conditions {
                    if_modified_since: Some(&lm),
                    ..Default::default()
                },
                Plan::NotModified,
            ),
            (
                Conditions {
                    if_modified_since: Some(after),
                    ..Default::default()
                },
                Plan::NotModified,
            ),
            (
                Conditions {
                    if_modified_since: Some(before),
                    ..Default::default()
                },
                Plan::Full,
            ),
            // Preconditions before Range.
            (
                Conditions {
                    if_match: Some(other),
                    range: Some("bytes=0-1"),
                    ..Default::default()
                },
                Plan::PreconditionFailed,
            ),
            (
                Conditions {
                    if_none_match: Some(&f.etag),
                    range: Some("bytes=0-1"),
                    ..Default::default()
                },
                Plan::NotModified,
            ),
            // If-Range: the range only if the client's copy is this version.
            (
                Conditions {
                    range: Some("bytes=0-1"),
                    if_range: Some(&f.etag),
                    ..Default::default()
                },
                Plan::Partial { start: 0, end: 1 },
            ),
            (
                Conditions {
                    range: Some("bytes=0-1"),
                    if_range: Some(other),
                    ..Default::default()
                },
                Plan::Full,
            ),
            (
                Conditions {
                    range: Some("bytes=0-1"),
                    if_range: Some(&weak),
                    ..Default::default()
                },
                Plan::Full,
            ),
            (
                Conditions {
                    range: Some("bytes=0-1"),
                    if_range: Some(&lm),
                    ..Default::default()
                },
                Plan::Partial { start: 0, end: 1 },
            ),
            (
                Conditions {
                    range: Some("bytes=0-1"),
                    if_range: Some(before),
                    ..Default::default()
                },
                Plan::Full,
            ),
            (
                Conditions {
                    range: Some("bytes=0-1"),
                    if_range: Some("garbage"),
                    ..Default::default()
                },
                Plan::Full,
            ),
        ];
        for (cond, want) in &cases {
            assert_eq!(plan(cond, &f), *want, "{cond:?}");
        }
    }

    fn write(dir: &Path, name: &str, data: &[u8]) -> (PathBuf, std::fs::File, Metadata) {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        let m = f.metadata().unwrap();
        (p, f, m)
    }

    async fn get(cache: &FileCache, p: &Path) -> Content {
        let f = std::fs::File::open(p).unwrap();
        let m = f.metadata().unwrap();
        cache.content(p, f, &m).await
    }

    fn cached(c: Content) -> Bytes {
        match c {
            Content::Cached(b) => b,
            Content::Stream(_) => panic!("streamed, expected cached"),
        }
    }

    #[tokio::test]
    async fn the_cache_is_bounded_and_evicts_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FileCache::new(CacheLimits {
            total: 250,
            max_file: 120,
        });
        let (a, ..) = write(dir.path(), "a", &[1; 100]);
        let (b, ..) = write(dir.path(), "b", &[2; 100]);
        let (c, ..) = write(dir.path(), "c", &[3; 100]);
        let (big, ..) = write(dir.path(), "big", &[4; 121]);
        assert_eq!(cached(get(&cache, &a).await).as_ref(), &[1; 100]);
        assert_eq!(cached(get(&cache, &b).await).as_ref(), &[2; 100]);
        assert_eq!(cache.used(), 200);
        // a is used again, so b is the least recently used when c comes.
        let first = cached(get(&cache, &a).await);
        assert_eq!(cached(get(&cache, &c).await).as_ref(), &[3; 100]);
        assert_eq!(cache.used(), 200);
        {
            let st = cache.lock();
            assert!(st.slots.contains_key(&a) && st.slots.contains_key(&c) && !st.slots.contains_key(&b));
        }
        // Still cached: the very same buffer, not a second read.
        let again = cached(get(&cache, &a).await);
        assert_eq!(first.as_ptr(), again.as_ptr());
        // Too large for one file: streamed, and the cache is untouched.
        assert!(matches!(get(&cache, &big).await, Content::Stream(_)));
        assert_eq!(cache.used(), 200);
        // Off: everything streams.
        let off = FileCache::new(CacheLimits { total: 0, max_file: 0 });
        assert!(matches!(get(&off, &a).await, Content::Stream(_)));
        assert_eq!(off.used(), 0);
    }

    #[tokio::test]
    async fn a_file_replaced_on_disk_is_served_new() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FileCache::new(CacheLimits {
            total: 1000,
            max_file: 1000,
        });
        let (p, ..) = write(dir.path(), "initrd", b"version one");
        assert_eq!(cached(get(&cache, &p).await).as_ref(), b"version one");
        // Replaced by rename (a new inode), same size.
        let (tmp, ..) = write(dir.path(), ".initrd.new", b"version two");
        std::fs::rename(&tmp, &p).unwrap();
        assert_eq!(cached(get(&cache, &p).await).as_ref(), b"version two");
        // Rewritten in place, other size.
        std::fs::write(&p, b"v3").unwrap();
        assert_eq!(cached(get(&cache, &p).await).as_ref(), b"v3");
        assert_eq!(cache.used(), 2, "the old versions' bytes are released");
        // Rewritten in place, same size, mtime set back: ctime still moves.
        let before = std::fs::metadata(&p).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&p, b"v4").unwrap();
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(before.modified().unwrap()).unwrap();
        drop(f);
        assert_eq!(cached(get(&cache, &p).await).as_ref(), b"v4");
    }

    #[tokio::test]
    async fn a_file_that_changes_while_loading_is_streamed_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FileCache::new(CacheLimits {
            total: 1000,
            max_file: 1000,
        });
        let (p, f, m) = write(dir.path(), "img", &[7; 50]);
        // Grows after it was opened and stat'ed: the load sees another version.
        std::fs::write(&p, [8; 60]).unwrap();
        assert!(matches!(cache.content(&p, f, &m).await, Content::Stream(_)));
        assert_eq!(cache.used(), 0);
        // The next request sees the new version and caches it.
        assert_eq!(cached(get(&cache, &p).await).as_ref(), &[8; 60]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_share_one_load() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(FileCache::new(CacheLimits {
            total: 1 << 24,
            max_file: 1 << 24,
        }));
        let (p, ..) = write(dir.path(), "initrd", &vec![9u8; 1 << 22]);
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (cache, p) = (cache.clone(), p.clone());
                tokio::spawn(async move { cached(get(&cache, &p).await) })
            })
            .collect();
        let mut ptrs = std::collections::HashSet::new();
        for t in tasks {
            ptrs.insert(t.await.unwrap().as_ptr() as usize);
        }
        assert_eq!(ptrs.len(), 1, "every response shares one buffer");
        assert_eq!(cache.used(), 1 << 22);
    }
}
