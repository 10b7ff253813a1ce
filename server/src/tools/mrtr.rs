//! Conformance fixtures for the 2026-07-28 protocol: multi round-trip requests (MRTR, SEP-2322)
//! and the stateless-server diagnostics (SEP-2575).
//!
//! An MRTR tool answers `input_required` with requests for the client (elicitation, sampling,
//! roots) and an opaque `requestState`; the client retries with the answers. Each round may land
//! on any replica, so the state is self-contained and sealed with an HMAC key every replica shares
//! (see [`crate::state::AppState::request_state`]): a tampered state is rejected with -32602.

#![allow(
    deprecated,
    reason = "sampling, roots and logging are exercised by the suite"
)]

use std::time::Duration;

use rmcp::{
    ErrorData as McpError, RoleServer,
    handler::server::tool::{InputResponses, RequestState},
    model::{
        CallToolResponse, CallToolResult, ClientCapabilities, ContentBlock, GetPromptRequestParams,
        GetPromptResponse, GetPromptResult, InputRequest, InputRequests, InputRequiredResult,
        LoggingLevel, LoggingMessageNotificationParam, RequestStateCodec, ResultType, SealOptions,
    },
    service::RequestContext,
    tool, tool_router,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use shoal_shared::bus::ListKind;

use crate::{
    mcp::error::{During as _, Failure},
    toolbox::ToolHost,
};

/// How long a sealed request state stays valid.
const STATE_TTL: Duration = Duration::from_secs(10 * 60);

/// What a sealed `requestState` carries.
#[derive(Debug, Serialize, Deserialize)]
struct Round {
    /// The round that produced the state (1-based).
    round: u32,
    /// Answers collected in earlier rounds.
    #[serde(default)]
    carried: Value,
    /// Makes every state string unique.
    nonce: u64,
}

fn input(value: Value) -> Result<InputRequest, McpError> {
    serde_json::from_value(value)
        .map_err(|error| McpError::from(Failure::internal("input request fixture", error)))
}

fn elicit(message: &str, property: &str, kind: &str) -> Result<InputRequest, McpError> {
    input(json!({
        "method": "elicitation/create",
        "params": {
            "message": message,
            "requestedSchema": {"type": "object", "properties": {property: {"type": kind}}, "required": [property]}
        }
    }))
}

fn sample(question: &str, max_tokens: u32) -> Result<InputRequest, McpError> {
    input(json!({
        "method": "sampling/createMessage",
        "params": {
            "messages": [{"role": "user", "content": {"type": "text", "text": question}}],
            "maxTokens": max_tokens
        }
    }))
}

fn roots() -> Result<InputRequest, McpError> {
    input(json!({"method": "roots/list", "params": {}}))
}

/// The one question of the fixtures that only need a confirmation.
fn confirmation() -> Result<Vec<(&'static str, InputRequest)>, McpError> {
    Ok(vec![(
        "confirm",
        elicit("Please confirm", "ok", "boolean")?,
    )])
}

fn requests(entries: Vec<(&str, InputRequest)>) -> InputRequests {
    entries
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

/// An `input_required` answer asking `questions`, with no state to carry.
fn ask(questions: Vec<(&str, InputRequest)>) -> CallToolResponse {
    CallToolResponse::InputRequired(InputRequiredResult::from_input_requests(requests(
        questions,
    )))
}

fn complete(text: impl Into<String>) -> CallToolResponse {
    CallToolResponse::Complete(CallToolResult::success(vec![ContentBlock::text(text)]))
}

fn invalid(message: &str) -> McpError {
    McpError::invalid_params(message.to_owned(), None)
}

/// The accepted content of an elicitation answer: `Ok(None)` when the key was not answered.
fn accepted<'a>(
    responses: &'a Option<rmcp::model::InputResponses>,
    key: &str,
) -> Result<Option<&'a Value>, McpError> {
    let Some(answer) = responses.as_ref().and_then(|r| r.get(key)) else {
        return Ok(None);
    };
    let object = answer.as_object().ok_or_else(|| {
        invalid(&format!(
            "inputResponses.{key} must be an elicitation result object"
        ))
    })?;
    match object.get("action").and_then(Value::as_str) {
        Some("accept") => Ok(Some(object.get("content").unwrap_or(&Value::Null))),
        Some(_) => Err(invalid(&format!(
            "the user did not accept the {key} request"
        ))),
        None => Err(invalid(&format!("inputResponses.{key} has no action"))),
    }
}

/// The `field` of the accepted content of the elicitation answer `key`, when it is a string.
fn accepted_text<'a>(
    responses: &'a Option<rmcp::model::InputResponses>,
    key: &str,
    field: &str,
) -> Result<Option<&'a str>, McpError> {
    Ok(accepted(responses, key)?
        .and_then(|content| content.get(field))
        .and_then(Value::as_str))
}

