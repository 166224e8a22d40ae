//! A private `redis-server` on a free loopback port.
//!
//! The demo starts one when no Redis answers at the configured URL; the integration tests start
//! one per test so they never share keys and can stop or restart their Redis on purpose. It is
//! killed when dropped.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Why a private Redis could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LocalRedisError {
    /// `redis-server` is not on `PATH` or could not run.
    #[error("could not run redis-server: {0}")]
    Spawn(#[from] std::io::Error),
    /// It started but did not answer `PING` in time.
    #[error("redis-server on port {port} did not answer PING within {timeout:?}")]
    NotReady {
        /// Its port.
        port: u16,
        /// How long we waited.
        timeout: Duration,
    },
}

/// A running private redis-server.
#[derive(Debug)]
pub struct LocalRedis {
    port: u16,
    dir: PathBuf,
    extra_args: Vec<String>,
    child: Option<Child>,
}

impl LocalRedis {
    /// True when `redis-server` can be found on `PATH`.
    pub fn available() -> bool {
        Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Starts a server with persistence off on a free port and waits until it answers.
    pub async fn start() -> Result<Self, LocalRedisError> {
        Self::start_with(&[]).await
    }

    /// Like [`LocalRedis::start`], with extra `redis-server` arguments (e.g. `--appendonly yes`).
    pub async fn start_with(extra_args: &[&str]) -> Result<Self, LocalRedisError> {
        let dir = std::env::temp_dir().join(format!(
            "agent-worker-redis-{}-{}",
            std::process::id(),
            ulid::Ulid::generate()
        ));
        std::fs::create_dir_all(&dir)?;
        let mut last_error = None;
        // The port is free when we look; another process may take it before redis binds it,
        // so retry with a new port a few times.
        for _ in 0..5 {
            let port = free_port()?;
            let mut redis = Self {
                port,
                dir: dir.clone(),
                extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
                child: None,
            };
            match redis.spawn_and_wait().await {
                Ok(()) => return Ok(redis),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (SIGKILL) and waits for it to exit. Its data is gone unless AOF was on.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, with the same arguments and directory.
    pub async fn restart(&mut self) -> Result<(), LocalRedisError> {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn_and_wait().await {
                Ok(()) => return Ok(()),
                // The old socket may linger briefly; retry until the deadline.
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn spawn_and_wait(&mut self) -> Result<(), LocalRedisError> {
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command.spawn()?;
        self.child = Some(child);
        let timeout = Duration::from_secs(5);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(LocalRedisError::Spawn(std::io::Error::other(format!(
                    "redis-server exited with {status}"
                ))));
            }
            if ping(self.port).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.stop();
        Err(LocalRedisError::NotReady {
            port: self.port,
            timeout,
        })
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn ping(port: u16) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(b"PING\r\n").await?;
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply).await?;
        // A server with `requirepass` answers NOAUTH: it is up all the same.
        Ok::<_, std::io::Error>(&reply == b"+PONG\r\n" || &reply == b"-NOAUTH")
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), attempt).await,
        Ok(Ok(true))
    )
}
