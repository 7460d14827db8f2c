// swift-tools-version:5.9
// The Ferry SDK as a Swift package: `Ferry` is the generated Swift API,
// `FerryFFI` the Rust library with its C header and module map, as an
// xcframework built by build-xcframework.sh on a Mac.
import PackageDescription

let package = Package(
    name: "Ferry",
    platforms: [.iOS(.v15), .macOS(.v12)],
    products: [
        .library(name: "Ferry", targets: ["Ferry"]),
    ],
    targets: [
        .binaryTarget(name: "FerryFFI", path: "FerryFFI.xcframework"),
        .target(name: "Ferry", dependencies: ["FerryFFI"], path: "Sources/Ferry"),
    ]
)