/// The text a sampling answer carries (empty when it has none).
fn sampled_text(answer: &Value) -> &str {
    answer
        .pointer("/content/text")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// How many roots a `roots/list` answer names.
fn root_count(answer: &Value) -> usize {
    answer
        .get("roots")
        .and_then(Value::as_array)
        .map_or(0, Vec::len)
}

fn answered(responses: &Option<rmcp::model::InputResponses>, key: &str) -> Result<Value, McpError> {
    responses
        .as_ref()
        .and_then(|r| r.get(key))
        .cloned()
        .ok_or_else(|| invalid(&format!("missing inputResponses.{key}")))
}

/// What a sealed `requestState` is bound to (its associated data): the tool and the calling
/// principal, so a state opens only for the same tool called by the same principal.
fn binding(tool: &str, context: &RequestContext<RoleServer>) -> Vec<u8> {
    let caller = crate::mcp::handler::caller(context);
    [tool.as_bytes(), &[0], caller.id.as_bytes()].concat()
}

fn supports(capabilities: &Option<ClientCapabilities>, capability: &str) -> bool {
    capabilities
        .as_ref()
        .and_then(|caps| serde_json::to_value(caps).ok())
        .and_then(|value| value.get(capability).cloned())
        .is_some_and(|value| !value.is_null())
}

impl ToolHost {
    async fn codec(&self) -> Result<&RequestStateCodec, McpError> {
        Ok(self
            .state
            .request_state()
            .await
            .map_err(Failure::RequestState)?)
    }

    async fn seal(&self, binding: &[u8], round: u32, carried: Value) -> Result<String, McpError> {
        let codec = self.codec().await?;
        let payload = Round {
            round,
            carried,
            nonce: rand::random(),
        };
        codec
            .seal_json_with(
                &payload,
                &SealOptions::new().associated_data(binding).ttl(STATE_TTL),
            )
            .map_err(|error| Failure::internal("sealing request state", error).into())
    }

    /// An `input_required` answer asking `questions`, with `round` sealed for `binding` (see
    /// [`binding`]).
    async fn ask_sealed(
        &self,
        binding: &[u8],
        round: u32,
        carried: Value,
        questions: Vec<(&str, InputRequest)>,
    ) -> Result<CallToolResponse, McpError> {
        let state = self.seal(binding, round, carried).await?;
        Ok(CallToolResponse::InputRequired(InputRequiredResult::new(
            Some(requests(questions)),
            Some(state),
        )))
    }

    /// Where a fixture that carries state stands: on a first call (no answers, no state), the
    /// answer asking `first` with round 1 sealed (`Err`); else the round its state opens to.
    async fn resume(
        &self,
        binding: &[u8],
        responses: &Option<rmcp::model::InputResponses>,
        state: Option<String>,
        first: impl FnOnce() -> Result<Vec<(&'static str, InputRequest)>, McpError>,
    ) -> Result<Result<Round, CallToolResponse>, McpError> {
        if responses.is_none() && state.is_none() {
            return Ok(Err(self
                .ask_sealed(binding, 1, Value::Null, first()?)
                .await?));
        }
        self.open(binding, state).await.map(Ok)
    }

    /// Opens a state sealed for `binding`; a forged, tampered or expired one, or one sealed for
    /// another tool or another principal, is -32602.
    async fn open(&self, binding: &[u8], state: Option<String>) -> Result<Round, McpError> {
        let state =
            state.ok_or_else(|| invalid("requestState is required to continue this request"))?;
        self.codec()
            .await?
            .open_json_with(&state, binding)
            .map_err(|_| invalid("requestState integrity check failed"))
    }

    /// `prompts/get` of `test_input_required_result_prompt`.
    pub(crate) async fn input_required_prompt(
        &self,
        request: &GetPromptRequestParams,
    ) -> Result<GetPromptResponse, McpError> {
        match accepted(&request.input_responses, "user_context")? {
            Some(content) => {
                let context = content
                    .get("context")
                    .and_then(Value::as_str)
                    .unwrap_or("none");
                let mut result: GetPromptResult = serde_json::from_value(json!({
                    "description": "A prompt that needed input",
                    "messages": [{"role": "user", "content": {"type": "text",
                        "text": format!("Answer using this context: {context}")}}]
                }))
                .map_err(|error| McpError::from(Failure::internal("prompt fixture", error)))?;
                result.result_type = Some(ResultType::COMPLETE);
                Ok(GetPromptResponse::Complete(result))
            }
            None => Ok(GetPromptResponse::InputRequired(
                InputRequiredResult::from_input_requests(requests(vec![(
                    "user_context",
                    elicit("What context should the prompt use?", "context", "string")?,
                )])),
            )),
        }
    }
}

#[tool_router(router = mrtr_tools, vis = "pub(crate)")]
impl ToolHost {
    #[tool(
        description = "Conformance fixture (MRTR): asks the user's name through an input request, then greets."
    )]
    async fn test_input_required_result_elicitation(
        &self,
        InputResponses(responses): InputResponses,
    ) -> Result<CallToolResponse, McpError> {
        match accepted(&responses, "user_name")? {
            Some(content) => {
                let name = content.get("name").and_then(Value::as_str).ok_or_else(|| {
                    invalid("inputResponses.user_name.content.name must be a string")
                })?;
                Ok(complete(format!("Hello, {name}!")))
            }
            // First round, or answers that miss the key: ask (again).
            None => Ok(ask(vec![(
                "user_name",
                elicit("What is your name?", "name", "string")?,
            )])),
        }
    }

    #[tool(
        description = "Conformance fixture (MRTR): asks the client's model a question through an input request."
    )]
    async fn test_input_required_result_sampling(
        &self,
        InputResponses(responses): InputResponses,
    ) -> Result<CallToolResponse, McpError> {
        if responses.is_none() {
            return Ok(ask(vec![(
                "capital_question",
                sample("What is the capital of France?", 100)?,
            )]));
        }
        let answer = answered(&responses, "capital_question")?;
        Ok(complete(format!(
            "The model answered: {}",
            sampled_text(&answer)
        )))
    }

    #[tool(
        description = "Conformance fixture (MRTR): asks the client for its roots through an input request."
    )]
    async fn test_input_required_result_list_roots(
        &self,
        InputResponses(responses): InputResponses,
    ) -> Result<CallToolResponse, McpError> {
        if responses.is_none() {
            return Ok(ask(vec![("client_roots", roots()?)]));
        }
        let count = root_count(&answered(&responses, "client_roots")?);
        Ok(complete(format!("The client has {count} root(s)")))
    }

    #[tool(
        description = "Conformance fixture (MRTR): needs a confirmation and carries sealed request state between rounds."
    )]
    async fn test_input_required_result_request_state(
        &self,
        InputResponses(responses): InputResponses,
        RequestState(state): RequestState,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        if let Err(asked) = self
            .resume(
                &binding("test_input_required_result_request_state", &context),
                &responses,
                state,
                confirmation,
            )
            .await?
        {
            return Ok(asked);
        }
        let ok = accepted(&responses, "confirm")?
            .and_then(|content| content.get("ok"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(complete(format!("state-ok: confirmed={ok}")))
    }

    #[tool(
        description = "Conformance fixture (MRTR): asks for elicitation, sampling and roots in one round."
    )]
    async fn test_input_required_result_multiple_inputs(
        &self,
        InputResponses(responses): InputResponses,
        RequestState(state): RequestState,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let first = || {
            Ok(vec![
                ("user_name", elicit("What is your name?", "name", "string")?),
                ("greeting", sample("Generate a greeting", 50)?),
                ("client_roots", roots()?),
            ])
        };
        if let Err(asked) = self
            .resume(
                &binding("test_input_required_result_multiple_inputs", &context),
                &responses,
                state,
                first,
            )
            .await?
        {
            return Ok(asked);
        }
        let name = accepted_text(&responses, "user_name", "name")?.unwrap_or("someone");
        let greeting = answered(&responses, "greeting")?;
        let count = root_count(&answered(&responses, "client_roots")?);
        Ok(complete(format!(
            "{} {name}; {count} root(s)",
            sampled_text(&greeting)
        )))
    }

    #[tool(
        description = "Conformance fixture (MRTR): asks two questions in two rounds, carrying the first answer in sealed state."
    )]
    async fn test_input_required_result_multi_round(
        &self,
        InputResponses(responses): InputResponses,
        RequestState(state): RequestState,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        const TOOL: &str = "test_input_required_result_multi_round";
        let binding = binding(TOOL, &context);
        let first = || {
            Ok(vec![(
                "step1",
                elicit("Step 1: What is your name?", "name", "string")?,
            )])
        };
        let round = match self.resume(&binding, &responses, state, first).await? {
            Ok(round) => round,
            Err(asked) => return Ok(asked),
        };
        match round.round {
            1 => {
                let name = accepted_text(&responses, "step1", "name")?
                    .ok_or_else(|| invalid("step1 needs a name"))?;
                let color = elicit("Step 2: What is your favorite color?", "color", "string")?;
                self.ask_sealed(&binding, 2, json!({"name": name}), vec![("step2", color)])
                    .await
            }
            2 => {
                let color = accepted_text(&responses, "step2", "color")?
                    .ok_or_else(|| invalid("step2 needs a color"))?;
                let name = round
                    .carried
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("someone");
                Ok(complete(format!("{name} likes {color}")))
            }
            _ => Err(invalid("requestState names an unknown round")),
        }
    }

    #[tool(
        description = "Conformance fixture (MRTR): rejects a request state that was tampered with."
    )]
    async fn test_input_required_result_tampered_state(
        &self,
        InputResponses(responses): InputResponses,
        RequestState(state): RequestState,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        Ok(
            match self
                .resume(
                    &binding("test_input_required_result_tampered_state", &context),
                    &responses,
                    state,
                    confirmation,
                )
                .await?
            {
                Ok(_) => complete("state verified"),
                Err(asked) => asked,
            },
        )
    }

    #[tool(
        description = "Conformance fixture (MRTR): only asks for what the client declared it can do."
    )]
    async fn test_input_required_result_capabilities(
        &self,
        context: RequestContext<RoleServer>,
        InputResponses(responses): InputResponses,
    ) -> Result<CallToolResponse, McpError> {
        if responses.is_some() {
            return Ok(complete("thanks"));
        }
        let capabilities = context.client_capabilities();
        let mut asked = Vec::new();
        if supports(&capabilities, "elicitation") {
            asked.push(("user_name", elicit("What is your name?", "name", "string")?));
        }
        if supports(&capabilities, "sampling") {
            asked.push(("greeting", sample("Generate a greeting", 50)?));
        }
        if supports(&capabilities, "roots") {
            asked.push(("client_roots", roots()?));
        }
        if asked.is_empty() {
            return Ok(complete(
                "the client declared no capability this tool could use",
            ));
        }
        Ok(ask(asked))
    }

    #[tool(
        description = "Conformance fixture (SEP-2575): needs the client's sampling capability and says so when it is missing."
    )]
    async fn test_missing_capability(
        &self,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        if !supports(&context.client_capabilities(), "sampling") {
            let mut required = ClientCapabilities::default();
            required.sampling = Some(Default::default());
            return Err(McpError::missing_required_client_capability(required));
        }
        Ok(complete("the client supports sampling"))
    }

    #[tool(
        description = "Conformance fixture (SEP-2575): asks for input through an input-required result, never a request frame."
    )]
    async fn test_streaming_elicitation(
        &self,
        InputResponses(responses): InputResponses,
    ) -> Result<CallToolResponse, McpError> {
        if responses.is_some() {
            return Ok(complete("thanks"));
        }
        Ok(ask(vec![(
            "user_name",
            elicit("What is your name?", "name", "string")?,
        )]))
    }

    #[tool(
        description = "Conformance fixture (SEP-2575): logs only when the request asks for a log level."
    )]
    async fn test_logging_tool(
        &self,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        if let Some(level) = context.meta.log_level() {
            let rank = |level: LoggingLevel| {
                serde_json::to_value(level)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
            };
            let wanted = rank(level).unwrap_or_default();
            if matches!(wanted.as_str(), "debug" | "info") {
                let message = LoggingMessageNotificationParam::new(
                    LoggingLevel::Info,
                    json!("test_logging_tool ran"),
                )
                .with_logger("conformance");
                let _ = context.peer.notify_logging_message(message).await;
            }
        }
        Ok(CallToolResult::success(vec![ContentBlock::text(
            "logging tool done",
        )]))
    }

    #[tool(
        description = "Conformance fixture: announces that the tool list changed, on every replica."
    )]
    async fn test_trigger_tool_change(
        &self,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        self.announce(ListKind::Tools, &context).await
    }

    #[tool(
        description = "Conformance fixture: announces that the prompt list changed, on every replica."
    )]
    async fn test_trigger_prompt_change(
        &self,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        self.announce(ListKind::Prompts, &context).await
    }
}

impl ToolHost {
    async fn announce(
        &self,
        list: ListKind,
        context: &RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        // subscriptions/listen streams anywhere in the cluster...
        self.state
            .backend
            .list_changed(list)
            .await
            .during("list_changed")?;
        // ...and the calling legacy session's own GET stream.
        if crate::mcp::handler::session_id(context).is_some() {
            let sent = match list {
                ListKind::Tools => context.peer.notify_tool_list_changed().await,
                ListKind::Prompts => context.peer.notify_prompt_list_changed().await,
                ListKind::Resources => context.peer.notify_resource_list_changed().await,
            };
            if let Err(error) = sent {
                tracing::debug!(%error, "list-changed notification not delivered");
            }
        }
        Ok(CallToolResult::success(vec![ContentBlock::text(
            "announced",
        )]))
    }
}
