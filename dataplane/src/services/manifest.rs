//! Parsing the multi-document YAML a user would `kubectl apply`.
//!
//! Each document is read in three steps, so that every mistake is reported
//! with the document number, the line it starts on, and the field:
//!
//! 1. YAML syntax, into a generic value (YAML merge keys applied).
//! 2. The Kubernetes shape, with the k8s-openapi types through
//!    `serde_path_to_error` (which knows the field path, e.g.
//!    `spec.ports[0].port`), then a strict check for fields the type does
//!    not know: the typed object, serialized back, must still hold every
//!    field of the document. A misspelt `targetport` would otherwise be
//!    dropped without a word and traffic would go to the wrong port; kubectl
//!    refuses unknown fields too (strict field validation).
//! 3. Semantics (`validate`): addresses, port ranges, protocols, names.
//!
//! Kinds other than Service, Endpoints and EndpointSlice (a Deployment in
//! the same file, say) are skipped with a warning, as are empty documents.
//! A `kind: List` (what `kubectl get -o yaml` prints for several objects) is
//! read item by item. One bad document fails the whole file: callers write
//! nothing unless everything parsed.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value as Json;
use serde_norway::Value as Yaml;

use super::object::{Kind, ObjectRef, SERVICE_NAME_LABEL};
use super::validate::{self, FieldError};

/// The namespace of objects whose manifest names none (as kubectl does
/// without `-n`).
pub const DEFAULT_NAMESPACE: &str = "default";

/// How many unknown fields one document reports before "and N more".
const MAX_UNKNOWN_FIELDS_REPORTED: usize = 10;

/// A Kubernetes object this dataplane stores.
#[derive(Clone, Debug, PartialEq)]
// The variants are the API types themselves so callers can match and use
// them directly; objects are few and short-lived, so boxing buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum Object {
    /// core/v1 Service.
    Service(Service),
    /// core/v1 Endpoints.
    Endpoints(Endpoints),
    /// discovery.k8s.io/v1 EndpointSlice.
    EndpointSlice(EndpointSlice),
}

impl Object {
    /// The kind.
    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::Endpoints(_) => Kind::Endpoints,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
        }
    }

    fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Service(o) => &o.metadata,
            Object::Endpoints(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
        }
    }

    /// `metadata.namespace`, [`DEFAULT_NAMESPACE`] when unset.
    pub fn namespace(&self) -> &str {
        self.metadata()
            .namespace
            .as_deref()
            .unwrap_or(DEFAULT_NAMESPACE)
    }

    /// `metadata.name` (empty if unset; [`parse_manifests`] never returns
    /// such an object).
    pub fn name(&self) -> &str {
        self.metadata().name.as_deref().unwrap_or_default()
    }

    /// Kind, namespace and name.
    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef::new(self.kind(), self.namespace(), self.name())
    }

    /// The object as stored in etcd: its JSON wire format (with apiVersion
    /// and kind).
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing these types into memory cannot fail: every map key is
        // a string and there are no non-finite floats.
        match self {
            Object::Service(o) => serde_json::to_vec(o),
            Object::Endpoints(o) => serde_json::to_vec(o),
            Object::EndpointSlice(o) => serde_json::to_vec(o),
        }
        .unwrap_or_default()
    }

    /// The semantic problems of this object (empty when it is valid).
    pub(crate) fn problems(&self) -> Vec<FieldError> {
        match self {
            Object::Service(o) => validate::service(o),
            Object::Endpoints(o) => validate::endpoints(o),
            Object::EndpointSlice(o) => validate::endpoint_slice(o),
        }
    }

    fn set_default_namespace(&mut self) {
        let meta = match self {
            Object::Service(o) => &mut o.metadata,
            Object::Endpoints(o) => &mut o.metadata,
            Object::EndpointSlice(o) => &mut o.metadata,
        };
        if meta.namespace.as_deref().is_none_or(str::is_empty) {
            meta.namespace = Some(DEFAULT_NAMESPACE.to_string());
        }
    }
}

/// What is wrong with one document.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("document {document} (line {line}): {}{message}", field_prefix(.path))]
pub struct DocumentError {
    /// 1-based, counting the non-empty documents of the file.
    pub document: usize,
    /// 1-based line of the file where the document's content starts.
    pub line: usize,
    /// The field at fault, e.g. `spec.ports[0].port`; `None` when the
    /// problem is the document as a whole (YAML syntax, say).
    pub path: Option<String>,
    /// What is wrong.
    pub message: String,
}

