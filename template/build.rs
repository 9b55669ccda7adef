// `sqlx::migrate!` embeds `migrations/` at compile time; without this, Cargo would not notice a
// new migration file and `migrate` would run the old list.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
