//! Connection authentication: JWT (HS256, RS256, ES256; keys from the
//! config and/or a JWKS URL) with pinned algorithms, or a development mode
//! where the token is the user id.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::frame::{Bytes, ErrorReply};
use ferry_core::ErrorCode;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::AuthConfig;

/// Who a verified token says the connection is.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Identity {
    /// User id (empty = anonymous).
    pub user: String,
    /// Connection info, shown in presence.
    pub info: Option<Bytes>,
    /// Token expiry, Unix seconds; none = never.
    pub expires_at: Option<u64>,
    /// Channels the token grants (and asks to subscribe to).
    pub channels: Vec<String>,
}

impl Identity {
    /// Time left before expiry, from `now` (Unix seconds).
    pub fn expires_in(&self, now: u64) -> Option<Duration> {
        self.expires_at.map(|e| Duration::from_secs(e.saturating_sub(now)))
    }
}

/// Claims of a connection token.
#[derive(Debug, Serialize, Deserialize, Default)]
pub struct Claims {
    /// User id; empty = anonymous.
    #[serde(default)]
    pub sub: String,
    /// Expiry, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    /// Connection info (any JSON), shown in presence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
    /// Channels granted to this connection.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
}

enum Mode {
    /// The token is the user id: for development only.
    Dev,
    Jwt {
        keys: Vec<(Algorithm, DecodingKey)>,
        validation: Box<Validation>,
        jwks: Option<Arc<Jwks>>,
    },
}

/// Keys fetched from a JWKS URL, by key id, refreshed in the background.
pub struct Jwks {
    url: crate::http_client::Url,
    http: crate::http_client::HttpClient,
    allowed: Vec<Algorithm>,
    refresh: Duration,
    keys: std::sync::RwLock<HashMap<String, (Algorithm, DecodingKey)>>,
    wake: tokio::sync::Notify,
}

/// Unknown key ids trigger at most one fetch this often.
const JWKS_MIN_GAP: Duration = Duration::from_secs(5);
/// Largest JWKS document accepted.
const JWKS_MAX_BYTES: usize = 1 << 20;

impl Jwks {
    /// Fetch the set once; keeps the previous keys when it fails.
    pub async fn fetch(&self) -> Result<usize, String> {
        let r = self
            .http
            .request("GET", &self.url, &[("Accept", "application/json")], b"", Duration::from_secs(10), JWKS_MAX_BYTES)
            .await?;
        if r.status != 200 {
            return Err(format!("HTTP {}", r.status));
        }
        let set: jsonwebtoken::jwk::JwkSet =
            serde_json::from_slice(&r.body).map_err(|e| format!("not a JWK set: {e}"))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = &jwk.common.key_id else { continue };
            // Symmetric keys are never taken from a URL, and a key only ever
            // verifies its own algorithm: no key confusion.
            let alg = match (&jwk.common.key_algorithm, &jwk.algorithm) {
                (_, jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)) => continue,
                (Some(ka), _) => match ka.to_string().parse::<Algorithm>() {
                    Ok(a) => a,
                    Err(_) => continue,
                },
                (None, jsonwebtoken::jwk::AlgorithmParameters::RSA(_)) => Algorithm::RS256,
                (None, jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(p)) => match p.curve {
                    jsonwebtoken::jwk::EllipticCurve::P256 => Algorithm::ES256,
                    jsonwebtoken::jwk::EllipticCurve::P384 => Algorithm::ES384,
                    _ => continue,
                },
                (None, jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(_)) => Algorithm::EdDSA,
            };
            if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) || !self.allowed.contains(&alg) {
                continue;
            }
            match DecodingKey::from_jwk(jwk) {
                Ok(k) => {
                    keys.insert(kid.clone(), (alg, k));
                }
                Err(e) => tracing::warn!(kid, "JWKS key skipped: {e}"),
            }
        }
        let n = keys.len();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        Ok(n)
    }

    /// Refetch every `refresh`, and soon after an unknown key id was seen.
    pub async fn run(self: Arc<Self>) {
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(last + self.refresh) => {}
                _ = self.wake.notified() => {
                    tokio::time::sleep_until(last + JWKS_MIN_GAP).await;
                }
            }
            last = tokio::time::Instant::now();
            match self.fetch().await {
                Ok(n) => tracing::debug!(keys = n, "JWKS refreshed"),
                Err(e) => tracing::warn!(url = %self.url.path, "JWKS refresh failed (keeping the old keys): {e}"),
            }
        }
    }

    fn get(&self, kid: &str) -> Option<(Algorithm, DecodingKey)> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).get(kid).cloned()
    }

    fn by_alg(&self, alg: Algorithm) -> Vec<DecodingKey> {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|(a, _)| *a == alg)
            .map(|(_, k)| k.clone())
            .collect()
    }
}

