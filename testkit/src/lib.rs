//! Test-only infrastructure for Stratos (SPEC §10). Nothing here ships in the binary.
//!
//! - [`schema`]: validates and defaults custom resources the way the API server does with a
//!   CRD's structural schema and CEL rules.
//! - [`moto`]: starts the EC2 emulator; [`ec2_faults`]: a fault-injecting proxy in front of it.

pub mod apiserver;
pub mod controllers;
pub mod ec2_faults;
pub mod harness;
mod http;
pub mod interpod;
pub mod invariants;
pub mod kubelet;
pub mod moto;
pub mod nodematch;
pub mod reflect;
pub mod scheduler;
pub mod schema;
pub mod tools;
