//! Stratos: a Kubernetes operator that keeps pools of pre-warmed, reusable nodes.
//!
//! Data flows one way: watches and listings → snapshot → planner → actions → executor →
//! status, events and metrics (SPEC §2).

pub mod api;
pub mod cloud;
pub mod config;
pub mod contract;
pub mod controller;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod pool;
pub mod preflight;
pub mod telemetry;
