//! Ferry mobile SDK through UniFFI (work in progress, issue 7).
