//! Test-only infrastructure for Stratos (SPEC §10). Nothing here ships in the binary.
//!
//! - [`schema`]: validates and defaults custom resources the way the API server does with a
//!   CRD's structural schema and CEL rules.

pub mod schema;
