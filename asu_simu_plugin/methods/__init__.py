"""The unlearning methods: one module or subpackage each, registering itself with one
`asu_simu_plugin.registry.register_method` call (the registry imports every one of them)."""
