pub mod fjall;
pub mod redb;
pub mod sqlite;
