//! A stand-in for Azure Key Vault and Entra ID, over TLS with a CA made here: Azure itself is
//! not reachable from CI and no Key Vault emulator installs, so this server speaks the documented
//! REST subset the agent uses, with real P-256 keys:
//!
//! - Key Vault (`api-version` required; bearer tokens only, after the documented challenge —
//!   `401` with `WWW-Authenticate: Bearer authorization="…", resource="…"`):
//!   `GET /keys/{name}/{version?}` (Get Key), `POST /keys/{name}/create` (Create Key: a new key,
//!   or a new version of an existing one), `POST /keys/{name}/{version}/sign` (Sign, ES256:
//!   `{"alg","value": base64url(digest)}` → `{"kid","value": base64url(r || s)}`); errors as
//!   `{"error": {"code", "message"}}`; throttling as `429` with `Retry-After`.
//! - Entra ID: `POST /{tenant}/oauth2/v2.0/token` with `client_credentials` and a client secret
//!   or a client assertion (workload identity's federated token); errors as
//!   `{"error", "error_description", "error_codes"}`.
//!
//! Its host names (`knhk.vault.azure.test`, `login.azure.test`) resolve nowhere: clients reach
//! it through [`AzureStandIn::proxy`], an HTTP CONNECT proxy that sends every tunnel here (the
//! vault's host must be a subdomain of the challenge's resource, as in Azure, so `127.0.0.1` will
//! not do).

use axum::body::Body;
use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64URL, Engine as _};
use hyper::{Request, Response, StatusCode};
use p256::ecdsa::{signature::hazmat::PrehashSigner, Signature, SigningKey};
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex,
    },
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The vault's URL (as an operator writes `kms.vault_url`).
pub const VAULT_URL: &str = "https://knhk.vault.azure.test";
/// Entra ID's authority host (`AZURE_AUTHORITY_HOST`).
pub const AUTHORITY_HOST: &str = "https://login.azure.test";
/// The resource Key Vault's challenge names.
pub const RESOURCE: &str = "https://vault.azure.test";
/// Tenant and client ids the token endpoint accepts.
pub const TENANT_ID: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
/// The application (client) id.
pub const CLIENT_ID: &str = "04b07795-8ddb-461a-bbee-02f9e1bf7b46";
/// The client secret it accepts.
pub const CLIENT_SECRET: &str = "s3cret~value";
/// The federated (service account) token it accepts as a client assertion.
pub const FEDERATED_TOKEN: &str =
    "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6a25oazprbmhrLWFnZW50In0.c2ln";

enum Material {
    Ec(SigningKey),
    /// An RSA key as Get Key shows it (a modulus and exponent); it never signs here.
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
}

struct Version {
    id: String,
    material: Material,
    created: u64,
}

/// What the server has seen and how it should misbehave.
#[derive(Default)]
pub struct Knobs {
    /// Refuse every token request (as for a wrong secret or an unknown federated subject).
    pub refuse_tokens: AtomicBool,
    /// Answer the next N Key Vault calls with 429 and `Retry-After: 1`.
    pub throttle_next: AtomicU32,
    /// 429s answered.
    pub throttled: AtomicU32,
    /// Token requests answered (refused or not).
    pub token_requests: AtomicU32,
    /// Sign calls answered with a signature.
    pub signatures: AtomicU32,
    /// Hosts clients asked the proxy to tunnel to.
    pub tunnels: Mutex<Vec<String>>,
}

struct State {
    keys: Mutex<HashMap<String, Vec<Version>>>,
    tokens: Mutex<HashSet<String>>,
    knobs: Arc<Knobs>,
}

/// A running stand-in (it stops with the test's runtime).
pub struct AzureStandIn {
    /// The CA (PEM) that signed the server's certificate, for `kms.ca_file`.
    pub ca_pem: String,
    /// The CONNECT proxy's URL (`http://127.0.0.1:PORT`).
    pub proxy: String,
    /// What the server saw; how it misbehaves.
    pub knobs: Arc<Knobs>,
    state: Arc<State>,
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).expect("random");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn new_signing_key() -> SigningKey {
    loop {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).expect("random");
        if let Ok(k) = SigningKey::from_slice(&bytes) {
            return k;
        }
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json; charset=utf-8")
        .body(Body::from(v.to_string()))
        .expect("response")
}

