//! `doppel-load`: the command line of the device simulator.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use twin_load::api::{self, Api, RolloutArgs};
use twin_load::routes::{self, Receiver};
use twin_load::scenarios::{self, Fleet, Pace, parse_duration};

#[derive(Parser)]
#[command(
    name = "doppel-load",
    version,
    about = "Simulated MQTT devices and benchmark scenarios for Doppel (and any MQTT broker)"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Args)]
struct Output {
    /// Write the full report (totals, percentiles, per-second timeline) as JSON
    #[arg(long)]
    report: Option<PathBuf>,
    /// Draw throughput and latency over time as a PNG
    #[arg(long)]
    chart: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Scenario {
    /// Every device publishes reported updates to its shadow and waits for update/accepted.
    /// Measures durable updates per second and publish-to-accepted latency.
    /// Run Doppel with --auto-register.
    ShadowUpdate {
        #[command(flatten)]
        fleet: Fleet,
        #[command(flatten)]
        pace: Pace,
        #[command(flatten)]
        output: Output,
    },
    /// Every device publishes telemetry on dt/load/{id}/meter at QoS 1 and waits for the
    /// PUBACK (sent once the reading is durable). Measures readings kept per second and
    /// publish-to-PUBACK latency; with --readers, also the latency of reading devices'
    /// latest values through GraphQL meanwhile (needs a token). Run Doppel with
    /// --auto-register.
    Telemetry {
        #[command(flatten)]
        fleet: Fleet,
        #[command(flatten)]
        pace: Pace,
        #[command(flatten)]
        api: Api,
        /// GraphQL callers reading Thing.telemetry, one read after another, during the run
        #[arg(long, default_value_t = 0)]
        readers: usize,
        #[command(flatten)]
        output: Output,
    },
    /// Connects every device as fast as the server accepts them.
    /// Measures connections per second and failures.
    ConnectStorm {
        #[command(flatten)]
        fleet: Fleet,
        /// Keep the fleet connected this long after the last connection
        #[arg(long, default_value = "0s", value_parser = parse_duration)]
        hold: Duration,
        #[command(flatten)]
        output: Output,
    },
    /// Connects every device, activates its twin with one update, holds the fleet idle and
    /// reads the server's memory from /proc/PID/status: bytes per resident twin.
    IdleFleet {
        #[command(flatten)]
        fleet: Fleet,
        /// Process id of the server under test (same machine)
        #[arg(long)]
        server_pid: u32,
        /// Idle time before the memory is read
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        hold: Duration,
        #[command(flatten)]
        output: Output,
    },
    /// An application sets each device's desired state through GraphQL (updateDesired);
    /// the device gets the delta over MQTT, applies it and reports it back, and a
    /// thingsChanged subscriber sees the twin in sync. Measures that whole loop, with the
    /// steps broken down. Run Doppel with --auto-register and give an operator token.
    DesiredRoundtrip {
        #[command(flatten)]
        fleet: Fleet,
        #[command(flatten)]
        pace: Pace,
        #[command(flatten)]
        api: Api,
        #[command(flatten)]
        output: Output,
    },
    /// Registers things through GraphQL (skipping those that exist), gives them
    /// attributes and desired state, then times things(filter) queries over all of them,
    /// from a lookup by id to a near-full scan. Needs an admin token.
    FleetQuery {
        #[command(flatten)]
        api: Api,
        /// Things in the fleet
        #[arg(long, default_value_t = 100_000)]
        things: usize,
        /// Thing ids are PREFIX-0000001, PREFIX-0000002, ...
        #[arg(long, default_value = "q")]
        prefix: String,
        /// Times each filter runs
        #[arg(long, default_value_t = 50)]
        repeat: usize,
        #[command(flatten)]
        output: Output,
    },
    /// Every device runs the AWS IoT Jobs device API; one firmware job is created for the
    /// whole fleet through GraphQL (all at once, in --waves or at a --rate-base) and the
    /// run lasts until it has ended. Measures devices updated per minute and, with
    /// --server-pid, the server's CPU time per execution. Run Doppel with --auto-register
    /// and give an operator token.
    OtaRollout {
        #[command(flatten)]
        fleet: Fleet,
        #[command(flatten)]
        api: Api,
        #[command(flatten)]
        rollout: RolloutArgs,
        #[command(flatten)]
        output: Output,
    },
    /// shadow-update with a route sending every shadow change to a webhook receiver run
    /// here, or to a Redis stream or Kafka topic read here (created through GraphQL,
    /// deleted after): events delivered per second, the latency added from the commit to
    /// the reader, and events lost, out of order or duplicated. Run Doppel with
    /// --auto-register (and --webhook-allowed-networks 127.0.0.0/8 for the webhook) and
    /// give an admin token.
    RouteFanout {
        #[command(flatten)]
        fleet: Fleet,
        #[command(flatten)]
        pace: Pace,
        #[command(flatten)]
        api: Api,
        #[command(flatten)]
        receiver: Receiver,
        #[command(flatten)]
        output: Output,
    },
    /// The same devices and payloads as shadow-update against any MQTT broker, as a QoS 1
    /// echo (each device subscribes to load/ID and publishes to it): the raw broker ceiling.
    Baseline {
        #[command(flatten)]
        fleet: Fleet,
        #[command(flatten)]
        pace: Pace,
        #[command(flatten)]
        output: Output,
    },
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let (report, output) = match cli.scenario {
        Scenario::ShadowUpdate {
            fleet,
            pace,
            output,
        } => (scenarios::shadow_update(&fleet, &pace).await?, output),
        Scenario::Telemetry {
            fleet,
            pace,
            api,
            readers,
            output,
        } => (api::telemetry(&fleet, &pace, &api, readers).await?, output),
        Scenario::ConnectStorm {
            fleet,
            hold,
            output,
        } => (scenarios::connect_storm(&fleet, hold).await?, output),
        Scenario::IdleFleet {
            fleet,
            server_pid,
            hold,
            output,
        } => (
            scenarios::idle_fleet(&fleet, hold, server_pid).await?,
            output,
        ),
        Scenario::Baseline {
            fleet,
            pace,
            output,
        } => (scenarios::baseline(&fleet, &pace).await?, output),
        Scenario::RouteFanout {
            fleet,
            pace,
            api,
            receiver,
            output,
        } => (
            routes::route_fanout(&fleet, &pace, &api, &receiver).await?,
            output,
        ),
        Scenario::DesiredRoundtrip {
            fleet,
            pace,
            api,
            output,
        } => (api::desired_roundtrip(&fleet, &pace, &api).await?, output),
        Scenario::OtaRollout {
            fleet,
            api,
            rollout,
            output,
        } => (api::ota_rollout(&fleet, &api, &rollout).await?, output),
        Scenario::FleetQuery {
            api,
            things,
            prefix,
            repeat,
            output,
        } => (
            api::fleet_query(&api, &prefix, things, repeat).await?,
            output,
        ),
    };
    print!("{}", report.summary());
    if let Some(path) = &output.report {
        report.write_json(path)?;
        println!("report: {}", path.display());
    }
    if let Some(path) = &output.chart {
        report.write_chart(path)?;
        println!("chart: {}", path.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
