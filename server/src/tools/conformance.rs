//! Toolset `conformance`: the fixtures the official MCP conformance suite calls (see
//! `docs/conformance.md`). Names and behaviours follow the suite's reference server; values are
//! our own.

#![allow(
    deprecated,
    reason = "sampling, elicitation and logging are legacy-era features the suite still exercises"
)]

use std::time::Duration;

use rmcp::{
    ErrorData as McpError, RoleServer,
    handler::server::wrapper::Parameters,
    model::{
        CacheScope, CallToolResult, CompleteRequestParams, ContentBlock,
        CreateMessageRequestParams, ElicitRequestParams, GetPromptRequestParams, GetPromptResult,
        LoggingLevel, LoggingMessageNotificationParam, ProgressNotificationParam, Prompt,
        ReadResourceResult, Resource, ResourceContents, ResourceTemplate,
    },
    service::RequestContext,
    tool, tool_router,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use futures::{FutureExt as _, future::BoxFuture};
use rmcp::model::GetPromptResponse;

use crate::{
    mcp::handler::session_id,
    toolbox::{ToolHost, Toolset},
    tools::model,
};

/// The toolset: the fixtures of the MCP conformance suite (its tools, the multi round-trip ones of
/// [`crate::tools::mrtr`] included, resources and prompts).
#[derive(Debug)]
pub struct Conformance;

impl Toolset for Conformance {
    fn name(&self) -> &'static str {
        "conformance"
    }

    fn router(&self) -> rmcp::handler::server::router::tool::ToolRouter<ToolHost> {
        let mut router = ToolHost::conformance_tools();
        router += ToolHost::mrtr_tools();
        router.add_route(json_schema_tool());
        router.add_route(custom_header_tool());
        router
    }

    fn resources(&self) -> Vec<Resource> {
        resources()
    }

    fn templates(&self) -> Vec<ResourceTemplate> {
        templates()
    }

    fn prompts(&self) -> Vec<Prompt> {
        prompts()
    }

    fn owns(&self, uri: &str) -> bool {
        uri.starts_with("test://")
    }

    fn subscribable(&self, uri: &str) -> bool {
        is_resource(uri)
    }

    fn read<'a>(
        &'a self,
        _host: &'a ToolHost,
        uri: &'a str,
    ) -> BoxFuture<'a, Result<ReadResourceResult, McpError>> {
        let result = read(uri).ok_or_else(|| crate::toolbox::resource_not_found(uri));
        futures::future::ready(result).boxed()
    }

    fn complete(&self, request: &CompleteRequestParams) -> Vec<String> {
        complete(request)
    }

    fn get_prompt<'a>(
        &'a self,
        host: &'a ToolHost,
        request: &'a GetPromptRequestParams,
    ) -> Option<BoxFuture<'a, Result<GetPromptResponse, McpError>>> {
        if request.name == INPUT_REQUIRED_PROMPT {
            return Some(host.input_required_prompt(request).boxed());
        }
        let answer = get_prompt(request).map(|mut result| {
            result.result_type = Some(rmcp::model::ResultType::COMPLETE);
            GetPromptResponse::Complete(result)
        });
        Some(futures::future::ready(answer).boxed())
    }
}

/// A 1×1 transparent PNG.
const PNG_1X1: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";
/// A 44-byte WAV header with one silent 8-bit sample.
const WAV_SILENCE: &str = "UklGRiUAAABXQVZFZm10IBAAAAABAAEAQB8AAEAfAAABAAgAZGF0YQEAAACA";

/// The multi round-trip prompt (served by [`crate::tools::mrtr`]).
pub const INPUT_REQUIRED_PROMPT: &str = "test_input_required_result_prompt";

const STATIC_TEXT: &str = "This is the content of the static text resource.";

/// Arguments of `test_sampling`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct SamplingParams {
    /// The prompt to send to the client's model.
    pub prompt: String,
}

/// Arguments of `test_elicitation`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct ElicitationParams {
    /// The message to show the user.
    pub message: String,
}

/// Fixed resources.
pub fn resources() -> Vec<Resource> {
    vec![
        model(
            json!({"uri": "test://static-text", "name": "static-text", "mimeType": "text/plain",
            "description": "A static text resource"}),
        ),
        model(
            json!({"uri": "test://static-binary", "name": "static-binary", "mimeType": "image/png",
            "description": "A static binary resource (a 1x1 PNG)"}),
        ),
        model(
            json!({"uri": "test://watched-resource", "name": "watched-resource", "mimeType": "text/plain",
            "description": "A resource clients may subscribe to"}),
        ),
    ]
}

