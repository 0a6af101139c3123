//! `sqlx::migrate!` (crates/ledger/src/store/mod.rs) embeds the migration files it finds when the
//! crate compiles, but Cargo tracks only the files it already embedded: a newly added migration
//! would be missing from the binary until something else changed. Watching the directories makes
//! Cargo rebuild the crate whenever a migration is added, changed or removed.
fn main() {
    println!("cargo:rerun-if-changed=../../migrations/postgres");
    println!("cargo:rerun-if-changed=../../migrations/sqlite");
}
