//! The `shoal` binary: see the `cli` module of shoal-control.

fn main() {}
