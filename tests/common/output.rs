//! A finished process's output, as a test checks it.

use std::process::Output;

/// Asserts that the process that gave `out` exited 0 (else the failure names `what` ran and
/// shows its stderr); its stdout, which must be UTF-8.
pub fn stdout_of(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone())
        .unwrap_or_else(|e| panic!("{what} printed something other than UTF-8: {e}"))
}
