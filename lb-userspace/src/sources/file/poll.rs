//! Following the files: a poll compares stamps of every manifest file, and the loop sends
//! a new state once a change has settled.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::read::list_manifests;
use super::{FileSource, FileSourceError};
use crate::error_chain;
use crate::model::DesiredState;
use crate::sources::Update;

/// How often the files are checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// A file modified this recently is also compared by content: file timestamps have a
/// granularity of a few milliseconds, so two quick writes of the same size can leave
/// size and mtime unchanged.
const RECENT: Duration = Duration::from_secs(2);

/// What a poll compares: per file, its identity, size, times and (for recently modified
/// files) a hash of the contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    recent_hash: Option<u64>,
}

pub(super) type Fingerprint = BTreeMap<PathBuf, FileStamp>;

/// Lists the manifest files of `path` with their stamps.
pub(super) fn fingerprint(path: &Path) -> Result<Fingerprint, FileSourceError> {
    Ok(list_manifests(path)?
        .into_iter()
        .map(|f| {
            let s = stamp(&f);
            (f, s)
        })
        .collect())
}

impl FileSource {
    /// Loads again if the files changed since the last load and have not changed since
    /// the previous poll (a change is loaded on the second poll that sees it).
    /// `Ok(None)`: nothing to load (yet).
    pub fn poll(&mut self) -> Result<Option<DesiredState>, FileSourceError> {
        let now = fingerprint(&self.path)?;
        if self.fingerprint.as_ref() == Some(&now) {
            self.pending = None;
            return Ok(None);
        }
        if self.pending.as_ref() != Some(&now) {
            self.pending = Some(now);
            return Ok(None);
        }
        self.pending = None;
        self.load().map(Some)
    }

    /// Sends the current state, then a new state after each change, until every receiver
    /// is dropped. Fails only if the path cannot be read at start; later read failures are
    /// logged and the last state stays in force.
    pub async fn run(self, tx: watch::Sender<Update>) -> Result<(), FileSourceError> {
        let path = self.path.clone();
        let (mut this, first) = blocking(self, super::FileSource::load).await?;
        let state = first.map_err(|source| FileSourceError::FirstLoad {
            path: path.clone(),
            source: Box::new(source),
        })?;
        // A receiver that already holds this state (the agent loads once before it starts
        // the source) is not woken for nothing.
        send_if_changed(&tx, state);
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_failure: Option<String> = None;
        loop {
            tokio::select! {
                _ = tx.closed() => return Ok(()),
                _ = tick.tick() => {}
            }
            let (s, polled) = blocking(this, super::FileSource::poll).await?;
            this = s;
            match polled {
                Ok(None) => {}
                Ok(Some(state)) => {
                    last_failure = None;
                    send_if_changed(&tx, state);
                }
                Err(e) => {
                    let msg = error_chain(&e);
                    if last_failure.as_ref() != Some(&msg) {
                        tracing::warn!(
                            path = %path.display(),
                            "cannot read services, keeping the last state: {msg}"
                        );
                        last_failure = Some(msg);
                    }
                }
            }
        }
    }
}

fn send_if_changed(tx: &watch::Sender<Update>, state: DesiredState) {
    tx.send_if_modified(|cur| {
        if cur.state == state {
            return false;
        }
        // A file change is read in full: every update is a resync.
        *cur = Update::new(state, true);
        true
    });
}

/// Runs `f` on the source off the async threads (it reads files) and hands it back.
async fn blocking<T: Send + 'static>(
    src: FileSource,
    f: impl FnOnce(&mut FileSource) -> T + Send + 'static,
) -> Result<(FileSource, T), FileSourceError> {
    tokio::task::spawn_blocking(move || {
        let mut src = src;
        let r = f(&mut src);
        (src, r)
    })
    .await
    .map_err(FileSourceError::Task)
}

/// A file's stamp; a file that vanished or cannot be read gets a stamp of its own (all
/// zero) so its reappearance counts as a change.
fn stamp(path: &Path) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata(path) else {
        return FileStamp {
            dev: 0,
            ino: 0,
            len: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            recent_hash: None,
        };
    };
    let mtime_ns = i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec());
    let ctime_ns = i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec());
    // ctime, not mtime: a tool can set mtime back (`touch -d`, `cp -p`), not ctime.
    let now_ns = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    let recent = now_ns - ctime_ns < RECENT.as_nanos() as i128;
    let recent_hash = if recent {
        std::fs::read(path).ok().map(|bytes| hash_bytes(&bytes))
    } else {
        None
    };
    FileStamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime_ns,
        ctime_ns,
        recent_hash,
    }
}

fn hash_bytes(b: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}
