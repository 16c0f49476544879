"""Built-in model-family plugins, one module per family, each registered by entry point."""