/// The verifier built from the `[auth]` config.
pub struct Auth {
    mode: Mode,
    allow_anonymous: bool,
    failures: Failures,
}

/// Which credential was refused: the `credential` label of
/// `ferry_auth_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Credential {
    /// A connection token (connect or refresh).
    Token,
    /// A subscription token for a private channel.
    SubscriptionToken,
    /// A backend API key.
    ApiKey,
}

/// Why a credential was refused: the `reason` label of
/// `ferry_auth_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Failure {
    /// No credential (an empty token with anonymous access off, no API key).
    Missing,
    /// Not a JWT (bad base64, JSON or structure).
    Malformed,
    /// An algorithm not allowed, or not the one of the key it names.
    Algorithm,
    /// Signed with a key id not (yet) in the JWKS.
    UnknownKey,
    /// Past its `exp` (plus the leeway).
    Expired,
    /// The signature does not verify.
    BadSignature,
    /// A required claim is missing or a claim is not valid (`nbf`, ...).
    BadClaims,
    /// A valid token for another user (refresh) or channel (subscription).
    WrongSubject,
    /// An API key that is not configured.
    WrongKey,
}

impl Credential {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Credential::Token => "token",
            Credential::SubscriptionToken => "subscription_token",
            Credential::ApiKey => "api_key",
        }
    }
}

impl Failure {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Missing => "missing",
            Failure::Malformed => "malformed",
            Failure::Algorithm => "algorithm",
            Failure::UnknownKey => "unknown_key",
            Failure::Expired => "expired",
            Failure::BadSignature => "bad_signature",
            Failure::BadClaims => "bad_claims",
            Failure::WrongSubject => "wrong_subject",
            Failure::WrongKey => "wrong_key",
        }
    }
}

/// Refusals counted by (credential, reason).
struct Failures(std::sync::Mutex<std::collections::BTreeMap<(Credential, Failure), u64>>);

impl Default for Failures {
    fn default() -> Self {
        use Failure::*;
        // Every pair that can happen starts at 0, so a rate over it exists
        // before the first refusal.
        let jwt = [Malformed, Algorithm, UnknownKey, Expired, BadSignature, BadClaims, WrongSubject];
        let mut m = std::collections::BTreeMap::new();
        for f in jwt.iter().chain(&[Missing]) {
            m.insert((Credential::Token, *f), 0);
        }
        for f in jwt {
            m.insert((Credential::SubscriptionToken, f), 0);
        }
        for f in [Missing, WrongKey] {
            m.insert((Credential::ApiKey, f), 0);
        }
        Failures(std::sync::Mutex::new(m))
    }
}

/// Read a PEM given inline or as a file path.
fn pem(v: &str) -> anyhow::Result<Vec<u8>> {
    if v.contains("-----BEGIN") {
        Ok(v.as_bytes().to_vec())
    } else {
        std::fs::read(v).map_err(|e| anyhow::anyhow!("{v}: {e}"))
    }
}

impl Auth {
    /// Build from config; JWT mode when any key or a JWKS URL is configured.
    pub fn from_config(c: &AuthConfig, allow_anonymous: bool) -> anyhow::Result<Auth> {
        Auth::from_config_with(c, allow_anonymous, None)
    }

