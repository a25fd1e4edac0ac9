//! `ShardSupervisor`: owns the resident twins of one shard.
//!
//! Messages: [`ShardMsg`]. Children: the `DeviceTwin`s of its things, linked, so that a
//! panicking twin is reported here. Invariants:
//! - at most one live twin per thing: a twin being passivated is drained (it finishes its
//!   mailbox) and a new one for the same thing is spawned only after it has stopped;
//!   messages for it wait here meanwhile;
//! - at most `max_resident` twins: activating one more passivates the least recently used;
//! - twins idle longer than `idle_timeout` are passivated on the next tick;
//! - a twin passivated with a command or job deadline ahead (or not loaded since the
//!   server started) is woken for it by the tick after the deadline, so that timeouts do
//!   not wait for the device's next message;
//! - a twin that panicked is forgotten; the next message activates a fresh one, which
//!   loads the last persisted state;
//! - a placement partition given up (the cluster hands it to another node) has its twins
//!   passivated, and the answer comes once they have all stopped; their deadlines go with
//!   the partition (its new owner wakes them).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ractor::{
    Actor, ActorId, ActorProcessingErr, ActorRef, MessagingErr, RpcReplyPort, SupervisionEvent,
};
use tokio::time::Instant;
use twin_model::DeviceId;

use crate::device::{DeviceArgs, DeviceMsg, DeviceTwin, Mail};
use crate::fleet::TwinContext;
use crate::telemetry::{self, Queued};

/// The shard of a thing, from its stable hash.
pub fn shard_for(thing: &DeviceId, shard_count: usize) -> usize {
    (thing.stable_hash() % shard_count.max(1) as u64) as usize
}

pub enum ShardMsg {
    /// A message for the thing's twin (counted in the shard's mailbox until taken).
    Route(DeviceId, DeviceMsg, Queued),
    /// Passivates idle twins.
    Tick,
    /// How many twins are resident.
    Resident(RpcReplyPort<usize>),
    /// Wake the thing's twin at this time (a deadline found in the store at start).
    Alarm(u64, DeviceId),
    /// Passivates the twins of a placement partition; answers once they have stopped.
    GiveUp(u16, RpcReplyPort<()>),
}

pub struct ShardSupervisor;

pub struct ShardArgs {
    pub ctx: Arc<TwinContext>,
    pub max_resident: usize,
    pub idle_timeout: Duration,
}

struct Resident {
    actor: ActorRef<Mail>,
    stamp: u64,
    last_used: Instant,
}

pub struct ShardState {
    ctx: Arc<TwinContext>,
    max_resident: usize,
    idle_timeout: Duration,
    twins: HashMap<DeviceId, Resident>,
    /// Least recently used first.
    lru: BTreeMap<u64, DeviceId>,
    clock: u64,
    /// Live twins (resident or stopping), with their deadline.
    by_actor: HashMap<ActorId, (DeviceId, Arc<AtomicU64>)>,
    /// Things whose twin is stopping, with the messages that arrived meanwhile.
    stopping: HashMap<DeviceId, Vec<DeviceMsg>>,
    /// Deadlines of twins that are not resident, soonest first.
    alarms: BTreeSet<(u64, DeviceId)>,
    /// Partitions being given up: the things still stopping, and who waits for them.
    giving_up: Vec<GivingUp>,
}

struct GivingUp {
    partition: u16,
    stopping: BTreeSet<DeviceId>,
    reply: RpcReplyPort<()>,
}

impl ShardState {
    fn touch(&mut self, thing: &DeviceId) {
        if let Some(r) = self.twins.get_mut(thing) {
            self.lru.remove(&r.stamp);
            self.clock += 1;
            r.stamp = self.clock;
            r.last_used = Instant::now();
            self.lru.insert(self.clock, thing.clone());
        }
    }

