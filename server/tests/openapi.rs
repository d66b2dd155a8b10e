//! The OpenAPI description: what `GET /openapi.json` serves is `docs/openapi.json` byte for
//! byte; every route is in it and everything in it is routed; and what the server answers,
//! success and error alike, is what it says: each status is documented for its operation, each
//! error code is listed for that status, each JSON body (and each NDJSON line and SSE event)
//! matches its schema, with no property the schema does not name, and each request body the
//! server accepts matches the request schema.
//!
//! `UPDATE_OPENAPI=1 cargo test -p soloist-server --test openapi` rewrites `docs/openapi.json`
//! from the server.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use common::{Server, client, read_named_events};

/// `docs/openapi.json` in the repository.
fn checked_in_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("docs")
        .join("openapi.json")
}

/// The document as the server serves it.
async fn served(server: &Server) -> String {
    let response = client()
        .get(server.url("/openapi.json"))
        .send()
        .await
        .expect("GET /openapi.json");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|value| value.to_str().ok()),
        Some("application/json")
    );
    response.text().await.expect("body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_description_is_the_checked_in_one() {
    let server = Server::sqlite(&[]);
    let text = served(&server).await;
    let document: Value = serde_json::from_str(&text).expect("the description is JSON");
    assert_eq!(document["openapi"], "3.1.0");
    assert!(
        text.ends_with("}\n"),
        "pretty-printed, with a trailing newline"
    );
    assert_eq!(
        text,
        soloist_server::openapi_json(),
        "the binary serves what the library renders"
    );

    let path = checked_in_path();
    if std::env::var_os("UPDATE_OPENAPI").is_some_and(|value| value == "1") {
        std::fs::write(&path, &text).expect("write docs/openapi.json");
        eprintln!("wrote {}", path.display());
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    if checked_in != text {
        let first_difference = checked_in
            .lines()
            .zip(text.lines())
            .position(|(old, new)| old != new)
            .unwrap_or_else(|| checked_in.lines().count().min(text.lines().count()));
        panic!(
            "docs/openapi.json is not what the server serves at GET /openapi.json (first \
             difference at line {}: checked in {:?}, served {:?}). If the change to the API is \
             meant, regenerate it with\n\n    UPDATE_OPENAPI=1 cargo test -p soloist-server \
             --test openapi\n\nand commit docs/openapi.json.",
            first_difference + 1,
            checked_in.lines().nth(first_difference),
            text.lines().nth(first_difference),
        );
    }
}

/// A concrete path for a documented one: random ids in place of `{id}` and `{message_id}`.
fn concrete(template: &str) -> String {
    template
        .replace("{id}", &Uuid::now_v7().to_string())
        .replace("{message_id}", &Uuid::now_v7().to_string())
}

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_is_described_and_every_described_route_is_served() {
    let server = Server::sqlite(&[]);
    let client = client();
    let document: Value = serde_json::from_str(&served(&server).await).expect("JSON");
    let paths = document["paths"].as_object().expect("paths");
    assert!(paths.len() >= 11, "{:?}", paths.keys());
    let mut operations = 0;
    for (template, item) in paths {
        for method in METHODS {
            let request = client
                .request(
                    Method::from_bytes(method.to_uppercase().as_bytes()).expect("method"),
                    server.url(&concrete(template)),
                )
                .header("x-user-id", "alice")
                .json(&json!({}));
            let response = request.send().await.expect("request");
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            if item.get(method).is_some() {
                operations += 1;
                assert_ne!(
                    body["error"]["message"], "no such route",
                    "{method} {template} is described but not routed"
                );
                assert_ne!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {template} is described but not routed: {body}"
                );
            } else {
                assert_eq!(
                    (status, &body["error"]["code"]),
                    (StatusCode::METHOD_NOT_ALLOWED, &json!("method_not_allowed")),
                    "{method} {template} is routed but not described: {body}"
                );
            }
        }
    }
    assert_eq!(operations, 16, "the API's 16 operations");

    // Routes are only ever added from their description (`routes!` of utoipa-axum, which reads
    // the handler's `#[utoipa::path]`): a plain axum `.route(...)` would serve a path the
    // description cannot know of, so none may be in the server's code.
    let mut folders = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")];
    let mut files = Vec::new();
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).expect("a folder of server/src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                folders.push(path);
            } else {
                files.push(path);
            }
        }
    }
    for path in files {
        let text = std::fs::read_to_string(&path).expect("source");
        for call in [".route(", ".route_service(", ".nest(", ".nest_service("] {
            assert!(
                !text.contains(call),
                "{} calls `{call}`: add routes with `.routes(routes!(handler))` and a \
                 `#[utoipa::path]` on the handler, so that the description has them",
                path.display()
            );
        }
    }
}