/// Resource templates.
pub fn templates() -> Vec<ResourceTemplate> {
    vec![model(json!({
        "uriTemplate": "test://template/{id}/data",
        "name": "template-data",
        "mimeType": "application/json",
        "description": "Data for an id",
    }))]
}

/// Whether `uri` is a resource of this toolset.
pub fn is_resource(uri: &str) -> bool {
    matches!(
        uri,
        "test://static-text" | "test://static-binary" | "test://watched-resource"
    ) || template_id(uri).is_some()
}

fn template_id(uri: &str) -> Option<&str> {
    uri.strip_prefix("test://template/")?
        .strip_suffix("/data")
        .filter(|id| !id.is_empty() && !id.contains('/'))
}

fn static_result(contents: ResourceContents) -> ReadResourceResult {
    let mut result = ReadResourceResult::new(vec![contents]);
    result.ttl_ms = Some(5 * 60 * 1000);
    result.cache_scope = Some(CacheScope::Public);
    result
}

/// `resources/read` of this toolset's resources.
pub fn read(uri: &str) -> Option<ReadResourceResult> {
    let contents: ResourceContents = match uri {
        "test://static-text" => {
            model(json!({"uri": uri, "mimeType": "text/plain", "text": STATIC_TEXT}))
        }
        "test://static-binary" => {
            model(json!({"uri": uri, "mimeType": "image/png", "blob": PNG_1X1}))
        }
        "test://watched-resource" => {
            model(json!({"uri": uri, "mimeType": "text/plain", "text": "watched"}))
        }
        _ => {
            let id = template_id(uri)?;
            let text =
                json!({"id": id, "templateTest": true, "data": format!("Data for ID: {id}")})
                    .to_string();
            model(json!({"uri": uri, "mimeType": "application/json", "text": text}))
        }
    };
    Some(static_result(contents))
}

/// Prompts.
pub fn prompts() -> Vec<Prompt> {
    vec![
        model(json!({"name": "test_simple_prompt", "description": "A prompt without arguments"})),
        model(
            json!({"name": "test_prompt_with_arguments", "description": "A prompt with two required arguments",
            "arguments": [
                {"name": "arg1", "description": "First argument", "required": true},
                {"name": "arg2", "description": "Second argument", "required": true}
            ]}),
        ),
        model(
            json!({"name": "test_prompt_with_embedded_resource", "description": "A prompt embedding a resource",
            "arguments": [{"name": "resourceUri", "description": "URI of the resource to embed", "required": true}]}),
        ),
        model(json!({"name": "test_prompt_with_image", "description": "A prompt with an image"})),
        model(json!({"name": INPUT_REQUIRED_PROMPT,
            "description": "A prompt that asks the client for context first (multi round-trip)"})),
    ]
}

fn argument<'a>(request: &'a GetPromptRequestParams, name: &str) -> Result<&'a str, McpError> {
    request
        .arguments
        .as_ref()
        .and_then(|arguments| arguments.get(name))
        .and_then(|value| value.as_str())
        .ok_or_else(|| McpError::invalid_params(format!("missing required argument {name}"), None))
}

/// `prompts/get`.
///
/// # Errors
/// `invalid_params` for unknown prompts and missing arguments.
pub fn get_prompt(request: &GetPromptRequestParams) -> Result<GetPromptResult, McpError> {
    let messages = match request.name.as_str() {
        "test_simple_prompt" => json!([
            {"role": "user", "content": {"type": "text", "text": "This is a simple prompt for testing."}}
        ]),
        "test_prompt_with_arguments" => {
            let (arg1, arg2) = (argument(request, "arg1")?, argument(request, "arg2")?);
            json!([{"role": "user", "content": {"type": "text",
                "text": format!("Prompt with arguments: arg1='{arg1}', arg2='{arg2}'")}}])
        }
        "test_prompt_with_embedded_resource" => {
            let uri = argument(request, "resourceUri")?;
            json!([
                {"role": "user", "content": {"type": "resource", "resource":
                    {"uri": uri, "mimeType": "text/plain", "text": "Embedded resource content for testing."}}},
                {"role": "user", "content": {"type": "text", "text": "Please process the embedded resource above."}}
            ])
        }
        "test_prompt_with_image" => json!([
            {"role": "user", "content": {"type": "image", "data": PNG_1X1, "mimeType": "image/png"}},
            {"role": "user", "content": {"type": "text", "text": "Please analyze the image above."}}
        ]),
        other => {
            return Err(McpError::invalid_params(
                format!("unknown prompt: {other}"),
                None,
            ));
        }
    };
    serde_json::from_value(json!({"description": request.name, "messages": messages})).map_err(
        |error| {
            McpError::from(crate::mcp::error::Failure::internal(
                "prompt fixture",
                error,
            ))
        },
    )
}

