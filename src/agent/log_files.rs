//! Per-session log files (`agent.log_dir`): each agent's whole output in
//! `<log_dir>/<session id>.log`, as the original worker's `AGENT_LOG_DIR` had it.
//!
//! The directory may be shared and writable by others, so a file is opened only if it is (or
//! becomes) a regular file of ours with one link: never through a symlink (`O_NOFOLLOW`),
//! never a FIFO or device (`O_NONBLOCK` so the open itself cannot hang, then `fstat`), never a
//! hard link to someone else's file. It is created `0640` (less with a stricter umask).
//!
//! Writes never happen on the tasks that read agent output: a stalled disk (an NFS mount) would
//! stop them reading and stall the agents. Lines go through a queue bounded in bytes to one
//! writer thread; when the disk falls behind, lines beyond the budget are dropped from the file
//! (they are in the worker's log and `agent:<id>:logs`). A file stops growing at
//! `agent.log_file_max_bytes`, with a last line saying so.

use std::{
    fs::File,
    io::Write,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
};

use agent_jobs::SessionId;

/// Bytes queued for the writer thread at most, all files together.
const QUEUE_BYTES: usize = 16 * 1024 * 1024;

/// One agent's open log file.
#[derive(Debug)]
pub struct LogFile {
    file: File,
    path: PathBuf,
    /// Bytes written so far; only the writer thread changes it.
    written: Mutex<u64>,
}

/// The writer of every agent's log file. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LogFiles {
    tx: mpsc::Sender<(Arc<LogFile>, Vec<u8>)>,
    queued: Arc<AtomicUsize>,
}

impl LogFiles {
    /// Starts the writer thread; files stop growing at `max_bytes`.
    pub fn start(max_bytes: u64) -> Self {
        let (tx, rx) = mpsc::channel::<(Arc<LogFile>, Vec<u8>)>();
        let queued = Arc::new(AtomicUsize::new(0));
        let drained = queued.clone();
        std::thread::Builder::new()
            .name("agent-worker-logfiles".into())
            .spawn(move || {
                // Ends when every sender (launcher clone) is gone.
                for (file, bytes) in rx {
                    drained.fetch_sub(bytes.len(), Ordering::Relaxed);
                    file.append(&bytes, max_bytes);
                }
            })
            .expect("a thread for agent log files");
        Self { tx, queued }
    }

    /// Opens (creating it) the log file at `path` for session `id`, or logs why not
    /// (`agent_log_file_failed`) and returns `None`: the agent runs either way. Blocking
    /// system calls, so on a blocking thread.
    pub async fn open(&self, id: &SessionId, path: &Path) -> Option<Arc<LogFile>> {
        let owned = path.to_path_buf();
        let opened = tokio::task::spawn_blocking(move || open_private(&owned))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match opened {
            Ok(file) => Some(Arc::new(LogFile {
                file,
                path: path.to_path_buf(),
                written: Mutex::new(0),
            })),
            Err(error) => {
                tracing::warn!(session_id = %id, path = %path.display(), error = %error, "agent_log_file_failed");
                None
            }
        }
    }

    /// Queues `line` (and a newline) for `file`. Never waits; dropped beyond the budget.
    pub fn write(&self, file: &Arc<LogFile>, line: &str) {
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        let size = bytes.len();
        if self.queued.fetch_add(size, Ordering::Relaxed) + size > QUEUE_BYTES {
            self.queued.fetch_sub(size, Ordering::Relaxed);
            return;
        }
        if self.tx.send((file.clone(), bytes)).is_err() {
            self.queued.fetch_sub(size, Ordering::Relaxed);
        }
    }
}

impl LogFile {
    /// Appends one line, unless the file reached `max_bytes` (then one last line says so).
    fn append(&self, bytes: &[u8], max_bytes: u64) {
        let mut written = self.written.lock().expect("log file lock");
        if *written >= max_bytes {
            return;
        }
        let result = if *written + bytes.len() as u64 > max_bytes {
            *written = max_bytes;
            (&self.file).write_all(
                b"[agent-worker: this file reached agent.log_file_max_bytes; the rest of the \
                  output is only in agent:<id>:logs and the worker's log]\n",
            )
        } else {
            *written += bytes.len() as u64;
            // One write per line: O_APPEND keeps stdout's and stderr's lines whole.
            (&self.file).write_all(bytes)
        };
        if let Err(error) = result {
            tracing::debug!(path = %self.path.display(), error = %error, "agent_log_file_write_failed");
        }
    }
}

fn open_private(path: &Path) -> std::io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    let refuse = |why: &str| Err(std::io::Error::other(format!("refused: {why}")));
    if !meta.file_type().is_file() {
        return refuse("not a regular file");
    }
    if meta.nlink() != 1 {
        return refuse("the file has other hard links");
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return refuse("the file belongs to another user");
    }
    Ok(file)
}
