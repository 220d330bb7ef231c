"""Kumo's built-in plugins, one module (or package) each, registered as ``kumo.plugins`` entry points."""