    /// Like [`Auth::from_config`], fetching the JWKS with `http` (default:
    /// the public web roots only). Start [`Auth::jwks`]'s `run` to refresh.
    pub fn from_config_with(
        c: &AuthConfig,
        allow_anonymous: bool,
        http: Option<crate::http_client::HttpClient>,
    ) -> anyhow::Result<Auth> {
        let mut keys = Vec::new();
        if let Some(secret) = &c.hmac_secret {
            check_hmac_secret(secret).map_err(|e| anyhow::anyhow!("auth.hmac_secret {e}"))?;
            keys.push((Algorithm::HS256, DecodingKey::from_secret(secret.as_bytes())));
        }
        if let Some(k) = &c.rsa_public_key {
            keys.push((Algorithm::RS256, DecodingKey::from_rsa_pem(&pem(k)?)?));
        }
        if let Some(k) = &c.ec_public_key {
            keys.push((Algorithm::ES256, DecodingKey::from_ec_pem(&pem(k)?)?));
        }
        let jwks_url = c.jwks_url.as_deref().filter(|u| !u.is_empty());
        if keys.is_empty() && jwks_url.is_none() {
            return Ok(Auth { mode: Mode::Dev, allow_anonymous, failures: Failures::default() });
        }
        // Pinned: only the configured algorithms, each with its own key
        // type, so an HS256 token "signed" with a public RSA key is refused.
        let allowed: Vec<Algorithm> = match &c.algorithms {
            Some(list) => list
                .iter()
                .map(|a| a.parse::<Algorithm>().map_err(|_| anyhow::anyhow!("auth.algorithms: unknown {a}")))
                .collect::<Result<_, _>>()?,
            None => {
                let mut a: Vec<Algorithm> = keys.iter().map(|(a, _)| *a).collect();
                if jwks_url.is_some() {
                    for x in [Algorithm::RS256, Algorithm::ES256] {
                        if !a.contains(&x) {
                            a.push(x);
                        }
                    }
                }
                a
            }
        };
        anyhow::ensure!(!allowed.is_empty(), "auth.algorithms must not be empty");
        for a in &allowed {
            let from_jwks = jwks_url.is_some() && !matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
            anyhow::ensure!(
                from_jwks || keys.iter().any(|(k, _)| k == a),
                "auth.algorithms: no key configured for {a:?}"
            );
        }
        keys.retain(|(a, _)| allowed.contains(a));
        let jwks = match jwks_url {
            Some(u) => {
                let url = crate::http_client::Url::parse(u).map_err(|e| anyhow::anyhow!("auth.jwks_url: {e}"))?;
                let http = match http {
                    Some(h) => h,
                    None => crate::http_client::HttpClient::new(crate::tls::client_config(None)?),
                };
                Some(Arc::new(Jwks {
                    url,
                    http,
                    allowed: allowed.clone(),
                    refresh: Duration::from_secs(c.jwks_refresh_secs.max(10)),
                    keys: Default::default(),
                    wake: tokio::sync::Notify::new(),
                }))
            }
            None => None,
        };
        let mut validation = Validation::new(allowed[0]);
        validation.algorithms = allowed;
        validation.leeway = c.leeway_secs;
        validation.validate_exp = true;
        validation.required_spec_claims = if c.require_exp { ["exp".to_string()].into() } else { Default::default() };
        Ok(Auth {
            mode: Mode::Jwt { keys, validation: Box::new(validation), jwks },
            allow_anonymous,
            failures: Failures::default(),
        })
    }

