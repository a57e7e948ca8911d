//! The admin API answers every error as JSON (`{"error": ..., "hint": ...}`), its extractors'
//! refusals included: a body that is not JSON, a field it does not know, a path or method it
//! does not serve. Without this, axum answers those in plain text (or with an empty body).

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use super::admin::error_with_hint;

/// Where a client finds what the API takes.
const SCHEMA_HINT: &str = "the endpoints and their request schemas are in /api/openapi.json";

/// A JSON body, refused as JSON when it cannot be read.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    axum::Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(r) => Err(refusal(&r)),
        }
    }
}

/// Query parameters, refused as JSON when they cannot be read.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    axum::extract::Query<T>: FromRequestParts<S, Rejection = QueryRejection>,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Self(v)),
            Err(r) => Err(error_with_hint(
                StatusCode::BAD_REQUEST,
                r.body_text(),
                SCHEMA_HINT,
            )),
        }
    }
}

/// A query parameter outside its documented range, refused as the schema says.
pub fn out_of_range(name: &str, value: impl std::fmt::Display, min: u64, max: u64) -> Response {
    error_with_hint(
        StatusCode::BAD_REQUEST,
        format!("{name}={value} is out of range: give {min} to {max}"),
        SCHEMA_HINT,
    )
}

fn refusal(r: &JsonRejection) -> Response {
    match r {
        JsonRejection::MissingJsonContentType(_) => error_with_hint(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the request body must be JSON",
            "send it with Content-Type: application/json",
        ),
        JsonRejection::JsonDataError(e) => {
            error_with_hint(StatusCode::UNPROCESSABLE_ENTITY, e.body_text(), SCHEMA_HINT)
        }
        JsonRejection::JsonSyntaxError(e) => error_with_hint(
            StatusCode::BAD_REQUEST,
            e.body_text(),
            "the body is not valid JSON",
        ),
        other => error_with_hint(other.status(), other.body_text(), SCHEMA_HINT),
    }
}

/// What an unknown path under `/api/` gets (others, the UI's, keep the usual 404).
pub async fn not_found(method: Method, uri: Uri) -> Response {
    if uri.path().starts_with("/api/") {
        error_with_hint(
            StatusCode::NOT_FOUND,
            format!("no endpoint {method} {}", uri.path()),
            SCHEMA_HINT,
        )
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

/// A method an endpoint does not take (the path as the client sent it, not as nested).
pub async fn method_not_allowed(
    method: Method,
    axum::extract::OriginalUri(uri): axum::extract::OriginalUri,
) -> Response {
    error_with_hint(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
        SCHEMA_HINT,
    )
}
