//! What a run produces: a JSON report, a summary table and a PNG chart of throughput and
//! latency over time.

use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::stats::{Percentiles, Second};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub target: String,
    pub protocol: String,
    pub devices: usize,
    /// The command line that made the run.
    pub command: String,
    /// Seconds since the epoch.
    pub started_at: u64,
    pub duration_secs: f64,
    pub ok: u64,
    pub errors: u64,
    /// Completed operations per second over the whole run.
    pub throughput: f64,
    pub latency_us: Option<Percentiles>,
    pub timeline: Vec<Second>,
    /// Scenario-specific figures (connections per second, RSS, bytes per twin, ...).
    pub figures: serde_json::Map<String, serde_json::Value>,
    pub machine: Machine,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub cpus: usize,
    pub os: String,
}

impl Machine {
    pub fn this() -> Self {
        Self {
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
        }
    }
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

impl Report {
    /// The human summary printed at the end of a run.
    pub fn summary(&self) -> String {
        let mut rows: Vec<(String, String)> = vec![
            ("scenario".into(), self.scenario.clone()),
            ("target".into(), self.target.clone()),
            (
                "devices".into(),
                format!("{} ({})", self.devices, self.protocol),
            ),
            ("duration".into(), format!("{:.1} s", self.duration_secs)),
            ("completed".into(), self.ok.to_string()),
            ("errors".into(), self.errors.to_string()),
            ("throughput".into(), format!("{:.0} /s", self.throughput)),
        ];
        if let Some(l) = &self.latency_us {
            for (name, v) in [
                ("p50", l.p50),
                ("p90", l.p90),
                ("p99", l.p99),
                ("p99.9", l.p999),
                ("max", l.max),
            ] {
                rows.push((format!("latency {name}"), ms(v)));
            }
        }
        for (k, v) in &self.figures {
            let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
            rows.push((k.replace('_', " "), v));
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in rows {
            out.push_str(&format!("{k:<width$}  {v}\n"));
        }
        out
    }

    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Throughput per second (top) and p50/p99 latency per second (bottom), as a PNG.
    pub fn write_chart(&self, path: &Path) -> anyhow::Result<()> {
        ensure_font();
        let root = BitMapBackend::new(path, (1200, 800)).into_drawing_area();
        root.fill(&WHITE)?;
        let (top, bottom) = root.split_vertically(400);
        let secs = self.timeline.len().max(1) as u64;
        let max_rate = self
            .timeline
            .iter()
            .map(|s| s.ok + s.errors)
            .max()
            .unwrap_or(1)
            .max(1);
        let mut chart = ChartBuilder::on(&top)
            .caption(
                format!(
                    "{} against {}: completed per second",
                    self.scenario, self.target
                ),
                ("sans-serif", 22),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(80)
            .build_cartesian_2d(0u64..secs, 0u64..max_rate + max_rate / 10)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("per second")
            .draw()?;
        chart
            .draw_series(LineSeries::new(
                self.timeline.iter().map(|s| (s.second, s.ok)),
                BLUE.stroke_width(2),
            ))?
            .label("completed")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        chart
            .draw_series(LineSeries::new(
                self.timeline.iter().map(|s| (s.second, s.errors)),
                RED.stroke_width(2),
            ))?
            .label("errors")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()?;

        let max_ms = self
            .timeline
            .iter()
            .filter_map(|s| s.latency_us.map(|l| l.p99))
            .max()
            .map_or(1.0, |us| us as f64 / 1000.0)
            .max(0.1);
        let mut chart = ChartBuilder::on(&bottom)
            .caption("latency per second", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(80)
            .build_cartesian_2d(0u64..secs, 0f64..max_ms * 1.1)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("ms")
            .draw()?;
        for (name, color, pick) in [("p50", GREEN, 0usize), ("p99", MAGENTA, 1)] {
            let points = self.timeline.iter().filter_map(|s| {
                s.latency_us.map(|l| {
                    (
                        s.second,
                        if pick == 0 { l.p50 } else { l.p99 } as f64 / 1000.0,
                    )
                })
            });
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()?;
        root.present()
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

/// Charts use an embedded DejaVu Sans, so they render the same on machines without fonts.
fn ensure_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // A font that is built in cannot be invalid.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        let lat = Percentiles {
            count: 3,
            mean: 1500.0,
            p50: 1000,
            p90: 2000,
            p99: 2500,
            p999: 2500,
            max: 2500,
        };
        Report {
            scenario: "shadow-update".into(),
            target: "127.0.0.1:1883".into(),
            protocol: "v4".into(),
            devices: 2,
            command: "doppel-load shadow-update".into(),
            started_at: 1,
            duration_secs: 2.0,
            ok: 3,
            errors: 1,
            throughput: 1.5,
            latency_us: Some(lat),
            timeline: vec![
                Second {
                    second: 0,
                    ok: 2,
                    errors: 0,
                    latency_us: Some(lat),
                },
                Second {
                    second: 1,
                    ok: 1,
                    errors: 1,
                    latency_us: None,
                },
            ],
            figures: [("connections_per_sec".to_string(), serde_json::json!(1234.5))]
                .into_iter()
                .collect(),
            machine: Machine::this(),
        }
    }

    #[test]
    fn the_json_report_round_trips_and_the_summary_shows_the_figures() {
        let r = sample();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        r.write_json(&path).unwrap();
        let back: Report = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, r);
        let text: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(text["latency_us"]["p99"], 2500);
        let s = r.summary();
        for needle in [
            "shadow-update",
            "throughput",
            "latency p99",
            "2.50 ms",
            "connections per sec",
            "1234.5",
        ] {
            assert!(s.contains(needle), "{needle} missing from\n{s}");
        }
    }

    #[test]
    fn the_chart_is_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.png");
        sample().write_chart(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(
            bytes.len() > 5_000,
            "a chart with axes and text, not an empty image"
        );
    }
}