    /// The JWKS fetcher, when `auth.jwks_url` is set.
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        match &self.mode {
            Mode::Jwt { jwks, .. } => jwks.as_ref(),
            Mode::Dev => None,
        }
    }

    /// The keys that may have signed a token with this header: the JWKS
    /// key named by `kid`, else the configured key for the algorithm, else
    /// (no `kid`) every JWKS key of the algorithm.
    fn keys_for(&self, header: &Header) -> Result<Vec<DecodingKey>, KeyMiss> {
        let Mode::Jwt { keys, jwks, validation } = &self.mode else { return Err(KeyMiss::NotAllowed) };
        if !validation.algorithms.contains(&header.alg) {
            return Err(KeyMiss::NotAllowed);
        }
        let fixed = keys.iter().find(|(a, _)| *a == header.alg).map(|(_, k)| k.clone());
        match (jwks, &header.kid) {
            (Some(j), Some(kid)) => match j.get(kid) {
                Some((alg, k)) if alg == header.alg => Ok(vec![k]),
                Some(_) => Err(KeyMiss::WrongAlgorithm),
                None => match fixed {
                    Some(k) => Ok(vec![k]),
                    None => {
                        // Perhaps a key rotated in after the last fetch.
                        j.wake.notify_one();
                        Err(KeyMiss::UnknownKid)
                    }
                },
            },
            (Some(j), None) => match fixed {
                Some(k) => Ok(vec![k]),
                None => Ok(j.by_alg(header.alg)),
            },
            (None, _) => fixed.map(|k| vec![k]).ok_or(KeyMiss::NotAllowed),
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, token: &str) -> Result<T, DecodeFailure> {
        let Mode::Jwt { validation, .. } = &self.mode else { return Err(DecodeFailure::Miss(KeyMiss::NotAllowed)) };
        let header = jsonwebtoken::decode_header(token).map_err(|_| DecodeFailure::Malformed)?;
        let keys = self.keys_for(&header).map_err(DecodeFailure::Miss)?;
        // Checked against the pinned list above; jsonwebtoken wants every
        // listed algorithm to fit the key, so list just this one.
        let mut validation = validation.as_ref().clone();
        validation.algorithms = vec![header.alg];
        let mut last = None;
        for key in &keys {
            match jsonwebtoken::decode::<T>(token, key, &validation) {
                Ok(d) => return Ok(d.claims),
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) => DecodeFailure::Invalid(e),
            None => DecodeFailure::Miss(KeyMiss::UnknownKid),
        })
    }
}

/// Why no key could check a token.
enum KeyMiss {
    NotAllowed,
    WrongAlgorithm,
    UnknownKid,
}

enum DecodeFailure {
    Malformed,
    Miss(KeyMiss),
    Invalid(jsonwebtoken::errors::Error),
}

impl DecodeFailure {
    fn failure(&self) -> Failure {
        use jsonwebtoken::errors::ErrorKind as K;
        match self {
            DecodeFailure::Malformed => Failure::Malformed,
            DecodeFailure::Miss(KeyMiss::NotAllowed | KeyMiss::WrongAlgorithm) => Failure::Algorithm,
            DecodeFailure::Miss(KeyMiss::UnknownKid) => Failure::UnknownKey,
            DecodeFailure::Invalid(e) => match e.kind() {
                K::ExpiredSignature => Failure::Expired,
                K::InvalidSignature => Failure::BadSignature,
                K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => Failure::Malformed,
                K::InvalidAlgorithm | K::InvalidAlgorithmName | K::MissingAlgorithm => Failure::Algorithm,
                _ => Failure::BadClaims,
            },
        }
    }

    /// `code` for a bad token, `expired` for one past its `exp`.
    fn reply(self, code: ErrorCode, expired: ErrorCode, what: &str) -> ErrorReply {
        match self {
            DecodeFailure::Malformed => ErrorReply::with_message(code, format!("malformed {what}")),
            DecodeFailure::Miss(KeyMiss::NotAllowed) => {
                ErrorReply::with_message(code, format!("{what} algorithm not allowed"))
            }
            DecodeFailure::Miss(KeyMiss::WrongAlgorithm) => {
                ErrorReply::with_message(code, format!("{what} algorithm does not match its key"))
            }
            // Temporary: the key set is being refetched; a retry may pass.
            DecodeFailure::Miss(KeyMiss::UnknownKid) => ErrorReply::with_message(
                ErrorCode::Unavailable,
                format!("{what} signed with an unknown key id; refreshing keys, retry"),
            ),
            DecodeFailure::Invalid(e) => match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                    ErrorReply::with_message(expired, format!("{what} expired"))
                }
                _ => ErrorReply::with_message(code, format!("invalid {what}: {e}")),
            },
        }
    }
}

impl Auth {
    /// Whether tokens are checked (else development mode).
    pub fn is_jwt(&self) -> bool {
        matches!(self.mode, Mode::Jwt { .. })
    }