/// `completion/complete` values for the fixtures' prompt arguments.
pub fn complete(request: &CompleteRequestParams) -> Vec<String> {
    let typed = request.argument.value.as_str();
    ["test", "test-value", "testing", "example"]
        .into_iter()
        .filter(|candidate| candidate.starts_with(typed))
        .map(str::to_owned)
        .collect()
}

fn level_rank(level: &str) -> u8 {
    match level {
        "debug" => 0,
        "info" => 1,
        "notice" => 2,
        "warning" => 3,
        "error" => 4,
        "critical" => 5,
        "alert" => 6,
        "emergency" => 7,
        _ => 1,
    }
}

#[tool_router(router = conformance_tools, vis = "pub(crate)")]
impl ToolHost {
    #[tool(description = "Conformance fixture: returns a simple text result.")]
    async fn test_simple_text(&self) -> Result<CallToolResult, McpError> {
        Ok(CallToolResult::success(vec![ContentBlock::text(
            "This is a simple text response for testing.",
        )]))
    }

    #[tool(description = "Conformance fixture: returns an image (a 1x1 PNG).")]
    async fn test_image_content(&self) -> Result<CallToolResult, McpError> {
        Ok(CallToolResult::success(vec![ContentBlock::image(
            PNG_1X1,
            "image/png",
        )]))
    }

    #[tool(description = "Conformance fixture: returns audio (a silent WAV).")]
    async fn test_audio_content(&self) -> Result<CallToolResult, McpError> {
        Ok(CallToolResult::success(vec![ContentBlock::audio(
            WAV_SILENCE,
            "audio/wav",
        )]))
    }

    #[tool(description = "Conformance fixture: returns an embedded text resource.")]
    async fn test_embedded_resource(&self) -> Result<CallToolResult, McpError> {
        Ok(CallToolResult::success(vec![ContentBlock::resource(
            model(json!({
                "uri": "test://embedded-resource", "mimeType": "text/plain", "text": "This is an embedded resource content."
            })),
        )]))
    }

    #[tool(description = "Conformance fixture: returns text, an image and an embedded resource.")]
    async fn test_multiple_content_types(&self) -> Result<CallToolResult, McpError> {
        Ok(CallToolResult::success(vec![
            ContentBlock::text("Multiple content types test:"),
            ContentBlock::image(PNG_1X1, "image/png"),
            ContentBlock::resource(model(json!({
                "uri": "test://mixed-content-resource", "mimeType": "application/json",
                "text": json!({"test": "data", "value": 123}).to_string()
            }))),
        ]))
    }

    #[tool(description = "Conformance fixture: sends three log messages while it runs.")]
    async fn test_tool_with_logging(
        &self,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let threshold = match session_id(&context) {
            Some(session) => self
                .state
                .backend
                .session_get_field(&session, "log")
                .await
                .ok()
                .flatten(),
            None => None,
        };
        let threshold = level_rank(threshold.as_deref().unwrap_or("debug"));
        for (n, text) in [
            "Tool execution started",
            "Tool processing data",
            "Tool execution completed",
        ]
        .into_iter()
        .enumerate()
        {
            if n > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if level_rank("info") >= threshold {
                let message = LoggingMessageNotificationParam::new(LoggingLevel::Info, json!(text))
                    .with_logger("conformance");
                let _ = context.peer.notify_logging_message(message).await;
            }
        }
        Ok(CallToolResult::success(vec![ContentBlock::text(
            "Tool with logging executed successfully",
        )]))
    }

