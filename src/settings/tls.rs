//! The `redis.tls_*` keys: which protection a connection gets ([`TlsMode`]), whether the keys
//! agree with the URL and each other, and the PEM files they name, read and checked.
//!
//! The files are read again for each connection ([`RedisSettings::tls_certificates`]), so a
//! rotated certificate is picked up without a restart; at start-up the same read is the check.

use std::{fmt, path::Path};

use super::{RedisSettings, SettingsError, invalid};

/// How a connection to Redis is protected, as [`RedisSettings::tls_mode`] tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// `redis://`: plain TCP.
    Off,
    /// `rediss://`, the server's certificate checked against the system's roots.
    SystemRoots,
    /// `rediss://`, the server's certificate checked against `redis.tls_ca_file`.
    CaFile,
    /// `rediss://` without any verification (`redis.tls_insecure`).
    Insecure,
}

impl TlsMode {
    /// Its name in log lines and `status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::SystemRoots => "system-roots",
            Self::CaFile => "ca-file",
            Self::Insecure => "insecure",
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl RedisSettings {
    /// True for a `rediss://` (or `valkeys://`) URL.
    pub fn uses_tls(&self) -> bool {
        let url = self.url.expose().trim_start();
        ["rediss://", "valkeys://"].iter().any(|scheme| {
            url.len() >= scheme.len() && url[..scheme.len()].eq_ignore_ascii_case(scheme)
        })
    }

    /// How the connection is protected.
    pub fn tls_mode(&self) -> TlsMode {
        match (self.uses_tls(), self.tls_insecure, &self.tls_ca_file) {
            (false, _, _) => TlsMode::Off,
            (true, true, _) => TlsMode::Insecure,
            (true, false, Some(_)) => TlsMode::CaFile,
            (true, false, None) => TlsMode::SystemRoots,
        }
    }

    /// The CA bundle and client certificate to hand to the Redis client, read from their
    /// files now (so a rotated file is picked up by the next connection); `None` when neither
    /// is set. Errors name the setting.
    pub fn tls_certificates(&self) -> Result<Option<::redis::TlsCertificates>, SettingsError> {
        let root_cert = match &self.tls_ca_file {
            Some(path) => Some(read_pem("redis.tls_ca_file", path, Pem::Certificates)?),
            None => None,
        };
        let client_tls = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => Some(::redis::ClientTlsConfig {
                client_cert: read_pem("redis.tls_cert_file", cert, Pem::Certificates)?,
                client_key: read_pem("redis.tls_key_file", key, Pem::PrivateKey)?,
            }),
            (Some(_), None) => {
                return Err(invalid(
                    "redis.tls_key_file",
                    "must be set with redis.tls_cert_file (the client certificate's \
                     private key)",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "redis.tls_cert_file",
                    "must be set with redis.tls_key_file (the certificate of that key)",
                ));
            }
            (None, None) => None,
        };
        if root_cert.is_none() && client_tls.is_none() {
            return Ok(None);
        }
        Ok(Some(::redis::TlsCertificates {
            client_tls,
            root_cert,
        }))
    }

    /// The `redis.tls_*` keys: consistent with the URL and each other, their files readable
    /// and holding what they should.
    pub(super) fn validate_tls(&self) -> Result<(), SettingsError> {
        // redis-rs's own opt-out would skip the start-up warning of redis.tls_insecure.
        let info = ::redis::IntoConnectionInfo::into_connection_info(self.url.expose());
        if let Ok(info) = info
            && let ::redis::ConnectionAddr::TcpTls { insecure: true, .. } = info.addr()
        {
            return Err(invalid(
                "redis.url",
                "ends in #insecure, which turns certificate verification off; remove it and set \
                 redis.tls_insecure = true if that is really meant",
            ));
        }
        if !self.uses_tls() {
            let set = [
                ("redis.tls_ca_file", self.tls_ca_file.is_some()),
                ("redis.tls_cert_file", self.tls_cert_file.is_some()),
                ("redis.tls_key_file", self.tls_key_file.is_some()),
                ("redis.tls_insecure", self.tls_insecure),
            ];
            if let Some((key, _)) = set.iter().find(|(_, set)| *set) {
                return Err(invalid(
                    key,
                    "is set, but redis.url is not a rediss:// URL, so the connection would not \
                     use TLS at all; use rediss://host:port for TLS",
                ));
            }
            return Ok(());
        }
        if self.tls_insecure && self.tls_ca_file.is_some() {
            return Err(invalid(
                "redis.tls_insecure",
                "turns certificate verification off, so redis.tls_ca_file would be ignored; set \
                 only one of them",
            ));
        }
        self.tls_certificates().map(drop)
    }
}

/// What a PEM file of the TLS settings must hold.
#[derive(Debug, Clone, Copy)]
enum Pem {
    /// One or more certificates.
    Certificates,
    /// One private key (PKCS#8, PKCS#1 or SEC1).
    PrivateKey,
}

