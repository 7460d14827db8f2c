// swift-tools-version:5.9
// The Ferry SDK as a Swift package: `Ferry` is the generated Swift API,
// `FerryFFI` the Rust library with its C header and module map, as an
// xcframework built by build-xcframework.sh on a Mac.
import PackageDescription

// Local builds use the xcframework next to this file. A release sets these
// two to the uploaded FerryFFI.xcframework.zip and the checksum that
// build-xcframework.sh prints (`swift package compute-checksum`), so apps
// adding the package by URL download the binary instead of building Rust.
let ferryFFIURL: String? = nil
let ferryFFIChecksum = ""

let ferryFFI: Target = ferryFFIURL.map { .binaryTarget(name: "FerryFFI", url: $0, checksum: ferryFFIChecksum) }
    ?? .binaryTarget(name: "FerryFFI", path: "FerryFFI.xcframework")

let package = Package(
    name: "Ferry",
    platforms: [.iOS(.v15), .macOS(.v12)],
    products: [
        .library(name: "Ferry", targets: ["Ferry"]),
    ],
    targets: [
        ferryFFI,
        .target(name: "Ferry", dependencies: ["FerryFFI"], path: "Sources/Ferry"),
    ]
)
