//! Presence: who is subscribed to each channel, per connection and per
//! user, with a leave grace period so a quick reconnect does not flap.
//!
//! [`Presence`] is the engine seam; [`MemoryPresence`] is the single-node
//! implementation. A networked engine keeps the same entries with expiry.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use ferry_core::frame::ClientInfo;

/// What a join or leave means for the channel's join/leave pushes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing to announce (another connection of the user is present, or
    /// the user came back within the grace period).
    None,
    /// The user's first connection: announce a join.
    Join(ClientInfo),
    /// The user's last connection left: announce a leave after the grace
    /// period unless [`Presence::settle_leave`] finds them back.
    LeavePending {
        /// User key.
        user: String,
        /// Token that `settle_leave` must present.
        generation: u64,
    },
}

/// Counts for a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Stats {
    /// Connections.
    pub clients: u32,
    /// Distinct users.
    pub users: u32,
}

/// The presence engine seam.
pub trait Presence: Send + Sync + 'static {
    /// A connection subscribed.
    fn join(&self, channel: &str, conn: u64, info: &ClientInfo) -> Change;
    /// A connection left.
    fn leave(&self, channel: &str, conn: u64) -> Change;
    /// After the grace period: the leave to announce, if the user is still gone.
    fn settle_leave(&self, channel: &str, user: &str, generation: u64) -> Option<ClientInfo>;
    /// Connections present, ordered by connection id, after `after`, at most `limit`.
    fn list(&self, channel: &str, after: Option<&str>, limit: usize) -> Vec<ClientInfo>;
    /// Counts.
    fn stats(&self, channel: &str) -> Stats;
    /// A connection of `user` opened (anywhere).
    fn user_up(&self, user: &str);
    /// A connection of `user` closed.
    fn user_down(&self, user: &str);
    /// Which of `users` have at least one connection.
    fn online(&self, users: &[String]) -> Vec<String>;
}

#[derive(Default)]
struct UserEntry {
    conns: usize,
    leaving: bool,
    generation: u64,
    last: ClientInfo,
}

#[derive(Default)]
struct ChannelEntry {
    conns: BTreeMap<u64, ClientInfo>,
    users: HashMap<String, UserEntry>,
}

#[derive(Default)]
struct State {
    channels: HashMap<String, ChannelEntry>,
    online: HashMap<String, usize>,
}

/// Single-node presence in memory.
#[derive(Default)]
pub struct MemoryPresence {
    state: Mutex<State>,
}

/// Anonymous connections count as users of their own.
fn user_key(info: &ClientInfo) -> String {
    if info.user.is_empty() {
        format!("\u{0}anon:{}", info.client)
    } else {
        info.user.clone()
    }
}

impl MemoryPresence {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Presence for MemoryPresence {
    fn join(&self, channel: &str, conn: u64, info: &ClientInfo) -> Change {
        let mut st = self.lock();
        let ch = st.channels.entry(channel.to_string()).or_default();
        if ch.conns.insert(conn, info.clone()).is_some() {
            return Change::None;
        }
        let u = ch.users.entry(user_key(info)).or_default();
        u.conns += 1;
        u.last = info.clone();
        if u.conns > 1 {
            return Change::None;
        }
        if u.leaving {
            // Back within the grace period: the pending leave is cancelled.
            u.leaving = false;
            u.generation += 1;
            return Change::None;
        }
        Change::Join(info.clone())
    }

    fn leave(&self, channel: &str, conn: u64) -> Change {
        let mut st = self.lock();
        let Some(ch) = st.channels.get_mut(channel) else {
            return Change::None;
        };
        let Some(info) = ch.conns.remove(&conn) else {
            return Change::None;
        };
        let key = user_key(&info);
        let Some(u) = ch.users.get_mut(&key) else {
            return Change::None;
        };
        u.conns = u.conns.saturating_sub(1);
        if u.conns > 0 {
            return Change::None;
        }
        u.leaving = true;
        u.generation += 1;
        Change::LeavePending { user: key, generation: u.generation }
    }

    fn settle_leave(&self, channel: &str, user: &str, generation: u64) -> Option<ClientInfo> {
        let mut st = self.lock();
        let ch = st.channels.get_mut(channel)?;
        let u = ch.users.get(user)?;
        if !u.leaving || u.generation != generation || u.conns > 0 {
            return None;
        }
        let info = u.last.clone();
        ch.users.remove(user);
        if ch.users.is_empty() && ch.conns.is_empty() {
            st.channels.remove(channel);
        }
        Some(info)
    }

    fn list(&self, channel: &str, after: Option<&str>, limit: usize) -> Vec<ClientInfo> {
        let st = self.lock();
        let Some(ch) = st.channels.get(channel) else {
            return Vec::new();
        };
        let mut v: Vec<ClientInfo> = ch.conns.values().cloned().collect();
        v.sort_by(|a, b| a.client.cmp(&b.client));
        v.into_iter().filter(|c| after.is_none_or(|a| c.client.as_str() > a)).take(limit).collect()
    }

    fn stats(&self, channel: &str) -> Stats {
        let st = self.lock();
        let Some(ch) = st.channels.get(channel) else {
            return Stats::default();
        };
        let users = ch.users.values().filter(|u| u.conns > 0).count();
        Stats { clients: ch.conns.len() as u32, users: users as u32 }
    }

    fn user_up(&self, user: &str) {
        if !user.is_empty() {
            *self.lock().online.entry(user.to_string()).or_default() += 1;
        }
    }

    fn user_down(&self, user: &str) {
        let mut st = self.lock();
        if let Some(n) = st.online.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                st.online.remove(user);
            }
        }
    }

    fn online(&self, users: &[String]) -> Vec<String> {
        let st = self.lock();
        users.iter().filter(|u| st.online.contains_key(*u)).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(client: &str, user: &str) -> ClientInfo {
        ClientInfo { client: client.into(), user: user.into(), info: None }
    }

    #[test]
    fn join_leave_with_grace() {
        let p = MemoryPresence::default();
        assert_eq!(p.join("c", 1, &info("a", "u1")), Change::Join(info("a", "u1")));
        assert_eq!(p.join("c", 2, &info("b", "u1")), Change::None, "second connection of the same user");
        assert_eq!(p.stats("c"), Stats { clients: 2, users: 1 });
        assert_eq!(p.leave("c", 1), Change::None);
        let Change::LeavePending { user, generation } = p.leave("c", 2) else { panic!() };
        // Quick reconnect: no leave, no second join.
        assert_eq!(p.join("c", 3, &info("c", "u1")), Change::None);
        assert_eq!(p.settle_leave("c", &user, generation), None);
        let Change::LeavePending { user, generation } = p.leave("c", 3) else { panic!() };
        assert_eq!(p.settle_leave("c", &user, generation), Some(info("c", "u1")));
        assert_eq!(p.stats("c"), Stats::default());
        // Anonymous connections are users of their own.
        p.join("c", 4, &info("x", ""));
        p.join("c", 5, &info("y", ""));
        assert_eq!(p.stats("c").users, 2);
        assert_eq!(p.list("c", None, 1), vec![info("x", "")]);
        assert_eq!(p.list("c", Some("x"), 10), vec![info("y", "")]);
    }
}