/// `path: `, or nothing without a path.
fn field_prefix(path: &Option<String>) -> String {
    path.as_ref().map(|p| format!("{p}: ")).unwrap_or_default()
}

/// Why a manifest file was refused: every problem found, in file order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", list_errors(.errors))]
pub struct ManifestError {
    /// At least one.
    pub errors: Vec<DocumentError>,
}

/// One problem on its own; several as a count and one line each.
fn list_errors(errors: &[DocumentError]) -> String {
    match errors {
        [one] => one.to_string(),
        all => {
            let mut s = format!("{} problems in the manifests:", all.len());
            for e in all {
                s.push_str(&format!("\n  {e}"));
            }
            s
        }
    }
}

/// One document's text and where it is in the file.
struct Chunk<'a> {
    text: &'a str,
    /// Line of the file on which `text` begins.
    first_line: usize,
    /// Line of the first content (not blank, not a comment, not a bare
    /// `---`); `None` for an empty document.
    content_line: Option<usize>,
}

/// `---` (or `...`) at the start of a line, followed by nothing or blanks
/// or content: YAML forbids these at column 0 inside a document, so they
/// always separate documents, even within block scalars.
fn marker<'a>(line: &'a str, m: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(m)?;
    (rest.is_empty() || rest.starts_with([' ', '\t'])).then_some(rest)
}

fn is_blank_or_comment(s: &str) -> bool {
    let t = s.trim();
    t.is_empty() || t.starts_with('#')
}

/// Splits YAML text into documents. The `---` line stays with the document
/// it opens (it may carry content, `--- !!map {...}`); a `...` line ends a
/// document and is dropped.
fn split_documents(text: &str) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut first_line = 1;
    let mut content_line = None;
    let mut offset = 0;
    for (i, raw) in text.split_inclusive('\n').enumerate() {
        let lineno = i + 1;
        let line = raw.trim_end_matches(['\n', '\r']);
        if let Some(rest) = marker(line, "---") {
            chunks.push(Chunk {
                text: &text[start..offset],
                first_line,
                content_line,
            });
            start = offset;
            first_line = lineno;
            content_line = (!is_blank_or_comment(rest)).then_some(lineno);
        } else if marker(line, "...").is_some() {
            chunks.push(Chunk {
                text: &text[start..offset],
                first_line,
                content_line,
            });
            start = offset + raw.len();
            first_line = lineno + 1;
            content_line = None;
        } else if content_line.is_none() && !is_blank_or_comment(line) {
            content_line = Some(lineno);
        }
        offset += raw.len();
    }
    chunks.push(Chunk {
        text: &text[start..],
        first_line,
        content_line,
    });
    chunks
}

/// Where we are, for error messages: document, line, and the path prefix
/// (`items[3].` inside a List).
struct Ctx<'a> {
    document: usize,
    line: usize,
    path_prefix: &'a str,
}

impl Ctx<'_> {
    fn error(&self, path: Option<String>, message: impl Into<String>) -> DocumentError {
        let path = match (self.path_prefix.is_empty(), path) {
            (true, p) => p,
            (false, None) => Some(self.path_prefix.trim_end_matches('.').to_string()),
            (false, Some(p)) => Some(format!("{}{p}", self.path_prefix)),
        };
        DocumentError {
            document: self.document,
            line: self.line,
            path,
            message: message.into(),
        }
    }
}

