//! Connection authentication: JWT (HS256, RS256, ES256) with pinned
//! algorithms, or a development mode where the token is the user id.

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
    },
}

/// The verifier built from the `[auth]` config.
pub struct Auth {
    mode: Mode,
    allow_anonymous: bool,
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
    /// Build from config; JWT mode when any key is configured.
    pub fn from_config(c: &AuthConfig, allow_anonymous: bool) -> anyhow::Result<Auth> {
        let mut keys = Vec::new();
        if let Some(secret) = &c.hmac_secret {
            anyhow::ensure!(secret.len() >= 32, "auth.hmac_secret must be at least 32 bytes");
            keys.push((Algorithm::HS256, DecodingKey::from_secret(secret.as_bytes())));
        }
        if let Some(k) = &c.rsa_public_key {
            keys.push((Algorithm::RS256, DecodingKey::from_rsa_pem(&pem(k)?)?));
        }
        if let Some(k) = &c.ec_public_key {
            keys.push((Algorithm::ES256, DecodingKey::from_ec_pem(&pem(k)?)?));
        }
        if keys.is_empty() {
            return Ok(Auth { mode: Mode::Dev, allow_anonymous });
        }
        // Pinned: only the configured algorithms, each with its own key
        // type, so an HS256 token "signed" with a public RSA key is refused.
        let allowed: Vec<Algorithm> = match &c.algorithms {
            Some(list) => list
                .iter()
                .map(|a| a.parse::<Algorithm>().map_err(|_| anyhow::anyhow!("auth.algorithms: unknown {a}")))
                .collect::<Result<_, _>>()?,
            None => keys.iter().map(|(a, _)| *a).collect(),
        };
        for a in &allowed {
            anyhow::ensure!(keys.iter().any(|(k, _)| k == a), "auth.algorithms: no key configured for {a:?}");
        }
        keys.retain(|(a, _)| allowed.contains(a));
        let mut validation = Validation::new(allowed[0]);
        validation.algorithms = allowed;
        validation.leeway = c.leeway_secs;
        validation.validate_exp = true;
        validation.required_spec_claims = if c.require_exp { ["exp".to_string()].into() } else { Default::default() };
        Ok(Auth { mode: Mode::Jwt { keys, validation: Box::new(validation) }, allow_anonymous })
    }

    /// Whether tokens are checked (else development mode).
    pub fn is_jwt(&self) -> bool {
        matches!(self.mode, Mode::Jwt { .. })
    }

    /// Verify a connection token.
    pub fn verify(&self, token: &str) -> Result<Identity, ErrorReply> {
        let id = match &self.mode {
            Mode::Dev => Identity { user: token.to_string(), ..Identity::default() },
            Mode::Jwt { .. } if token.is_empty() => Identity::default(),
            Mode::Jwt { keys, validation } => {
                let header = jsonwebtoken::decode_header(token).map_err(|_| unauthorized("malformed token"))?;
                let Some((_, key)) = keys.iter().find(|(a, _)| *a == header.alg) else {
                    return Err(unauthorized("token algorithm not allowed"));
                };
                let data = jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                        ErrorReply::with_message(ErrorCode::TokenExpired, "token expired")
                    }
                    _ => unauthorized(&format!("invalid token: {e}")),
                })?;
                let c = data.claims;
                Identity {
                    user: c.sub,
                    info: c.info.map(|v| Bytes(serde_json::to_vec(&v).unwrap_or_default())),
                    expires_at: c.exp,
                    channels: c.channels,
                }
            }
        };
        if id.user.is_empty() && !self.allow_anonymous {
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
        let Mode::Jwt { keys, validation } = &self.mode else {
            return Err(ErrorReply::with_message(
                ErrorCode::PermissionDenied,
                "private channels need signed tokens (configure [auth])",
            ));
        };
        let denied = |m: &str| ErrorReply::with_message(ErrorCode::PermissionDenied, m);
        let header = jsonwebtoken::decode_header(token).map_err(|_| denied("malformed subscription token"))?;
        let Some((_, key)) = keys.iter().find(|(a, _)| *a == header.alg) else {
            return Err(denied("subscription token algorithm not allowed"));
        };
        let c = jsonwebtoken::decode::<SubscriptionClaims>(token, key, validation)
            .map_err(|e| denied(&format!("invalid subscription token: {e}")))?
            .claims;
        if c.sub != user || c.channel != channel {
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

/// Sign an HS256 token (for `ferry token` and tests).
pub fn sign_hs256(secret: &str, claims: &Claims) -> anyhow::Result<String> {
    Ok(jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret.as_bytes()))?)
}
