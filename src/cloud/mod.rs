//! The cloud layer: the only place that knows AWS (SPEC §7).

pub mod ec2;