/// Parses multi-document YAML into the objects it defines, in file order.
///
/// Errors name the document (1-based, counting non-empty documents), the
/// line where it starts, and the field, e.g. `document 2 (line 14):
/// spec.ports[0].port: invalid type: string "eighty", expected i32`. All
/// problems of the file are reported together, and any problem fails the
/// whole file. Objects without a namespace get [`DEFAULT_NAMESPACE`]. The
/// same object defined twice is an error (one etcd transaction cannot write
/// a key twice, and which copy the user meant is anyone's guess).
pub fn parse_manifests(text: &str) -> Result<Vec<Object>, ManifestError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    let mut seen: BTreeMap<ObjectRef, (usize, usize)> = BTreeMap::new();
    let mut document = 0;
    for chunk in split_documents(text) {
        let Some(line) = chunk.content_line else {
            continue;
        };
        document += 1;
        let ctx = Ctx {
            document,
            line,
            path_prefix: "",
        };
        let value = match parse_yaml(&chunk) {
            Ok(v) => v,
            Err(message) => {
                errors.push(ctx.error(None, message));
                continue;
            }
        };
        let before = objects.len();
        read_value(&value, &ctx, &mut objects, &mut errors);
        for obj in &objects[before..] {
            let r = obj.object_ref();
            if let Some((d, l)) = seen.get(&r) {
                errors.push(ctx.error(
                    None,
                    format!("{r} is already defined in document {d} (line {l})"),
                ));
            } else {
                seen.insert(r, (document, line));
            }
        }
    }
    if errors.is_empty() {
        Ok(objects)
    } else {
        Err(ManifestError { errors })
    }
}

/// YAML syntax of one document, merge keys applied.
fn parse_yaml(chunk: &Chunk<'_>) -> Result<Yaml, String> {
    let parsed = serde_norway::from_str::<Yaml>(chunk.text).and_then(|mut v| {
        v.apply_merge()?;
        Ok(v)
    });
    parsed.map_err(|_| {
        // Parse again with the document at its place in the file, so the
        // positions in the message are the file's, not the document's.
        // Costs a copy of the file's length, only for a broken document.
        let padded = format!(
            "{}{}",
            "\n".repeat(chunk.first_line.saturating_sub(1)),
            chunk.text
        );
        let e = serde_norway::from_str::<Yaml>(&padded)
            .and_then(|mut v| v.apply_merge())
            .err();
        format!(
            "invalid YAML: {}",
            e.map_or_else(|| "unknown error".to_string(), |e| e.to_string())
        )
    })
}

fn field<'a>(map: &'a serde_norway::Mapping, key: &str) -> Option<&'a Yaml> {
    map.get(key).filter(|v| !v.is_null())
}

/// Reads one document (or one item of a List).
fn read_value(value: &Yaml, ctx: &Ctx<'_>, out: &mut Vec<Object>, errors: &mut Vec<DocumentError>) {
    let map = match value {
        // `---` followed by nothing but `null`/`~`.
        Yaml::Null => return,
        Yaml::Mapping(m) => m,
        other => {
            errors.push(ctx.error(
                None,
                format!(
                    "expected a Kubernetes object (a mapping with apiVersion and kind), found {}",
                    describe(other)
                ),
            ));
            return;
        }
    };
    let api_version = field(map, "apiVersion").and_then(Yaml::as_str);
    let kind = field(map, "kind").and_then(Yaml::as_str);
    let (api_version, kind) = match (api_version, kind) {
        (Some(a), Some(k)) => (a, k),
        (None, _) => {
            errors.push(ctx.error(
                Some("apiVersion".into()),
                "required (a string, e.g. v1): this is not a Kubernetes object",
            ));
            return;
        }
        (_, None) => {
            errors.push(ctx.error(
                Some("kind".into()),
                "required (a string, e.g. Service): this is not a Kubernetes object",
            ));
            return;
        }
    };
    let expected = match kind {
        "Service" | "Endpoints" => "v1",
        "EndpointSlice" => "discovery.k8s.io/v1",
        "List" if api_version == "v1" => {
            read_list(map, ctx, out, errors);
            return;
        }
        _ => {
            let name = field(map, "metadata")
                .and_then(Yaml::as_mapping)
                .and_then(|m| field(m, "name"))
                .and_then(Yaml::as_str)
                .unwrap_or("(unnamed)");
            log::warn!(
                "skipping document {} (line {}){}: {kind} {name} ({api_version}) is not a \
                 Service, Endpoints or EndpointSlice",
                ctx.document,
                ctx.line,
                if ctx.path_prefix.is_empty() {
                    String::new()
                } else {
                    format!(" {}", ctx.path_prefix.trim_end_matches('.'))
                },
            );
            return;
        }
    };
    if api_version != expected {
        errors.push(ctx.error(
            Some("apiVersion".into()),
            format!("{api_version} is not supported for kind {kind}; use {expected}"),
        ));
        return;
    }
    let typed = match kind {
        "Service" => typed::<Service>(value, ctx).map(Object::Service),
        "Endpoints" => typed::<Endpoints>(value, ctx).map(Object::Endpoints),
        _ => typed::<EndpointSlice>(value, ctx).map(Object::EndpointSlice),
    };
    let mut obj = match typed {
        Ok(o) => o,
        Err(mut e) => {
            errors.append(&mut e);
            return;
        }
    };
    obj.set_default_namespace();
    let problems = obj.problems();
    if !problems.is_empty() {
        errors.extend(
            problems
                .into_iter()
                .map(|p| ctx.error(Some(p.path), p.message)),
        );
        return;
    }
    warn_unsupported(&obj, ctx);
    out.push(obj);
}

