//! Every MQTT topic of the device API, parsed and formatted in one place.
//!
//! - `$aws/things/{thing}/shadow[/name/{shadow}]/{update|get|delete}[/accepted|/rejected|/delta|/documents]`
//! - `$aws/commands/things/{thing}/executions/{executionId}/{request|response|response/accepted|response/rejected}/json`
//! - `$aws/things/{thing}/jobs/{notify|notify-next|get|start-next|{jobId}/get|{jobId}/update}[/accepted|/rejected]`

use std::fmt::Write as _;

use crate::id::{DeviceId, NameError, ShadowName};

pub const THINGS_PREFIX: &str = "$aws/things/";
pub const COMMANDS_PREFIX: &str = "$aws/commands/things/";

/// The command topics' channels; every one ends in the payload format, `/json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandChannel {
    /// To the device: the command.
    Request,
    /// From the device: its status.
    Response,
    Accepted,
    Rejected,
}

impl CommandChannel {
    pub const fn path(self) -> &'static str {
        match self {
            Self::Request => "request/json",
            Self::Response => "response/json",
            Self::Accepted => "response/accepted/json",
            Self::Rejected => "response/rejected/json",
        }
    }
}

/// A command execution's topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CommandTopic {
    pub thing: DeviceId,
    pub execution_id: String,
    pub channel: CommandChannel,
}

impl CommandTopic {
    pub fn format(&self) -> String {
        format!(
            "{COMMANDS_PREFIX}{}/executions/{}/{}",
            self.thing,
            self.execution_id,
            self.channel.path()
        )
    }
}