    /// Count one refusal (for `ferry_auth_failures_total`).
    pub fn record_failure(&self, credential: Credential, failure: Failure) {
        *self.failures.0.lock().unwrap_or_else(|e| e.into_inner()).entry((credential, failure)).or_insert(0) += 1;
    }

    /// Refusals so far by (credential, reason), every possible pair listed.
    pub fn failures(&self) -> Vec<(Credential, Failure, u64)> {
        self.failures.0.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|((c, f), n)| (*c, *f, *n)).collect()
    }

    /// Verify a connection token.
    pub fn verify(&self, token: &str) -> Result<Identity, ErrorReply> {
        let id = match &self.mode {
            Mode::Dev => Identity { user: token.to_string(), ..Identity::default() },
            Mode::Jwt { .. } if token.is_empty() => Identity::default(),
            Mode::Jwt { .. } => {
                let c: Claims = self.decode(token).map_err(|f| {
                    self.record_failure(Credential::Token, f.failure());
                    f.reply(ErrorCode::Unauthorized, ErrorCode::TokenExpired, "token")
                })?;
                Identity {
                    user: c.sub,
                    info: c.info.map(|v| Bytes(serde_json::to_vec(&v).unwrap_or_default())),
                    expires_at: c.exp,
                    channels: c.channels,
                }
            }
        };
        if id.user.is_empty() && !self.allow_anonymous {
            self.record_failure(Credential::Token, Failure::Missing);
            return Err(unauthorized("anonymous access is off"));
        }
        Ok(id)
    }
}

/// Claims of a subscription token.
#[derive(Debug, Serialize, Deserialize, Default)]
pub struct SubscriptionClaims {
    /// User the grant is for.
    pub sub: String,
    /// Channel it grants.
    pub channel: String,
    /// Expiry, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
}

impl Auth {
    /// Check a subscription token for `user` and `channel`.
    pub fn verify_subscription(&self, token: &str, user: &str, channel: &str) -> Result<(), ErrorReply> {
        if !self.is_jwt() {
            return Err(ErrorReply::with_message(
                ErrorCode::PermissionDenied,
                "private channels need signed tokens (configure [auth])",
            ));
        }
        let denied = |m: &str| ErrorReply::with_message(ErrorCode::PermissionDenied, m);
        let c: SubscriptionClaims = self.decode(token).map_err(|f| {
            self.record_failure(Credential::SubscriptionToken, f.failure());
            f.reply(ErrorCode::PermissionDenied, ErrorCode::PermissionDenied, "subscription token")
        })?;
        if c.sub != user || c.channel != channel {
            self.record_failure(Credential::SubscriptionToken, Failure::WrongSubject);
            return Err(denied("subscription token is for another user or channel"));
        }
        Ok(())
    }
}

/// Sign an HS256 subscription token.
pub fn sign_subscription_hs256(secret: &str, claims: &SubscriptionClaims) -> anyhow::Result<String> {
    Ok(jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret.as_bytes()))?)
}

fn unauthorized(msg: &str) -> ErrorReply {
    ErrorReply::with_message(ErrorCode::Unauthorized, msg)
}

/// Shortest HS256 secret accepted, bytes: 256 bits, the size of the
/// SHA-256 output (RFC 7518 section 3.2 requires a key at least that long).
pub const MIN_HMAC_SECRET_LEN: usize = 32;

/// Refuse an HS256 secret shorter than [`MIN_HMAC_SECRET_LEN`] bytes; the
/// error reads after the secret's name (`auth.hmac_secret must be ...`).
pub fn check_hmac_secret(secret: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        secret.len() >= MIN_HMAC_SECRET_LEN,
        "must be at least {MIN_HMAC_SECRET_LEN} bytes (this one has {}); `ferry genconfig` prints a fresh one",
        secret.len()
    );
    Ok(())
}

/// Sign an HS256 token (for `ferry token` and tests).
pub fn sign_hs256(secret: &str, claims: &Claims) -> anyhow::Result<String> {
    Ok(jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret.as_bytes()))?)
}
