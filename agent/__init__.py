"""The Kumo node agent: configuration, plugin manager, runtime loop, controller client, metrics."""
