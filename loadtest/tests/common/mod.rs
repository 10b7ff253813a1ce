//! What the load generator's test binaries share: where the binaries are, and how a run's output
//! reads in a failure message.

use std::{path::PathBuf, process::Output};

/// The load generator under test.
pub fn loadtest_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_shoal-loadtest"))
}

/// `shoal-server` is built next to the load generator (`cargo build --workspace`).
pub fn server_bin() -> PathBuf {
    let bin = loadtest_bin().with_file_name("shoal-server");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first",
        bin.display()
    );
    bin
}

/// A run's exit status and output, for a failure message.
pub fn describe(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}