/// Whether `id` can be an execution id in a topic: 1-64 of `A-Z a-z 0-9 _ -`.
pub fn valid_execution_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn parse_command(rest: &str) -> Result<Topic, TopicError> {
    let (thing, rest) = rest
        .split_once('/')
        .ok_or(TopicError::UnknownCommandTopic)?;
    let thing = DeviceId::parse(thing).map_err(TopicError::Thing)?;
    let rest = rest
        .strip_prefix("executions/")
        .ok_or(TopicError::UnknownCommandTopic)?;
    let (execution_id, path) = rest
        .split_once('/')
        .ok_or(TopicError::UnknownCommandTopic)?;
    if !valid_execution_id(execution_id) {
        return Err(TopicError::UnknownCommandTopic);
    }
    let channel = [
        CommandChannel::Request,
        CommandChannel::Response,
        CommandChannel::Accepted,
        CommandChannel::Rejected,
    ]
    .into_iter()
    .find(|c| c.path() == path)
    .ok_or(TopicError::UnknownCommandTopic)?;
    Ok(Topic::Command(CommandTopic {
        thing,
        execution_id: execution_id.to_owned(),
        channel,
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShadowOp {
    Update,
    Get,
    Delete,
}

impl ShadowOp {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Update => "update",
            Self::Get => "get",
            Self::Delete => "delete",
        }
    }
}

/// The part after the operation: none for a request, else a response channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShadowChannel {
    Request,
    Accepted,
    Rejected,
    Delta,
    Documents,
}

impl ShadowChannel {
    pub const fn suffix(self) -> &'static str {
        match self {
            Self::Request => "",
            Self::Accepted => "/accepted",
            Self::Rejected => "/rejected",
            Self::Delta => "/delta",
            Self::Documents => "/documents",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShadowTopic {
    pub thing: DeviceId,
    pub shadow: ShadowName,
    pub op: ShadowOp,
    pub channel: ShadowChannel,
}

impl ShadowTopic {
    pub fn new(thing: DeviceId, shadow: ShadowName, op: ShadowOp, channel: ShadowChannel) -> Self {
        Self {
            thing,
            shadow,
            op,
            channel,
        }
    }

    pub fn format(&self) -> String {
        format_shadow_topic(&self.thing, &self.shadow, self.op, self.channel)
    }
}

/// Formats a shadow topic without building a [`ShadowTopic`].
pub fn format_shadow_topic(
    thing: &DeviceId,
    shadow: &ShadowName,
    op: ShadowOp,
    channel: ShadowChannel,
) -> String {
    let mut s = String::with_capacity(64);
    s.push_str(THINGS_PREFIX);
    s.push_str(thing.as_str());
    s.push_str("/shadow");
    if let Some(name) = shadow.name() {
        let _ = write!(s, "/name/{name}");
    }
    s.push('/');
    s.push_str(op.as_str());
    s.push_str(channel.suffix());
    s
}

/// The AWS IoT Jobs device API.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum JobOp {
    /// `jobs/notify`: the pending executions changed (Doppel → device).
    Notify,
    /// `jobs/notify-next`: the next pending execution changed (Doppel → device).
    NotifyNext,
    /// `jobs/get`: the pending executions.
    GetPending,
    /// `jobs/start-next`: start (or resume) the next pending execution.
    StartNext,
    /// `jobs/{jobId}/get`; `$next` for the next pending one.
    Describe(String),
    /// `jobs/{jobId}/update`.
    Update(String),
}

impl JobOp {
    fn path(&self) -> String {
        match self {
            Self::Notify => "notify".into(),
            Self::NotifyNext => "notify-next".into(),
            Self::GetPending => "get".into(),
            Self::StartNext => "start-next".into(),
            Self::Describe(job) => format!("{job}/get"),
            Self::Update(job) => format!("{job}/update"),
        }
    }
}

/// Request, or one of its answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobChannel {
    Request,
    Accepted,
    Rejected,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobTopic {
    pub thing: DeviceId,
    pub op: JobOp,
    pub channel: JobChannel,
}

impl JobTopic {
    pub fn format(&self) -> String {
        let suffix = match self.channel {
            JobChannel::Request => "",
            JobChannel::Accepted => "/accepted",
            JobChannel::Rejected => "/rejected",
        };
        format!(
            "{THINGS_PREFIX}{}/jobs/{}{suffix}",
            self.thing,
            self.op.path()
        )
    }
}

/// Whether `id` can be a job id: 1-64 of `A-Z a-z 0-9 _ -`.
pub fn valid_job_id(id: &str) -> bool {
    valid_execution_id(id)
}

fn parse_job(thing: DeviceId, rest: &str) -> Result<Topic, TopicError> {
    let (path, channel) = match rest.rsplit_once('/') {
        Some((p, "accepted")) => (p, JobChannel::Accepted),
        Some((p, "rejected")) => (p, JobChannel::Rejected),
        _ => (rest, JobChannel::Request),
    };
    let op = match path.split_once('/') {
        None => match path {
            "notify" => JobOp::Notify,
            "notify-next" => JobOp::NotifyNext,
            "get" => JobOp::GetPending,
            "start-next" => JobOp::StartNext,
            _ => return Err(TopicError::UnknownJobTopic),
        },
        Some((job, op)) if job == "$next" || valid_job_id(job) => match op {
            "get" => JobOp::Describe(job.to_owned()),
            "update" if job != "$next" => JobOp::Update(job.to_owned()),
            _ => return Err(TopicError::UnknownJobTopic),
        },
        Some(_) => return Err(TopicError::UnknownJobTopic),
    };
    if matches!(op, JobOp::Notify | JobOp::NotifyNext) && channel != JobChannel::Request {
        return Err(TopicError::UnknownJobTopic);
    }
    Ok(Topic::Job(JobTopic { thing, op, channel }))
}

/// A topic of the device API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    Shadow(ShadowTopic),
    Command(CommandTopic),
    Job(JobTopic),
    /// Any other topic in the thing's namespace (jobs, commands, ... later).
    Other {
        thing: DeviceId,
        rest: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is not under $aws/things/ or $aws/commands/things/")]
    NotAThingTopic,
    #[error("bad thing name in topic: {0}")]
    Thing(NameError),
    #[error("bad shadow name in topic: {0}")]
    ShadowName(NameError),
    #[error("unknown shadow topic")]
    UnknownShadowTopic,
    #[error("unknown command topic")]
    UnknownCommandTopic,
    #[error("unknown jobs topic")]
    UnknownJobTopic,
}

pub fn parse(topic: &str) -> Result<Topic, TopicError> {
    if let Some(rest) = topic.strip_prefix(COMMANDS_PREFIX) {
        return parse_command(rest);
    }
    let rest = topic
        .strip_prefix(THINGS_PREFIX)
        .ok_or(TopicError::NotAThingTopic)?;
    let (thing, rest) = rest.split_once('/').ok_or(TopicError::NotAThingTopic)?;
    let thing = DeviceId::parse(thing).map_err(TopicError::Thing)?;
    if let Some(jobs) = rest.strip_prefix("jobs/") {
        return parse_job(thing, jobs);
    }
    let Some(shadow_rest) = rest.strip_prefix("shadow/") else {
        return Ok(Topic::Other {
            thing,
            rest: rest.to_owned(),
        });
    };
    let (shadow, op_rest) = match shadow_rest.strip_prefix("name/") {
        Some(named) => {
            let (name, op_rest) = named
                .split_once('/')
                .ok_or(TopicError::UnknownShadowTopic)?;
            (
                ShadowName::named(name).map_err(TopicError::ShadowName)?,
                op_rest,
            )
        }
        None => (ShadowName::classic(), shadow_rest),
    };
    let (op, channel) = match op_rest.split_once('/') {
        Some((op, ch)) => (op, Some(ch)),
        None => (op_rest, None),
    };
    let op = match op {
        "update" => ShadowOp::Update,
        "get" => ShadowOp::Get,
        "delete" => ShadowOp::Delete,
        _ => return Err(TopicError::UnknownShadowTopic),
    };
    let channel = match (op, channel) {
        (_, None) => ShadowChannel::Request,
        (_, Some("accepted")) => ShadowChannel::Accepted,
        (_, Some("rejected")) => ShadowChannel::Rejected,
        (ShadowOp::Update, Some("delta")) => ShadowChannel::Delta,
        (ShadowOp::Update, Some("documents")) => ShadowChannel::Documents,
        _ => return Err(TopicError::UnknownShadowTopic),
    };
    Ok(Topic::Shadow(ShadowTopic {
        thing,
        shadow,
        op,
        channel,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    #[test]
    fn parses_and_formats_every_shadow_topic() {
        let ops = [ShadowOp::Update, ShadowOp::Get, ShadowOp::Delete];
        let channels = [
            ShadowChannel::Request,
            ShadowChannel::Accepted,
            ShadowChannel::Rejected,
            ShadowChannel::Delta,
            ShadowChannel::Documents,
        ];
        for shadow in [ShadowName::classic(), ShadowName::named("cfg").unwrap()] {
            for op in ops {
                for ch in channels {
                    let t = ShadowTopic::new(id("lamp-1"), shadow.clone(), op, ch);
                    let s = t.format();
                    let parsed = parse(&s);
                    let valid = op == ShadowOp::Update
                        || !matches!(ch, ShadowChannel::Delta | ShadowChannel::Documents);
                    if valid {
                        assert_eq!(parsed, Ok(Topic::Shadow(t)), "{s}");
                    } else {
                        assert_eq!(parsed, Err(TopicError::UnknownShadowTopic), "{s}");
                    }
                }
            }
        }
        assert_eq!(
            format_shadow_topic(
                &id("a"),
                &ShadowName::named("n").unwrap(),
                ShadowOp::Update,
                ShadowChannel::Delta
            ),
            "$aws/things/a/shadow/name/n/update/delta"
        );
    }

    #[test]
    fn parses_and_formats_every_command_topic() {
        for channel in [
            CommandChannel::Request,
            CommandChannel::Response,
            CommandChannel::Accepted,
            CommandChannel::Rejected,
        ] {
            let t = CommandTopic {
                thing: id("lamp-1"),
                execution_id: "0190a1b2c3d4-7f3a".into(),
                channel,
            };
            assert_eq!(parse(&t.format()), Ok(Topic::Command(t.clone())));
        }
        assert_eq!(
            CommandTopic {
                thing: id("a"),
                execution_id: "e1".into(),
                channel: CommandChannel::Accepted
            }
            .format(),
            "$aws/commands/things/a/executions/e1/response/accepted/json"
        );
        for bad in [
            "$aws/commands/things/a/executions/e1/response/cbor",
            "$aws/commands/things/a/executions/e1",
            "$aws/commands/things/a/jobs/e1/request/json",
            "$aws/commands/things/a/executions/e.1/request/json",
            "$aws/commands/things/a",
        ] {
            assert_eq!(parse(bad), Err(TopicError::UnknownCommandTopic), "{bad}");
        }
    }

    #[test]
    fn parses_and_formats_every_jobs_topic() {
        let ops = [
            JobOp::GetPending,
            JobOp::StartNext,
            JobOp::Describe("fw-2".into()),
            JobOp::Describe("$next".into()),
            JobOp::Update("fw-2".into()),
        ];
        for op in ops {
            for channel in [
                JobChannel::Request,
                JobChannel::Accepted,
                JobChannel::Rejected,
            ] {
                let t = JobTopic {
                    thing: id("pump-1"),
                    op: op.clone(),
                    channel,
                };
                assert_eq!(
                    parse(&t.format()),
                    Ok(Topic::Job(t.clone())),
                    "{}",
                    t.format()
                );
            }
        }
        for op in [JobOp::Notify, JobOp::NotifyNext] {
            let t = JobTopic {
                thing: id("pump-1"),
                op,
                channel: JobChannel::Request,
            };
            assert_eq!(parse(&t.format()), Ok(Topic::Job(t.clone())));
        }
        assert_eq!(
            JobTopic {
                thing: id("a"),
                op: JobOp::Describe("$next".into()),
                channel: JobChannel::Accepted
            }
            .format(),
            "$aws/things/a/jobs/$next/get/accepted"
        );
        for bad in [
            "$aws/things/a/jobs/$next/update",
            "$aws/things/a/jobs/notify/accepted",
            "$aws/things/a/jobs/fw.2/get",
            "$aws/things/a/jobs/fw/run",
            "$aws/things/a/jobs/list",
        ] {
            assert_eq!(parse(bad), Err(TopicError::UnknownJobTopic), "{bad}");
        }
    }

    #[test]
    fn other_and_bad_topics() {
        assert_eq!(
            parse("$aws/things/t1/defender/metrics/json"),
            Ok(Topic::Other {
                thing: id("t1"),
                rest: "defender/metrics/json".into()
            })
        );
        assert_eq!(parse("a/b"), Err(TopicError::NotAThingTopic));
        assert!(matches!(
            parse("$aws/things/+/shadow/get"),
            Err(TopicError::Thing(_))
        ));
        assert_eq!(
            parse("$aws/things/t/shadow/fly"),
            Err(TopicError::UnknownShadowTopic)
        );
        assert_eq!(
            parse("$aws/things/t/shadow/get/accepted/x"),
            Err(TopicError::UnknownShadowTopic)
        );
    }
}
