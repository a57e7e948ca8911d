//! The directory source: Kubernetes YAML (`*.yaml`, `*.yml`, multi-document) under a directory,
//! re-read when a file changes. A file that does not parse is reported and its last good content
//! is kept, so a typo never withdraws an export.
//!
//! The directory is watched (inotify on Linux, through `notify`): a change is read
//! [`DEBOUNCE`] after its first event, so an edit is in force within milliseconds. A full rescan
//! every `rescan` interval is the safety net for events a watch can miss (a queue overflow, a
//! network filesystem); where no watch can be set up, the directory is polled every
//! [`POLL_WITHOUT_WATCH`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{LocalObjects, Object, parse_object};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileProblem {
    pub file: PathBuf,
    pub message: String,
}

struct FileState {
    stamp: (SystemTime, u64),
    /// The last good objects of this file.
    objects: Vec<Object>,
    problem: Option<String>,
}

pub struct DirSource {
    dir: PathBuf,
    objects: watch::Sender<Arc<LocalObjects>>,
    problems: watch::Sender<Arc<Vec<FileProblem>>>,
}

/// How long after a file's first change event the directory is read: an editor's or a tool's
/// burst of writes and renames is read once, whole.
pub const DEBOUNCE: Duration = Duration::from_millis(15);
/// How often the directory is read when it cannot be watched.
pub const POLL_WITHOUT_WATCH: Duration = Duration::from_millis(500);

/// Watches `dir` recursively; each event wakes `wake`. None (logged) when the platform or its
/// limits (e.g. `fs.inotify.max_user_instances`) refuse a watch.
fn watch(dir: &Path, wake: Arc<tokio::sync::Notify>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let made = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reading a file is an access event too: our own rescans would wake us forever. Errors
        // (e.g. a queue overflow) wake a rescan: it finds whatever was missed.
        if event.as_ref().map_or(true, |e| !e.kind.is_access()) {
            wake.notify_one();
        }
    })
    .and_then(|mut w| {
        w.watch(dir, notify::RecursiveMode::Recursive)?;
        Ok(w)
    });
    match made {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, interval = ?POLL_WITHOUT_WATCH,
                "cannot watch the source directory; polling it instead (raise fs.inotify.max_user_instances / max_user_watches if they are exhausted)");
            None
        }
    }
}

impl DirSource {
    /// Reads `dir` now, then on every change (watched) and at least every `rescan`, until
    /// `shutdown`.
    pub fn start(dir: &Path, rescan: Duration, shutdown: CancellationToken) -> Arc<Self> {
        let me = Arc::new(Self {
            dir: dir.to_path_buf(),
            objects: watch::Sender::new(Arc::new(LocalObjects::default())),
            problems: watch::Sender::new(Arc::new(Vec::new())),
        });
        let mut files = BTreeMap::new();
        let wake = Arc::new(tokio::sync::Notify::new());
        // Watching starts before the first read: nothing written in between is missed.
        let watcher = watch(dir, wake.clone());
        let interval = if watcher.is_some() {
            rescan
        } else {
            rescan.min(POLL_WITHOUT_WATCH)
        };
        me.rescan(&mut files);
        let bg = me.clone();
        tokio::spawn(async move {
            // The watch lives as long as this task.
            let _watcher = watcher;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = wake.notified() => tokio::time::sleep(DEBOUNCE).await,
                    _ = tokio::time::sleep(interval) => {}
                }
                let scan = bg.clone();
                // File reading and YAML parsing are blocking work.
                files = match tokio::task::spawn_blocking(move || {
                    scan.rescan(&mut files);
                    files
                })
                .await
                {
                    Ok(f) => f,
                    Err(_) => return,
                };
            }
        });
        me
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<LocalObjects>> {
        self.objects.subscribe()
    }

    pub fn problems(&self) -> watch::Receiver<Arc<Vec<FileProblem>>> {
        self.problems.subscribe()
    }

    fn rescan(&self, files: &mut BTreeMap<PathBuf, FileState>) {
        let mut seen = Vec::new();
        collect_yaml(&self.dir, &mut seen);
        let mut changed = false;
        files.retain(|p, _| {
            let keep = seen.contains(p);
            changed |= !keep;
            keep
        });
        for path in seen {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let stamp = (
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            );
            if files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            changed = true;
            let result = std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|text| parse_file(&text));
            let entry = files.entry(path.clone()).or_insert(FileState {
                stamp,
                objects: Vec::new(),
                problem: None,
            });
            entry.stamp = stamp;
            match result {
                Ok(objects) => {
                    if entry.problem.take().is_some() {
                        tracing::info!(file = %path.display(), "file is valid again");
                    }
                    entry.objects = objects;
                }
                Err(message) => {
                    tracing::error!(file = %path.display(), error = %message, "skipping invalid file; keeping its last good content");
                    entry.problem = Some(message);
                }
            }
        }
        if !changed {
            return;
        }
        let mut objs = LocalObjects::default();
        let mut problems = Vec::new();
        let mut owners: BTreeMap<String, PathBuf> = BTreeMap::new();
        for (path, f) in files.iter() {
            if let Some(m) = &f.problem {
                problems.push(FileProblem {
                    file: path.clone(),
                    message: m.clone(),
                });
            }
            for o in &f.objects {
                if let Some(first) = owners.get(&o.id()) {
                    problems.push(FileProblem {
                        file: path.clone(),
                        message: format!(
                            "{} is also defined in {}; ignoring this copy",
                            o.id(),
                            first.display()
                        ),
                    });
                    continue;
                }
                owners.insert(o.id(), path.clone());
                objs.insert(o);
            }
        }
        self.objects.send_if_modified(|cur| {
            if **cur == objs {
                false
            } else {
                *cur = Arc::new(objs);
                true
            }
        });
        self.problems.send_replace(Arc::new(problems));
    }
}