    fn passivate(&mut self, thing: &DeviceId) {
        if let Some(r) = self.twins.remove(thing) {
            self.lru.remove(&r.stamp);
            telemetry::twin_passivated();
            // Drain: the twin handles what is already in its mailbox, then stops.
            if r.actor.drain().is_ok() {
                self.stopping.entry(thing.clone()).or_default();
            } else {
                self.forget(&r.actor.get_id());
            }
        }
    }

    async fn activate(
        &mut self,
        myself: &ActorRef<ShardMsg>,
        thing: &DeviceId,
    ) -> Result<ActorRef<Mail>, ActorProcessingErr> {
        while self.twins.len() >= self.max_resident {
            let Some((_, oldest)) = self.lru.pop_first() else {
                break;
            };
            self.passivate(&oldest);
        }
        let next_deadline = Arc::new(AtomicU64::new(0));
        let args = DeviceArgs {
            thing: thing.clone(),
            ctx: self.ctx.clone(),
            next_deadline: next_deadline.clone(),
        };
        let (actor, _) = Actor::spawn_linked(None, DeviceTwin, args, myself.get_cell()).await?;
        telemetry::twin_activated();
        self.clock += 1;
        self.by_actor
            .insert(actor.get_id(), (thing.clone(), next_deadline));
        self.lru.insert(self.clock, thing.clone());
        self.twins.insert(
            thing.clone(),
            Resident {
                actor: actor.clone(),
                stamp: self.clock,
                last_used: Instant::now(),
            },
        );
        Ok(actor)
    }

    async fn route(
        &mut self,
        myself: &ActorRef<ShardMsg>,
        thing: DeviceId,
        msg: DeviceMsg,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(waiting) = self.stopping.get_mut(&thing) {
            waiting.push(msg);
            return Ok(());
        }
        let mut msg = msg;
        // A twin can die between its last message and our hearing of it: retry once with
        // a fresh twin.
        for _ in 0..2 {
            let actor = match self.twins.get(&thing) {
                Some(r) => r.actor.clone(),
                None => self.activate(myself, &thing).await?,
            };
            self.touch(&thing);
            match actor.send_message(Mail::from(msg)) {
                Ok(()) => return Ok(()),
                Err(MessagingErr::SendErr(back)) => {
                    self.forget(&actor.get_id());
                    msg = back.take();
                }
                Err(_) => return Ok(()),
            }
        }
        Ok(())
    }

    /// Wakes the passivated twins whose deadline has come; a twin that is resident again
    /// has set its own timer when it loaded.
    async fn wake_due(&mut self, myself: &ActorRef<ShardMsg>) -> Result<(), ActorProcessingErr> {
        let now = self.ctx.now_millis();
        while let Some(first) = self.alarms.first() {
            if first.0 > now {
                break;
            }
            let (_, thing) = self.alarms.pop_first().expect("seen above");
            if !self.twins.contains_key(&thing) {
                self.route(myself, thing, DeviceMsg::Clock).await?;
            }
        }
        Ok(())
    }

    /// Removes a stopped or failed twin, keeping its deadline; returns the messages that
    /// waited for it.
    fn forget(&mut self, id: &ActorId) -> Option<(DeviceId, Vec<DeviceMsg>)> {
        let (thing, next_deadline) = self.by_actor.remove(id)?;
        telemetry::twin_stopped();
        let at = next_deadline.load(Ordering::Relaxed);
        let given_up = self.stopped_for_give_up(&thing);
        if at != 0 && !given_up {
            self.alarms.insert((at, thing.clone()));
        }
        if self
            .twins
            .get(&thing)
            .is_some_and(|r| r.actor.get_id() == *id)
        {
            let r = self.twins.remove(&thing).expect("checked above");
            self.lru.remove(&r.stamp);
        }
        let waiting = self.stopping.remove(&thing).unwrap_or_default();
        Some((thing, waiting))
    }