/// The description, and what the contract test has seen of it.
struct Contract {
    document: Value,
    /// `(method, path, status)` answered and checked.
    seen: Mutex<BTreeSet<(String, String, u16)>>,
}

/// One answer of the server.
struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
}

impl Contract {
    async fn load(server: &Server) -> Contract {
        Contract {
            document: serde_json::from_str(&served(server).await).expect("JSON"),
            seen: Mutex::default(),
        }
    }

    fn schema(&self, name: &str) -> Value {
        json!({"$ref": format!("#/components/schemas/{name}")})
    }

    fn operation(&self, method: &Method, template: &str) -> &Value {
        let operation = &self.document["paths"][template][method.as_str().to_lowercase()];
        assert!(
            operation.is_object(),
            "{method} {template} is not in the description"
        );
        operation
    }

    /// Sends a request to `template` (made concrete as `path`) and checks the request body and
    /// the answer against the description.
    async fn call(
        &self,
        server: &Server,
        method: Method,
        template: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Answer {
        let operation = self.operation(&method, template).clone();
        let mut request = client().request(method.clone(), server.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        // A string body sent as NDJSON goes as it is (an import); any other body as JSON.
        let ndjson = headers.iter().any(|(name, value)| {
            name.eq_ignore_ascii_case("content-type") && *value == "application/x-ndjson"
        });
        if let Some(body) = &body {
            request = match (ndjson, body) {
                (true, Value::String(text)) => request.body(text.clone()),
                _ => request.json(body),
            };
        }
        let response = request.send().await.expect("request");
        let answer = Answer {
            status: response.status(),
            headers: response.headers().clone(),
            text: response.text().await.expect("body"),
        };
        let what = format!("{method} {path} -> {}: {}", answer.status, answer.text);
        // A request body the server took must be one the description allows.
        if let (Some(body), true, false) = (&body, answer.status.is_success(), ndjson) {
            let schema = &operation["requestBody"]["content"]["application/json"]["schema"];
            assert!(schema.is_object(), "{what}: no request body is described");
            self.validate(body, schema, "request", &what);
        }
        let documented = &operation["responses"][answer.status.as_str()];
        assert!(
            documented.is_object(),
            "{what}: status {} is not described for {method} {template}",
            answer.status
        );
        for name in documented["headers"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, _)| name)
        {
            assert!(
                answer.headers.contains_key(name.as_str()),
                "{what}: the described header {name} is missing"
            );
        }
        let content = documented["content"].as_object();
        match content.and_then(|content| content.iter().next()) {
            None => assert!(answer.text.is_empty(), "{what}: no body is described"),
            Some((media, described)) => {
                let sent = answer
                    .headers
                    .get("content-type")
                    .and_then(|value| value.to_str().ok())
                    .unwrap_or_default();
                assert_eq!(sent, media, "{what}: content type");
                if media == "application/json" {
                    let json: Value = serde_json::from_str(&answer.text)
                        .unwrap_or_else(|_| panic!("{what}: not JSON"));
                    self.validate(&json, &described["schema"], "answer", &what);
                }
            }
        }
        if !answer.status.is_success() {
            let code = answer.json()["error"]["code"].clone();
            let listed = documented["x-error-codes"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            assert!(
                listed.contains(&code),
                "{what}: the code {code} is not listed for {} of {method} {template}: {listed:?}",
                answer.status
            );
        }
        self.seen.lock().expect("seen").insert((
            method.as_str().to_owned(),
            template.to_owned(),
            answer.status.as_u16(),
        ));
        answer
    }

    /// Checks `value` against `schema` (the JSON Schema keywords the description uses);
    /// objects may have no property that their schema does not name, unless it names none or
    /// says `additionalProperties: true`.
    #[track_caller]
    fn validate(&self, value: &Value, schema: &Value, at: &str, what: &str) {
        if let Err(error) = self.check(value, schema, at) {
            panic!("{what}: {error}");
        }
    }

    fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        match schema["$ref"].as_str() {
            Some(reference) => {
                let name = reference
                    .strip_prefix("#/components/schemas/")
                    .unwrap_or_else(|| panic!("unexpected $ref {reference}"));
                let target = &self.document["components"]["schemas"][name];
                assert!(target.is_object(), "no schema {name}");
                self.resolve(target)
            }
            None => schema,
        }
    }

    /// The properties an object schema names, across `allOf`.
    fn properties(&self, schema: &Value) -> Option<BTreeSet<String>> {
        let schema = self.resolve(schema);
        let mut names: Option<BTreeSet<String>> = schema["properties"]
            .as_object()
            .map(|properties| properties.keys().cloned().collect());
        for part in schema["allOf"].as_array().into_iter().flatten() {
            if let Some(more) = self.properties(part) {
                names.get_or_insert_with(BTreeSet::new).extend(more);
            }
        }
        names
    }

    fn check(&self, value: &Value, schema: &Value, at: &str) -> Result<(), String> {
        self.check_against(value, schema, at, true)
    }

    /// `strict`: refuse properties the schema (with its `allOf` parts) does not name; off for
    /// the parts of an `allOf`, which each name only some.
    fn check_against(
        &self,
        value: &Value,
        schema: &Value,
        at: &str,
        strict: bool,
    ) -> Result<(), String> {
        let schema = self.resolve(schema);
        for part in schema["allOf"].as_array().into_iter().flatten() {
            self.check_against(value, part, at, false)?;
        }
        if let Some(choices) = schema["oneOf"].as_array() {
            let matching = choices
                .iter()
                .filter(|choice| self.check(value, choice, at).is_ok())
                .count();
            if matching != 1 {
                return Err(format!(
                    "{at}: {value} matches {matching} of the oneOf choices {choices:?}"
                ));
            }
        }
        self.check_keywords(value, schema, at)?;
        let open = schema["additionalProperties"] == json!(true);
        if let (true, false, Value::Object(object), Some(names)) =
            (strict, open, value, self.properties(schema))
        {
            for key in object.keys() {
                if !names.contains(key) {
                    return Err(format!("{at}: the property {key:?} is not described"));
                }
            }
        }
        Ok(())
    }

    /// `type`, `enum`, `format`, `minimum`, `minItems`, `required`, and each property and item.
    fn check_keywords(&self, value: &Value, schema: &Value, at: &str) -> Result<(), String> {
        let types: Vec<&str> = match &schema["type"] {
            Value::String(one) => vec![one.as_str()],
            Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !types.is_empty() {
            let actual = match value {
                Value::Null => "null",
                Value::Bool(_) => "boolean",
                Value::Number(number) if number.is_i64() || number.is_u64() => "integer",
                Value::Number(_) => "number",
                Value::String(_) => "string",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
            };
            let fits =
                types.contains(&actual) || (actual == "integer" && types.contains(&"number"));
            if !fits {
                return Err(format!("{at}: {value} is not of type {types:?}"));
            }
        }
        let allowed = schema["enum"].as_array();
        if allowed.is_some_and(|allowed| !allowed.contains(value)) {
            return Err(format!("{at}: {value} is not one of {allowed:?}"));
        }
        if let (Some(format), Some(text)) = (schema["format"].as_str(), value.as_str()) {
            let ok = match format {
                "uuid" => text.parse::<Uuid>().is_ok(),
                "date-time" => chrono::DateTime::parse_from_rfc3339(text).is_ok(),
                _ => true,
            };
            if !ok {
                return Err(format!("{at}: {text:?} is not a {format}"));
            }
        }
        let minimum = schema["minimum"].as_f64().unwrap_or(f64::NEG_INFINITY);
        if value.as_f64().is_some_and(|number| number < minimum) {
            return Err(format!("{at}: {value} < minimum {minimum}"));
        }
        if let Value::Array(items) = value {
            let min = schema["minItems"].as_u64().unwrap_or(0);
            if (items.len() as u64) < min {
                return Err(format!("{at}: fewer than {min} items"));
            }
            if schema.get("items").is_some() {
                for (index, item) in items.iter().enumerate() {
                    self.check(item, &schema["items"], &format!("{at}[{index}]"))?;
                }
            }
        }
        if let Value::Object(object) = value {
            for required in schema["required"].as_array().into_iter().flatten() {
                let name = required.as_str().unwrap_or_default();
                if !object.contains_key(name) {
                    return Err(format!("{at}: the required property {name:?} is missing"));
                }
            }
            for (name, property) in schema["properties"].as_object().into_iter().flatten() {
                if let Some(field) = object.get(name) {
                    self.check(field, property, &format!("{at}.{name}"))?;
                }
            }
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_validator_of_this_test_refuses_what_the_description_does_not_allow() {
    // The checks below are only as good as `Contract::check`: it must refuse these.
    let server = Server::sqlite(&[]);
    let contract = Contract::load(&server).await;
    let summary = contract.schema("SessionSummary");
    let good = json!({
        "session_id": Uuid::now_v7(), "user_id": "alice", "title": null, "metadata": {},
        "usage": {"prompt_tokens": 0, "completion_tokens": 0}, "message_count": 0,
        "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00.5Z",
        "ttl_seconds": null, "expires_at": null,
    });
    assert_eq!(contract.check(&good, &summary, "summary"), Ok(()));
    let mut extra = good.clone();
    extra["version"] = json!(3);
    let mut missing = good.clone();
    missing.as_object_mut().expect("object").remove("title");
    let mut wrong_type = good.clone();
    wrong_type["message_count"] = json!("0");
    let mut bad_uuid = good.clone();
    bad_uuid["session_id"] = json!("not-a-uuid");
    let mut bad_time = good.clone();
    bad_time["created_at"] = json!("yesterday");
    for bad in [extra, missing, wrong_type, bad_uuid, bad_time] {
        assert!(contract.check(&bad, &summary, "summary").is_err(), "{bad}");
    }
    let message = contract.schema("NewMessage");
    assert_eq!(
        contract.check(&json!({"role": "user", "content": "hi"}), &message, "m"),
        Ok(())
    );
    assert_eq!(
        contract.check(
            &json!({"role": "user", "content": [{"type": "text", "text": "hi"}]}),
            &message,
            "m"
        ),
        Ok(())
    );
    for bad in [
        json!({"role": "wizard", "content": "hi"}),
        json!({"content": "hi"}),
        json!({"role": "user", "content": 5}),
        json!({"role": "user", "content": [{"text": "no type"}]}),
    ] {
        assert!(contract.check(&bad, &message, "m").is_err(), "{bad}");
    }
    let page = contract.schema("SessionPageBody");
    let mut full = good.clone();
    full["messages"] = json!([]);
    full["pending_tool_calls"] = json!([]);
    assert_eq!(contract.check(&full, &page, "page"), Ok(()));
    full["surprise"] = json!(1);
    assert!(
        contract.check(&full, &page, "page").is_err(),
        "a property neither part of the allOf names"
    );
}

/// Reads `count` SSE events `(name, data)`. An event without an id is never counted (the
/// read then times out and fails), and data that is not JSON comes back as `null`, which no
/// event schema allows.
async fn events(response: reqwest::Response, count: usize) -> Vec<(String, Value)> {
    read_named_events(response, count)
        .await
        .into_iter()
        .map(|(_, name, data)| (name, data))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_server_answers_is_what_the_description_says() {
    let server = Server::sqlite(&[]);
    let contract = Contract::load(&server).await;
    let alice = [("x-user-id", "alice")];
    let get = Method::GET;
    let post = Method::POST;

    contract
        .call(&server, get.clone(), "/healthz", "/healthz", &[], None)
        .await;
    contract
        .call(&server, get.clone(), "/metrics", "/metrics", &[], None)
        .await;
    contract
        .call(
            &server,
            get.clone(),
            "/openapi.json",
            "/openapi.json",
            &[],
            None,
        )
        .await;

    // Sessions: created with and without a key (and the key's retry), listed.
    let keyed = [("x-user-id", "alice"), ("idempotency-key", "trip-1")];
    let trip = json!({"title": "Trip", "metadata": {"k": 1}});
    let created = contract
        .call(
            &server,
            post.clone(),
            "/v1/sessions",
            "/v1/sessions",
            &keyed,
            Some(trip.clone()),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let again = contract
        .call(
            &server,
            post.clone(),
            "/v1/sessions",
            "/v1/sessions",
            &keyed,
            Some(trip),
        )
        .await;
    assert_eq!(again.json(), created.json());
    let reused = contract
        .call(
            &server,
            post.clone(),
            "/v1/sessions",
            "/v1/sessions",
            &keyed,
            Some(json!({"title": "Other"})),
        )
        .await;
    assert_eq!(reused.json()["error"]["code"], "idempotency_key_reused");
    let plain = contract
        .call(
            &server,
            post.clone(),
            "/v1/sessions",
            "/v1/sessions",
            &alice,
            Some(json!({})),
        )
        .await;
    assert_eq!(plain.json()["title"], Value::Null);
    let listed = contract
        .call(
            &server,
            get.clone(),
            "/v1/sessions",
            "/v1/sessions?limit=1",
            &alice,
            None,
        )
        .await;
    assert!(listed.json()["next_before"].is_string(), "{}", listed.text);
    let bad_cursor = contract
        .call(
            &server,
            get.clone(),
            "/v1/sessions",
            "/v1/sessions?before=x",
            &alice,
            None,
        )
        .await;
    assert_eq!(bad_cursor.status, StatusCode::BAD_REQUEST);
    let nobody = contract
        .call(
            &server,
            get.clone(),
            "/v1/sessions",
            "/v1/sessions",
            &[],
            None,
        )
        .await;
    assert_eq!(nobody.status, StatusCode::UNAUTHORIZED);

    let id = created.json()["session_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let session = format!("/v1/sessions/{id}");
    let messages = format!("/v1/sessions/{id}/messages");
    let messages_template = "/v1/sessions/{id}/messages";

    // Messages of every kind, then a draft.
    let first = Uuid::now_v7();
    let batch = json!({"messages": [
        {"id": first, "role": "system", "content": "Be brief.", "name": "setup"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}], "metadata": {"lang": "en"}},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "f", "arguments": "{}"}}]},
    ]});
    let appended = contract
        .call(
            &server,
            post.clone(),
            messages_template,
            &messages,
            &alice,
            Some(batch),
        )
        .await;
    assert_eq!(appended.json(), json!({"sequences": [0, 1, 2]}));
    let unanswered = contract
        .call(
            &server,
            post.clone(),
            messages_template,
            &messages,
            &alice,
            Some(json!({"messages": [{"role": "tool", "tool_call_id": "c9", "content": "?"}]})),
        )
        .await;
    assert_eq!(unanswered.json()["error"]["code"], "unknown_tool_call");
    let reused_id = contract
        .call(
            &server,
            post.clone(),
            messages_template,
            &messages,
            &alice,
            Some(json!({"messages": [{"id": first, "role": "user", "content": "other"}]})),
        )
        .await;
    assert_eq!(reused_id.json()["error"]["code"], "message_id_reused");
    let too_large = contract
        .call(
            &server,
            post.clone(),
            messages_template,
            &messages,
            &alice,
            Some(json!({"messages": [{"role": "user", "content": "x".repeat(70_000)}]})),
        )
        .await;
    assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE);
    let not_json = contract
        .call(
            &server,
            post.clone(),
            messages_template,
            &messages,
            &[("x-user-id", "alice"), ("content-type", "text/plain")],
            None,
        )
        .await;
    assert_eq!(not_json.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let draft = Uuid::now_v7();
    contract
        .call(
            &server,
            post.clone(),
            messages_template,
            &messages,
            &alice,
            Some(json!({"messages": [
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
                {"id": draft, "role": "assistant", "status": "in_progress", "content": "Hel"},
            ]})),
        )
        .await;
    let busy = contract
        .call(
            &server,
            post.clone(),
            messages_template,
            &messages,
            &alice,
            Some(json!({"messages": [{"role": "assistant", "status": "in_progress"}]})),
        )
        .await;
    assert_eq!(busy.json()["error"]["code"], "turn_in_progress");

    // Reads: a page, a foreign or malformed id, a stale If-Match.
    let session_template = "/v1/sessions/{id}";
    let page = contract
        .call(
            &server,
            get.clone(),
            session_template,
            &format!("{session}?after_seq=0&limit=2"),
            &alice,
            None,
        )
        .await;
    assert_eq!(page.json()["next_after_seq"], 2, "{}", page.text);
    let whole = contract
        .call(
            &server,
            get.clone(),
            session_template,
            &session,
            &alice,
            None,
        )
        .await;
    assert_eq!(whole.json()["message_count"], 5, "{}", whole.text);
    let etag = whole.headers["etag"].to_str().expect("ETag").to_owned();
    let foreign = contract
        .call(
            &server,
            get.clone(),
            session_template,
            &session,
            &[("x-user-id", "bob")],
            None,
        )
        .await;
    assert_eq!(foreign.status, StatusCode::NOT_FOUND);
    let malformed = contract
        .call(
            &server,
            get.clone(),
            session_template,
            "/v1/sessions/nope",
            &alice,
            None,
        )
        .await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);

    // The draft grows, follows on the event stream, and ends.
    let deltas_template = "/v1/sessions/{id}/messages/{message_id}/deltas";
    let deltas = format!("{messages}/{draft}/deltas");
    let grown = contract
        .call(
            &server,
            post.clone(),
            deltas_template,
            &deltas,
            &alice,
            Some(json!({"offset": 3, "content": "lo"})),
        )
        .await;
    assert_eq!(grown.json(), json!({"length": 5}));
    contract
        .call(
            &server,
            post.clone(),
            deltas_template,
            &deltas,
            &alice,
            Some(json!({"deltas": [{"offset": 5, "content": ", "}, {"offset": 7, "content": "you"}]})),
        )
        .await;
    let gap = contract
        .call(
            &server,
            post.clone(),
            deltas_template,
            &deltas,
            &alice,
            Some(json!({"offset": 99, "content": "?"})),
        )
        .await;
    assert_eq!(gap.json()["error"]["code"], "offset_gap");
    let nowhere = contract
        .call(
            &server,
            post.clone(),
            deltas_template,
            &format!("{messages}/{}/deltas", Uuid::now_v7()),
            &alice,
            Some(json!({"offset": 0, "content": "?"})),
        )
        .await;
    assert_eq!(nowhere.json()["error"]["code"], "message_not_found");

    let events_template = "/v1/sessions/{id}/events";
    let stream = client()
        .get(server.url(&format!("{session}/events?after_seq=-1")))
        .header("x-user-id", "alice")
        .send()
        .await
        .expect("events");
    assert_eq!(stream.status(), StatusCode::OK);
    let described = &contract.operation(&get, events_template)["responses"]["200"]["content"];
    let media = described
        .as_object()
        .and_then(|content| content.keys().next().cloned());
    assert_eq!(
        stream
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        media.as_deref()
    );
    let following = events(stream, 5).await;
    let names: Vec<&str> = following.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "message",
            "message",
            "message",
            "message",
            "message.created"
        ]
    );
    for (name, data) in &following {
        contract.validate(data, &contract.schema("Message"), name, "an event");
    }
    let resumed = contract
        .call(
            &server,
            get.clone(),
            events_template,
            &format!("{session}/events"),
            &[("x-user-id", "alice"), ("last-event-id", "not an id")],
            None,
        )
        .await;
    assert_eq!(resumed.status, StatusCode::BAD_REQUEST);
    let live = client()
        .get(server.url(&format!("{session}/events")))
        .header("x-user-id", "alice")
        .header("last-event-id", "4:3")
        .send()
        .await
        .expect("events");
    let finish_template = "/v1/sessions/{id}/messages/{message_id}/finish";
    let finish = format!("{messages}/{draft}/finish");
    let finished = contract
        .call(
            &server,
            post.clone(),
            finish_template,
            &finish,
            &alice,
            Some(json!({"status": "completed", "usage": {"prompt_tokens": 3, "completion_tokens": 4}})),
        )
        .await;
    assert_eq!(finished.json()["content"], "Hello, you");
    let live = events(live, 2).await;
    assert_eq!(live[0].0, "message.delta");
    contract.validate(
        &live[0].1,
        &contract.schema("DeltaEvent"),
        "delta",
        "an event",
    );
    assert_eq!(live[0].1["content"], "lo, you");
    assert_eq!(live[1].0, "message.finished");
    contract.validate(
        &live[1].1,
        &contract.schema("Message"),
        "finished",
        "an event",
    );
    let twice = contract
        .call(
            &server,
            post.clone(),
            finish_template,
            &finish,
            &alice,
            Some(json!({"status": "aborted"})),
        )
        .await;
    assert_eq!(twice.json()["error"]["code"], "finish_conflict");

    // Usage, update (conditional), export, delete.
    let usage_template = "/v1/sessions/{id}/usage";
    let usage = contract
        .call(
            &server,
            post.clone(),
            usage_template,
            &format!("{session}/usage"),
            &[("x-user-id", "alice"), ("idempotency-key", "u-1")],
            Some(json!({"prompt_tokens": 10, "completion_tokens": 1})),
        )
        .await;
    assert_eq!(
        usage.json(),
        json!({"prompt_tokens": 13, "completion_tokens": 5})
    );
    let stale = contract
        .call(
            &server,
            Method::PATCH,
            session_template,
            &session,
            &[("x-user-id", "alice"), ("if-match", etag.as_str())],
            Some(json!({"title": "Renamed"})),
        )
        .await;
    assert_eq!(
        stale.status,
        StatusCode::PRECONDITION_FAILED,
        "{}",
        stale.text
    );
    let fresh = contract
        .call(
            &server,
            get.clone(),
            session_template,
            &session,
            &alice,
            None,
        )
        .await;
    let etag = fresh.headers["etag"].to_str().expect("ETag").to_owned();
    let renamed = contract
        .call(
            &server,
            Method::PATCH,
            session_template,
            &session,
            &[("x-user-id", "alice"), ("if-match", etag.as_str())],
            Some(json!({"title": "Renamed", "metadata": {"k": 2}})),
        )
        .await;
    assert_eq!(renamed.json()["title"], "Renamed", "{}", renamed.text);

    let export_template = "/v1/sessions/{id}/export";
    let export = contract
        .call(
            &server,
            get.clone(),
            export_template,
            &format!("{session}/export"),
            &alice,
            None,
        )
        .await;
    let lines: Vec<Value> = export
        .text
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 1 + 5);
    contract.validate(
        &lines[0],
        &contract.schema("SessionSummary"),
        "line 1",
        "export",
    );
    for (index, line) in lines[1..].iter().enumerate() {
        contract.validate(
            line,
            &contract.schema("Message"),
            &format!("line {}", index + 2),
            "export",
        );
    }
    // The export imports back, under a new id: created, then the same again changes nothing.
    let copy = Uuid::now_v7();
    let mut first = lines[0].clone();
    first["session_id"] = json!(copy);
    let file: String = std::iter::once(&first)
        .chain(&lines[1..])
        .map(|line| format!("{line}\n"))
        .collect();
    let ndjson = [
        ("x-user-id", "alice"),
        ("content-type", "application/x-ndjson"),
    ];
    for expected in [StatusCode::CREATED, StatusCode::OK] {
        let imported = contract
            .call(
                &server,
                Method::POST,
                "/v1/sessions/import",
                "/v1/sessions/import",
                &ndjson,
                Some(Value::String(file.clone())),
            )
            .await;
        assert_eq!(imported.status, expected, "{}", imported.text);
        assert_eq!(imported.json()["session_id"], json!(copy));
    }

    let deleted = contract
        .call(
            &server,
            Method::DELETE,
            session_template,
            &session,
            &alice,
            None,
        )
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let gone = contract
        .call(
            &server,
            Method::DELETE,
            session_template,
            &session,
            &alice,
            None,
        )
        .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    // Its owner may still erase it; then everything of alice's is erased.
    let erased = contract
        .call(
            &server,
            Method::DELETE,
            session_template,
            &format!("{session}?erase=true"),
            &alice,
            None,
        )
        .await;
    assert_eq!(erased.status, StatusCode::NO_CONTENT, "{}", erased.text);
    let erase_all = contract
        .call(
            &server,
            Method::DELETE,
            "/v1/users/me/sessions",
            "/v1/users/me/sessions",
            &alice,
            None,
        )
        .await;
    assert_eq!(erase_all.status, StatusCode::OK, "{}", erase_all.text);
    assert!(erase_all.json()["erased"].as_u64().is_some_and(|n| n >= 1));

    // Outside any operation: an unknown path, a method a path does not take. Their codes are
    // described codes, their bodies error bodies.
    for (method, path, status) in [
        (Method::GET, "/v2/nothing", StatusCode::NOT_FOUND),
        (Method::PUT, "/v1/sessions", StatusCode::METHOD_NOT_ALLOWED),
    ] {
        let response = client()
            .request(method, server.url(path))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), status);
        let body: Value = response.json().await.expect("JSON");
        contract.validate(&body, &contract.schema("ErrorBody"), "error", path);
    }

    // Every operation answered with success at least once.
    let seen = contract.seen.lock().expect("seen").clone();
    let mut unanswered = BTreeMap::new();
    for (template, item) in contract.document["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("item").keys() {
            let upper = method.to_uppercase();
            let succeeded = seen
                .iter()
                .any(|(m, t, status)| *m == upper && t == template && *status < 300);
            if !succeeded && template != events_template {
                unanswered.insert(template.clone(), upper);
            }
        }
    }
    assert!(
        unanswered.is_empty(),
        "never answered with success: {unanswered:?}"
    );
}
