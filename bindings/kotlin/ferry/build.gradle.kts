// The Ferry SDK as an Android library (AAR): the generated Kotlin in
// src/main/kotlin, the Rust library per ABI in src/main/jniLibs (built by
// ../build-android.sh), JNA to call it.
plugins {
    id("com.android.library")
    id("org.jetbrains.kotlin.android")
}

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
}

dependencies {
    // The AAR flavour ships JNA's own native dispatch library per ABI.
    implementation("net.java.dev.jna:jna:5.14.0@aar")
    // Generated `suspend fun`s resume through kotlinx.coroutines.
    implementation("org.jetbrains.kotlinx:kotlinx-coroutines-core:1.8.1")
}