    #[tool(description = "Conformance fixture: reports progress 0, 50 and 100 of 100.")]
    async fn test_tool_with_progress(
        &self,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        if let Some(token) = context.meta.get_progress_token() {
            for (n, progress) in [0.0, 50.0, 100.0].into_iter().enumerate() {
                if n > 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let param = ProgressNotificationParam::new(token.clone(), progress)
                    .with_total(100.0)
                    .with_message(format!("Completed step {n} of 2"));
                let _ = context.peer.notify_progress(param).await;
            }
        }
        Ok(CallToolResult::success(vec![ContentBlock::text(
            "Tool with progress executed successfully",
        )]))
    }

    #[tool(description = "Conformance fixture: always fails with a tool error.")]
    async fn test_error_handling(&self) -> Result<CallToolResult, McpError> {
        Ok(crate::toolbox::failed(
            "This tool intentionally returns an error for testing",
        ))
    }

    #[tool(
        description = "Conformance fixture: asks the client's model to answer a prompt (sampling)."
    )]
    async fn test_sampling(
        &self,
        Parameters(params): Parameters<SamplingParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let request: CreateMessageRequestParams = serde_json::from_value(json!({
            "messages": [{"role": "user", "content": {"type": "text", "text": params.prompt}}],
            "maxTokens": 100
        }))
        .map_err(|error| {
            McpError::from(crate::mcp::error::Failure::internal(
                "sampling fixture",
                error,
            ))
        })?;
        match context.peer.create_message(request).await {
            Ok(result) => {
                let answer = serde_json::to_value(&result.message.content).unwrap_or_default();
                Ok(CallToolResult::success(vec![ContentBlock::text(format!(
                    "LLM response: {answer}"
                ))]))
            }
            Err(error) => Ok(crate::toolbox::failed(format!("sampling failed: {error}"))),
        }
    }

    #[tool(description = "Conformance fixture: asks the user for information (elicitation).")]
    async fn test_elicitation(
        &self,
        Parameters(params): Parameters<ElicitationParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let request = elicitation(json!({
            "message": params.message,
            "requestedSchema": {
                "type": "object",
                "properties": {
                    "username": {"type": "string", "description": "User's response"},
                    "email": {"type": "string", "description": "User's email address"}
                },
                "required": ["username", "email"]
            }
        }))?;
        self.run_elicitation(request, &context).await
    }

    #[tool(
        description = "Conformance fixture: elicitation whose schema carries default values (SEP-1034)."
    )]
    async fn test_elicitation_sep1034_defaults(
        &self,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let request = elicitation(json!({
            "message": "Please review and update the form fields with defaults",
            "requestedSchema": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "description": "User name", "default": "John Doe"},
                    "age": {"type": "integer", "description": "User age", "default": 30},
                    "score": {"type": "number", "description": "User score", "default": 95.5},
                    "status": {"type": "string", "description": "User status",
                        "enum": ["active", "inactive", "pending"], "default": "active"},
                    "verified": {"type": "boolean", "description": "Verification status", "default": true}
                },
                "required": []
            }
        }))?;
        self.run_elicitation(request, &context).await
    }

    #[tool(description = "Conformance fixture: elicitation with every enum form (SEP-1330).")]
    async fn test_elicitation_sep1330_enums(
        &self,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let request = elicitation(json!({
            "message": "Please select options from the enum fields",
            "requestedSchema": {
                "type": "object",
                "properties": {
                    "untitledSingle": {"type": "string", "description": "Select one option",
                        "enum": ["option1", "option2", "option3"]},
                    "titledSingle": {"type": "string", "description": "Select one option with titles",
                        "oneOf": [
                            {"const": "value1", "title": "First Option"},
                            {"const": "value2", "title": "Second Option"},
                            {"const": "value3", "title": "Third Option"}
                        ]},
                    "legacyEnum": {"type": "string", "description": "Select one option (legacy)",
                        "enum": ["opt1", "opt2", "opt3"],
                        "enumNames": ["Option One", "Option Two", "Option Three"]},
                    "untitledMulti": {"type": "array", "description": "Select multiple options",
                        "items": {"type": "string", "enum": ["option1", "option2", "option3"]}},
                    "titledMulti": {"type": "array", "description": "Select multiple options with titles",
                        "items": {"anyOf": [
                            {"const": "value1", "title": "First Choice"},
                            {"const": "value2", "title": "Second Choice"},
                            {"const": "value3", "title": "Third Choice"}
                        ]}}
                },
                "required": []
            }
        }))?;
        self.run_elicitation(request, &context).await
    }
}