fn kv_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json(
        status,
        serde_json::json!({"error": {"code": code, "message": message}}),
    )
}

fn form(body: &[u8]) -> HashMap<String, String> {
    fn decode(s: &str) -> String {
        let s = s.replace('+', " ");
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' && i + 2 < b.len() {
                if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                    out.push(v);
                    i += 3;
                    continue;
                }
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

impl State {
    fn bundle(&self, name: &str, v: &Version) -> serde_json::Value {
        let kid = format!("{VAULT_URL}/keys/{name}/{}", v.id);
        let key = match &v.material {
            Material::Ec(sk) => {
                let point = sk.verifying_key().to_sec1_point(false);
                serde_json::json!({
                    "kid": kid, "kty": "EC", "crv": "P-256",
                    "key_ops": ["sign", "verify"],
                    "x": B64URL.encode(point.x().expect("x")),
                    "y": B64URL.encode(point.y().expect("y")),
                })
            }
            Material::Rsa { n, e } => serde_json::json!({
                "kid": kid, "kty": "RSA",
                "key_ops": ["sign", "verify", "encrypt", "decrypt", "wrapKey", "unwrapKey"],
                "n": B64URL.encode(n), "e": B64URL.encode(e),
            }),
        };
        serde_json::json!({
            "key": key,
            "attributes": {
                "enabled": true, "created": v.created, "updated": v.created,
                "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": 90,
            },
        })
    }

    fn token(&self, tenant: &str, body: &[u8]) -> Response<Body> {
        self.knobs.token_requests.fetch_add(1, Ordering::SeqCst);
        let f = form(body);
        let refuse = |code: u32, description: String| {
            json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({
                    "error": "invalid_client",
                    "error_description": description,
                    "error_codes": [code],
                    "timestamp": "2026-11-30 12:00:00Z",
                    "trace_id": "5f1b2a8e-0000-0000-0000-000000000000",
                    "correlation_id": "9e1c0000-0000-0000-0000-000000000000",
                }),
            )
        };
        if tenant != TENANT_ID {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": "invalid_request", "error_codes": [90002],
                    "error_description": format!("AADSTS90002: Tenant '{tenant}' not found.")}),
            );
        }
        if f.get("grant_type").map(String::as_str) != Some("client_credentials")
            || f.get("scope").map(String::as_str) != Some(&format!("{RESOURCE}/.default"))
        {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": "invalid_request", "error_codes": [900144],
                    "error_description": format!("AADSTS900144: bad grant_type or scope: {f:?}")}),
            );
        }
        if f.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
            return refuse(
                700016,
                format!(
                    "AADSTS700016: Application with identifier '{}' was not found in the directory.",
                    f.get("client_id").cloned().unwrap_or_default()
                ),
            );
        }
        let by_secret = f.get("client_secret").map(String::as_str) == Some(CLIENT_SECRET);
        let by_assertion = f.get("client_assertion_type").map(String::as_str)
            == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
            && f.get("client_assertion").map(String::as_str) == Some(FEDERATED_TOKEN);
        if self.knobs.refuse_tokens.load(Ordering::SeqCst) || !(by_secret || by_assertion) {
            return refuse(
                7000215,
                "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the \
                 request is the client secret value, not the client secret ID."
                    .into(),
            );
        }
        let token = random_hex(24);
        if let Ok(mut t) = self.tokens.lock() {
            t.insert(token.clone());
        }
        json(
            StatusCode::OK,
            serde_json::json!({"token_type": "Bearer", "expires_in": 3599,
                "ext_expires_in": 3599, "access_token": token}),
        )
    }

    fn vault(&self, method: &hyper::Method, segs: &[&str], body: &[u8]) -> Response<Body> {
        let mut keys = self.keys.lock().expect("keys");
        match (method.as_str(), segs) {
            ("GET", ["keys", name] | ["keys", name, ""]) | ("GET", ["keys", name, _]) => {
                let version = segs.get(2).copied().filter(|v| !v.is_empty());
                let found = keys.get(*name).and_then(|vs| match version {
                    Some(v) => vs.iter().find(|x| x.id == v),
                    None => vs.last(),
                });
                match found {
                    Some(v) => json(StatusCode::OK, self.bundle(name, v)),
                    None => kv_error(
                        StatusCode::NOT_FOUND,
                        "KeyNotFound",
                        &format!(
                            "A key with (name/id) {name}{} was not found in this key vault. If you \
                             recently deleted this key you may be able to recover it using the \
                             correct recovery command.",
                            version.map(|v| format!("/{v}")).unwrap_or_default()
                        ),
                    ),
                }
            }
            ("POST", ["keys", name, "create"]) => {
                let req: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
                let kty = req.get("kty").and_then(|k| k.as_str()).unwrap_or("");
                let material = match (kty, req.get("crv").and_then(|c| c.as_str())) {
                    ("EC" | "EC-HSM", Some("P-256")) => Material::Ec(new_signing_key()),
                    ("RSA", _) => {
                        let mut n = vec![0u8; 256];
                        getrandom::fill(&mut n).expect("random");
                        n[0] |= 0x80;
                        Material::Rsa {
                            n,
                            e: vec![1, 0, 1],
                        }
                    }
                    _ => {
                        return kv_error(
                            StatusCode::BAD_REQUEST,
                            "BadParameter",
                            &format!("Unsupported key type or curve: {req}"),
                        )
                    }
                };
                let v = Version {
                    id: random_hex(16),
                    material,
                    created: now(),
                };
                let out = self.bundle(name, &v);
                keys.entry((*name).to_owned()).or_default().push(v);
                json(StatusCode::OK, out)
            }
            ("POST", ["keys", name, version, "sign"]) => {
                let Some(v) = keys
                    .get(*name)
                    .and_then(|vs| vs.iter().find(|x| x.id == *version))
                else {
                    return kv_error(
                        StatusCode::NOT_FOUND,
                        "KeyNotFound",
                        &format!("A key with (name/id) {name}/{version} was not found in this key vault."),
                    );
                };
                let req: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
                let alg = req.get("alg").and_then(|a| a.as_str()).unwrap_or("");
                let digest = req
                    .get("value")
                    .and_then(|a| a.as_str())
                    .and_then(|d| B64URL.decode(d.trim_end_matches('=')).ok())
                    .unwrap_or_default();
                let Material::Ec(sk) = &v.material else {
                    return kv_error(
                        StatusCode::BAD_REQUEST,
                        "BadParameter",
                        "Key and signing algorithm are incompatible.",
                    );
                };
                if alg != "ES256" || digest.len() != 32 {
                    return kv_error(
                        StatusCode::BAD_REQUEST,
                        "BadParameter",
                        &format!(
                            "ES256 signs a 32-byte SHA-256 digest; got alg {alg:?} and {} bytes",
                            digest.len()
                        ),
                    );
                }
                let sig: Signature = sk.sign_prehash(&digest).expect("sign");
                self.knobs.signatures.fetch_add(1, Ordering::SeqCst);
                json(
                    StatusCode::OK,
                    serde_json::json!({
                        "kid": format!("{VAULT_URL}/keys/{name}/{}", v.id),
                        "value": B64URL.encode(sig.to_bytes()),
                    }),
                )
            }
            _ => kv_error(
                StatusCode::BAD_REQUEST,
                "BadParameter",
                &format!("no such operation: {method} /{}", segs.join("/")),
            ),
        }
    }

    async fn handle(self: Arc<Self>, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let body = axum::body::to_bytes(Body::new(body), 1 << 20)
            .await
            .unwrap_or_default();
        let host = parts
            .headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let path = parts.uri.path().to_owned();
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        if host.starts_with("login.") {
            return match (parts.method.as_str(), segs.as_slice()) {
                ("POST", [tenant, "oauth2", "v2.0", "token"]) => self.token(tenant, &body),
                _ => json(
                    StatusCode::NOT_FOUND,
                    serde_json::json!({"error": "invalid_request", "error_codes": [90000],
                        "error_description": "no such endpoint"}),
                ),
            };
        }
        if !parts
            .uri
            .query()
            .is_some_and(|q| q.split('&').any(|p| p.starts_with("api-version=")))
        {
            return kv_error(
                StatusCode::BAD_REQUEST,
                "BadParameter",
                "The api-version query parameter is missing.",
            );
        }
        let authorized = parts
            .headers
            .get("authorization")
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "))
            .is_some_and(|t| self.tokens.lock().is_ok_and(|s| s.contains(t)));
        if !authorized {
            return Response::builder()
                .status(StatusCode::UNAUTHORIZED)
                .header(
                    "www-authenticate",
                    format!(
                        "Bearer authorization=\"{AUTHORITY_HOST}/{TENANT_ID}\", resource=\"{RESOURCE}\""
                    ),
                )
                .header("content-type", "application/json; charset=utf-8")
                .body(Body::from(
                    r#"{"error":{"code":"Unauthorized","message":"AKV10000: Request is missing a Bearer or PoP token."}}"#,
                ))
                .expect("response");
        }
        let throttle = self
            .knobs
            .throttle_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if throttle {
            self.knobs.throttled.fetch_add(1, Ordering::SeqCst);
            let mut r = kv_error(
                StatusCode::TOO_MANY_REQUESTS,
                "Throttled",
                "Request was not processed because too many requests were received. Reason: \
                 VaultRequestTypeLimitReached",
            );
            r.headers_mut()
                .insert("retry-after", hyper::header::HeaderValue::from_static("1"));
            return r;
        }
        self.vault(&parts.method, &segs, &body)
    }
}

