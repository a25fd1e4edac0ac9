//! The twin's telemetry: a device's reading becomes the thing's latest values and points
//! of its series, and a `TELEMETRY` event for the routes, in one durable commit.

use std::sync::Arc;

use serde_json::json;
use twin_model::route::EventType;
use twin_model::{Rejection, RejectionKind, TwinEvent};
use twin_store::{Point, Write};

use super::{DeviceState, TelemetryMessage};
use crate::error::FleetError;
use crate::routing;

impl DeviceState {
    /// Keeps `message` durably; answers once it is (the device's PUBACK waits for this).
    pub(super) async fn telemetry(&mut self, message: TelemetryMessage) -> Result<(), FleetError> {
        let TelemetryMessage {
            reading,
            topic,
            kind,
            route,
        } = message;
        let routes = self.ctx.routes.clone();
        if let Some(name) = &route
            && !routes.has_name(name)
        {
            return Err(Rejection::new(
                RejectionKind::NotFound,
                format!("no route is named {name:?} (AWS IoT Basic Ingest names a route)"),
            )
            .into());
        }
        let loaded = self.registered().await?;
        let latest = Arc::new(
            loaded
                .telemetry
                .with(&reading)
                .map_err(Rejection::bad_request)?,
        );
        let points: Arc<[Point]> = reading
            .numbers()
            .map(|(key, value)| Point {
                key: key.to_owned(),
                at: reading.at,
                value,
            })
            .collect();
        // The thing as routes' filters see it, assembled only when a route may take the
        // reading: most readings go to no route.
        let matched = if route.is_some() || routes.wants(EventType::Telemetry) {
            let view = routing::After {
                record: loaded.record.clone(),
                connectivity: loaded.connectivity.clone(),
                shadows: loaded.shadows.clone(),
                telemetry: latest.clone(),
            }
            .view()
            .expect("a registered thing has its record");
            match &route {
                Some(name) => routes.named(name, &view),
                None => routes.matching(EventType::Telemetry, Some(&view)),
            }
        } else {
            Vec::new()
        };
        let mut writes = vec![Write::Telemetry {
            thing: self.thing.clone(),
            latest: latest.clone(),
            points,
        }];
        let values = Arc::new(reading.body);
        if !matched.is_empty() {
            let data = json!({
                "topic": topic,
                "type": kind,
                "timestamp": twin_model::rfc3339(reading.at),
                "values": &*values,
            });
            writes.push(self.event(EventType::Telemetry, self.ctx.now_millis(), data, matched));
        }
        self.commit(writes).await?;
        if let Some(l) = self.loaded.as_mut() {
            l.telemetry = latest.clone();
        }
        let version = self.version();
        self.ctx.publish_event(TwinEvent::Telemetry {
            thing: self.thing.clone(),
            topic,
            kind,
            values,
            at: reading.at,
            latest,
            version,
        });
        Ok(())
    }
}
