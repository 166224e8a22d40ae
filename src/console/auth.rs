//! Who may use the console's write actions: the admin token, the login cookie and the CSRF
//! token, all checked in constant time.
//!
//! A request is authenticated by `Authorization: Bearer <http.admin_token>` or by the cookie
//! the login form sets. The cookie does not hold the token itself but a value derived from it
//! (HMAC-SHA256 keyed with the token), so the browser never stores the secret, every replica
//! with the same token accepts the same cookie, and rotating the token logs everybody out. The
//! CSRF token is derived the same way with another label: only someone who knows the admin
//! token (or was shown a page after authenticating) can produce it, and every POST must carry
//! it, whatever authenticated it.
//!
//! Comparisons never use `==` on secrets: a presented value and the expected one are both
//! signed with a random per-process key and the tags compared by [`ring::hmac::verify`], in
//! constant time and without leaking the expected length.

use std::fmt;

use axum::http::{HeaderMap, header};
use ring::{hmac, rand::SystemRandom};

use crate::settings::Secret;

/// Name of the login cookie.
pub const COOKIE: &str = "agent_worker_console";

/// How long a login lasts in the browser (12 h: one on-call shift).
pub const COOKIE_MAX_AGE_SECS: u64 = 12 * 3600;

/// The console's admin credentials, derived once from `http.admin_token`.
pub struct AdminAuth {
    /// Signs presented and expected values alike for comparison (random, per process).
    compare_key: hmac::Key,
    token_tag: hmac::Tag,
    cookie: String,
    cookie_tag: hmac::Tag,
    csrf: String,
    csrf_tag: hmac::Tag,
}

impl fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminAuth(***)")
    }
}

impl AdminAuth {
    /// Credentials of `token`.
    ///
    /// # Panics
    ///
    /// When the operating system has no random numbers to give (the process could not run
    /// TLS either).
    pub fn new(token: &Secret) -> Self {
        let derive = hmac::Key::new(hmac::HMAC_SHA256, token.expose().as_bytes());
        let cookie = hex(hmac::sign(&derive, b"agent-worker console cookie v1").as_ref());
        let csrf = hex(hmac::sign(&derive, b"agent-worker console csrf v1").as_ref());
        let compare_key = hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new())
            .expect("the system's random number generator works");
        Self {
            token_tag: hmac::sign(&compare_key, token.expose().as_bytes()),
            cookie_tag: hmac::sign(&compare_key, cookie.as_bytes()),
            csrf_tag: hmac::sign(&compare_key, csrf.as_bytes()),
            compare_key,
            cookie,
            csrf,
        }
    }

    /// The CSRF token forms must carry (shown only on pages of authenticated requests).
    pub fn csrf_token(&self) -> &str {
        &self.csrf
    }

    /// The `Set-Cookie` value of a successful login.
    pub fn login_cookie(&self) -> String {
        format!(
            "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={COOKIE_MAX_AGE_SECS}",
            self.cookie
        )
    }

    /// The `Set-Cookie` value that ends a login.
    pub fn logout_cookie() -> String {
        format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
    }

    /// Whether `presented` is the admin token.
    pub fn is_token(&self, presented: &str) -> bool {
        self.matches(presented, &self.token_tag)
    }

    /// Whether `presented` is the CSRF token.
    pub fn is_csrf(&self, presented: &str) -> bool {
        self.matches(presented, &self.csrf_tag)
    }

    /// Whether the request carries the admin token as a bearer token or the login cookie.
    pub fn is_authenticated(&self, headers: &HeaderMap) -> bool {
        let bearer = headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .filter_map(|value| value.strip_prefix("Bearer "))
            .any(|token| self.is_token(token.trim()));
        bearer || cookies(headers, COOKIE).any(|value| self.matches(value, &self.cookie_tag))
    }

    fn matches(&self, presented: &str, expected: &hmac::Tag) -> bool {
        hmac::verify(&self.compare_key, presented.as_bytes(), expected.as_ref()).is_ok()
    }
}

/// The values of the cookie `name` in the request's `Cookie` headers.
fn cookies<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(move |pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key == name).then_some(value)
        })
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const TOKEN: &str = "a-long-enough-admin-token";

    #[test]
    fn tokens_cookies_and_csrf_are_checked() {
        let auth = AdminAuth::new(&Secret::new(TOKEN));
        assert!(auth.is_token(TOKEN));
        assert!(!auth.is_token("a-long-enough-admin-toke"));
        assert!(!auth.is_token(""));
        assert!(auth.is_csrf(auth.csrf_token()));
        assert!(!auth.is_csrf(TOKEN));
        // Derived values never hold the token, and the cookie is not the CSRF token.
        assert!(!auth.login_cookie().contains(TOKEN));
        assert!(!auth.login_cookie().contains(auth.csrf_token()));
        assert!(!format!("{auth:?}").contains(TOKEN));

        let mut headers = HeaderMap::new();
        assert!(!auth.is_authenticated(&headers));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {TOKEN}")).unwrap(),
        );
        assert!(auth.is_authenticated(&headers));

        let cookie = auth.login_cookie();
        let value = cookie.split(';').next().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("other=1; {value}")).unwrap(),
        );
        assert!(auth.is_authenticated(&headers));
        // Another process with the same token accepts the same cookie (replicas agree).
        assert!(AdminAuth::new(&Secret::new(TOKEN)).is_authenticated(&headers));
        let other = AdminAuth::new(&Secret::new("another-long-admin-token"));
        assert!(!other.is_authenticated(&headers));
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("agent_worker_console=00"),
        );
        assert!(!auth.is_authenticated(&headers));
    }
}
