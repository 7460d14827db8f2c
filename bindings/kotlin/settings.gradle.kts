// Android library project for the Ferry SDK: open this directory in Android
// Studio, or include `:ferry` from your app's settings (see README.md).
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}
dependencyResolutionManagement {
    repositories {
        google()
        mavenCentral()
    }
}
rootProject.name = "ferry-android"
include(":ferry")