/// `kind: List`: each of `items` as if it were a document.
fn read_list(
    map: &serde_norway::Mapping,
    ctx: &Ctx<'_>,
    out: &mut Vec<Object>,
    errors: &mut Vec<DocumentError>,
) {
    let items = match field(map, "items") {
        None => return,
        Some(Yaml::Sequence(items)) => items,
        Some(other) => {
            errors.push(ctx.error(
                Some("items".into()),
                format!("expected a list, found {}", describe(other)),
            ));
            return;
        }
    };
    for (i, item) in items.iter().enumerate() {
        let prefix = format!("{}items[{i}].", ctx.path_prefix);
        let item_ctx = Ctx {
            document: ctx.document,
            line: ctx.line,
            path_prefix: &prefix,
        };
        read_value(item, &item_ctx, out, errors);
    }
}

/// Deserializes `value` as `T`, then refuses fields `T` does not know.
fn typed<T: DeserializeOwned + Serialize>(
    value: &Yaml,
    ctx: &Ctx<'_>,
) -> Result<T, Vec<DocumentError>> {
    let obj: T = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = (path != ".").then_some(path);
        vec![ctx.error(path, e.into_inner().to_string())]
    })?;
    let original = serde_json::to_value(value)
        .map_err(|e| vec![ctx.error(None, format!("unsupported YAML: {e}"))])?;
    let round_trip = serde_json::to_value(&obj)
        .map_err(|e| vec![ctx.error(None, format!("internal error re-encoding: {e}"))])?;
    let mut unknown = Vec::new();
    unknown_fields(&original, &round_trip, String::new(), &mut unknown);
    if unknown.is_empty() {
        return Ok(obj);
    }
    let extra = unknown.len().saturating_sub(MAX_UNKNOWN_FIELDS_REPORTED);
    let mut errs: Vec<DocumentError> = unknown
        .into_iter()
        .take(MAX_UNKNOWN_FIELDS_REPORTED)
        .map(|p| {
            ctx.error(
                Some(p),
                "unknown field (misspelt, or not in this API version)",
            )
        })
        .collect();
    if extra > 0 {
        errs.push(ctx.error(None, format!("and {extra} more unknown fields")));
    }
    Err(errs)
}