/// `json_schema_2020_12_tool`: a tool whose input schema uses JSON Schema 2020-12 features that
/// must reach clients unchanged.
pub fn json_schema_tool() -> rmcp::handler::server::router::tool::ToolRoute<ToolHost> {
    let tool: rmcp::model::Tool = model(json!({
        "name": "json_schema_2020_12_tool",
        "description": "Conformance fixture: an input schema with $schema, $defs and additionalProperties.",
        "inputSchema": {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "$defs": {
                "address": {
                    "$anchor": "address",
                    "type": "object",
                    "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
                    "required": ["street", "city"]
                }
            },
            "properties": {"name": {"type": "string"}, "address": {"$ref": "#/$defs/address"}},
            "required": ["name"],
            "allOf": [
                {"properties": {"name": {"minLength": 1}}},
                {"anyOf": [{"required": ["name"]}, {"required": ["address"]}]}
            ],
            "if": {"properties": {"name": {"const": "admin"}}},
            "then": {"required": ["address"]},
            "else": {"properties": {"address": {"$ref": "#/$defs/address"}}},
            "additionalProperties": false
        }
    }));
    rmcp::handler::server::router::tool::ToolRoute::new_dyn(tool, |context| {
        let name = context
            .arguments
            .as_ref()
            .and_then(|arguments| arguments.get("name"))
            .and_then(serde_json::Value::as_str)
            .unwrap_or("nobody")
            .to_owned();
        Box::pin(async move {
            Ok(
                CallToolResult::success(vec![ContentBlock::text(format!("schema ok for {name}"))])
                    .into(),
            )
        })
    })
}

/// `test_custom_header`: a tool whose `region` argument is mirrored in the `Mcp-Param-Region`
/// header (SEP-2243), which rmcp validates against the body.
pub fn custom_header_tool() -> rmcp::handler::server::router::tool::ToolRoute<ToolHost> {
    let tool: rmcp::model::Tool = model(json!({
        "name": "test_custom_header",
        "description": "Conformance fixture: its region argument travels in the Mcp-Param-Region header too.",
        "inputSchema": {
            "type": "object",
            "properties": {"region": {"type": "string", "description": "A region name", "x-mcp-header": "Region"}},
            "required": ["region"]
        }
    }));
    rmcp::handler::server::router::tool::ToolRoute::new_dyn(tool, |context| {
        let region = context
            .arguments
            .as_ref()
            .and_then(|arguments| arguments.get("region"))
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned();
        Box::pin(async move {
            Ok(
                CallToolResult::success(vec![ContentBlock::text(format!("region {region}"))])
                    .into(),
            )
        })
    })
}

fn elicitation(params: serde_json::Value) -> Result<ElicitRequestParams, McpError> {
    serde_json::from_value(params).map_err(|error| {
        McpError::from(crate::mcp::error::Failure::internal(
            "elicitation fixture",
            error,
        ))
    })
}

impl ToolHost {
    async fn run_elicitation(
        &self,
        request: ElicitRequestParams,
        context: &RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        match context.peer.create_elicitation(request).await {
            Ok(result) => {
                let answer = serde_json::to_value(&result).unwrap_or_default();
                Ok(CallToolResult::success(vec![ContentBlock::text(format!(
                    "User response: {answer}"
                ))]))
            }
            Err(error) => Ok(crate::toolbox::failed(format!(
                "elicitation failed: {error}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixtures_deserialize() {
        assert_eq!(resources().len(), 3);
        assert_eq!(templates().len(), 1);
        assert_eq!(prompts().len(), 5);
        for uri in [
            "test://static-text",
            "test://static-binary",
            "test://watched-resource",
            "test://template/123/data",
        ] {
            assert!(is_resource(uri), "{uri}");
            assert!(read(uri).is_some(), "{uri}");
        }
        assert!(!is_resource("test://template//data"));
        assert!(read("test://nope").is_none());
    }

    #[test]
    fn template_data_carries_the_id() {
        let result = read("test://template/123/data").expect("read");
        let text = serde_json::to_string(&result).expect("serialize");
        assert!(text.contains("Data for ID: 123"), "{text}");
    }
}