    /// Starts giving `partition` up: passivates its resident twins and forgets its
    /// deadlines; answers `reply` once none of its twins is live.
    fn give_up(&mut self, partition: u16, reply: RpcReplyPort<()>) {
        let ours = |thing: &DeviceId| thing.partition() == partition;
        let resident: Vec<DeviceId> = self.twins.keys().filter(|t| ours(t)).cloned().collect();
        for thing in &resident {
            self.passivate(thing);
        }
        self.alarms.retain(|(_, thing)| !ours(thing));
        let stopping: BTreeSet<DeviceId> =
            self.stopping.keys().filter(|t| ours(t)).cloned().collect();
        if stopping.is_empty() {
            let _ = reply.send(());
        } else {
            self.giving_up.push(GivingUp {
                partition,
                stopping,
                reply,
            });
        }
    }

    /// Notes that `thing`'s twin stopped; answers the partitions given up that waited for
    /// it last. True when its partition is being given up.
    fn stopped_for_give_up(&mut self, thing: &DeviceId) -> bool {
        let partition = thing.partition();
        let mut given_up = false;
        for g in self
            .giving_up
            .iter_mut()
            .filter(|g| g.partition == partition)
        {
            g.stopping.remove(thing);
            given_up = true;
        }
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.giving_up)
            .into_iter()
            .partition(|g| g.stopping.is_empty());
        self.giving_up = waiting;
        for g in done {
            let _ = g.reply.send(());
        }
        given_up
    }
}

impl Actor for ShardSupervisor {
    type Msg = ShardMsg;
    type State = ShardState;
    type Arguments = ShardArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ShardMsg>,
        args: ShardArgs,
    ) -> Result<ShardState, ActorProcessingErr> {
        let period =
            (args.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        myself.send_interval(period, || ShardMsg::Tick);
        Ok(ShardState {
            ctx: args.ctx,
            max_resident: args.max_resident.max(1),
            idle_timeout: args.idle_timeout,
            twins: HashMap::new(),
            lru: BTreeMap::new(),
            clock: 0,
            by_actor: HashMap::new(),
            stopping: HashMap::new(),
            alarms: BTreeSet::new(),
            giving_up: Vec::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ShardMsg>,
        msg: ShardMsg,
        state: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ShardMsg::Route(thing, msg, queued) => {
                drop(queued);
                state.route(&myself, thing, msg).await?
            }
            ShardMsg::Tick => {
                let now = Instant::now();
                let idle: Vec<DeviceId> = state
                    .lru
                    .values()
                    .take_while(|t| {
                        state
                            .twins
                            .get(*t)
                            .is_some_and(|r| now.duration_since(r.last_used) >= state.idle_timeout)
                    })
                    .cloned()
                    .collect();
                for thing in idle {
                    state.passivate(&thing);
                }
                state.wake_due(&myself).await?;
            }
            ShardMsg::Resident(reply) => {
                let _ = reply.send(state.twins.len());
            }
            ShardMsg::Alarm(at, thing) => {
                state.alarms.insert((at, thing));
            }
            ShardMsg::GiveUp(partition, reply) => state.give_up(partition, reply),
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<ShardMsg>,
        evt: SupervisionEvent,
        state: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failure) = match evt {
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, None),
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(err)),
            _ => return Ok(()),
        };
        if let Some((thing, waiting)) = state.forget(&cell.get_id()) {
            if let Some(err) = failure {
                tracing::error!(%thing, error = %err, "twin failed; it restarts from its persisted state");
            }
            for msg in waiting {
                state.route(&myself, thing.clone(), msg).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharding_is_stable_and_spread() {
        let id = DeviceId::parse("sensor-42").unwrap();
        assert_eq!(shard_for(&id, 64), shard_for(&id, 64));
        assert_eq!(shard_for(&id, 1), 0);
        // Pinned: changing the hash would move every twin to another shard.
        assert_eq!(
            (shard_for(&id, 1_000_003), shard_for(&id, 64)),
            (708_482, 16)
        );
        let mut counts = [0usize; 8];
        for i in 0..8000 {
            counts[shard_for(&DeviceId::parse(&format!("dev-{i}")).unwrap(), 8)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }
}