/// Reads a PEM file of setting `key` and checks it holds what it should; the error names the
/// key and the path (never the contents: a key file is a secret).
fn read_pem(key: &'static str, path: &Path, want: Pem) -> Result<Vec<u8>, SettingsError> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let invalid = |reason: String| super::invalid(key, reason);
    let bytes =
        std::fs::read(path).map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
    match want {
        Pem::Certificates => {
            let certs = CertificateDer::pem_slice_iter(&bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    invalid(format!(
                        "{} is not a PEM certificate file: {e}",
                        path.display()
                    ))
                })?;
            if certs.is_empty() {
                return Err(invalid(format!(
                    "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                    path.display()
                )));
            }
        }
        Pem::PrivateKey => {
            PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
                invalid(format!(
                    "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
                    path.display()
                ))
            })?;
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::settings::{Settings, load::load_with_env};

    /// A directory with a self-signed certificate (`cert.pem`), its key (`key.pem`) and a file
    /// that is neither (`junk.pem`).
    fn tls_files() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "agent-worker-settings-tls-{}-{}",
            std::process::id(),
            ulid::Ulid::generate()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        std::fs::write(dir.join("cert.pem"), certified.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), certified.signing_key.serialize_pem()).unwrap();
        std::fs::write(dir.join("junk.pem"), "not a certificate\n").unwrap();
        dir
    }

    /// A `rediss://` URL holding a password that no error may show.
    const TLS_URL: &str = "rediss://:s3cret@cache.example:6380/0";

    /// Loads with [`TLS_URL`] and `pairs`.
    fn load_tls(pairs: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let mut all = vec![("AGENT_WORKER__REDIS__URL", TLS_URL)];
        all.extend_from_slice(pairs);
        load_with_env(&all)
    }

    #[test]
    fn tls_modes_and_certificates_follow_the_settings() {
        let dir = tls_files();
        let file = |name: &str| dir.join(name).display().to_string();
        let (cert, key) = (file("cert.pem"), file("key.pem"));

        let s = load_tls(&[]).unwrap();
        assert_eq!(s.redis.tls_mode(), TlsMode::SystemRoots);
        assert!(s.redis.tls_certificates().unwrap().is_none());
        let s = load_tls(&[
            ("AGENT_WORKER__REDIS__TLS_CA_FILE", &cert),
            ("AGENT_WORKER__REDIS__TLS_CERT_FILE", &cert),
            ("AGENT_WORKER__REDIS__TLS_KEY_FILE", &key),
        ])
        .unwrap();
        assert_eq!(s.redis.tls_mode(), TlsMode::CaFile);
        let certs = s.redis.tls_certificates().unwrap().unwrap();
        assert!(certs.root_cert.is_some() && certs.client_tls.is_some());
        let s = load_tls(&[("AGENT_WORKER__REDIS__TLS_INSECURE", "true")]).unwrap();
        assert_eq!(s.redis.tls_mode(), TlsMode::Insecure);
        let plain = load_with_env(&[]).unwrap();
        assert_eq!(plain.redis.tls_mode(), TlsMode::Off);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tls_settings_are_checked_with_errors_naming_the_key() {
        let dir = tls_files();
        let file = |name: &str| dir.join(name).display().to_string();
        let (cert, key, junk) = (file("cert.pem"), file("key.pem"), file("junk.pem"));
        let missing = file("missing.pem");

        for (pairs, key_named, says) in [
            (
                vec![("AGENT_WORKER__REDIS__TLS_CA_FILE", missing.as_str())],
                "redis.tls_ca_file",
                missing.as_str(),
            ),
            (
                vec![("AGENT_WORKER__REDIS__TLS_CA_FILE", junk.as_str())],
                "redis.tls_ca_file",
                "holds no PEM certificate",
            ),
            (
                vec![("AGENT_WORKER__REDIS__TLS_CERT_FILE", cert.as_str())],
                "redis.tls_key_file",
                "must be set with redis.tls_cert_file",
            ),
            (
                vec![("AGENT_WORKER__REDIS__TLS_KEY_FILE", key.as_str())],
                "redis.tls_cert_file",
                "must be set with redis.tls_key_file",
            ),
            (
                vec![
                    ("AGENT_WORKER__REDIS__TLS_CERT_FILE", cert.as_str()),
                    ("AGENT_WORKER__REDIS__TLS_KEY_FILE", cert.as_str()),
                ],
                "redis.tls_key_file",
                "holds no PEM private key",
            ),
            (
                vec![
                    ("AGENT_WORKER__REDIS__TLS_INSECURE", "true"),
                    ("AGENT_WORKER__REDIS__TLS_CA_FILE", cert.as_str()),
                ],
                "redis.tls_insecure",
                "set only one",
            ),
        ] {
            let err = load_tls(&pairs).unwrap_err().to_string();
            assert!(
                err.contains(key_named) && err.contains(says),
                "{pairs:?}: {err}"
            );
            assert!(!err.contains("s3cret"), "{err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// TLS keys with a redis:// URL would silently mean no TLS; redis-rs's own opt-out
    /// (`#insecure`) would bypass the warning of `redis.tls_insecure`.
    #[test]
    fn tls_keys_need_a_rediss_url_and_no_insecure_suffix() {
        let dir = tls_files();
        let cert = dir.join("cert.pem").display().to_string();
        for key in ["TLS_CA_FILE", "TLS_INSECURE"] {
            let value = if key == "TLS_INSECURE" { "true" } else { &cert };
            let err = load_with_env(&[(&format!("AGENT_WORKER__REDIS__{key}"), value)])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("redis.{}", key.to_lowercase())),
                "{err}"
            );
            assert!(err.contains("not a rediss:// URL"), "{err}");
        }
        let err = load_with_env(&[(
            "AGENT_WORKER__REDIS__URL",
            "rediss://:s3cret@h:6380/#insecure",
        )])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("redis.url") && err.contains("#insecure"),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
