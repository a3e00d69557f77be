//! Tests of the `tandem` binary as a user runs it.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod proxy_cmd;
