//! Channel names: `namespace:rest`, and personal channels `#user:<id>`.

use ferry_core::frame::ErrorReply;
use ferry_core::ErrorCode;

/// Longest channel name, bytes.
pub const MAX_CHANNEL_LEN: usize = 255;

/// Prefix of personal channels: `#user:42` belongs to user `42`.
pub const PERSONAL_PREFIX: &str = "#user:";

/// The namespace of a channel: the part before the first `:`, or `""`.
pub fn namespace_of(channel: &str) -> &str {
    let name = channel.strip_prefix('#').unwrap_or(channel);
    name.split_once(':').map(|(ns, _)| ns).unwrap_or("")
}

/// The owner of a personal channel.
pub fn personal_owner(channel: &str) -> Option<&str> {
    channel.strip_prefix(PERSONAL_PREFIX).filter(|u| !u.is_empty())
}

/// The personal channel of a user.
pub fn personal_channel(user: &str) -> String {
    format!("{PERSONAL_PREFIX}{user}")
}

/// Check a channel name: 1-255 bytes of printable ASCII without spaces.
pub fn validate(channel: &str) -> Result<(), ErrorReply> {
    let ok = !channel.is_empty() && channel.len() <= MAX_CHANNEL_LEN && channel.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(ErrorReply::with_message(
            ErrorCode::UnknownChannel,
            "channel names are 1-255 printable ASCII characters without spaces",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(namespace_of("chat:lobby"), "chat");
        assert_eq!(namespace_of("lobby"), "");
        assert_eq!(namespace_of("#user:42"), "user");
        assert_eq!(personal_owner("#user:42"), Some("42"));
        assert_eq!(personal_owner("#user:"), None);
        assert_eq!(personal_owner("user:42"), None);
        assert!(validate("chat:lobby").is_ok());
        assert!(validate("").is_err());
        assert!(validate("a b").is_err());
        assert!(validate(&"x".repeat(256)).is_err());
    }
}
