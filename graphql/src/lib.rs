//! Doppel's GraphQL API.
//!
//! - [`schema`]: the async-graphql schema, merged from one object per domain, and what
//!   the domains share (roles as guards, paging, the `Lagged` adapter);
//! - [`things`] and [`thing_events`]: things, shadows, the registry and their
//!   subscriptions;
//! - [`history`]: a shadow's history and time travel;
//! - [`commands`]: command executions;
//! - [`jobs`]: OTA jobs (creation, progress, pause, cancel) and their fields;
//! - [`signing`]: the Ed25519 key that signs job documents;
//! - [`http`]: the axum router: `POST /graphql`, GraphiQL on `GET /graphql`, and
//!   subscriptions on `/graphql/ws` (`graphql-transport-ws`, and the legacy `graphql-ws`);
//! - [`auth`]: bearer tokens and the roles viewer < operator < admin;
//! - [`error`]: the one mapping from failures to `extensions.code`.
//!
//! The API reaches the twins only through [`twin_actors::FleetHandle`] and its event
//! stream.

pub mod audit;
pub mod auth;
pub mod certificates;
pub mod cluster;
pub mod commands;
pub mod error;
pub mod history;
pub mod http;
pub mod jobs;
pub mod provisioning;
pub mod routes;
pub mod schema;
pub mod signing;
pub mod telemetry;
pub mod thing_events;
pub mod things;

pub use auth::{Principal, Role, Tokens};
pub use schema::{Api, ApiLimits, DoppelSchema, build, sdl};
pub use signing::Signer;
