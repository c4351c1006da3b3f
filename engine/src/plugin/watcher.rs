//! Watches the plugin folder and reports changed `.wasm` files, debounced.
//!
//! Editors and `cp` write a file in several steps, and each step is an event.
//! The watcher waits until the folder has been quiet for [`DEBOUNCE`] and
//! then reports each changed path once. Two events say a file is complete,
//! and are acted on at once, without the wait: a file renamed into place
//! (the recommended way to install a plugin) and a writer closing the file
//! it wrote. A file caught half-written still cannot be loaded half-way: it
//! fails validation (a truncated module does not compile), is rejected, and
//! the next event loads the finished file.
//!
//! A Kubernetes ConfigMap mounted as the plugin folder changes differently:
//! its files are symlinks through `..data`, and an update writes a new
//! hidden folder and swaps the `..data` symlink, so no event names a
//! `.wasm` file. An event on a `..`-prefixed name therefore rescans the
//! folder; unchanged files are skipped by content hash.
//!
//! Each file is loaded on a thread of its own, so a large module being
//! compiled does not hold up a small fix to another plugin dropped after
//! it. Changes to one file are loaded one after another, the latest last.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

/// Quiet time before a batch of changes is handled.
pub const DEBOUNCE: Duration = Duration::from_millis(10);

/// A running watcher; dropping it stops watching.
pub struct PluginWatcher {
    _watcher: notify::RecommendedWatcher,
}

impl std::fmt::Debug for PluginWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PluginWatcher")
    }
}

impl PluginWatcher {
    /// Watch `dir`; `on_change(path)` runs on the watcher's own thread for
    /// every `.wasm` file created, changed, renamed into place or removed
    /// (check `path.exists()`). Compiling there keeps it off the runtime.
    pub fn start(
        dir: &Path,
        on_change: impl Fn(&Path) + Send + Sync + 'static,
    ) -> notify::Result<Self> {
        let loader = Loader {
            on_change: Arc::new(on_change),
            running: Arc::default(),
        };
        let (tx, rx) = mpsc::channel::<(PathBuf, bool)>();
        let folder = dir.to_path_buf();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                use notify::EventKind as K;
                use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
                if let Ok(event) = event {
                    // Complete files: renamed into place, or closed after
                    // writing. Other accesses are noise.
                    let complete = match event.kind {
                        K::Access(AccessKind::Close(AccessMode::Write)) => true,
                        K::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both)) => true,
                        K::Access(_) => return,
                        _ => false,
                    };
                    for path in event.paths {
                        if path.extension().is_some_and(|e| e == "wasm") {
                            let _ = tx.send((path, complete));
                        } else if path
                            .file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with(".."))
                        {
                            // A ConfigMap update: report every plugin file.
                            for p in wasm_files(&folder) {
                                let _ = tx.send((p, complete));
                            }
                        }
                    }
                }
            })?;
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
        std::thread::Builder::new()
            .name("wasmq-plugin-watch".into())
            .spawn(move || {
                while let Ok((first, complete)) = rx.recv() {
                    let mut batch = BTreeSet::from([first]);
                    let mut complete = complete;
                    while !complete {
                        match rx.recv_timeout(DEBOUNCE) {
                            Ok((p, done)) => {
                                batch.insert(p);
                                complete = done;
                            }
                            Err(mpsc::RecvTimeoutError::Timeout) => break,
                            Err(mpsc::RecvTimeoutError::Disconnected) => return,
                        }
                    }
                    // Whatever else is already queued goes in this batch.
                    batch.extend(rx.try_iter().map(|(p, _)| p));
                    for path in batch {
                        loader.load(path);
                    }
                }
            })
            .map_err(|e| notify::Error::generic(&e.to_string()))?;
        Ok(PluginWatcher { _watcher: watcher })
    }
}

/// Runs `on_change` for each path on a thread of its own; a path changed
/// again while it loads is loaded once more when that load ends.
struct Loader {
    on_change: Arc<dyn Fn(&Path) + Send + Sync>,
    /// Paths being loaded, and whether they changed again meanwhile.
    running: Arc<Mutex<HashMap<PathBuf, bool>>>,
}

impl Loader {
    fn load(&self, path: PathBuf) {
        {
            let mut running = self.running.lock().expect("not poisoned");
            if let Some(again) = running.get_mut(&path) {
                *again = true;
                return;
            }
            running.insert(path.clone(), false);
        }
        let (on_change, running) = (self.on_change.clone(), self.running.clone());
        let spawned = std::thread::Builder::new()
            .name("wasmq-plugin-load".into())
            .spawn({
                let path = path.clone();
                move || {
                    loop {
                        on_change(&path);
                        let mut r = running.lock().expect("not poisoned");
                        if r.get(&path) == Some(&true) {
                            r.insert(path.clone(), false);
                        } else {
                            r.remove(&path);
                            return;
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(file = %path.display(), "no thread to load the plugin file on; loading it here: {e}");
            self.running.lock().expect("not poisoned").remove(&path);
            (self.on_change)(&path);
        }
    }
}

/// The `.wasm` files in `dir` (symlinks included).
fn wasm_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
                .collect()
        })
        .unwrap_or_default()
}
