//! The schema executed directly (`schema.execute`) over a real fleet on a real store.
//!
//! Over 600 lines: one test binary for the whole schema, so that the fixture (a fleet over a real
//! store) is built once in code; each test is independent.

use std::sync::Arc;

use async_graphql::futures_util::StreamExt;
use serde_json::{Value, json};
use twin_actors::{FleetConfig, FleetHandle};
use twin_graphql::{Api, ApiLimits, DoppelSchema, Principal, Role, Tokens};
use twin_model::history::Origin;
use twin_model::{DeviceId, Limits, ShadowName, UpdateRequest};
use twin_store::testing::CrashAfter;
use twin_store::{Committer, EmbeddedStore};

struct Fixture {
    schema: DoppelSchema,
    fleet: FleetHandle,
    /// The store under the fleet: the embedded store, with a switch to fail job reads.
    store: Arc<CrashAfter>,
    dir: Arc<tempfile::TempDir>,
    commits: tokio::task::JoinHandle<()>,
}

async fn fixture_in(dir: Arc<tempfile::TempDir>, config: FleetConfig) -> Fixture {
    let config = FleetConfig {
        device_ca_dir: Some(dir.path().to_owned()),
        ..config
    };
    let embedded = EmbeddedStore::open(dir.path(), 100).unwrap();
    let store = Arc::new(CrashAfter::new(Arc::new(embedded), usize::MAX));
    let (committer, commits) = Committer::start(store.clone(), 1024, 256);
    let fleet = FleetHandle::start(config, committer).await.unwrap();
    let tokens = Arc::new(Tokens::open(dir.path()).unwrap());
    let limits = ApiLimits {
        max_page_size: 5,
        max_depth: 7,
        max_complexity: 60,
        ..ApiLimits::default()
    };
    let signer = Arc::new(twin_graphql::Signer::open(dir.path()).unwrap());
    let schema = twin_graphql::build(Api {
        fleet: fleet.clone(),
        tokens,
        limits,
        signer,
        cluster: None,
    });
    Fixture {
        schema,
        fleet,
        store,
        dir,
        commits,
    }
}

async fn fixture() -> Fixture {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    fixture_in(dir, FleetConfig::default()).await
}

impl Fixture {
    /// A subscription (or any request) run by a viewer, as a stream of responses.
    fn viewer_stream(
        &self,
        query: &str,
    ) -> async_graphql::futures_util::stream::BoxStream<'static, async_graphql::Response> {
        self.schema
            .execute_stream(async_graphql::Request::new(query).data(Principal::new(
                Role::Viewer,
                "test",
                None,
            )))
    }

    /// Stops like a server: the store is closed when this returns.
    async fn close(self) {
        self.fleet.shutdown().await;
        drop(self.schema);
        drop(self.fleet);
        self.commits.await.unwrap();
    }

    async fn run_as(&self, role: Option<Role>, query: &str, vars: Value) -> Value {
        let mut req =
            async_graphql::Request::new(query).variables(async_graphql::Variables::from_json(vars));
        if let Some(role) = role {
            req = req.data(Principal::new(role, "test", None));
        }
        serde_json::to_value(self.schema.execute(req).await).unwrap()
    }

    async fn admin(&self, query: &str, vars: Value) -> Value {
        let r = self.run_as(Some(Role::Admin), query, vars).await;
        assert!(r.get("errors").is_none(), "{query}: {r}");
        r["data"].clone()
    }

    async fn register(&self, id: &str, attributes: Value) -> String {
        let d = self
            .admin(
                "mutation($id: ID!, $a: JSON) { registerThing(id: $id, attributes: $a) { secret thing { id } } }",
                json!({"id": id, "a": attributes}),
            )
            .await;
        d["registerThing"]["secret"].as_str().unwrap().to_owned()
    }

    /// A telemetry reading of `id` on `dt/app/{id}/env`, as the MQTT endpoint passes it.
    async fn telemetry(&self, id: &str, body: Value) {
        let reading = twin_model::telemetry::Reading::parse(
            body.to_string().as_bytes(),
            twin_store::now_millis(),
            6,
        )
        .unwrap();
        self.fleet
            .telemetry()
            .record(
                &DeviceId::parse(id).unwrap(),
                twin_actors::TelemetryMessage {
                    reading,
                    topic: format!("dt/app/{id}/env"),
                    kind: Some("env".into()),
                    route: None,
                },
            )
            .await
            .unwrap();
    }

    async fn report(&self, id: &str, reported: Value) {
        let body = json!({"state": {"reported": reported}}).to_string();
        let req = UpdateRequest::parse(body.as_bytes(), &Limits::default()).unwrap();
        self.fleet
            .shadows()
            .update(
                &DeviceId::parse(id).unwrap(),
                ShadowName::classic(),
                req,
                Origin::Device,
            )
            .await
            .unwrap();
    }
}

