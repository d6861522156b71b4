//! Lists: field and label selectors ([`Filter`], shared with watches), and `limit` +
//! `continue` pages over one consistent snapshot.

use super::responses::{error_response, full, Body};
use super::store::{Kind, Shared};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};
use std::collections::HashMap;

/// Which objects a list or watch covers.
pub(crate) struct Filter {
    pub(crate) kind: Kind,
    pub(crate) namespace: Option<String>,
    /// (field, wanted value, equal?)
    pub(crate) fields: Vec<(String, String, bool)>,
    pub(crate) labels: Vec<LabelReq>,
}

pub(crate) enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// Splits a selector on commas outside parentheses.
pub(crate) fn split_selector(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0i32);
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out.into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

impl Filter {
    pub(crate) fn new(
        kind: Kind,
        namespace: Option<String>,
        params: &HashMap<String, String>,
    ) -> std::result::Result<Self, String> {
        let mut fields = Vec::new();
        for term in split_selector(params.get("fieldSelector").map_or("", String::as_str)) {
            let (k, v, eq) = if let Some((k, v)) = term.split_once("!=") {
                (k, v, false)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, v, true)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, v, true)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            let k = k.trim();
            if k != "metadata.name" && k != "metadata.namespace" {
                return Err(format!(
                    "field label not supported: {k} (the fake server knows metadata.name and \
                     metadata.namespace)"
                ));
            }
            fields.push((k.to_string(), v.trim().to_string(), eq));
        }
        let mut labels = Vec::new();
        for term in split_selector(params.get("labelSelector").map_or("", String::as_str)) {
            let set = |v: &str| -> Vec<String> {
                v.trim()
                    .trim_start_matches('(')
                    .trim_end_matches(')')
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .collect()
            };
            let req = if let Some((k, v)) = term.split_once(" notin ") {
                LabelReq::NotIn(k.trim().into(), set(v))
            } else if let Some((k, v)) = term.split_once(" in ") {
                LabelReq::In(k.trim().into(), set(v))
            } else if let Some((k, v)) = term.split_once("!=") {
                LabelReq::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once("==") {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once('=') {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some(k) = term.strip_prefix('!') {
                LabelReq::NotExists(k.trim().into())
            } else {
                LabelReq::Exists(term.trim().into())
            };
            labels.push(req);
        }
        Ok(Filter {
            kind,
            namespace,
            fields,
            labels,
        })
    }

    pub(crate) fn matches(&self, kind: Kind, obj: &Value) -> bool {
        if kind != self.kind {
            return false;
        }
        let md = &obj["metadata"];
        let ns = md["namespace"].as_str().unwrap_or("");
        if self.namespace.as_deref().is_some_and(|want| want != ns) {
            return false;
        }
        for (k, v, eq) in &self.fields {
            let have = match k.as_str() {
                "metadata.name" => md["name"].as_str().unwrap_or(""),
                _ => ns,
            };
            if (have == v) != *eq {
                return false;
            }
        }
        let label = |k: &str| md["labels"][k].as_str().map(str::to_string);
        self.labels.iter().all(|r| match r {
            LabelReq::Eq(k, v) => label(k).as_deref() == Some(v.as_str()),
            LabelReq::Ne(k, v) => label(k).as_deref() != Some(v.as_str()),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.contains(&l)),
            LabelReq::NotIn(k, vs) => label(k).is_none_or(|l| !vs.contains(&l)),
        })
    }
}

/// A list item as the API server sends it: without `kind` and `apiVersion`.
pub(crate) fn list_item(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("kind");
        m.remove("apiVersion");
    }
    o
}

pub(crate) fn list(
    shared: &Shared,
    filter: Filter,
    params: &HashMap<String, String>,
) -> Response<Body> {
    let mut st = shared.store();
    let limit = match params.get("limit").map(|l| l.parse::<usize>()) {
        None => None,
        Some(Ok(0)) => None,
        Some(Ok(l)) => Some(l),
        Some(Err(_)) => {
            return error_response(StatusCode::BAD_REQUEST, "BadRequest", "invalid limit")
        }
    };
    if let Some(rv) = params.get("resourceVersion").filter(|v| !v.is_empty()) {
        let Ok(n) = rv.parse::<u64>() else {
            return error_response(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("invalid resource version {rv:?}"),
            );
        };
        let exact = params.get("resourceVersionMatch").map(String::as_str) == Some("Exact");
        if exact && n != st.rv {
            // Only the latest version is kept as a snapshot.
            return error_response(
                StatusCode::GONE,
                "Expired",
                &format!("too old resource version: {n} ({})", st.rv),
            );
        }
    }
    let (rv, items) = if let Some(token) = params.get("continue").filter(|t| !t.is_empty()) {
        match st.pages.remove(token) {
            Some(p) => p,
            None => {
                return error_response(
                    StatusCode::GONE,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter.",
                )
            }
        }
    } else {
        let items: Vec<Value> = st
            .objects
            .iter()
            .filter(|((k, _, _), o)| filter.matches(*k, o))
            .map(|(_, o)| list_item(o))
            .collect();
        (st.rv, items)
    };
    let (page, rest) = match limit {
        Some(l) if items.len() > l => {
            let mut items = items;
            let rest = items.split_off(l);
            (items, rest)
        }
        _ => (items, Vec::new()),
    };
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if !rest.is_empty() {
        let token = format!("fake-continue-{}-{}", rv, st.next_page);
        st.next_page += 1;
        metadata["continue"] = json!(token);
        metadata["remainingItemCount"] = json!(rest.len());
        st.pages.insert(token, (rv, rest));
    }
    full(
        StatusCode::OK,
        json!({
            "kind": format!("{}List", filter.kind.name()),
            "apiVersion": filter.kind.api_version(),
            "metadata": metadata,
            "items": page,
        }),
    )
}