impl AzureStandIn {
    /// Starts the server and its proxy on the current runtime.
    pub async fn start() -> AzureStandIn {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "knhk Azure stand-in test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
        let mut leaf = rcgen::CertificateParams::new(vec![
            "knhk.vault.azure.test".to_string(),
            "login.azure.test".to_string(),
        ])
        .expect("leaf params");
        leaf.is_ca = rcgen::IsCa::ExplicitNoCa;
        leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_cert = leaf
            .signed_by(&leaf_key, &issuer)
            .expect("leaf certificate");
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf_cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .expect("server TLS config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let knobs = Arc::new(Knobs::default());
        let state = Arc::new(State {
            keys: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashSet::new()),
            knobs: knobs.clone(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let server: SocketAddr = listener.local_addr().expect("addr");
        let s = state.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, s) = (acceptor.clone(), s.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, std::convert::Infallible>(s.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        let proxy = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let proxy_addr = proxy.local_addr().expect("proxy addr");
        let k = knobs.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = proxy.accept().await {
                let k = k.clone();
                tokio::spawn(async move {
                    // Read the CONNECT request's head, then tunnel to the server whatever the host.
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match client.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let line = String::from_utf8_lossy(&head)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_owned();
                    let Some(target) = line
                        .strip_prefix("CONNECT ")
                        .and_then(|r| r.split(' ').next())
                    else {
                        let _ = client
                            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                            .await;
                        return;
                    };
                    if let Ok(mut t) = k.tunnels.lock() {
                        t.push(target.to_owned());
                    }
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(server).await else {
                        return;
                    };
                    if client
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        AzureStandIn {
            ca_pem: ca_cert.pem(),
            proxy: format!("http://{proxy_addr}"),
            knobs,
            state,
        }
    }

    /// Creates key `name` (a first version, or a new one) of type `kty` (`EC` on P-256, or
    /// `RSA`), as an operator would with `az keyvault key create`.
    pub fn create_key(&self, name: &str, kty: &str) {
        let body = serde_json::json!({"kty": kty, "crv": "P-256"}).to_string();
        let r = self.state.vault(
            &hyper::Method::POST,
            &["keys", name, "create"],
            body.as_bytes(),
        );
        assert_eq!(r.status(), StatusCode::OK, "create key {name}");
    }

    /// The versions of key `name`, oldest first.
    pub fn versions(&self, name: &str) -> Vec<String> {
        self.state
            .keys
            .lock()
            .expect("keys")
            .get(name)
            .map(|vs| vs.iter().map(|v| v.id.clone()).collect())
            .unwrap_or_default()
    }
}
