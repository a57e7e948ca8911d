//! The directory source: Kubernetes YAML (`*.yaml`, `*.yml`, multi-document) under a directory,
//! re-read when a file changes. A file that does not parse is reported and its last good content
//! is kept, so a typo never withdraws an export.

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

impl DirSource {
    /// Reads `dir` now and then every `interval` until `shutdown`.
    pub fn start(dir: &Path, interval: Duration, shutdown: CancellationToken) -> Arc<Self> {
        let me = Arc::new(Self {
            dir: dir.to_path_buf(),
            objects: watch::Sender::new(Arc::new(LocalObjects::default())),
            problems: watch::Sender::new(Arc::new(Vec::new())),
        });
        let mut files = BTreeMap::new();
        me.rescan(&mut files);
        let bg = me.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
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
