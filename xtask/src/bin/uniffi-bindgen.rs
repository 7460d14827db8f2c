//! UniFFI's bindings generator, pinned to the uniffi version ferry-ffi uses
//! (a generator from another version would not match the scaffolding).

fn main() {
    uniffi::uniffi_bindgen_main()
}
