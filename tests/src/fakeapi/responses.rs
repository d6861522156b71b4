//! Response bodies: JSON documents and the `Status` objects errors are reported in.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};

pub(crate) type Body = BoxBody<Bytes, std::io::Error>;

pub(crate) fn full(status: StatusCode, body: Value) -> Response<Body> {
    let bytes = Bytes::from(body.to_string());
    let mut resp = Response::new(Full::new(bytes).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

pub(crate) fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

pub(crate) fn error_response(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    full(code, status_object(code.as_u16(), reason, message))
}