/// The `extensions.code` of the first error.
fn code(r: &Value) -> &str {
    r["errors"][0]["extensions"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {r}"))
}

#[tokio::test]
async fn registry_mutations_and_thing_queries() {
    let f = fixture().await;
    let secret = f.register("press-1", json!({"site": "plant-7"})).await;
    assert_eq!(secret.len(), 64);

    let q = "query($id: ID!) { thing(id: $id) { id enabled attributes version createdAt connectivity { connected since lastSeen } shadows { version } } }";
    let d = f.admin(q, json!({"id": "press-1"})).await;
    let t = &d["thing"];
    assert_eq!(t["attributes"], json!({"site": "plant-7"}));
    assert_eq!(t["enabled"], true);
    assert_eq!(t["version"], 0);
    assert_eq!(t["connectivity"]["connected"], false);
    assert_eq!(t["shadows"], json!([]));
    assert!(t["createdAt"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        f.admin(q, json!({"id": "nobody"})).await["thing"],
        Value::Null
    );

    // Attributes merge; null deletes.
    let d = f
        .admin(
            r#"mutation { updateThingAttributes(id: "press-1", attributes: {line: 3, site: null}) { attributes } }"#,
            json!({}),
        )
        .await;
    assert_eq!(d["updateThingAttributes"]["attributes"], json!({"line": 3}));

    let d = f
        .admin(
            r#"mutation { disableThing(id: "press-1") { enabled } }"#,
            json!({}),
        )
        .await;
    assert_eq!(d["disableThing"]["enabled"], false);
    let d = f
        .admin(
            r#"mutation { enableThing(id: "press-1") { enabled } }"#,
            json!({}),
        )
        .await;
    assert_eq!(d["enableThing"]["enabled"], true);

    // A rotated secret replaces the old one at connect.
    let d = f
        .admin(
            r#"mutation { rotateThingSecret(id: "press-1") { secret } }"#,
            json!({}),
        )
        .await;
    let rotated = d["rotateThingSecret"]["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(rotated, secret);
    let id = DeviceId::parse("press-1").unwrap();
    assert!(f.fleet.sessions().connect(&id, Some(secret)).await.is_err());
    assert!(f.fleet.sessions().connect(&id, Some(rotated)).await.is_ok());

    // Registering twice is a conflict; unknown things are not found; bad ids are invalid.
    let r = f
        .run_as(
            Some(Role::Admin),
            r#"mutation { registerThing(id: "press-1") { secret } }"#,
            json!({}),
        )
        .await;
    assert_eq!(code(&r), "VERSION_CONFLICT");
    let r = f
        .run_as(
            Some(Role::Admin),
            r#"mutation { disableThing(id: "ghost") { id } }"#,
            json!({}),
        )
        .await;
    assert_eq!(code(&r), "NOT_FOUND");
    let r = f
        .run_as(
            Some(Role::Admin),
            r#"mutation { registerThing(id: "bad id!") { secret } }"#,
            json!({}),
        )
        .await;
    assert_eq!(code(&r), "INVALID_ARGUMENT");
    let big = "x".repeat(10_000);
    let r = f
        .run_as(
            Some(Role::Admin),
            "mutation($a: JSON) { registerThing(id: \"big\", attributes: $a) { secret } }",
            json!({"a": {"blob": big}}),
        )
        .await;
    assert_eq!(code(&r), "PAYLOAD_TOO_LARGE");

    // Deleting removes the thing and its shadows; it can be registered anew.
    f.report("press-1", json!({"temp": 20})).await;
    let d = f
        .admin(r#"mutation { deleteThing(id: "press-1") }"#, json!({}))
        .await;
    assert_eq!(d["deleteThing"], "press-1");
    assert_eq!(
        f.admin(q, json!({"id": "press-1"})).await["thing"],
        Value::Null
    );
    let r = f
        .run_as(
            Some(Role::Admin),
            r#"mutation { deleteThing(id: "press-1") }"#,
            json!({}),
        )
        .await;
    assert_eq!(code(&r), "NOT_FOUND");
    f.register("press-1", json!({})).await;
    let d = f.admin(q, json!({"id": "press-1"})).await;
    assert_eq!(d["thing"]["shadows"], json!([]));
}

#[tokio::test]
async fn update_desired_has_shadow_semantics() {
    let f = fixture().await;
    f.register("lamp", json!({})).await;
    f.report("lamp", json!({"power": "off", "level": 1})).await;

    let m = "mutation($d: JSON!, $v: Int, $s: String) { updateDesired(id: \"lamp\", shadow: $s, desired: $d, expectedVersion: $v, clientToken: \"t1\") { name desired reported delta version metadata updatedAt } }";
    let d = f.admin(m, json!({"d": {"power": "on"}, "v": 1})).await;
    let s = &d["updateDesired"];
    assert_eq!(s["version"], 2);
    assert_eq!(s["name"], Value::Null);
    assert_eq!(s["delta"], json!({"power": "on"}));
    assert_eq!(s["reported"], json!({"power": "off", "level": 1}));
    assert!(s["metadata"]["desired"]["power"]["timestamp"].is_u64());

    let r = f
        .run_as(
            Some(Role::Operator),
            m,
            json!({"d": {"power": "off"}, "v": 1}),
        )
        .await;
    assert_eq!(code(&r), "VERSION_CONFLICT");
    let r = f
        .run_as(Some(Role::Operator), m, json!({"d": [1, 2]}))
        .await;
    assert_eq!(code(&r), "INVALID_ARGUMENT", "{r}");
    let r = f
        .run_as(
            Some(Role::Operator),
            m,
            json!({"d": {"blob": "x".repeat(9000)}}),
        )
        .await;
    assert_eq!(code(&r), "PAYLOAD_TOO_LARGE");
    let r = f
        .run_as(
            Some(Role::Operator),
            m,
            json!({"d": {"a": 1}, "s": "bad/name"}),
        )
        .await;
    assert_eq!(code(&r), "INVALID_ARGUMENT");

    // Null deletes the desired key; the delta is gone.
    let d = f.admin(m, json!({"d": {"power": null}})).await;
    assert_eq!(d["updateDesired"]["delta"], Value::Null);
    assert_eq!(d["updateDesired"]["version"], 3);

    // Named shadows, and their deletion (the version is kept).
    let d = f
        .admin(m, json!({"d": {"v": "2.0"}, "s": "firmware"}))
        .await;
    assert_eq!(d["updateDesired"]["name"], "firmware");
    let q = r#"{ thing(id: "lamp") { version shadows { name version } shadow(name: "firmware") { desired } } }"#;
    let d = f.admin(q, json!({})).await;
    assert_eq!(d["thing"]["version"], 4);
    assert_eq!(
        d["thing"]["shadows"],
        json!([{"name": null, "version": 3}, {"name": "firmware", "version": 1}])
    );
    let d = f
        .admin(
            r#"mutation { deleteShadow(id: "lamp", shadow: "firmware") { thingId shadow version } }"#,
            json!({}),
        )
        .await;
    assert_eq!(
        d["deleteShadow"],
        json!({"thingId": "lamp", "shadow": "firmware", "version": 1})
    );
    let r = f
        .run_as(
            Some(Role::Operator),
            r#"mutation { deleteShadow(id: "lamp", shadow: "firmware") { version } }"#,
            json!({}),
        )
        .await;
    assert_eq!(code(&r), "NOT_FOUND");
    let r = f
        .run_as(
            Some(Role::Operator),
            r#"mutation { updateDesired(id: "ghost", desired: {a: 1}) { version } }"#,
            json!({}),
        )
        .await;
    assert_eq!(code(&r), "NOT_FOUND");
}

#[tokio::test]
async fn things_filters_and_pages_over_the_whole_fleet() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    {
        let f = fixture_in(dir.clone(), FleetConfig::default()).await;
        for i in 0..12 {
            let site = if i % 3 == 0 { "plant-7" } else { "plant-1" };
            f.register(&format!("m{i:02}"), json!({"site": site})).await;
            f.report(&format!("m{i:02}"), json!({"temp": 20 + i})).await;
        }
        f.close().await;
    }
    // A new server over the same data: the index is rebuilt from the store.
    let f = fixture_in(dir, FleetConfig::default()).await;
    let q = "query($f: String, $n: Int!, $a: String) { things(filter: $f, first: $n, after: $a) { totalCount edges { cursor node { id } } pageInfo { hasNextPage endCursor } } }";
    let ids = |d: &Value| -> Vec<String> {
        d["things"]["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["node"]["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let d = f
        .admin(
            q,
            json!({"f": "reported.temp > 25 AND attributes.site = \"plant-7\"", "n": 5}),
        )
        .await;
    assert_eq!(ids(&d), ["m06", "m09"]);
    assert_eq!(d["things"]["totalCount"], 2);
    assert_eq!(d["things"]["pageInfo"]["hasNextPage"], false);

    let d = f.admin(q, json!({"n": 5})).await;
    assert_eq!(d["things"]["totalCount"], 12);
    assert_eq!(ids(&d), ["m00", "m01", "m02", "m03", "m04"]);
    let cursor = d["things"]["pageInfo"]["endCursor"].clone();
    let d = f.admin(q, json!({"n": 5, "a": cursor})).await;
    assert_eq!(ids(&d), ["m05", "m06", "m07", "m08", "m09"]);
    assert_eq!(d["things"]["pageInfo"]["hasNextPage"], true);

    let r = f
        .run_as(
            Some(Role::Viewer),
            q,
            json!({"f": "reported.temp >", "n": 5}),
        )
        .await;
    assert_eq!(code(&r), "INVALID_ARGUMENT");
    assert_eq!(r["errors"][0]["extensions"]["position"], 16);
    let r = f.run_as(Some(Role::Viewer), q, json!({"n": 6})).await;
    assert_eq!(code(&r), "INVALID_ARGUMENT");
    assert!(
        r["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("between 1 and 5")
    );
    let r = f
        .run_as(Some(Role::Viewer), q, json!({"n": 5, "a": "not a cursor!"}))
        .await;
    assert_eq!(code(&r), "INVALID_ARGUMENT");
}

#[tokio::test]
async fn roles_and_request_limits() {
    let f = fixture().await;
    f.register("t1", json!({})).await;
    let read = r#"{ thing(id: "t1") { id } }"#;
    let steer = r#"mutation { updateDesired(id: "t1", desired: {a: 1}) { version } }"#;
    let admin = r#"mutation { registerThing(id: "t2") { secret } }"#;

    assert_eq!(
        code(&f.run_as(None, read, json!({})).await),
        "UNAUTHENTICATED"
    );
    assert!(f.run_as(Some(Role::Viewer), read, json!({})).await["errors"].is_null());
    assert_eq!(
        code(&f.run_as(Some(Role::Viewer), steer, json!({})).await),
        "FORBIDDEN"
    );
    assert!(f.run_as(Some(Role::Operator), steer, json!({})).await["errors"].is_null());
    assert_eq!(
        code(&f.run_as(Some(Role::Operator), admin, json!({})).await),
        "FORBIDDEN"
    );
    let r = f
        .run_as(
            Some(Role::Operator),
            "mutation { createToken(role: VIEWER) { token } }",
            json!({}),
        )
        .await;
    assert_eq!(code(&r), "FORBIDDEN");

    // Admins create tokens that authenticate with their role.
    let d = f
        .admin(
            "mutation { createToken(role: OPERATOR, ttlSeconds: 3600) { token role expiresAt } }",
            json!({}),
        )
        .await;
    let token = d["createToken"]["token"].as_str().unwrap();
    let tokens = Tokens::open(f.dir.path()).unwrap();
    assert_eq!(
        tokens.authenticate(Some(token)).await.unwrap().role,
        Role::Operator
    );

    // Too deep, too complex, and plain syntax errors are the caller's: INVALID_ARGUMENT.
    let deep = "{ thing(id: \"t1\") { shadow { name } connectivity { connected } } __schema { types { fields { type { ofType { ofType { ofType { name } } } } } } } }";
    let r = f.run_as(Some(Role::Viewer), deep, json!({})).await;
    assert_eq!(code(&r), "INVALID_ARGUMENT");
    assert!(
        r["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("nested too deep: at most 7 levels (setting graphql_max_depth)"),
        "{r}"
    );
    let complex = "{ things(first: 5) { edges { node { id attributes enabled version createdAt shadows { name desired reported delta metadata version updatedAt } connectivity { connected since lastSeen disconnectReason } } } } }";
    let r = f.run_as(Some(Role::Viewer), complex, json!({})).await;
    assert_eq!(code(&r), "INVALID_ARGUMENT");
    assert!(
        r["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("too complex: at most 60 (one per field, times `first` for pages; setting graphql_max_complexity)"),
        "{r}"
    );
    let r = f
        .run_as(Some(Role::Viewer), "{ thing(id: ", json!({}))
        .await;
    assert_eq!(code(&r), "INVALID_ARGUMENT");
}

#[tokio::test]
async fn subscriptions_deliver_changes_and_say_when_they_lag() {
    let config = FleetConfig {
        event_buffer: 16,
        ..FleetConfig::default()
    };
    let f = fixture_in(Arc::new(tempfile::tempdir().unwrap()), config).await;
    f.register("hot", json!({"site": "a"})).await;
    f.register("cold", json!({"site": "b"})).await;
    let fields = "__typename ... on ShadowChanged { thingId version shadowVersion operation state delta } ... on ConnectivityChanged { thingId connected } ... on Lagged { skipped resumeFromVersion thingId } ... on Subscribed { thingId version }";
    let mut one = f.viewer_stream(&format!(
        r#"subscription {{ thingChanged(id: "hot") {{ {fields} }} }}"#
    ));
    let mut filtered = f.viewer_stream(&format!(
        r#"subscription {{ thingsChanged(filter: "attributes.site = \"b\"") {{ {fields} }} }}"#
    ));
    let mut presence = f.viewer_stream(&format!(
        "subscription {{ connectivityChanged {{ {fields} }} }}"
    ));
    // Every subscription starts with `Subscribed`: from then on it is listening.
    let e = data(&mut one).await;
    assert_eq!(
        e["thingChanged"],
        json!({"__typename": "Subscribed", "thingId": "hot", "version": 0})
    );
    for s in [&mut filtered, &mut presence] {
        let e = data(s).await;
        let event = e.as_object().unwrap().values().next().unwrap();
        assert_eq!(event["__typename"], "Subscribed");
    }

    f.report("hot", json!({"temp": 90})).await;
    f.report("cold", json!({"temp": 1})).await;
    let secret = f
        .admin(
            r#"mutation { rotateThingSecret(id: "cold") { secret } }"#,
            json!({}),
        )
        .await["rotateThingSecret"]["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    f.fleet
        .sessions()
        .connect(&DeviceId::parse("cold").unwrap(), Some(secret))
        .await
        .unwrap();

    let e = data(&mut one).await;
    assert_eq!(e["thingChanged"]["thingId"], "hot");
    assert_eq!(e["thingChanged"]["version"], 1);
    assert_eq!(
        e["thingChanged"]["state"],
        json!({"reported": {"temp": 90}})
    );
    let e = data(&mut filtered).await;
    assert_eq!(e["thingsChanged"]["thingId"], "cold");
    assert_eq!(e["thingsChanged"]["__typename"], "ShadowChanged");
    let e = data(&mut filtered).await;
    assert_eq!(e["thingsChanged"]["__typename"], "ConnectivityChanged");
    let e = data(&mut presence).await;
    assert_eq!(e["connectivityChanged"]["thingId"], "cold");
    assert_eq!(e["connectivityChanged"]["connected"], true);

    // 40 more changes while `one` is not read: more than the 16-event buffer.
    for i in 0..40 {
        f.report("hot", json!({"n": i})).await;
    }
    let e = data(&mut one).await;
    assert_eq!(e["thingChanged"]["__typename"], "Lagged", "{e}");
    assert_eq!(e["thingChanged"]["resumeFromVersion"], 2);
    assert_eq!(e["thingChanged"]["thingId"], "hot");
    assert!(e["thingChanged"]["skipped"].as_u64().unwrap() >= 24);
    // After the signal, the newest events follow, in order.
    let e = data(&mut one).await;
    let v = e["thingChanged"]["version"].as_u64().unwrap();
    assert!(v > 2 && v <= 41, "{e}");
    let e = data(&mut one).await;
    assert_eq!(e["thingChanged"]["version"], v + 1);

    let r = f
        .run_as(
            Some(Role::Viewer),
            r#"subscription { thingChanged(id: "ghost") { __typename } }"#,
            json!({}),
        )
        .await;
    assert_eq!(
        code(&r),
        "INVALID_ARGUMENT",
        "subscriptions cannot be executed as queries"
    );
    let mut missing =
        f.viewer_stream(r#"subscription { thingChanged(id: "ghost") { __typename } }"#);
    let r = serde_json::to_value(missing.next().await.unwrap()).unwrap();
    assert_eq!(code(&r), "NOT_FOUND");
    let mut bad =
        f.viewer_stream(r#"subscription { thingsChanged(filter: "id = ") { __typename } }"#);
    let r = serde_json::to_value(bad.next().await.unwrap()).unwrap();
    assert_eq!(code(&r), "INVALID_ARGUMENT");
}

/// The next response's data, failing on errors.
/// Telemetry comes to `telemetryReceived` (of one thing, or by filter on the thing right
/// after the reading), as the device sent it; the shadow subscriptions do not carry it.
#[tokio::test]
async fn telemetry_subscriptions_deliver_readings_of_one_thing_or_by_filter() {
    let f = fixture().await;
    f.register("hot", json!({"site": "a"})).await;
    f.register("cold", json!({"site": "b"})).await;
    let fields = "__typename ... on TelemetryReceived { thingId topic type values at version } ... on ShadowChanged { thingId } ... on Subscribed { thingId }";
    let mut one = f.viewer_stream(&format!(
        r#"subscription {{ telemetryReceived(id: "cold") {{ {fields} }} }}"#
    ));
    let mut hot = f.viewer_stream(&format!(
        r#"subscription {{ telemetryReceived(filter: "telemetry.temp > 50") {{ {fields} }} }}"#
    ));
    let mut shadows = f.viewer_stream(&format!("subscription {{ thingsChanged {{ {fields} }} }}"));
    for s in [&mut one, &mut hot, &mut shadows] {
        let e = data(s).await;
        let event = e.as_object().unwrap().values().next().unwrap();
        assert_eq!(event["__typename"], "Subscribed");
    }
    let at: u64 = 1_764_000_000_000;
    // A reading of `hot` that its filter does not take yet, one of `cold`, one that it does.
    f.telemetry("hot", json!({"temp": 10, "timestamp": at - 1000}))
        .await;
    f.telemetry("cold", json!({"temp": 3, "timestamp": at + 1}))
        .await;
    f.telemetry(
        "hot",
        json!({"temp": 90, "power": {"watts": 5}, "timestamp": at}),
    )
    .await;
    f.report("cold", json!({"on": true})).await;

    let e = data(&mut one).await;
    assert_eq!(
        e["telemetryReceived"],
        json!({"__typename": "TelemetryReceived", "thingId": "cold",
            "topic": "dt/app/cold/env", "type": "env", "values": {"temp": 3},
            "at": "2025-11-24T16:00:00.001Z", "version": 0})
    );
    let e = data(&mut hot).await;
    assert_eq!(e["telemetryReceived"]["thingId"], "hot");
    assert_eq!(
        e["telemetryReceived"]["values"],
        json!({"temp": 90, "power": {"watts": 5}})
    );
    // Neither reading, only the shadow change, on the shadow subscription.
    let e = data(&mut shadows).await;
    assert_eq!(
        e["thingsChanged"],
        json!({"__typename": "ShadowChanged", "thingId": "cold"})
    );
}

/// Readings have a stream of their own: a flood of them does not push a subscriber of
/// shadow changes out of its buffer.
#[tokio::test]
async fn a_flood_of_readings_does_not_make_shadow_subscribers_lag() {
    let config = FleetConfig {
        event_buffer: 16,
        ..FleetConfig::default()
    };
    let f = fixture_in(Arc::new(tempfile::tempdir().unwrap()), config).await;
    f.register("meter", json!({})).await;
    let mut shadows = f.viewer_stream("subscription { thingsChanged { __typename } }");
    assert_eq!(
        data(&mut shadows).await["thingsChanged"]["__typename"],
        "Subscribed"
    );
    for n in 0..40 {
        f.telemetry("meter", json!({"n": n})).await;
    }
    f.report("meter", json!({"on": true})).await;
    assert_eq!(
        data(&mut shadows).await["thingsChanged"]["__typename"],
        "ShadowChanged"
    );
}

async fn data<S>(s: &mut S) -> Value
where
    S: async_graphql::futures_util::Stream<Item = async_graphql::Response> + Unpin,
{
    let r = tokio::time::timeout(std::time::Duration::from_secs(10), s.next())
        .await
        .expect("an event within 10 s")
        .expect("the stream goes on");
    let r = serde_json::to_value(r).unwrap();
    assert!(r["errors"].is_null(), "{r}");
    r["data"].clone()
}

#[test]
fn the_checked_in_sdl_matches_the_schema() {
    let checked_in = include_str!("../schema.graphql");
    assert!(
        checked_in == twin_graphql::sdl(),
        "graphql/schema.graphql is out of date: run `cargo run -- schema > graphql/schema.graphql`"
    );
}

#[tokio::test]
async fn commands_are_sent_answered_listed_and_watched() {
    let f = fixture().await;
    let secret = f.register("pump-1", json!({})).await;
    let thing = DeviceId::parse("pump-1").unwrap();
    let watch = |id: &str| {
        let req = async_graphql::Request::new(format!(
            r#"subscription {{ commandUpdated(thingId: "{id}") {{ __typename ... on CommandExecution {{ executionId status deliveredAt statusReason {{ reasonCode }} result }} }} }}"#
        ))
        .data(Principal::new(Role::Viewer, "test", None));
        f.schema.execute_stream(req)
    };
    let mut updates = watch("pump-1");
    let live = serde_json::to_value(updates.next().await.unwrap().data).unwrap();
    assert_eq!(live["commandUpdated"]["__typename"], "Subscribed");
    let send = r#"mutation($p: JSON) { sendCommand(thingId: "pump-1", name: "reboot", payload: $p, timeoutSeconds: 30) { executionId status payload timeoutSeconds deliveredAt } }"#;
    let d = f.admin(send, json!({"p": {"delay": 5}})).await;
    let sent = &d["sendCommand"];
    assert_eq!(sent["status"], "CREATED");
    assert_eq!(sent["payload"], json!({"delay": 5}));
    assert_eq!(sent["timeoutSeconds"], 30);
    assert_eq!(sent["deliveredAt"], Value::Null, "the device is offline");
    let id = sent["executionId"].as_str().unwrap().to_owned();
    let next = |e: async_graphql::Response| {
        serde_json::to_value(e.data).unwrap()["commandUpdated"].clone()
    };
    assert_eq!(next(updates.next().await.unwrap())["status"], "CREATED");

    // The device connects and subscribes: the command is delivered, then answered.
    let ok = f
        .fleet
        .sessions()
        .connect(&thing, Some(secret))
        .await
        .unwrap();
    f.fleet.sessions().commands_wanted(&thing, ok.session);
    let delivered = next(updates.next().await.unwrap());
    assert!(delivered["deliveredAt"].is_string(), "{delivered}");
    let respond = |status: &str| {
        let body = json!({"status": status, "result": {"rebooted": {"s": "yes"}}}).to_string();
        f.fleet.commands().respond(
            &thing,
            id.clone(),
            twin_model::command::DeviceResponse::parse(body.as_bytes()),
        )
    };
    respond("SUCCEEDED").await.unwrap();
    let done = next(updates.next().await.unwrap());
    assert_eq!(done["status"], "SUCCEEDED");
    assert_eq!(done["result"], json!({"rebooted": {"s": "yes"}}));

    let q = "query($id: ID!) { command(executionId: $id) { status thingId name completedAt } }";
    let d = f.admin(q, json!({"id": id})).await;
    assert_eq!(d["command"]["status"], "SUCCEEDED");
    assert_eq!(d["command"]["thingId"], "pump-1");
    assert!(d["command"]["completedAt"].is_string());
    assert_eq!(
        f.admin(q, json!({"id": "nope"})).await["command"],
        Value::Null
    );

    // Pages, newest first.
    for _ in 0..3 {
        f.admin(send, json!({})).await;
    }
    let page = "query($after: String) { commands(thingId: \"pump-1\", first: 3, after: $after) { edges { cursor node { executionId status } } pageInfo { hasNextPage endCursor } } }";
    let d = f.admin(page, json!({})).await;
    let first = &d["commands"];
    assert_eq!(first["edges"].as_array().unwrap().len(), 3);
    assert_eq!(first["pageInfo"]["hasNextPage"], true);
    let d = f
        .admin(page, json!({"after": first["pageInfo"]["endCursor"]}))
        .await;
    let rest = &d["commands"];
    assert_eq!(
        rest["edges"][0]["node"]["executionId"],
        id.as_str(),
        "the oldest comes last"
    );
    assert_eq!(rest["pageInfo"]["hasNextPage"], false);

    // Errors: the role, an unknown thing, bad limits.
    let r = f.run_as(Some(Role::Viewer), send, json!({})).await;
    assert_eq!(code(&r), "FORBIDDEN");
    let r = f
        .run_as(
            Some(Role::Operator),
            r#"mutation { sendCommand(thingId: "ghost", name: "x") { executionId } }"#,
            json!({}),
        )
        .await;
    assert_eq!(code(&r), "NOT_FOUND");
    let r = f
        .run_as(
            Some(Role::Operator),
            r#"mutation { sendCommand(thingId: "pump-1", name: "x", timeoutSeconds: 0) { executionId } }"#,
            json!({}),
        )
        .await;
    assert_eq!(code(&r), "INVALID_ARGUMENT");
    assert!(
        r["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("timeoutSeconds"),
        "{r}"
    );
    let big = json!({"blob": "x".repeat(20_000)});
    let r = f
        .run_as(Some(Role::Operator), send, json!({"p": big}))
        .await;
    assert_eq!(code(&r), "PAYLOAD_TOO_LARGE");
    drop(updates);
    f.close().await;
}

#[tokio::test]
async fn ota_jobs_are_created_for_their_targets_and_counted() {
    let f = fixture().await;
    for t in ["a1", "a2", "b1"] {
        f.register(t, json!({"line": &t[..1]})).await;
    }
    let create = "mutation($id: ID!, $t: OtaTargets!, $sha: String!, $retries: Int) { createOtaJob(jobId: $id, targets: $t, document: {firmware: {version: \"3.1\", url: \"https://x/3.1\", sha256: $sha, size: 10}}, executions: {retries: $retries, stepMinutes: 5}) { jobId targets counts { queued inProgress } document } }";
    let sha = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    let d = f
        .admin(
            create,
            json!({"id": "j1", "t": {"filter": "attributes.line = \"a\"", "thingIds": ["b1", "a1"]}, "sha": sha}),
        )
        .await;
    let job = &d["createOtaJob"];
    assert_eq!(job["targets"], 3, "ids and filter, without duplicates");
    assert_eq!(job["counts"]["queued"], 3);
    assert_eq!(job["document"]["firmware"]["sha256"], sha);
    // Without a pace too, the fan-out is recorded with the job (every target at once), so
    // that a restart half-way goes on where it stood (see the fan-out test in twin-actors).
    let stored = f.fleet.jobs().get("j1").await.unwrap().unwrap();
    let rollout = stored.rollout.expect("the fan-out is part of the job");
    assert_eq!(rollout.pace, twin_model::rollout::Pace::All);
    assert_eq!((rollout.total(), rollout.released), (3, 3));
    let key = f.admin("{ signingKey }", json!({})).await["signingKey"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        twin_graphql::signing::verify(&job["document"], &key),
        "the document is signed: {job}"
    );
    let q = "query($id: ID!) { otaJob(jobId: $id) { targets counts { queued } } }";
    assert_eq!(
        f.admin(q, json!({"id": "j1"})).await["otaJob"]["targets"],
        3
    );
    assert_eq!(
        f.admin(q, json!({"id": "nope"})).await["otaJob"],
        Value::Null
    );

    for (vars, want) in [
        (
            json!({"id": "j2", "t": {"thingIds": ["a1"]}, "sha": "abc"}),
            "INVALID_ARGUMENT",
        ),
        (
            json!({"id": "j 2", "t": {"thingIds": ["a1"]}, "sha": sha}),
            "INVALID_ARGUMENT",
        ),
        (
            json!({"id": "j2", "t": {"thingIds": ["ghost"]}, "sha": sha}),
            "NOT_FOUND",
        ),
        (
            json!({"id": "j2", "t": {"filter": "line ="}, "sha": sha}),
            "INVALID_ARGUMENT",
        ),
        (
            json!({"id": "j2", "t": {"filter": "attributes.line = \"z\""}, "sha": sha}),
            "INVALID_ARGUMENT",
        ),
        (
            json!({"id": "j2", "t": {"thingIds": ["a1"]}, "sha": sha, "retries": 11}),
            "INVALID_ARGUMENT",
        ),
        (
            json!({"id": "j1", "t": {"thingIds": ["a1"]}, "sha": sha}),
            "VERSION_CONFLICT",
        ),
    ] {
        let r = f.run_as(Some(Role::Operator), create, vars.clone()).await;
        assert_eq!(code(&r), want, "{vars}: {r}");
    }
    let r = f
        .run_as(
            Some(Role::Viewer),
            create,
            json!({"id": "j3", "t": {"thingIds": ["a1"]}, "sha": sha}),
        )
        .await;
    assert_eq!(code(&r), "FORBIDDEN");

    // Taking things out of the job: their executions end REMOVED.
    let remove = "mutation($id: ID!, $things: [ID!]!) { removeOtaJobTargets(jobId: $id, thingIds: $things) { targets counts { queued removed } } }";
    let d = f
        .run_as(
            Some(Role::Operator),
            remove,
            json!({"id": "j1", "things": ["b1"]}),
        )
        .await;
    let job = &d["data"]["removeOtaJobTargets"];
    assert_eq!(job["counts"], json!({"queued": 2, "removed": 1}), "{d}");
    assert_eq!(job["targets"], 3);
    for (vars, role, want) in [
        (
            json!({"id": "j1", "things": ["zz"]}),
            Role::Operator,
            "NOT_FOUND",
        ),
        (
            json!({"id": "nope", "things": ["a1"]}),
            Role::Operator,
            "NOT_FOUND",
        ),
        (
            json!({"id": "j1", "things": ["a 1"]}),
            Role::Operator,
            "INVALID_ARGUMENT",
        ),
        (
            json!({"id": "j1", "things": []}),
            Role::Operator,
            "INVALID_ARGUMENT",
        ),
        (
            json!({"id": "j1", "things": ["a1"]}),
            Role::Viewer,
            "FORBIDDEN",
        ),
    ] {
        let r = f.run_as(Some(role), remove, vars.clone()).await;
        assert_eq!(code(&r), want, "{vars}: {r}");
    }
    f.close().await;
}

#[tokio::test]
async fn filtered_subscriptions_judge_each_change_by_the_state_right_after_it() {
    let f = fixture().await;
    f.register("probe", json!({})).await;
    let mut hot = f.schema.execute_stream(
        async_graphql::Request::new(
            r#"subscription { thingsChanged(filter: "reported.temp > 30") { __typename ... on ShadowChanged { version state } } }"#,
        )
        .data(Principal::new(Role::Viewer, "test", None)),
    );
    assert_eq!(
        data(&mut hot).await["thingsChanged"]["__typename"],
        "Subscribed"
    );
    // All five are acknowledged before the subscriber reads one: by then the twin is
    // far past the first changes.
    for temp in [40, 10, 50, 5, 60] {
        f.report("probe", json!({"temp": temp})).await;
    }
    let mut seen = Vec::new();
    for _ in 0..3 {
        let e = data(&mut hot).await;
        seen.push((
            e["thingsChanged"]["version"].as_u64().unwrap(),
            e["thingsChanged"]["state"]["reported"]["temp"].clone(),
        ));
    }
    assert_eq!(
        seen,
        [(1, json!(40)), (3, json!(50)), (5, json!(60))],
        "the changes that left the twin hot, and only those"
    );
    drop(hot);
    f.close().await;
}

/// A literal for an argument of `ty` (introspected), using only required input fields.
fn literal(ty: &Value, types: &Value) -> String {
    match ty["kind"].as_str() {
        Some("NON_NULL") => literal(&ty["ofType"], types),
        Some("LIST") => format!("[{}]", literal(&ty["ofType"], types)),
        _ => {
            let name = ty["name"].as_str().unwrap();
            let def = types
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["name"] == name)
                .unwrap();
            match (def["kind"].as_str().unwrap(), name) {
                ("SCALAR", "Int") => "1".into(),
                ("SCALAR", "Boolean") => "false".into(),
                ("SCALAR", "JSON") => "{}".into(),
                ("SCALAR", "DateTime") => "\"2026-01-01T00:00:00Z\"".into(),
                ("SCALAR", _) => "\"x\"".into(),
                ("ENUM", _) => def["enumValues"][0]["name"].as_str().unwrap().into(),
                ("INPUT_OBJECT", _) => {
                    let fields: Vec<String> = def["inputFields"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|f| f["type"]["kind"] == "NON_NULL")
                        .map(|f| {
                            format!(
                                "{}: {}",
                                f["name"].as_str().unwrap(),
                                literal(&f["type"], types)
                            )
                        })
                        .collect();
                    format!("{{{}}}", fields.join(", "))
                }
                (kind, _) => panic!("no literal for {kind} {name}"),
            }
        }
    }
}

/// Every root field as a request with its required arguments.
async fn every_root_field() -> Vec<(&'static str, String)> {
    use twin_graphql::schema::{Mutation, Query, SubscriptionRoot};
    // Introspected without the depth limit of a served schema.
    let plain = async_graphql::Schema::build(
        Query::default(),
        Mutation::default(),
        SubscriptionRoot::default(),
    )
    .finish();
    let d = plain
        .execute(
            r#"{ __schema { types { name kind enumValues { name } inputFields { name type { ...T } } fields { name args { name type { ...T } } type { ...T } } } } }
            fragment T on __Type { kind name ofType { kind name ofType { kind name ofType { kind name } } } }"#,
        )
        .await;
    let d = serde_json::to_value(d.data).unwrap();
    let types = &d["__schema"]["types"];
    let mut requests = Vec::new();
    for (root, op) in [
        ("Query", "query"),
        ("Mutation", "mutation"),
        ("SubscriptionRoot", "subscription"),
    ] {
        let def = types
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == root)
            .unwrap();
        for field in def["fields"].as_array().unwrap() {
            let args: Vec<String> = field["args"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| a["type"]["kind"] == "NON_NULL")
                .map(|a| {
                    format!(
                        "{}: {}",
                        a["name"].as_str().unwrap(),
                        literal(&a["type"], types)
                    )
                })
                .collect();
            let args = if args.is_empty() {
                String::new()
            } else {
                format!("({})", args.join(", "))
            };
            let mut ty = &field["type"];
            while ty["kind"] == "NON_NULL" || ty["kind"] == "LIST" {
                ty = &ty["ofType"];
            }
            let selection = if ty["kind"] == "SCALAR" {
                ""
            } else {
                " { __typename }"
            };
            requests.push((
                op,
                format!(
                    "{op} {{ {}{args}{selection} }}",
                    field["name"].as_str().unwrap()
                ),
            ));
        }
    }
    requests
}

#[tokio::test]
async fn every_field_has_its_role_guard() {
    let f = fixture().await;
    let requests = every_root_field().await;
    assert!(requests.len() > 25, "{requests:?}");
    let schema = &f.schema;
    for (op, request) in &requests {
        let answer = |role| async move {
            let mut req = async_graphql::Request::new(request.as_str());
            if let Some(role) = role {
                req = req.data(Principal::new(role, "test", None));
            }
            let r = if *op == "subscription" {
                let mut s = schema.execute_stream(req);
                tokio::time::timeout(std::time::Duration::from_secs(10), s.next())
                    .await
                    .expect("an answer within 10 s")
                    .expect("an answer")
            } else {
                schema.execute(req).await
            };
            serde_json::to_value(r).unwrap()
        };
        let r = answer(None).await;
        assert_eq!(code(&r), "UNAUTHENTICATED", "{request}: {r}");
        if *op == "mutation" {
            let r = answer(Some(Role::Viewer)).await;
            assert_eq!(code(&r), "FORBIDDEN", "{request}: {r}");
        }
    }
}

#[tokio::test]
async fn a_store_error_ends_a_job_subscription_with_an_error_the_client_sees() {
    let f = fixture().await;
    f.register("a1", json!({})).await;
    let create = "mutation { createOtaJob(jobId: \"j1\", targets: {thingIds: [\"a1\"]}, document: {firmware: {version: \"3.1\", url: \"https://x/3.1\", sha256: \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\", size: 10}}) { jobId } }";
    f.admin(create, json!({})).await;
    let watch = "subscription { otaJobProgress(jobId: \"j1\") { __typename } }";
    let mut s = f.viewer_stream(watch);
    let within = std::time::Duration::from_secs(10);
    let first = tokio::time::timeout(within, s.next())
        .await
        .unwrap()
        .unwrap();
    assert!(first.errors.is_empty(), "{first:?}");

    f.store
        .jobs_unreadable
        .store(true, std::sync::atomic::Ordering::SeqCst);
    // A change of the job (paused, by its rollout controller, without reading the store)
    // wakes the subscription, whose read then fails.
    f.fleet.jobs().pause("j1", true).await.unwrap();
    let failed = tokio::time::timeout(within, s.next())
        .await
        .expect("an answer within 10 s")
        .expect("the error is delivered");
    let failed = serde_json::to_value(failed).unwrap();
    assert_eq!(code(&failed), "INTERNAL", "{failed}");
    assert!(
        failed.to_string().contains("jobs unreadable"),
        "the cause reaches the client: {failed}"
    );
    assert!(
        tokio::time::timeout(within, s.next())
            .await
            .unwrap()
            .is_none(),
        "the subscription ends after its error"
    );
}

/// Runs a query as an operator whose token has the id `ops-token` and a note.
async fn as_operator(f: &Fixture, query: &str, vars: Value) -> Value {
    let req = async_graphql::Request::new(query)
        .variables(async_graphql::Variables::from_json(vars))
        .data(Principal::new(
            Role::Operator,
            "ops-token",
            Some("night shift".into()),
        ));
    serde_json::to_value(f.schema.execute(req).await).unwrap()
}

const HISTORY: &str = "query($id: ID!, $first: Int = 3, $after: String, $since: DateTime, $until: DateTime) {
    thing(id: $id) { shadow { history(first: $first, after: $after, since: $since, until: $until) {
        edges { cursor node { version at operation state clientToken by { kind tokenId note jobId } } }
        pageInfo { hasNextPage endCursor } } } } }";

const AT: &str = "query($id: ID!, $at: DateTime) {
    thing(id: $id) { shadow(at: $at) { version desired reported delta } } }";

fn versions(history: &Value) -> Vec<u64> {
    history["thing"]["shadow"]["history"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["node"]["version"].as_u64().unwrap())
        .collect()
}

/// A shadow's history names who made each change, pages newest first and filters by
/// time; `shadow(at:)` answers the shadow as it was at any instant, null before it
/// existed and after it was deleted.
#[tokio::test(start_paused = true)]
async fn shadow_history_and_time_travel() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = FleetConfig {
        clock: twin_actors::Clock::tokio(),
        ..FleetConfig::default()
    };
    let f = fixture_in(dir, config).await;
    f.register("lamp-1", json!({})).await;
    let t0 = f.fleet.now_millis();
    let at = |offset_s: i64| twin_model::rfc3339((t0 as i64 + offset_s * 1000) as u64);
    let minute = std::time::Duration::from_secs(60);

    f.report("lamp-1", json!({"on": false})).await;
    tokio::time::advance(minute).await;
    let set = "mutation { updateDesired(id: \"lamp-1\", desired: {on: true}, clientToken: \"c-2\") { version } }";
    let r = as_operator(&f, set, json!({})).await;
    assert!(r.get("errors").is_none(), "{r}");
    tokio::time::advance(minute).await;
    f.report("lamp-1", json!({"on": true})).await;

    let page = f.admin(HISTORY, json!({"id": "lamp-1", "first": 2})).await;
    assert_eq!(versions(&page), [3, 2], "newest first");
    let h = &page["thing"]["shadow"]["history"];
    let (third, second) = (&h["edges"][0]["node"], &h["edges"][1]["node"]);
    assert_eq!(third["by"]["kind"], "DEVICE");
    assert_eq!(third["at"], at(120));
    assert_eq!(third["state"], json!({"reported": {"on": true}}));
    assert_eq!(second["operation"], "UPDATED");
    assert_eq!(second["clientToken"], "c-2");
    assert_eq!(
        second["by"],
        json!({"kind": "TOKEN", "tokenId": "ops-token", "note": "night shift", "jobId": null})
    );
    assert_eq!(h["pageInfo"]["hasNextPage"], true);
    let rest = f
        .admin(
            HISTORY,
            json!({"id": "lamp-1", "first": 2, "after": h["pageInfo"]["endCursor"]}),
        )
        .await;
    assert_eq!(versions(&rest), [1]);
    assert_eq!(
        rest["thing"]["shadow"]["history"]["pageInfo"]["hasNextPage"],
        false
    );
    let since = f
        .admin(HISTORY, json!({"id": "lamp-1", "since": at(60)}))
        .await;
    assert_eq!(versions(&since), [3, 2]);
    let until = f
        .admin(HISTORY, json!({"id": "lamp-1", "until": at(59)}))
        .await;
    assert_eq!(versions(&until), [1]);

    // Time travel.
    let then = |d: Value| d["thing"]["shadow"].clone();
    let first = then(f.admin(AT, json!({"id": "lamp-1", "at": at(30)})).await);
    assert_eq!(
        first,
        json!({"version": 1, "desired": null, "reported": {"on": false}, "delta": null})
    );
    let second = then(f.admin(AT, json!({"id": "lamp-1", "at": at(60)})).await);
    assert_eq!(second["version"], 2);
    assert_eq!(second["delta"], json!({"on": true}), "out of sync then");
    let before = then(f.admin(AT, json!({"id": "lamp-1", "at": at(-1)})).await);
    assert_eq!(before, Value::Null, "the shadow did not exist yet");

    tokio::time::advance(minute).await;
    let del = "mutation { deleteShadow(id: \"lamp-1\") { version } }";
    let r = as_operator(&f, del, json!({})).await;
    assert!(r.get("errors").is_none(), "{r}");
    let deleted = then(f.admin(AT, json!({"id": "lamp-1", "at": at(200)})).await);
    assert_eq!(deleted, Value::Null, "deleted then");
    let still = then(f.admin(AT, json!({"id": "lamp-1", "at": at(179)})).await);
    assert_eq!(still["version"], 3);
    // A deleted shadow's history is reached through the shadow as it was.
    let q = "query($id: ID!, $at: DateTime) { thing(id: $id) { shadow(at: $at) {
        history(first: 1) { edges { node { operation version by { kind } } } } } } }";
    let newest = f.admin(q, json!({"id": "lamp-1", "at": at(179)})).await;
    assert_eq!(
        newest["thing"]["shadow"]["history"]["edges"][0]["node"],
        json!({"operation": "DELETED", "version": 3, "by": {"kind": "TOKEN"}})
    );
    f.close().await;
}

/// Retention by age: changes older than `history_retention` are not listed, and an
/// instant they alone could answer is `INVALID_ARGUMENT`, naming the oldest instant
/// available.
#[tokio::test(start_paused = true)]
async fn time_travel_past_the_retention_names_the_oldest_instant() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = FleetConfig {
        clock: twin_actors::Clock::tokio(),
        history_retention: Some(std::time::Duration::from_secs(100)),
        ..FleetConfig::default()
    };
    let f = fixture_in(dir, config).await;
    f.register("lamp-1", json!({})).await;
    let t0 = f.fleet.now_millis();
    let at = |offset_s: u64| twin_model::rfc3339(t0 + offset_s * 1000);
    for n in 0..3 {
        if n > 0 {
            tokio::time::advance(std::time::Duration::from_secs(60)).await;
        }
        f.report("lamp-1", json!({"n": n})).await;
    }
    tokio::time::advance(std::time::Duration::from_secs(50)).await;
    // Now t0 + 170 s: only the change at t0 + 120 s is younger than 100 s.
    let listed = f.admin(HISTORY, json!({"id": "lamp-1"})).await;
    assert_eq!(versions(&listed), [3]);
    let r = f
        .run_as(
            Some(Role::Viewer),
            AT,
            json!({"id": "lamp-1", "at": at(90)}),
        )
        .await;
    assert_eq!(code(&r), "INVALID_ARGUMENT", "{r}");
    let message = r["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("the oldest instant available is {}", at(120))),
        "{message}"
    );
    let kept = f.admin(AT, json!({"id": "lamp-1", "at": at(130)})).await;
    assert_eq!(kept["thing"]["shadow"]["reported"], json!({"n": 2}));
    let bad = f
        .run_as(
            Some(Role::Viewer),
            AT,
            json!({"id": "lamp-1", "at": "yesterday"}),
        )
        .await;
    assert_eq!(code(&bad), "INVALID_ARGUMENT", "{bad}");
    f.close().await;
}

/// A self-signed certificate, PEM, made for the test.
fn self_signed(name: &str) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap()
        .pem()
}

#[tokio::test]
async fn certificates_are_registered_issued_attached_listed_and_revoked() {
    let f = fixture().await;
    f.register("lamp-1", json!({})).await;
    let create = "mutation($t: ID) { createKeysAndCertificate(thingId: $t) { privateKeyPem certificate { certificateId status notAfter } } }";
    let r = f
        .run_as(Some(Role::Admin), create, json!({"t": "lamp-1"}))
        .await;
    assert_eq!(code(&r), "FAILED_PRECONDITION", "no device CA yet: {r}");
    assert!(
        r["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("doppel ca init")
    );

    twin_actors::device_ca::DeviceCa::init(f.dir.path(), "test CA").unwrap();
    let d = f.admin(create, json!({"t": "lamp-1"})).await;
    let issued = &d["createKeysAndCertificate"];
    assert!(
        issued["privateKeyPem"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );
    assert_eq!(issued["certificate"]["status"], "ACTIVE");
    let issued_id = issued["certificate"]["certificateId"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(issued_id.len(), 64);
    let on_thing = "query { thing(id: \"lamp-1\") { certificates { certificateId } } }";
    let d = f.admin(on_thing, json!({})).await;
    assert_eq!(
        d["thing"]["certificates"],
        json!([{"certificateId": issued_id}])
    );

    let register = "mutation($p: String!, $s: CertificateStatus) { registerCertificate(pem: $p, status: $s) { certificateId status certificatePem } }";
    let pem = self_signed("own-ca-device");
    let d = f.admin(register, json!({"p": pem, "s": "INACTIVE"})).await;
    let own_id = d["registerCertificate"]["certificateId"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(d["registerCertificate"]["status"], "INACTIVE");
    assert_eq!(d["registerCertificate"]["certificatePem"], pem);
    let again = f
        .run_as(
            Some(Role::Admin),
            register,
            json!({"p": pem, "s": "ACTIVE"}),
        )
        .await;
    assert_eq!(code(&again), "VERSION_CONFLICT", "{again}");
    let bad = f
        .run_as(
            Some(Role::Admin),
            register,
            json!({"p": "hello", "s": "ACTIVE"}),
        )
        .await;
    assert_eq!(code(&bad), "INVALID_ARGUMENT", "{bad}");

    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(vec!["csr-device".to_owned()])
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let from_csr =
        "mutation($c: String!) { createCertificateFromCsr(csr: $c) { certificateId status } }";
    let d = f.admin(from_csr, json!({"c": csr})).await;
    assert_eq!(d["createCertificateFromCsr"]["status"], "ACTIVE");
    let bad = f
        .run_as(Some(Role::Admin), from_csr, json!({"c": pem}))
        .await;
    assert_eq!(
        code(&bad),
        "INVALID_ARGUMENT",
        "a certificate is not a request: {bad}"
    );

    // Three certificates, two a page; then only the inactive one.
    let list = "query($after: String, $s: CertificateStatus, $t: ID) { certificates(first: 2, after: $after, status: $s, thingId: $t) { edges { node { certificateId } } pageInfo { hasNextPage endCursor } } }";
    let mut seen = Vec::new();
    let mut after = Value::Null;
    loop {
        let d = f.admin(list, json!({"after": after})).await;
        let page = &d["certificates"];
        seen.extend(
            page["edges"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["node"]["certificateId"].clone()),
        );
        if page["pageInfo"]["hasNextPage"] == false {
            break;
        }
        after = page["pageInfo"]["endCursor"].clone();
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    let d = f.admin(list, json!({"s": "INACTIVE"})).await;
    assert_eq!(
        d["certificates"]["edges"],
        json!([{"node": {"certificateId": own_id}}])
    );
    let d = f.admin(list, json!({"t": "lamp-1"})).await;
    assert_eq!(
        d["certificates"]["edges"],
        json!([{"node": {"certificateId": issued_id}}])
    );

    let attach =
        "mutation($t: ID!, $c: ID!) { attachCertificate(thingId: $t, certificateId: $c) { id } }";
    let d = f.admin(attach, json!({"t": "lamp-1", "c": own_id})).await;
    assert_eq!(d["attachCertificate"]["id"], "lamp-1");
    let unknown = f
        .run_as(
            Some(Role::Admin),
            attach,
            json!({"t": "lamp-1", "c": "ab".repeat(32)}),
        )
        .await;
    assert_eq!(code(&unknown), "NOT_FOUND", "{unknown}");
    let malformed = f
        .run_as(
            Some(Role::Admin),
            attach,
            json!({"t": "lamp-1", "c": "xyz"}),
        )
        .await;
    assert_eq!(code(&malformed), "INVALID_ARGUMENT", "{malformed}");
    let detach = "mutation($t: ID!, $c: ID!) { detachCertificate(thingId: $t, certificateId: $c) { certificates { certificateId } } }";
    let d = f
        .admin(detach, json!({"t": "lamp-1", "c": issued_id}))
        .await;
    assert_eq!(
        d["detachCertificate"]["certificates"],
        json!([{"certificateId": own_id}])
    );

    let update = "mutation($c: ID!, $s: CertificateStatus!) { updateCertificate(certificateId: $c, status: $s) { status updatedAt } }";
    let d = f.admin(update, json!({"c": own_id, "s": "REVOKED"})).await;
    assert_eq!(d["updateCertificate"]["status"], "REVOKED");
    let back = f
        .run_as(
            Some(Role::Admin),
            update,
            json!({"c": own_id, "s": "ACTIVE"}),
        )
        .await;
    assert_eq!(code(&back), "INVALID_ARGUMENT", "revoked is final: {back}");
    assert!(
        back["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("revoked")
    );
    f.close().await;
}

#[tokio::test]
async fn every_mutation_is_in_the_audit_log_with_who_what_and_how_it_ended() {
    let f = fixture().await;
    f.register("audited", json!({"site": "north"})).await;
    let disable = "mutation($id: ID!) { disableThing(id: $id) { id } }";
    f.admin(disable, json!({"id": "audited"})).await;
    let missing = f
        .run_as(Some(Role::Admin), disable, json!({"id": "nobody"}))
        .await;
    assert_eq!(code(&missing), "NOT_FOUND");
    let viewer = f
        .run_as(Some(Role::Viewer), disable, json!({"id": "audited"}))
        .await;
    assert_eq!(code(&viewer), "FORBIDDEN");
    f.admin("{ thing(id: \"audited\") { id } }", json!({}))
        .await;

    let log = "query($after: String, $actor: String) { auditLog(first: 2, after: $after, actor: $actor) { edges { node { seq actor action arguments outcome prevHash hash at } } pageInfo { hasNextPage endCursor } } }";
    let mut entries: Vec<Value> = Vec::new();
    let mut after = Value::Null;
    loop {
        let d = f.admin(log, json!({"after": after})).await;
        let page = &d["auditLog"];
        entries.extend(
            page["edges"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["node"].clone()),
        );
        if page["pageInfo"]["hasNextPage"] == false {
            break;
        }
        after = page["pageInfo"]["endCursor"].clone();
    }
    let seen: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap(),
                e["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(seen.len(), 4, "mutations only, each once: {entries:#?}");
    assert_eq!(seen[0], ("registerThing", "ok"));
    assert_eq!(seen[1], ("disableThing", "ok"));
    assert_eq!(seen[2], ("disableThing", "error: Thing not found"));
    assert!(
        seen[3].1.starts_with("error: "),
        "a refused caller is logged: {:?}",
        seen[3]
    );
    assert_eq!(
        entries[0]["arguments"],
        json!({"id": "audited", "attributes": {"site": "north"}})
    );
    assert_eq!(entries[0]["actor"], "token:test");
    assert_eq!(entries[0]["prevHash"], "0".repeat(64));
    for pair in entries.windows(2) {
        assert_eq!(pair[1]["prevHash"], pair[0]["hash"], "a hash chain");
        assert_eq!(
            pair[1]["seq"].as_u64(),
            pair[0]["seq"].as_u64().map(|s| s + 1)
        );
    }
    assert!(
        twin_store::audit::verify(&*f.fleet.store().clone())
            .await
            .unwrap()
            .is_ok()
    );
    let d = f.admin(log, json!({"actor": "someone"})).await;
    assert_eq!(d["auditLog"]["edges"], json!([]));
    let d = f.admin(log, json!({"actor": "test"})).await;
    assert_eq!(d["auditLog"]["edges"].as_array().unwrap().len(), 2);
    let viewer = f.run_as(Some(Role::Viewer), log, json!({})).await;
    assert_eq!(code(&viewer), "FORBIDDEN", "the log is the admins'");
    f.close().await;
}
