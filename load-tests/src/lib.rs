//! `doppel-load`: a device simulator and benchmark scenarios for Doppel.
//!
//! A client like any other: it speaks MQTT and GraphQL to the server under test and
//! depends on no Doppel crate. See `doppel-load --help` and `load-tests/RESULTS.md`.

pub mod api;
pub mod client;
pub mod graphql;
pub mod report;
pub mod routes;
pub mod scenarios;
pub mod stats;
pub mod watch;

pub use report::Report;
pub use scenarios::{Fleet, Pace};
