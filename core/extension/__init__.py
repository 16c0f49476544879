"""The plugin interface: the hooks a plugin implements (`hookspecs`), the plugin manager and the
registries it fills (`registry`), what a model family and a runtime declare (`family`, `runtime`), and
module selection by name (`matching`)."""