/// Paths of the fields of `original` that `typed` lacks. Nulls count as
/// absent (`creationTimestamp: null` is fine); values are not compared.
fn unknown_fields(original: &Json, typed: &Json, path: String, out: &mut Vec<String>) {
    match (original, typed) {
        (Json::Object(o), Json::Object(t)) => {
            for (k, v) in o {
                if v.is_null() {
                    continue;
                }
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match t.get(k) {
                    Some(tv) => unknown_fields(v, tv, p, out),
                    None => out.push(p),
                }
            }
        }
        (Json::Array(o), Json::Array(t)) => {
            for (i, (ov, tv)) in o.iter().zip(t).enumerate() {
                unknown_fields(ov, tv, format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn describe(v: &Yaml) -> &'static str {
    match v {
        Yaml::Null => "nothing",
        Yaml::Bool(_) => "a boolean",
        Yaml::Number(_) => "a number",
        Yaml::String(_) => "a string",
        Yaml::Sequence(_) => "a list",
        Yaml::Mapping(_) => "a mapping",
        Yaml::Tagged(_) => "a tagged value",
    }
}

/// Warns about valid settings this dataplane accepts but does not act on,
/// so nobody waits for frontends that never open.
fn warn_unsupported(obj: &Object, ctx: &Ctx<'_>) {
    let r = obj.object_ref();
    let at = format!("document {} (line {})", ctx.document, ctx.line);
    match obj {
        Object::Service(svc) => {
            let Some(spec) = &svc.spec else { return };
            if spec.type_.as_deref() == Some("ExternalName") {
                log::warn!("{at}: {r} has type ExternalName; it gets no frontends (a DNS matter)");
            }
            if spec.cluster_ip.as_deref() == Some("None") {
                log::info!("{at}: {r} is headless; it gets no frontends");
            }
        }
        Object::Endpoints(ep) => {
            let v6 = ep
                .subsets
                .iter()
                .flatten()
                .flat_map(|s| s.addresses.iter().chain(s.not_ready_addresses.iter()))
                .flatten()
                .any(|a| a.ip.contains(':'));
            if v6 {
                log::warn!("{at}: {r} has IPv6 addresses; they are ignored (IPv4 only)");
            }
        }
        Object::EndpointSlice(slice) => {
            if slice.address_type != "IPv4" {
                log::warn!(
                    "{at}: {r} has addressType {}; only IPv4 slices are used",
                    slice.address_type
                );
            }
            let labelled = slice
                .metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(SERVICE_NAME_LABEL));
            if !labelled {
                log::warn!(
                    "{at}: {r} has no {SERVICE_NAME_LABEL} label, so it belongs to no \
                     service and will not be used"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    /// The `my-service` example of the Kubernetes Service docs, with the
    /// endpoints of three nginx pods.
    const MY_SERVICE: &str = r#"
# From https://kubernetes.io/docs/concepts/services-networking/service/
apiVersion: v1
kind: Service
metadata:
  name: my-service
spec:
  clusterIP: 10.96.0.10
  selector:
    app.kubernetes.io/name: MyApp
  ports:
    - name: http
      protocol: TCP
      port: 80
      targetPort: 9376
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: my-service-1
  labels:
    kubernetes.io/service-name: my-service
addressType: IPv4
ports:
  - name: http
    appProtocol: http
    protocol: TCP
    port: 9376
endpoints:
  - addresses: ["10.244.1.5"]
    conditions: {ready: true}
    nodeName: node-1
  - addresses: ["10.244.2.7"]
    nodeName: node-2
  - addresses:
      - "10.244.3.9"
    conditions:
      ready: true
      serving: true
      terminating: false
"#;

    fn err(text: &str) -> ManifestError {
        parse_manifests(text).expect_err("must be refused")
    }

    fn one(text: &str) -> String {
        let e = err(text);
        assert_eq!(e.errors.len(), 1, "{e}");
        e.to_string()
    }

    #[test]
    fn my_service_example() {
        let objs = parse_manifests(MY_SERVICE).unwrap();
        assert_eq!(objs.len(), 2);
        let Object::Service(svc) = &objs[0] else {
            panic!("{objs:?}")
        };
        assert_eq!(svc.metadata.namespace.as_deref(), Some("default"));
        let spec = svc.spec.as_ref().unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
        let port = &spec.ports.as_ref().unwrap()[0];
        assert_eq!(port.port, 80);
        assert_eq!(port.target_port, Some(IntOrString::Int(9376)));
        let Object::EndpointSlice(slice) = &objs[1] else {
            panic!("{objs:?}")
        };
        assert_eq!(slice.endpoints.as_ref().unwrap().len(), 3);
        assert_eq!(
            objs[1].object_ref(),
            ObjectRef::new(Kind::EndpointSlice, "default", "my-service-1")
        );
        // What goes to etcd parses back to the same object.
        let back: EndpointSlice = serde_json::from_slice(&objs[1].to_json()).unwrap();
        assert_eq!(Object::EndpointSlice(back), objs[1]);
    }

    #[test]
    fn documents_markers_comments_and_empty_documents() {
        let text = "---\n# only a comment\n---\n\
                    apiVersion: v1\nkind: Endpoints\nmetadata: {name: a, namespace: ns1}\n\
                    ...\n---\n---   \n\
                    --- {apiVersion: v1, kind: Endpoints, metadata: {name: b}}\n\
                    ---\r\napiVersion: v1\r\nkind: Endpoints\r\nmetadata:\r\n  name: c\r\n";
        let objs = parse_manifests(text).unwrap();
        let refs: Vec<String> = objs.iter().map(|o| o.object_ref().to_string()).collect();
        assert_eq!(
            refs,
            [
                "endpoints ns1/a",
                "endpoints default/b",
                "endpoints default/c"
            ]
        );
        assert!(parse_manifests("").unwrap().is_empty());
        assert!(parse_manifests("# nothing\n---\n").unwrap().is_empty());
    }

    #[test]
    fn unknown_kind_is_skipped() {
        let text = format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: nginx}}\n\
             spec: {{replicas: 3}}\n---\n{MY_SERVICE}"
        );
        let objs = parse_manifests(&text).unwrap();
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[0].kind(), Kind::Service);
    }

    #[test]
    fn list_of_items() {
        let text = "apiVersion: v1\nkind: List\nitems:\n\
                    - {apiVersion: v1, kind: Endpoints, metadata: {name: a}}\n\
                    - {apiVersion: apps/v1, kind: Deployment, metadata: {name: d}}\n\
                    - {apiVersion: v1, kind: Endpoints, metadata: {name: b}, subsets: [{ports: [{port: 0}]}]}\n";
        let e = one(text);
        assert_eq!(
            e,
            "document 1 (line 1): items[2].subsets[0].ports[0].port: 0 is not a valid port number (1-65535)"
        );
    }

    #[test]
    fn wrong_type_names_document_line_and_field() {
        let text = format!(
            "{MY_SERVICE}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: other\nspec:\n  \
             clusterIP: 10.96.0.11\n  ports:\n  - port: eighty\n"
        );
        assert_eq!(
            one(&text),
            "document 3 (line 42): spec.ports[0].port: invalid type: string \"eighty\", expected i32"
        );
    }

    #[test]
    fn yaml_syntax_error_has_file_position() {
        let text = "apiVersion: v1\nkind: Endpoints\nmetadata: {name: a}\n---\n\
                    apiVersion: v1\nkind: Service\nmetadata:\n  name: [oops\n";
        let e = err(text);
        assert_eq!(e.errors.len(), 1);
        let msg = e.to_string();
        assert!(
            msg.starts_with("document 2 (line 5): invalid YAML: "),
            "{msg}"
        );
        // The position is the file's (line 9 = end of input), not the document's.
        assert!(msg.contains("line 9") || msg.contains("line 8"), "{msg}");
    }

    #[test]
    fn unknown_field_is_refused() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  \
                    clusterIP: 10.96.0.1\n  ports:\n  - port: 80\n    targetport: 8080\n";
        assert_eq!(
            one(text),
            "document 1 (line 1): spec.ports[0].targetport: unknown field (misspelt, or not in this API version)"
        );
    }

    #[test]
    fn sctp_is_refused() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  \
                    clusterIP: 10.96.0.1\n  ports:\n  - port: 80\n    protocol: SCTP\n";
        assert_eq!(
            one(text),
            "document 1 (line 1): spec.ports[0].protocol: SCTP is not supported by this dataplane (only TCP and UDP)"
        );
    }

    #[test]
    fn semantic_errors() {
        let svc = |spec: &str| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec: {spec}\n")
        };
        let cases = [
            (
                svc("{ports: [{port: 80}]}"),
                "spec.clusterIP: required: this dataplane does not allocate ClusterIPs",
            ),
            (
                svc("{clusterIP: 10.96.0.300, ports: [{port: 80}]}"),
                "spec.clusterIP: \"10.96.0.300\" is not an IPv4 address",
            ),
            (
                svc("{clusterIP: 'fd00::1', ports: [{port: 80}]}"),
                "spec.clusterIP: fd00::1 is IPv6",
            ),
            (
                svc("{clusterIP: 10.96.0.1, ports: [{port: 70000}]}"),
                "spec.ports[0].port: 70000 is not a valid port number (1-65535)",
            ),
            (
                svc("{clusterIP: 10.96.0.1, ports: [{port: 80, targetPort: 0}]}"),
                "spec.ports[0].targetPort: 0 is not a valid port number",
            ),
            (
                svc("{clusterIP: 10.96.0.1, ports: [{port: 80, targetPort: 'Web_Port'}]}"),
                "spec.ports[0].targetPort: \"Web_Port\" is neither a port number nor a valid port name",
            ),
            (
                svc("{clusterIP: 10.96.0.1, ports: [{port: 80, protocol: tcp}]}"),
                "spec.ports[0].protocol: unsupported protocol \"tcp\"",
            ),
            (
                svc("{clusterIP: 10.96.0.1, ports: [{port: 80, name: a}, {port: 81}]}"),
                "spec.ports[1].name: required when a service has more than one port",
            ),
            (
                svc("{clusterIP: 10.96.0.1, ports: [{port: 80, name: a}, {port: 80, name: b}]}"),
                "spec.ports[1]: duplicate port 80/TCP",
            ),
            (
                svc("{clusterIP: 10.96.0.1}"),
                "spec.ports: required",
            ),
            (
                svc("{clusterIP: 10.96.0.1, ports: [{name: a}]}"),
                "spec.ports[0].port: required: a port number 1-65535",
            ),
            (
                svc("{clusterIP: 10.96.0.1, ports: [{port: 80}], sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}}"),
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds: 0 is out of range",
            ),
            (
                svc("{clusterIP: 10.96.0.1, ports: [{port: 80}], internalTrafficPolicy: Nearby}"),
                "spec.internalTrafficPolicy: unsupported value \"Nearby\"",
            ),
            (
                "apiVersion: v1\nkind: Service\nspec: {clusterIP: None}\n".to_string(),
                "metadata.name: required",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: My_Svc}\nspec: {clusterIP: None}\n".to_string(),
                "metadata.name: \"My_Svc\" is not a valid Service name",
            ),
            (
                "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: x}\naddressType: IPv4\n".to_string(),
                "apiVersion: discovery.k8s.io/v1beta1 is not supported for kind EndpointSlice; use discovery.k8s.io/v1",
            ),
            (
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: x}\naddressType: IPv4\nendpoints: [{addresses: [10.244.1.300]}]\n".to_string(),
                "endpoints[0].addresses[0]: \"10.244.1.300\" is not an IPv4 address",
            ),
            (
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: x}\nendpoints: []\n".to_string(),
                "addressType: required: must be IPv4, IPv6 or FQDN",
            ),
            (
                "apiVersion: v1\nkind: Endpoints\nmetadata: {name: x}\nsubsets: [{addresses: [{ip: nope}]}]\n".to_string(),
                "subsets[0].addresses[0].ip: \"nope\" is not an IP address",
            ),
            (
                "kind: Service\nmetadata: {name: x}\n".to_string(),
                "apiVersion: required",
            ),
            ("- a\n- b\n".to_string(), "expected a Kubernetes object"),
        ];
        for (text, want) in cases {
            let e = err(&text).to_string();
            assert!(e.contains(want), "{text}\n  got: {e}\n  want: {want}");
            assert!(e.starts_with("document 1 (line 1): "), "{e}");
        }
    }

    #[test]
    fn headless_and_external_name_are_accepted() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: h}\n\
                    spec: {clusterIP: None, ports: [{port: 53, protocol: UDP}]}\n---\n\
                    apiVersion: v1\nkind: Service\nmetadata: {name: e}\n\
                    spec: {type: ExternalName, externalName: example.com}\n";
        assert_eq!(parse_manifests(text).unwrap().len(), 2);
    }

    #[test]
    fn all_errors_reported_and_duplicates_refused() {
        let text = "apiVersion: v1\nkind: Endpoints\nmetadata: {name: a}\n---\n\
                    apiVersion: v1\nkind: Endpoints\nmetadata: {name: a, namespace: default}\n---\n\
                    apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}]}\n";
        let e = err(text);
        assert_eq!(e.errors.len(), 2, "{e}");
        assert_eq!(
            e.errors[0].to_string(),
            "document 2 (line 5): endpoints default/a is already defined in document 1 (line 1)"
        );
        assert_eq!(e.errors[1].document, 3);
        assert_eq!(e.errors[1].line, 9);
        assert!(e.to_string().starts_with("2 problems in the manifests:"));
    }

    #[test]
    fn merge_keys_are_applied() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  \
                    clusterIP: 10.96.0.1\n  ports:\n  - &p {port: 80, name: a}\n  \
                    - <<: *p\n    name: b\n    protocol: UDP\n";
        let objs = parse_manifests(text).unwrap();
        let Object::Service(s) = &objs[0] else {
            panic!()
        };
        assert_eq!(s.spec.as_ref().unwrap().ports.as_ref().unwrap()[1].port, 80);
    }
}
