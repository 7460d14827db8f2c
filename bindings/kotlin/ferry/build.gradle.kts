// The Ferry SDK as an Android library (AAR): the generated Kotlin in
// src/main/kotlin, the Rust library per ABI in src/main/jniLibs (built by
// ../build-android.sh), JNA to call it. Published as
// dev.ferry:ferry-android:<version> with maven-publish (README.md).
plugins {
    id("com.android.library")
    id("org.jetbrains.kotlin.android")
    id("maven-publish")
}

// Keep in step with the workspace version in the root Cargo.toml;
// `-PferryVersion=...` overrides it for a release build.
val ferryVersion: String = (findProperty("ferryVersion") as String?) ?: "0.1.0"
group = "dev.ferry"
version = ferryVersion

android {
    namespace = "dev.ferry.sdk"
    compileSdk = 34
    defaultConfig {
        minSdk = 24
        consumerProguardFiles("consumer-rules.pro")
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions {
        jvmTarget = "17"
    }
    // The one variant apps depend on, with sources for IDE navigation.
    publishing {
        singleVariant("release") {
            withSourcesJar()
        }
    }
}

dependencies {
    // The AAR flavour ships JNA's own native dispatch library per ABI.
    implementation("net.java.dev.jna:jna:5.14.0@aar")
    // Generated `suspend fun`s resume through kotlinx.coroutines.
    implementation("org.jetbrains.kotlinx:kotlinx-coroutines-core:1.8.1")
}

publishing {
    publications {
        register<MavenPublication>("release") {
            groupId = "dev.ferry"
            artifactId = "ferry-android"
            version = ferryVersion
            // AGP creates the "release" component only after evaluation.
            afterEvaluate { from(components["release"]) }
            pom {
                name.set("Ferry for Android")
                description.set("Ferry real-time messaging client: the Rust core via UniFFI and JNA")
                licenses {
                    license {
                        name.set("Apache-2.0")
                        url.set("https://www.apache.org/licenses/LICENSE-2.0")
                    }
                }
            }
        }
    }
    repositories {
        // A plain directory laid out as a Maven repository: upload it to any
        // static host, or point an app at it with maven { url = uri(...) }.
        // `-PferryRepo=<url or dir>` publishes elsewhere (credentials from
        // ferryRepoUser/ferryRepoPassword properties when given).
        maven {
            name = "ferry"
            url = uri((findProperty("ferryRepo") as String?) ?: rootProject.layout.buildDirectory.dir("maven").get().asFile.path)
            val user = findProperty("ferryRepoUser") as String?
            if (user != null) {
                credentials {
                    username = user
                    password = findProperty("ferryRepoPassword") as String?
                }
            }
        }
    }
}
