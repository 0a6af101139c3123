//! The router's discovery endpoints: the models it serves (`GET /v1/models`, `/v1/models/{id}`)
//! and what a user has left of their limits (`GET /v1/limits`).

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{bad, bearer_token, ApiError};
use crate::error::RouterError;
use crate::service::RouterService;

pub(super) async fn list_models(State(svc): State<RouterService>) -> Json<Value> {
    let owner = &svc.config().name;
    let data: Vec<Value> = svc
        .models()
        .into_iter()
        .map(|id| model_json(&id, owner))
        .collect();
    Json(json!({"object": "list", "data": data, "syft_limits": svc.limits_json()}))
}

/// `GET /v1/models/{id}`: a model a chat may name (any, when the config lists none), or 404 as
/// OpenAI answers an unknown one.
pub(super) async fn retrieve_model(
    State(svc): State<RouterService>,
    id: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<Value>, ApiError> {
    // An id that is not UTF-8 (`%ff`) is refused in OpenAI's shape, not axum's plain text.
    let axum::extract::Path(id) =
        id.map_err(|e| RouterError::InvalidArgument(format!("the model id: {}", e.body_text())))?;
    if svc.serves_model(&id) {
        return Ok(Json(model_json(&id, &svc.config().name)));
    }
    Err(RouterError::NotFound(format!(
        "the model {id:?} is not served by this router (GET /v1/models lists them)"
    ))
    .into())
}

fn model_json(id: &str, owner: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": owner})
}

#[derive(Deserialize)]
pub(super) struct LimitsQuery {
    #[serde(default)]
    user: String,
    #[serde(default)]
    service: String,
}

/// `GET /v1/limits[?user=<email>][&service=chat|search]` with `Authorization: Bearer <token>`:
/// what is left of each of the token's sender's windows on that service (chat by default).
pub(super) async fn limits_left(
    State(svc): State<RouterService>,
    headers: HeaderMap,
    query: Result<axum::extract::Query<LimitsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let query = query.map_err(|e| bad(format!("expected ?user=<email>: {e}")))?;
    let service = crate::service::parse_service(&query.service)?;
    let token = bearer_token(&headers)?;
    let user = svc.limits_user(&query.user, &token).await?;
    let windows = svc.remaining_limits(&user, service).await?;
    let mut body = crate::limits::remaining_json(&user, &windows);
    let budgets: Vec<Value> = svc
        .budgets_left(&user, service)
        .await?
        .iter()
        .filter_map(crate::limits::budget_left_json)
        .collect();
    body["budgets"] = Value::Array(budgets);
    Ok(Json(body))
}
