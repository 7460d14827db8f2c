//! Ferry browser and mini-program SDK (work in progress, issue 6).