fn collect_yaml(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if p.is_dir() {
            collect_yaml(&p, out);
        } else if matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
    out.sort();
}

/// Every document of a file; the first bad one fails the file (naming the document).
pub fn parse_file(text: &str) -> Result<Vec<Object>, String> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        match parse_object(doc) {
            Ok(Some(o)) => {
                // Namespace defaults to "default" like kubectl.
                out.push(o);
            }
            Ok(None) => {}
            Err(e) => return Err(format!("document {}: {e}", i + 1)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPORT: &str = "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: web, namespace: shop}\n";

    /// Waits (bounded) for the source's objects to satisfy `f`.
    async fn until(rx: &mut watch::Receiver<Arc<LocalObjects>>, f: impl Fn(&LocalObjects) -> bool) {
        tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|o| f(o)))
            .await
            .expect("the change was never read")
            .expect("source gone");
    }

    // The rescan is an hour away: only the watch can deliver these changes.
    #[tokio::test]
    async fn changes_are_read_when_they_happen_not_when_a_poll_comes_round() {
        let dir = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let source = DirSource::start(dir.path(), Duration::from_secs(3600), shutdown.clone());
        let mut rx = source.subscribe();
        assert!(rx.borrow().exports.is_empty());

        // Written in place, in a subdirectory made after the watch began, renamed over, removed.
        std::fs::write(dir.path().join("web.yaml"), EXPORT).unwrap();
        until(&mut rx, |o| o.exports.len() == 1).await;
        std::fs::create_dir(dir.path().join("team")).unwrap();
        std::fs::write(
            dir.path().join("team/api.yaml"),
            EXPORT.replace("name: web", "name: api"),
        )
        .unwrap();
        until(&mut rx, |o| o.exports.len() == 2).await;
        std::fs::write(
            dir.path().join(".tmp"),
            EXPORT.replace("name: web", "name: db"),
        )
        .unwrap();
        std::fs::rename(dir.path().join(".tmp"), dir.path().join("web.yaml")).unwrap();
        until(&mut rx, |o| {
            o.exports.keys().map(|k| k.to_string()).collect::<Vec<_>>() == ["shop/api", "shop/db"]
        })
        .await;
        std::fs::remove_file(dir.path().join("team/api.yaml")).unwrap();
        until(&mut rx, |o| o.exports.len() == 1).await;
        shutdown.cancel();
    }
}
