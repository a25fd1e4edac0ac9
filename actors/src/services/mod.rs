//! The fleet's services: one small typed API per concern, each a view of the
//! [`FleetHandle`](crate::FleetHandle) that routes to the twins and reads the store:
//! `fleet.shadows()`, `fleet.registry()`, `fleet.sessions()`, `fleet.commands()`,
//! `fleet.jobs()`, `fleet.queries()`, `fleet.certificates()`, `fleet.routes()` and
//! `fleet.telemetry()`. No service calls another (the rollout
//! controller in [`rollout`](crate::rollout) uses jobs and queries), so there are no
//! cycles between them.

mod certificates;
mod commands;
mod jobs;
mod provisioning;
mod queries;
mod registry;
mod routes;
mod sessions;
mod shadows;
mod telemetry;

pub(crate) use certificates::CertificateState;
pub use certificates::{CertificateLogin, Certificates, ParsedCertificate, fingerprint, parse_pem};
pub use commands::Commands;
pub use jobs::Jobs;
pub use provisioning::{NewCertificate, Provisioning, Registered};
pub use queries::Queries;
pub use registry::Registry;
pub use routes::{RouteSpec, Routes, check_destination};
pub use sessions::{DeviceSessions, Login};
pub use shadows::Shadows;
pub use telemetry::Telemetry;
