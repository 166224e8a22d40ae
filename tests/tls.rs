//! `rediss://`: a worker, the CLI, our own client and the Python client
//! (`python/tests/test_tls.py`) against a TLS-only redis-server with certificates made here; an
//! untrusted certificate is refused at once, with a clear error; client certificates for a
//! server that requires them.

mod common;

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use agent_jobs::QueueKeys;
use agent_worker::connection;
use agent_worker::connection::RedisConn;
use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

const CA_FILE: &str = "AGENT_WORKER__REDIS__TLS_CA_FILE";
const CERT_FILE: &str = "AGENT_WORKER__REDIS__TLS_CERT_FILE";
const KEY_FILE: &str = "AGENT_WORKER__REDIS__TLS_KEY_FILE";
const INSECURE: &str = "AGENT_WORKER__REDIS__TLS_INSECURE";

/// A CA and the certificates it signed, as PEM files in a directory of their own.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A CA; a server certificate for 127.0.0.1 and localhost; a client certificate; and a
    /// second CA that signed nothing of these.
    fn generate() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "agent-worker-tls-{}-{}",
            std::process::id(),
            ulid::Ulid::generate()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Self { dir };
        let issuer = pki.ca("ca");
        pki.ca("other-ca");
        pki.leaf(
            "server",
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
            &issuer,
        );
        pki.leaf(
            "client",
            &["agent-worker"],
            ExtendedKeyUsagePurpose::ClientAuth,
            &issuer,
        );
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn file(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// `<name>.pem`; returns the issuer for leaves.
    fn ca(&self, name: &str) -> Issuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("agent-worker test {name}"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).unwrap();
        Issuer::new(params, key)
    }

    /// `<name>.pem` and `<name>.key`.
    fn leaf(
        &self,
        name: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
        issuer: &Issuer<'static, KeyPair>,
    ) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, issuer).unwrap();
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(self.path(&format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A redis-server that speaks TLS only (`--port 0`), killed when dropped.
struct TlsRedis {
    port: u16,
    child: Child,
    /// Our own TLS connection to it, trusting the test CA (and with the client certificate).
    conn: RedisConn,
}

impl TlsRedis {
    /// `auth_clients`: redis-server's `--tls-auth-clients` (`no`, `yes`).
    async fn start(pki: &Pki, auth_clients: &str) -> Self {
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new("redis-server")
                .args(["--port", "0", "--bind", "127.0.0.1"])
                .args(["--tls-port", &port.to_string()])
                .args(["--tls-cert-file", &pki.file("server.pem")])
                .args(["--tls-key-file", &pki.file("server.key")])
                .args(["--tls-ca-cert-file", &pki.file("ca.pem")])
                .args(["--tls-auth-clients", auth_clients])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&pki.dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be on PATH for the tests");
            let settings = settings(
                &format!("rediss://127.0.0.1:{port}/"),
                &[
                    (CA_FILE, &pki.file("ca.pem")),
                    (CERT_FILE, &pki.file("client.pem")),
                    (KEY_FILE, &pki.file("client.key")),
                ],
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Some(status) = child.try_wait().unwrap() {
                    last = format!("redis-server exited with {status} (built without TLS?)");
                    break;
                }
                match connection::connect(&settings.redis).await {
                    Ok(conn) => return Self { port, child, conn },
                    Err(error) => last = error.to_string(),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("no TLS redis-server answered: {last}");
    }

    fn url(&self, host: &str) -> String {
        format!("rediss://{host}:{}/", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `agent-worker` binary with `args` against `url`, with no TLS settings but `env`, and
/// no trust store of the environment's choosing (SSL_CERT_FILE, SSL_CERT_DIR).
fn cli(url: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = worker_command(url, args, "ready", &[]);
    command
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR")
        .env_remove(CA_FILE)
        .env_remove(CERT_FILE)
        .env_remove(KEY_FILE)
        .env_remove(INSECURE)
        .envs(env.iter().copied());
    command
}

/// Runs a command to its end: (success, how long it took, stdout and stderr).
async fn run(command: Command) -> (bool, Duration, String) {
    let started = Instant::now();
    let out = WorkerProcess::spawn(command).output().await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), started.elapsed(), text)
}

/// Waits until the worker's wake-up listener has subscribed to the queue's wake channel.
async fn wait_subscribed(conn: &RedisConn) {
    let channel = QueueKeys::new(QUEUE).unwrap().wake_channel();
    wait_for(
        "the worker's wake-up listener to subscribe",
        Duration::from_secs(20),
        || async {
            let (_, count): (String, u64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&channel)
                .query_async(&mut conn.clone())
                .await
                .expect("PUBSUB NUMSUB");
            (count == 1).then_some(())
        },
    )
    .await;
}

fn assert_untrusted(what: &str, ok: bool, took: Duration, text: &str) {
    assert!(!ok, "{what}: {text}");
    assert!(text.contains("redis_tls_failed"), "{what}: {text}");
    assert!(text.contains("UnknownIssuer"), "{what}: {text}");
    assert!(text.contains("redis.tls_ca_file"), "{what}: {text}");
    // At once, not after the manager's reconnect attempts.
    assert!(took < Duration::from_secs(3), "{what}: took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rediss_worker_starts_a_session_and_refuses_an_untrusted_certificate() {
    let pki = Pki::generate();
    let redis = TlsRedis::start(&pki, "no").await;
    let ca = pki.file("ca.pem");

    // The worker over TLS, pick-up by wake-ups only: its pub/sub listener is on TLS too.
    let worker = cli(
        &redis.url("127.0.0.1"),
        &["run"],
        &[
            (CA_FILE, &ca),
            ("AGENT_WORKER__WORKER__POLL_INTERVAL", "1h"),
        ],
    );
    let worker = WorkerProcess::spawn(worker);
    wait_subscribed(&redis.conn).await;
    // The CLI over TLS, by host name this time.
    let (ok, _, text) = run(cli(
        &redis.url("localhost"),
        &["enqueue", "--session-id", "s", "--voice-id", "Craig"],
        &[(CA_FILE, &ca)],
    ))
    .await;
    assert!(ok, "enqueue over TLS: {text}");
    wait_status(&redis.conn, &sid("s"), "ready", Duration::from_secs(20)).await;
    let received = wait_received(&redis.conn, &sid("s")).await;
    assert_eq!(received["contract"]["voice_id"], "Craig", "{received}");
    let (ok, _, text) = run(cli(&redis.url("127.0.0.1"), &["status"], &[(CA_FILE, &ca)])).await;
    assert!(ok, "status over TLS: {text}");
    let out = worker.stop_cleanly().await;
    let started = events(&out.stderr)
        .into_iter()
        .find(|e| e["message"] == "worker_started")
        .unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(started["tls"], "ca-file", "{started}");

    // The system's roots do not hold the test CA, and another CA is not the server's.
    for (what, env) in [
        ("system roots", vec![]),
        ("another CA", vec![(CA_FILE, pki.file("other-ca.pem"))]),
    ] {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (ok, took, text) = run(cli(&redis.url("127.0.0.1"), &["status"], &env)).await;
        assert_untrusted(what, ok, took, &text);
        eprintln!("{what}: {}", text.lines().last().unwrap_or_default());
    }
    let (ok, took, text) = run(cli(
        &redis.url("localhost"),
        &["enqueue", "--session-id", "s-2"],
        &[],
    ))
    .await;
    assert_untrusted("enqueue", ok, took, &text);

    // A worker that does not trust the server waits, unready with the reason, says why once
    // in its log, and never starts.
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let http = addr.to_string();
    let worker = WorkerProcess::spawn(cli(
        &redis.url("127.0.0.1"),
        &["run"],
        &[("AGENT_WORKER__HTTP__ADDR", http.as_str())],
    ));
    wait_for(
        "/readyz to name the TLS failure",
        Duration::from_secs(20),
        || async {
            let (code, body) = http_get(addr, "/readyz").await?;
            (code == 503 && body.contains("redis TLS handshake failed")).then_some(())
        },
    )
    .await;
    let out = worker.stop_cleanly().await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let events = events(&out.stderr);
    let failures: Vec<_> = events
        .iter()
        .filter(|e| e["message"] == "redis_tls_failed")
        .collect();
    assert_eq!(failures.len(), 1, "logged once, not per retry: {stderr}");
    assert!(
        failures[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("UnknownIssuer")),
        "{stderr}"
    );
    assert!(
        !events.iter().any(|e| e["message"] == "worker_started"),
        "{stderr}"
    );

    // The explicit opt-out connects to anything, with a warning.
    let (ok, _, text) = run(cli(
        &redis.url("127.0.0.1"),
        &["status"],
        &[(INSECURE, "true")],
    ))
    .await;
    assert!(ok, "{text}");
    assert!(text.contains("redis_tls_insecure"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_requires_client_certificates_gets_the_configured_one() {
    let pki = Pki::generate();
    let redis = TlsRedis::start(&pki, "yes").await;
    let url = redis.url("127.0.0.1");
    let ca = pki.file("ca.pem");
    let (cert, key) = (pki.file("client.pem"), pki.file("client.key"));

    let (ok, _, text) = run(cli(
        &url,
        &["status"],
        &[(CA_FILE, &ca), (CERT_FILE, &cert), (KEY_FILE, &key)],
    ))
    .await;
    assert!(ok, "with the client certificate: {text}");

    let (ok, took, text) = run(cli(&url, &["status"], &[(CA_FILE, &ca)])).await;
    assert!(!ok, "without a client certificate: {text}");
    assert!(text.contains("redis_tls_failed"), "{text}");
    assert!(text.contains("redis.tls_cert_file"), "{text}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    eprintln!(
        "no client certificate: {}",
        text.lines().last().unwrap_or_default()
    );

    // Settings errors name the key, before any connection.
    let missing = pki.file("missing.pem");
    for (env, key_named) in [
        (
            vec![(CA_FILE, ca.as_str()), (CERT_FILE, &cert)],
            "redis.tls_key_file",
        ),
        (vec![(CA_FILE, missing.as_str())], "redis.tls_ca_file"),
        (
            vec![(CERT_FILE, cert.as_str()), (KEY_FILE, &cert)],
            "redis.tls_key_file",
        ),
    ] {
        let (ok, _, text) = run(cli(&url, &["status"], &env)).await;
        assert!(!ok, "{env:?}: {text}");
        assert!(text.contains(key_named), "{env:?}: {text}");
    }
}

/// A key file is never echoed, even when it is given where a certificate belongs.
#[test]
fn settings_errors_show_paths_not_contents() {
    let pki = Pki::generate();
    let key = pki.file("client.key");
    let secret = std::fs::read_to_string(&key).unwrap();
    let body = secret.lines().nth(1).unwrap().to_owned();
    let out = worker_bin()
        .args(["status"])
        .env("AGENT_WORKER__REDIS__URL", "rediss://127.0.0.1:1/")
        .env(CA_FILE, &key)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("redis.tls_ca_file"), "{text}");
    assert!(text.contains(&key), "{text}");
    assert!(!text.contains(&body), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_over_rediss_enqueues_what_the_worker_starts() {
    let pki = Pki::generate();
    let redis = TlsRedis::start(&pki, "no").await;
    let ca = pki.file("ca.pem");
    let worker = WorkerProcess::spawn(cli(&redis.url("127.0.0.1"), &["run"], &[(CA_FILE, &ca)]));
    wait_subscribed(&redis.conn).await;
    // As tests/python_client.rs runs the package's tests, with no trust store of the
    // environment's choosing.
    let env = [
        ("AGENT_WORKER_TEST_REDIS_URL", redis.url("localhost")),
        ("AGENT_WORKER_TEST_QUEUE", QUEUE.to_owned()),
        ("AGENT_WORKER_TEST_TLS_CA", ca.clone()),
        ("AGENT_WORKER_TEST_TLS_OTHER_CA", pki.file("other-ca.pem")),
    ];
    unittest("test_tls", 2, &env, &["SSL_CERT_FILE", "SSL_CERT_DIR"]).await;
    worker.stop_cleanly().await;
}
